"""Explicit FlexMF engine: recovery of planted structure, cold start, save/load, guards, recommend."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from flexmf_assets.errors import ConfigError, DataValidationError, TrainingError
from flexmf_assets.evaluation import BiasBaseline, rating_metrics
from flexmf_assets.flexmf import FlexMFExplicitConfig, FlexMFExplicitScorer
from flexmf_assets.flexmf.ids import IdIndex, SeenItems
from flexmf_assets.flexmf.training import oom_guard

NOISE = 0.3


def planted(seed: int = 0, n_users: int = 800, n_items: int = 400, density: float = 0.12):
    """Ratings = 3.5 + user bias + item bias + rank-4 dot product + N(0, 0.3) noise; 80/20 split."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_items)
    P, Q = rng.normal(0, 0.6, (n_users, 4)), rng.normal(0, 0.6, (n_items, 4))
    u, i = np.nonzero(rng.random((n_users, n_items)) < density)
    r = 3.5 + bu[u] + bi[i] + (P[u] * Q[i]).sum(1) + rng.normal(0, NOISE, len(u))
    df = pl.DataFrame({"user_id": u + 1000, "item_id": i + 5000, "rating": r.astype(np.float32)})
    perm = rng.permutation(df.height)
    n_test = df.height // 5
    return df[perm[n_test:]], df[perm[:n_test]]


FAST = dict(embedding_size=4, epochs=40, learning_rate=0.03, regularization=0.03, batch_size=512)


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def model(data):
    train, _ = data
    return FlexMFExplicitScorer(device="cpu", **FAST).fit(train)


@pytest.fixture(scope="module")
def small():
    train, test = planted(seed=1, n_users=120, n_items=60, density=0.25)
    return train, test


def test_recovers_planted_structure(data, model):
    train, test = data
    metrics = rating_metrics(test, model.predict_frame(test))
    baseline = rating_metrics(test, BiasBaseline().fit(train).predict_frame(test))
    assert metrics.rmse < NOISE * 1.2, metrics
    assert baseline.rmse > 0.7  # the factors carry real signal the biases cannot explain
    assert model.n_users == train["user_id"].n_unique() and model.n_items == train["item_id"].n_unique()
    assert [h["epoch"] for h in model.history] == list(range(1, 41))
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]
    assert model.epochs_run == 40 and model.best_epoch == 40
    assert model.updates_per_second > 0 and model.train_seconds > 0
    assert model.device == torch.device("cpu")


def test_cold_start_gets_bias_only_prediction(model):
    k = model.config.embedding_size
    item = model.items.ids[3]
    user = model.users.ids[5]
    pred = np.concatenate([model.predict([-1, user, -1], [item, 99999, 99999]), model.predict(["nobody"], [item])])
    assert np.isfinite(pred).all()
    lo, hi = model.rating_range
    b_i = float(model.item_table[3, k + 1])
    b_u = float(model.user_table[5, k])
    assert pred[0] == pytest.approx(np.clip(model.global_mean + b_i, lo, hi), abs=1e-5)
    assert pred[1] == pytest.approx(np.clip(model.global_mean + b_u, lo, hi), abs=1e-5)
    assert pred[2] == pytest.approx(np.clip(model.global_mean, lo, hi), abs=1e-5)
    assert pred[3] == pred[0]  # a string id unknown to an integer index is just unknown


def test_predictions_clamped_to_training_range(data, model):
    train, test = data
    pred = model.predict(test["user_id"], test["item_id"])
    assert pred.min() >= train["rating"].min() and pred.max() <= train["rating"].max()


def test_same_seed_identical_other_seed_differs(small):
    train, test = small
    cfg = dict(embedding_size=4, epochs=5, batch_size=64)
    a = FlexMFExplicitScorer(device="cpu", seed=7, **cfg).fit(train).predict(test["user_id"], test["item_id"])
    b = FlexMFExplicitScorer(device="cpu", seed=7, **cfg).fit(train).predict(test["user_id"], test["item_id"])
    c = FlexMFExplicitScorer(device="cpu", seed=8, **cfg).fit(train).predict(test["user_id"], test["item_id"])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_load_round_trip(tmp_path, data, model):
    _, test = data
    path = model.save(tmp_path / "m")
    loaded = FlexMFExplicitScorer.load(path, device="cpu")
    assert loaded.config == model.config
    np.testing.assert_array_equal(
        loaded.predict(test["user_id"], test["item_id"]), model.predict(test["user_id"], test["item_id"])
    )
    assert loaded.recommend(n=5).equals(model.recommend(n=5))
    assert loaded.history == model.history and loaded.best_epoch == model.best_epoch
    # saving again over the directory replaces it, leaving no temp directories behind
    model.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_string_ids_round_trip(tmp_path, small):
    train, test = small
    as_str = lambda df: df.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))  # noqa: E731
    m = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=3).fit(as_str(train))
    loaded = FlexMFExplicitScorer.load(m.save(tmp_path / "s"))
    np.testing.assert_array_equal(
        loaded.predict(as_str(test)["user_id"], as_str(test)["item_id"]),
        m.predict(as_str(test)["user_id"], as_str(test)["item_id"]),
    )
    recs = loaded.recommend(n=3)
    assert recs["user_id"].dtype == pl.String and recs["item_id"].dtype == pl.String


def test_tampered_or_foreign_files_rejected(tmp_path, model):
    path = model.save(tmp_path / "m")
    tensor_file = path / "tensors.safetensors"
    blob = bytearray(tensor_file.read_bytes())
    blob[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="sha256 .* does not match"):
        FlexMFExplicitScorer.load(path)

    path = model.save(tmp_path / "k")
    meta = json.loads((path / "metadata.json").read_text())
    meta["kind"] = "flexmf-implicit"
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="kind"):
        FlexMFExplicitScorer.load(path)
    with pytest.raises(ConfigError, match="missing"):
        FlexMFExplicitScorer.load(tmp_path / "nothing-here")


def test_nan_guard_on_diverging_config(small):
    train, _ = small
    # caught in the first epoch (here by the float32 overflow bound, before the loss turns NaN);
    # tests/test_reliability_models.py covers every reason on every engine, loss and optimizer
    with pytest.raises(TrainingError, match=r"^training diverged at epoch 1: .+ \(learning_rate=500.0\); "
                                            r"lower learning_rate or raise regularization$"):
        FlexMFExplicitScorer(device="cpu", learning_rate=500.0, epochs=5, regularization=0.0).fit(train)


def test_oom_guard_names_batch_size():
    with pytest.raises(TrainingError, match="batch_size=4096"):
        with oom_guard(4096):
            torch.empty(1 << 60, dtype=torch.uint8)  # a real allocation failure
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through untouched
        with oom_guard(4096):
            raise ValueError("unrelated")


@pytest.mark.parametrize(
    "field, value",
    [
        ("embedding_size", 0),
        ("batch_size", -4),
        ("epochs", 0),
        ("learning_rate", -0.1),
        ("learning_rate", 0.0),
        ("regularization", -1.0),
        ("reg_method", "L1"),
        ("optimizer", "rmsprop"),
        ("patience", 0),
        ("lr_decay", 1.5),
        ("init_scale", -0.1),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        FlexMFExplicitConfig.from_dict({field: value})
    with pytest.raises(ConfigError, match=field):
        FlexMFExplicitScorer(**{field: value})


def test_config_typo_and_overrides():
    with pytest.raises(ConfigError, match="did you mean 'embedding_size'"):
        FlexMFExplicitConfig.from_dict({"embeding_size": 8})
    cfg = FlexMFExplicitConfig.from_dict(FlexMFExplicitConfig.parse_overrides("reg_method=none,epochs=3"))
    assert cfg.reg_method is None and cfg.epochs == 3
    assert FlexMFExplicitConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_frames_rejected(small):
    train, _ = small
    with pytest.raises(DataValidationError, match="rating"):
        FlexMFExplicitScorer(epochs=1).fit(train.drop("rating"))
    with pytest.raises(DataValidationError, match="no ratings"):
        FlexMFExplicitScorer(epochs=1).fit(train.head(0))
    with pytest.raises(DataValidationError, match="NaN"):
        FlexMFExplicitScorer(epochs=1).fit(train.with_columns(pl.lit(float("nan")).alias("rating")))
    with pytest.raises(DataValidationError, match="fit"):
        FlexMFExplicitScorer().predict([1], [2])


def test_recommend_excludes_seen_ranks_and_batches(data, model):
    train, _ = data
    recs = model.recommend(n=10, batch_size=37)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs["user_id"].n_unique() == model.n_users
    assert recs.join(train, on=["user_id", "item_id"], how="semi").height == 0
    per_user = recs.group_by("user_id").agg(pl.col("rank"), pl.col("score"))
    for ranks, scores in zip(per_user["rank"], per_user["score"]):
        assert ranks.to_list() == list(range(1, 11))
        assert (np.diff(scores.to_numpy()) <= 0).all()
    one_batch = model.recommend(n=10, batch_size=100_000)
    assert recs.equals(one_batch)
    # the top item's score is the model's (unclamped) predicted rating
    first = recs.row(0, named=True)
    model_cfg_clamp = model.config.clamp
    object.__setattr__(model.config, "clamp", False)
    try:
        assert model.predict([first["user_id"]], [first["item_id"]])[0] == pytest.approx(first["score"], abs=1e-4)
    finally:
        object.__setattr__(model.config, "clamp", model_cfg_clamp)


def test_recommend_subset_unknown_users_and_seen_included(data, model):
    train, _ = data
    users = [model.users.ids[0], -42]
    recs = model.recommend(users, n=5)
    assert recs.filter(pl.col("user_id") == -42)["rank"].to_list() == [1, 2, 3, 4, 5]
    # an unknown user is ranked by item bias alone: best items first
    k = model.config.embedding_size
    by_bias = np.argsort(-model.item_table[: model.n_items, k + 1].numpy(), kind="stable")[:5]
    assert recs.filter(pl.col("user_id") == -42)["item_id"].to_list() == model.items.ids[by_bias].tolist()
    with_seen = model.recommend(users[:1], n=model.n_items, exclude_seen=False)
    assert with_seen.height == model.n_items
    without = model.recommend(users[:1], n=model.n_items)
    seen = train.filter(pl.col("user_id") == users[0]).height
    assert without.height == model.n_items - seen


def test_early_stopping_restores_best_epoch(small):
    train, test = small
    # no regularization and many factors on little data: validation error turns up quickly
    records = []
    m = FlexMFExplicitScorer(
        device="cpu", embedding_size=32, epochs=60, learning_rate=0.05, regularization=0.0,
        reg_method=None, patience=3, batch_size=64,
    ).fit(train, test, callback=records.append)
    assert m.epochs_run < 60
    assert records == m.history
    assert m.epochs_run == m.best_epoch + 3
    best = min(h["val_rmse"] for h in m.history)
    assert m.history[m.best_epoch - 1]["val_rmse"] == best
    assert rating_metrics(test, m.predict_frame(test)).rmse == pytest.approx(best, abs=1e-5)


def test_without_patience_the_best_validation_epoch_is_kept(small):
    """All epochs train, and the model is the best validation epoch's (as its reported validation
    RMSE says), not the last one's: the rule both scorers share."""
    train, test = small
    m = FlexMFExplicitScorer(device="cpu", embedding_size=16, epochs=25, learning_rate=0.05, regularization=0.0,
                             reg_method=None, batch_size=64).fit(train, test)
    curve = [h["val_rmse"] for h in m.history]
    assert m.epochs_run == 25 and m.best_epoch == int(np.argmin(curve)) + 1 < 25
    assert curve[-1] > min(curve) + 1e-4  # the last epoch is worse
    assert rating_metrics(test, m.predict_frame(test)).rmse == pytest.approx(min(curve), abs=1e-5)


@pytest.mark.parametrize("reg_method", ["L2", "AdamW"])
def test_adam_optimizer_learns(data, reg_method):
    train, test = data
    baseline = rating_metrics(test, BiasBaseline().fit(train).predict_frame(test)).rmse
    m = FlexMFExplicitScorer(
        device="cpu", optimizer="adam", reg_method=reg_method, embedding_size=4, epochs=15,
        learning_rate=0.02, regularization=0.02, batch_size=512,
    ).fit(train)
    assert np.isfinite(m.history[-1]["train_loss"])
    assert rating_metrics(test, m.predict_frame(test)).rmse < 0.4 < baseline


def test_sgd_stable_at_large_batches(data):
    """A popular row's steps must not add up with the batch size: plain summed SGD diverged here."""
    train, test = data
    baseline = rating_metrics(test, BiasBaseline().fit(train).predict_frame(test)).rmse
    for batch_size in (8192, train.height):  # several ratings per row per batch; one full batch
        m = FlexMFExplicitScorer(
            device="cpu", embedding_size=4, epochs=40, learning_rate=0.05, regularization=0.03,
            batch_size=batch_size,
        ).fit(train)
        assert all(np.isfinite(h["train_loss"]) for h in m.history)
        assert m.history[-1]["train_loss"] < m.history[0]["train_loss"]
        assert rating_metrics(test, m.predict_frame(test)).rmse < baseline


def test_row_groups_match_torch_unique():
    from flexmf_assets.flexmf.optim import RowGroups

    gen = torch.Generator().manual_seed(3)
    groups = RowGroups(50, torch.device("cpu"))
    for size in (1, 7, 200, 2):  # dense flags (small tables) and the unique fallback (size 1, 2)
        rows = torch.randint(0, 50, (size,), generator=gen)
        uniq, inv = groups(rows)
        want_u, want_inv = torch.unique(rows, return_inverse=True)
        assert torch.equal(uniq, want_u) and torch.equal(inv, want_inv)
        assert torch.equal(uniq[inv], rows)
    assert not groups.mark.any()  # the flags are cleared for the next batch


def test_adam_keeps_constant_bias_columns(data):
    train, _ = data
    for reg_method in ("L2", "AdamW"):
        m = FlexMFExplicitScorer(
            device="cpu", optimizer="adam", reg_method=reg_method, embedding_size=4, epochs=2, batch_size=256
        ).fit(train)
        k = m.config.embedding_size
        assert torch.all(m.user_table[:, k + 1] == 1.0) and torch.all(m.item_table[:, k] == 1.0)
        assert m.user_table.is_contiguous() and m.item_table.is_contiguous()
        assert m.user_table[:, k].abs().sum() > 0 and m.item_table[:, k + 1].abs().sum() > 0


def test_id_index_and_seen_items():
    index, rows = IdIndex.fit(np.array([30, 10, 20, 10]))
    assert index.ids.tolist() == [10, 20, 30] and rows.tolist() == [2, 0, 1, 0]
    assert index.lookup([20, 25, 30, -1]).tolist() == [1, -1, 2, -1]
    seen = SeenItems.build(np.array([0, 0, 2]), np.array([5, 1, 3]), 3, torch.device("cpu"))
    pos, items = seen.pairs(torch.tensor([2, -1, 0, 1]))
    assert pos.tolist() == [0, 2, 2] and items.tolist() == [3, 1, 5]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_training_matches_cpu_quality(data, tmp_path):
    train, test = data
    gpu = FlexMFExplicitScorer(device="cuda", **FAST).fit(train)
    assert gpu.device.type == "cuda" and gpu.user_table.is_cuda
    assert rating_metrics(test, gpu.predict_frame(test)).rmse < NOISE * 1.2
    recs = gpu.recommend(n=5, batch_size=50)
    assert recs.join(train, on=["user_id", "item_id"], how="semi").height == 0
    loaded = FlexMFExplicitScorer.load(gpu.save(tmp_path / "g"), device="cpu")
    np.testing.assert_allclose(
        loaded.predict(test["user_id"], test["item_id"]), gpu.predict(test["user_id"], test["item_id"]), atol=1e-5
    )
