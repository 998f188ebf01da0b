"""Top-N metrics against hand-computed values, bounds, monotonicity, and the popularity baseline."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from flexmf_assets.errors import DataValidationError
from flexmf_assets.evaluation.topn import (
    PopularityBaseline,
    coverage,
    mean_popularity,
    topn_metrics,
)

L2 = math.log2


@pytest.fixture
def case():
    # user 1: test {b, d, x}; ranked a b c d -> hits at ranks 2 and 4 (x never recommended)
    # user 2: test {p}; ranked p q -> hit at rank 1 (fewer test items than k)
    # user 3: test {z}; no recommendations at all -> zeros
    recs = pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 4],
        "item_id": ["a", "b", "c", "d", "p", "q", "a"],
        "rank": [1, 2, 3, 4, 1, 2, 1],
    })
    test = pl.DataFrame({"user_id": [1, 1, 1, 2, 3], "item_id": ["b", "d", "x", "p", "z"]})
    return recs, test


def test_hand_computed_values(case):
    recs, test = case
    res = topn_metrics(recs, test, ks=(2, 4))
    u1 = res.per_user.filter(pl.col("user_id") == 1).row(0, named=True)
    # @2: one hit at rank 2
    assert u1["ndcg@2"] == pytest.approx((1 / L2(3)) / (1 + 1 / L2(3)))
    assert u1["recall@2"] == pytest.approx(1 / 3)
    assert u1["precision@2"] == pytest.approx(1 / 2)
    assert u1["hit@2"] == 1.0
    assert u1["mrr@2"] == pytest.approx(1 / 2)
    assert u1["map@2"] == pytest.approx((1 / 2) / 2)
    # @4: hits at ranks 2 and 4; ideal over min(4, 3) = 3 positions
    idcg = 1 + 1 / L2(3) + 1 / L2(4)
    assert u1["ndcg@4"] == pytest.approx((1 / L2(3) + 1 / L2(5)) / idcg)
    assert u1["recall@4"] == pytest.approx(2 / 3)
    assert u1["precision@4"] == pytest.approx(2 / 4)
    assert u1["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    u2 = res.per_user.filter(pl.col("user_id") == 2).row(0, named=True)
    assert u2["ndcg@4"] == 1.0 and u2["recall@4"] == 1.0 and u2["map@4"] == 1.0
    assert u2["precision@4"] == pytest.approx(1 / 4)
    u3 = res.per_user.filter(pl.col("user_id") == 3).row(0, named=True)
    assert all(u3[f"{m}@4"] == 0.0 for m in ("ndcg", "recall", "precision", "hit", "mrr", "map"))
    # user 4 is not a test user: ignored; macro mean over the 3 test users
    assert res.per_user["user_id"].to_list() == [1, 2, 3]
    assert res.means["ndcg@4"] == pytest.approx((u1["ndcg@4"] + 1.0 + 0.0) / 3)
    assert res.means["hit@2"] == pytest.approx(2 / 3)


def test_lenskit_discount_weighs_ranks_one_and_two_equally():
    recs = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "rank": [1, 2]})
    test = pl.DataFrame({"user_id": [1], "item_id": [2]})
    assert topn_metrics(recs, test, ks=(2,), discount="lenskit").means["ndcg@2"] == 1.0
    assert topn_metrics(recs, test, ks=(2,), discount="log2").means["ndcg@2"] == pytest.approx(1 / L2(3))


def test_score_ties_broken_by_item_id():
    recs = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [30, 10, 20], "score": [0.5, 0.5, 0.9]})
    test = pl.DataFrame({"user_id": [1], "item_id": [10]})
    # order: 20 (0.9), then the tie 10 before 30 -> item 10 at rank 2
    assert topn_metrics(recs, test, ks=(1, 2)).means["mrr@2"] == pytest.approx(1 / 2)


def test_duplicate_ranks_rejected():
    recs = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "rank": [1, 1]})
    with pytest.raises(DataValidationError, match="user 1 has rank 1 more than once"):
        topn_metrics(recs, pl.DataFrame({"user_id": [1], "item_id": [1]}))


def test_bounds_and_monotonicity_random():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    rows = []
    for u in range(n_users):
        for r, i in enumerate(rng.permutation(n_items)[:20], start=1):
            rows.append((u, int(i), r))
    recs = pl.DataFrame(rows, schema=["user_id", "item_id", "rank"], orient="row")
    test = pl.DataFrame({"user_id": rng.integers(0, n_users + 5, 150), "item_id": rng.integers(0, n_items, 150)})
    res = topn_metrics(recs, test, ks=(1, 5, 10, 20))
    for col in res.per_user.columns[2:]:
        assert res.per_user[col].min() >= 0.0 and res.per_user[col].max() <= 1.0 + 1e-12
    for m in ("recall", "hit"):
        for a, b in ((1, 5), (5, 10), (10, 20)):
            assert (res.per_user[f"{m}@{a}"] <= res.per_user[f"{m}@{b}"] + 1e-12).all()


def test_coverage_and_popularity():
    train = pl.DataFrame({"user_id": [1, 2, 3, 3], "item_id": [1, 1, 1, 2]})
    recs = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rank": [1, 1]})
    assert coverage(recs, 4) == 0.5
    assert mean_popularity(recs, train) == pytest.approx((3 / 3 + 1 / 3) / 2)


def test_popularity_baseline_excludes_seen_and_orders_by_popularity():
    train = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 3], "item_id": [10, 11, 10, 12, 10, 11, 13]})
    recs = PopularityBaseline().fit(train).recommend(n=2)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    by_user = {u: g.sort("rank")["item_id"].to_list() for (u,), g in recs.group_by("user_id")}
    assert by_user == {1: [12, 13], 2: [11, 13], 3: [12]}  # user 3 has seen all but 12
    unseen = PopularityBaseline().fit(train).recommend([99], n=3, exclude_seen=False)
    assert unseen["item_id"].to_list() == [10, 11, 12] and unseen["rank"].to_list() == [1, 2, 3]
