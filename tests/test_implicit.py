"""FlexMFImplicitScorer on a planted-cluster implicit dataset: every loss/sampler beats popularity."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from flexmf_assets.errors import DataValidationError
from flexmf_assets.evaluation.topn import PopularityBaseline, topn_metrics
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    """200 users, 120 items in 4 clusters; users like items of their cluster, plus popular noise."""
    rng = np.random.default_rng(7)
    n_users, n_items, n_clusters = 200, 120, 4
    item_cluster = np.arange(n_items) % n_clusters
    train, test = [], []
    for u in range(n_users):
        own = np.flatnonzero(item_cluster == u % n_clusters)
        liked = rng.choice(own, 18, replace=False)
        noise = rng.choice(np.arange(12), 3, replace=False)  # globally popular items 0..11
        for i in liked[:3]:
            test.append((u, int(i)))
        for i in set(liked[3:].tolist()) | set(noise.tolist()):
            if (u, int(i)) not in test:
                train.append((u, int(i), 4.0))
    train = pl.DataFrame(train, schema=["user_id", "item_id", "rating"], orient="row")
    test = pl.DataFrame(test, schema=["user_id", "item_id"], orient="row")
    pop = PopularityBaseline().fit(train).recommend(test["user_id"].unique(), n=10)
    return train, test, topn_metrics(pop, test, ks=(10,)).means["ndcg@10"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"preset": "bpr"},
        {"preset": "warp"},
        {"loss": "logistic", "negative_strategy": "popular"},
        {"loss": "pairwise", "negative_strategy": "misranked"},
        {"loss": "logistic", "negative_strategy": "misranked", "reg_method": "L2", "regularization": 1e-4},
    ],
)
def test_each_loss_and_sampler_beats_popularity(planted, overrides):
    train, test, pop_ndcg = planted
    model = FlexMFImplicitScorer(embedding_size=16, epochs=15, batch_size=256, learning_rate=0.02,
                                 device="cpu", **overrides).fit(train)
    recs = model.recommend(test["user_id"].unique(), n=10)
    ndcg = topn_metrics(recs, test, ks=(10,)).means["ndcg@10"]
    assert pop_ndcg < 0.15
    # a perfect cluster model ranks 3 test items among ~15 unseen in-cluster items: ndcg ~0.4
    assert ndcg > max(0.25, 3 * pop_ndcg), (overrides, ndcg, pop_ndcg)
    assert model.epochs_run == 15 and len(model.history) == 15
    assert model.updates_per_second > 0


def test_recommend_excludes_seen_and_ranks_in_order(planted):
    train, test, _ = planted
    model = FlexMFImplicitScorer(embedding_size=8, epochs=2, device="cpu").fit(train)
    recs = model.recommend(n=15)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.join(train, on=["user_id", "item_id"], how="inner").height == 0
    for _, g in recs.group_by("user_id"):
        assert g["rank"].to_list() == list(range(1, g.height + 1))
        assert (g["score"].diff().drop_nulls() <= 0).all()
    again = model.recommend([0, 1], n=5, exclude_seen=False)
    scores = model.predict(again["user_id"], again["item_id"])
    np.testing.assert_allclose(scores, again["score"].to_numpy(), rtol=1e-5)


def test_early_stopping_restores_best_epoch_and_save_load(planted, tmp_path):
    train, test, _ = planted
    model = FlexMFImplicitScorer(embedding_size=16, epochs=12, batch_size=256, learning_rate=0.05,
                                 patience=2, device="cpu").fit(train, validation=test)
    curve = [row["val_ndcg"] for row in model.history]
    assert model.best_epoch == int(np.argmax(curve)) + 1
    recs = model.recommend(test["user_id"].unique(), n=10)
    assert topn_metrics(recs, test, ks=(10,)).means["ndcg@10"] == pytest.approx(max(curve))
    model.save(tmp_path / "m")
    back = FlexMFImplicitScorer.load(tmp_path / "m", device="cpu")
    assert back.config == model.config and back.best_epoch == model.best_epoch
    assert back.recommend(n=5).equals(model.recommend(n=5))


def test_min_rating_filters_interactions():
    train = pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "rating": [5.0, 1.0, 4.0, 2.0]})
    model = FlexMFImplicitScorer(min_rating=3.0, epochs=1, device="cpu")
    with pytest.raises(DataValidationError, match="at least 2 distinct items"):
        model.fit(train)
    with pytest.raises(DataValidationError, match="no 'rating' column"):
        model.fit(train.drop("rating"))
