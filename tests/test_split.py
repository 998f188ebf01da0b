"""Split protocols: disjoint, complete, deterministic, right sizes; LensKit-style crossfold."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from flexmf_assets.datasets.split import SplitConfig, crossfold_users, split_ratings
from flexmf_assets.errors import ConfigError, DataValidationError


def _ratings(n_users: int = 300, seed: int = 0) -> pl.DataFrame:
    """Unique (user, item) pairs; user u has 3 + u % 40 ratings; distinct timestamps per user."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(1, n_users + 1):
        k = 3 + u % 40
        users += [u] * k
        items += list(rng.choice(1_000, size=k, replace=False) + 1)
        ts += list(1_000_000 + u * 10_000 + rng.permutation(k) * 60)
    return pl.DataFrame({"user_id": users, "item_id": items, "rating": rng.integers(1, 6, len(users)),
                         "timestamp": ts},
                        schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32,
                                "timestamp": pl.Int64})


RATINGS = _ratings()


def _assert_partition(result, ratings=RATINGS):
    parts = [result.train, result.validation, result.test]
    together = pl.concat(parts).sort(["user_id", "item_id"])
    assert together.equals(ratings.sort(["user_id", "item_id"]))  # complete, no duplicates
    keys = [set(zip(p["user_id"], p["item_id"])) for p in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert result.summary()["leakage"] == 0


@pytest.mark.parametrize("config", [
    SplitConfig(),
    SplitConfig(protocol="user_holdout", holdout_n=2),
    SplitConfig(protocol="user_holdout", holdout_fraction=0.25),
    SplitConfig(protocol="temporal", cutoff=2_500_000),
    SplitConfig(protocol="temporal", last_n=2),
])
def test_every_protocol_partitions_and_is_deterministic(config):
    a = split_ratings(RATINGS, config)
    _assert_partition(a)
    b = split_ratings(RATINGS, config)
    assert a.test.equals(b.test) and a.validation.equals(b.validation)
    other = split_ratings(RATINGS, config.replace(seed=config.seed + 1))
    if config.cutoff is None and config.last_n is None:
        assert not other.test.equals(a.test)


def test_random_sizes():
    res = split_ratings(RATINGS, SplitConfig(test_fraction=0.2, validation_fraction=0.1))
    n = RATINGS.height
    assert res.test.height == round(n * 0.2)
    assert res.validation.height == round((n - round(n * 0.2)) * 0.1)


def test_user_holdout_n_keeps_one_in_train():
    res = split_ratings(RATINGS, SplitConfig(protocol="user_holdout", holdout_n=5, validation_fraction=0))
    counts = RATINGS.group_by("user_id").len().rename({"len": "n"})
    test = res.test.group_by("user_id").len().rename({"len": "t"})
    joined = counts.join(test, on="user_id", how="left").fill_null(0)
    assert (joined["t"] == np.minimum(5, joined["n"] - 1)).all()
    assert res.validation.height == 0
    assert res.summary()["test_cold_users"] == 0


def test_user_holdout_fraction_per_user():
    res = split_ratings(RATINGS, SplitConfig(protocol="user_holdout", holdout_fraction=0.5, validation_fraction=0))
    counts = RATINGS.group_by("user_id").len().rename({"len": "n"}).join(
        res.test.group_by("user_id").len().rename({"len": "t"}), on="user_id")
    want = np.minimum(np.floor(counts["n"].to_numpy() * 0.5 + 0.5), counts["n"].to_numpy() - 1)
    assert (counts["t"].to_numpy() == want).all()


def test_temporal_cutoff_and_last_n():
    cut = split_ratings(RATINGS, SplitConfig(protocol="temporal", cutoff=2_500_000))
    assert cut.test["timestamp"].min() >= 2_500_000
    assert cut.train["timestamp"].max() < 2_500_000
    # validation = the latest of the pre-cutoff ratings
    assert cut.validation["timestamp"].min() >= cut.train["timestamp"].max()
    last = split_ratings(RATINGS, SplitConfig(protocol="temporal", last_n=2, validation_fraction=0))
    newest = (RATINGS.sort("timestamp", descending=True).group_by("user_id", maintain_order=True)
              .head(2).sort(["user_id", "item_id"]))
    assert last.test.sort(["user_id", "item_id"]).equals(newest)


def test_summary_counts_cold_start():
    ratings = pl.concat([RATINGS, pl.DataFrame({"user_id": [9_999], "item_id": [5_000], "rating": [3.0],
                                                "timestamp": [9_000_000]}, schema=RATINGS.schema)])
    res = split_ratings(ratings, SplitConfig(protocol="temporal", cutoff=8_000_000, validation_fraction=0))
    s = res.summary()
    assert s["test_rows"] == 1 and s["test_cold_users"] == 1 and s["test_cold_items"] == 1
    assert s["train_rows"] + s["validation_rows"] + s["test_rows"] == ratings.height
    assert s["train_users"] == 300 and "temporal" in s["protocol"]


def test_split_errors():
    with pytest.raises(DataValidationError, match=r"'temporal \(cutoff 1\)' leaves 0 training and 6570 test ratings out of 6570"):
        split_ratings(RATINGS, SplitConfig(protocol="temporal", cutoff=1))
    with pytest.raises(DataValidationError, match="needs timestamps"):
        split_ratings(RATINGS.with_columns(pl.lit(None, pl.Int64).alias("timestamp")),
                      SplitConfig(protocol="temporal", last_n=1))
    singles = RATINGS.group_by("user_id").head(1)
    with pytest.raises(DataValidationError, match="user_holdout.*0 test"):
        split_ratings(singles, SplitConfig(protocol="user_holdout", holdout_n=1))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"validation_fraction": -0.1}, "validation_fraction"),
    ({"protocol": "user_holdout", "holdout_n": 0}, "holdout_n"),
    ({"protocol": "user_holdout", "holdout_n": 2, "holdout_fraction": 0.2}, "holdout_n"),
    ({"protocol": "temporal"}, "cutoff"),
    ({"protocol": "temporal", "cutoff": 5, "last_n": 2}, "cutoff"),
    ({"protocol": "random", "last_n": 2}, "last_n"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"SplitConfig.{field}"):
        SplitConfig(**kwargs)
    with pytest.raises(ConfigError, match="protocol"):
        SplitConfig.from_dict({"protocol": "k-fold"})


def test_crossfold_users():
    folds = list(crossfold_users(RATINGS, n_folds=5, holdout_n=5, seed=42))
    assert len(folds) == 5
    counts = RATINGS.group_by("user_id").len()
    eligible = set(counts.filter(pl.col("len") > 5)["user_id"])
    seen: set[int] = set()
    for train, test in folds:
        users = set(test["user_id"])
        assert not users & seen  # each user tested in one fold only
        seen |= users
        assert (test.group_by("user_id").len()["len"] == 5).all()
        assert train.height + test.height == RATINGS.height
        assert train.join(test, on=["user_id", "item_id"], how="semi").height == 0
    assert seen == eligible
    sizes = [len(set(t["user_id"])) for _, t in folds]
    assert max(sizes) - min(sizes) <= 1
    again = list(crossfold_users(RATINGS, n_folds=5, holdout_n=5, seed=42))
    assert all(a[1].equals(b[1]) for a, b in zip(folds, again))
