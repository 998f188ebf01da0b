"""The fused CPU kernels (flexmf/_kernels.c) against the eager-torch engine they replace on CPU.

Both engines consume the random generator identically (same permutation, same negatives), so a
fit with the kernels must land on the torch engine's parameters up to float summation order, for
every optimizer, loss and sampler; the thread count must not change a single bit of the
parameters; and without a compiler the scorers fall back to the torch engine.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from flexmf_assets.flexmf import FlexMFExplicitScorer, FlexMFImplicitScorer, _abi, _native
from flexmf_assets.flexmf.device import DeviceSettings

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the torch engine trains")


@pytest.fixture(scope="module")
def ratings() -> pl.DataFrame:
    """3,000 ratings of 150 users x 90 items with user/item effects, popularity skew, repeats removed."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, 150, 4000)
    items = np.minimum(rng.zipf(1.4, 4000) - 1, 89)
    frame = pl.DataFrame({"user_id": users * 7 + 1, "item_id": items * 3 + 2})
    frame = frame.unique(["user_id", "item_id"], maintain_order=True).head(3000)
    u, i = frame["user_id"].to_numpy(), frame["item_id"].to_numpy()
    score = 3.5 + 0.5 * np.sin(u) + 0.3 * np.cos(i) + rng.normal(0, 0.5, len(u))
    return frame.with_columns(rating=pl.Series(np.clip(np.round(score * 2) / 2, 0.5, 5.0)))


def _fit(cls, frame, native: bool, monkeypatch, threads: int = 1, **config):
    monkeypatch.setenv("FLEXMF_NATIVE", "1" if native else "0")
    model = cls(device=DeviceSettings("cpu", threads=threads), **config).fit(frame)
    assert model.engine == ("native" if native else "torch")
    return model


@needs_compiler
def test_kernels_build_and_load():
    assert _native.kernels() is not None, _native.status()
    assert _native.status() == "loaded"
    assert any(_native.cache_dir().glob("flexmf_kernels_*.so"))


@needs_compiler
@pytest.mark.parametrize(
    "config",
    [
        {"optimizer": "adam", "reg_method": "L2", "regularization": 0.1},
        {"optimizer": "adam", "reg_method": "AdamW", "regularization": 0.05},
        {"optimizer": "sgd", "learning_rate": 0.01, "regularization": 0.05},
        {"optimizer": "adam", "bias": False},
    ],
)
def test_explicit_kernel_matches_torch_engine(ratings, monkeypatch, config):
    common = {"embedding_size": 8, "batch_size": 512, "epochs": 6, **config}
    fast = _fit(FlexMFExplicitScorer, ratings, True, monkeypatch, **common)
    ref = _fit(FlexMFExplicitScorer, ratings, False, monkeypatch, **common)
    torch.testing.assert_close(fast.user_table, ref.user_table, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast.item_table, ref.item_table, atol=2e-5, rtol=1e-4)
    for a, b in zip(fast.history, ref.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # the model learnt something: the last epoch's loss is well under the first
    assert fast.history[-1]["train_loss"] < 0.95 * fast.history[0]["train_loss"]


@needs_compiler
@pytest.mark.parametrize(
    "config",
    [
        {},  # logistic, uniform, biases, AdamW
        {"preset": "bpr"},
        {"loss": "logistic", "negative_strategy": "popular", "negative_count": 3},
        {"loss": "pairwise", "negative_count": 2, "reg_method": "L2", "regularization": 1e-3},
        {"loss": "logistic", "user_bias": False, "item_bias": True, "reg_method": None},
        {"preset": "warp", "misranked_candidates": 16},
        {"loss": "pairwise", "negative_strategy": "misranked", "misranked_candidates": 8},
    ],
)
def test_implicit_kernel_matches_torch_engine(ratings, monkeypatch, config):
    common = {"embedding_size": 8, "batch_size": 256, "epochs": 5, "learning_rate": 0.02, **config}
    fast = _fit(FlexMFImplicitScorer, ratings, True, monkeypatch, **common)
    ref = _fit(FlexMFImplicitScorer, ratings, False, monkeypatch, **common)
    assert set(fast.parameters()) == set(ref.parameters())
    for name, value in ref.parameters().items():
        torch.testing.assert_close(fast.parameters()[name], value, atol=5e-5, rtol=1e-4, msg=name)
    for a, b in zip(fast.history, ref.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert fast.history[-1]["train_loss"] < fast.history[0]["train_loss"]


@needs_compiler
def test_thread_count_does_not_change_the_result(ratings, monkeypatch):
    """Rows are summed in rating order by their owning thread: bit-identical for any thread count."""
    for cls, config in ((FlexMFExplicitScorer, {"embedding_size": 8, "batch_size": 512, "epochs": 3}),
                        (FlexMFImplicitScorer, {"embedding_size": 8, "batch_size": 256, "epochs": 3})):
        one = _fit(cls, ratings, True, monkeypatch, threads=1, **config)
        three = _fit(cls, ratings, True, monkeypatch, threads=3, **config)
        p1 = one.parameters() if cls is FlexMFImplicitScorer else {"u": one.user_table, "i": one.item_table}
        p3 = three.parameters() if cls is FlexMFImplicitScorer else {"u": three.user_table, "i": three.item_table}
        for name in p1:
            assert torch.equal(p1[name], p3[name]), (cls.__name__, name)


@needs_compiler
def test_engine_is_recorded_in_the_saved_model(ratings, monkeypatch, tmp_path):
    model = _fit(FlexMFExplicitScorer, ratings, True, monkeypatch, embedding_size=4, epochs=1)
    loaded = FlexMFExplicitScorer.load(model.save(tmp_path / "m"))
    assert loaded.engine == "native"
    implicit = _fit(FlexMFImplicitScorer, ratings, True, monkeypatch, embedding_size=4, epochs=1)
    assert FlexMFImplicitScorer.load(implicit.save(tmp_path / "i")).engine == "native"


def test_without_a_compiler_the_torch_engine_trains(ratings, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_status", "not loaded yet")
    monkeypatch.setenv("FLEXMF_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLEXMF_NATIVE", "1")
    with caplog.at_level("WARNING"):
        model = FlexMFExplicitScorer(embedding_size=4, epochs=2, device="cpu").fit(ratings)
    assert model.engine == "torch"
    assert _native.status().startswith("unavailable: no C compiler")
    assert "no-such-compiler" in caplog.text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    implicit = FlexMFImplicitScorer(embedding_size=4, epochs=2, device="cpu").fit(ratings)
    assert implicit.engine == "torch" and implicit.history[-1]["train_loss"] > 0


def test_disabled_by_environment(ratings, monkeypatch):
    monkeypatch.setenv("FLEXMF_NATIVE", "0")
    assert _native.kernels() is None
    assert _native.status() == "disabled by FLEXMF_NATIVE"
    assert FlexMFExplicitScorer(embedding_size=4, epochs=1, device="cpu").fit(ratings).engine == "torch"


def test_kernels_reject_strided_tensors():
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        _abi.ptr(torch.zeros(4, 4)[:, 1])


@needs_compiler
@pytest.mark.parametrize("dense_limit", [1 << 26, 0], ids=["dense-table", "sorted-keys"])
def test_membership_kernel_matches_torch(monkeypatch, dense_limit):
    from flexmf_assets.flexmf.sampling import PositiveSet

    g = torch.Generator().manual_seed(0)
    users, items = torch.randint(0, 50, (400,), generator=g), torch.randint(0, 30, (400,), generator=g)
    positives = PositiveSet(users, items, 30, dense_limit=dense_limit)
    assert (positives.table is None) == (dense_limit == 0)
    query_users = torch.randint(0, 55, (300,), generator=g)  # rows 50..54: beyond the training range
    query_items = torch.randint(0, 30, (300, 4), generator=g)
    answers = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FLEXMF_NATIVE", flag)
        answers[flag] = (positives.contains(query_users, query_items),
                         positives.contains(query_users, query_items[:, 0]))
    for fast, ref in zip(answers["1"], answers["0"]):
        assert torch.equal(fast, ref)
    assert answers["0"][0].any() and not answers["0"][0].all()
    assert not answers["1"][0][query_users >= 50].any()


@needs_compiler
def test_a_compiler_without_openmp_builds_serial_kernels(ratings, monkeypatch, tmp_path):
    """`-fopenmp` refused: the kernels are rebuilt without it and still match the torch engine."""
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unsupported: -fopenmp" >&2; exit 1; }; done\n'
        'exec cc "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_status", "not loaded yet")
    monkeypatch.setenv("FLEXMF_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(wrapper))
    common = {"embedding_size": 8, "batch_size": 256, "epochs": 3}
    fast = _fit(FlexMFImplicitScorer, ratings, True, monkeypatch, threads=2, **common)
    assert _native.status() == "loaded"
    ref = _fit(FlexMFImplicitScorer, ratings, False, monkeypatch, threads=2, **common)
    for name, value in ref.parameters().items():
        torch.testing.assert_close(fast.parameters()[name], value, atol=5e-5, rtol=1e-4, msg=name)
