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


# ------------------------------------------------------------------------------------------------
# the interface: _kernels.h and its ctypes mirror (_abi.py)
# ------------------------------------------------------------------------------------------------


@needs_compiler
def test_ctypes_structs_mirror_the_header(tmp_path):
    """Every struct's size, every field's offset and size, every enum value and constant of
    _kernels.h, printed by a program compiled against the header, equal the Python mirror's."""
    import ctypes
    import subprocess

    from flexmf_assets.flexmf.losses import LOSSES
    from flexmf_assets.flexmf.optim import ADAM_BETAS, ADAM_EPS

    expected: dict[str, float] = {}
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "_kernels.h"', "int main(void) {"]
    for struct in _abi.STRUCTS:
        c = struct.C_NAME
        lines.append(f'printf("sizeof {c} %zu\\n", sizeof({c}));')
        expected[f"sizeof {c}"] = ctypes.sizeof(struct)
        for name, ctype in struct._fields_:
            lines.append(f'printf("{c}.{name} %zu %zu\\n", offsetof({c}, {name}), sizeof((({c} *)0)->{name}));')
            expected[f"{c}.{name}"] = (getattr(struct, name).offset, ctypes.sizeof(ctype))
    constants = {
        "FLEXMF_OK": _abi.OK, "FLEXMF_UNKNOWN_LOSS": _abi.UNKNOWN_LOSS,
        "FLEXMF_UNKNOWN_OPTIMIZER": _abi.UNKNOWN_OPTIMIZER, "FLEXMF_BAD_NEGATIVES": _abi.BAD_NEGATIVES,
        "FLEXMF_SGD": _abi.SGD, "FLEXMF_ADAM": _abi.ADAM, "FLEXMF_MAX_NEGATIVES": _abi.MAX_NEGATIVES,
        "FLEXMF_BAD_SIZE": _abi.BAD_SIZE, "FLEXMF_TOPN_PANEL": _abi.TOPN_PANEL, "FLEXMF_TOPN_USERS": _abi.TOPN_USERS,
        "FLEXMF_ALS_LANES": _abi.ALS_LANES, "FLEXMF_ALS_WORK(64, 7)": _abi.als_work(64, 7),
        **{f"FLEXMF_LOSS_{name.upper()}": loss.kind for name, loss in LOSSES.items()},
    }
    for name, value in constants.items():
        lines.append(f'printf("{name} %lld\\n", (long long){name});')
        expected[name] = value
    floats = {"FLEXMF_ADAM_B1": ADAM_BETAS[0], "FLEXMF_ADAM_B2": ADAM_BETAS[1], "FLEXMF_ADAM_EPS": ADAM_EPS}
    for name in floats:
        lines.append(f'printf("{name} %.9g\\n", (double){name});')
    lines += ["return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["cc", "-I", str(_native.SOURCE.parent), "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")],
                   check=True)
    printed = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    got: dict[str, object] = {}
    for line in printed.splitlines():
        key, *values = line.rsplit(" ", 2) if "." in line.split(" ")[0] else line.rsplit(" ", 1)
        got[key] = tuple(int(v) for v in values) if len(values) == 2 else float(values[0])
    for key, want in expected.items():
        assert got[key] == (want if isinstance(want, tuple) else float(want)), key
    for name, value in floats.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
    assert len(got) == len(expected) + len(floats)


@needs_compiler
def test_kernels_refuse_unknown_kinds():
    """A loss kind or optimizer the kernels do not know is an error status, never a silent default."""
    assert _native.kernels() is not None
    with pytest.raises(RuntimeError, match="flexmf_implicit_batches: unknown loss kind"):
        _native.run("flexmf_implicit_batches", _abi.ImplicitArgs(
            train=_abi.Train(optimizer=_abi.ADAM), loss_kind=99, negatives=1))
    with pytest.raises(RuntimeError, match="flexmf_explicit_epoch: unknown optimizer"):
        _native.run("flexmf_explicit_epoch", _abi.ExplicitArgs(train=_abi.Train(optimizer=7)))
    with pytest.raises(RuntimeError, match="flexmf_implicit_batches: negatives per positive"):
        _native.run("flexmf_implicit_batches", _abi.ImplicitArgs(
            train=_abi.Train(optimizer=_abi.ADAM), loss_kind=2, negatives=3))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_an_unknown_loss_is_an_error_in_every_engine(ratings, monkeypatch, native):
    """A loss name that reaches an engine without a config check (here forged into a valid config)
    fails naming it; it never trains as some other loss."""
    from flexmf_assets.errors import ConfigError
    from flexmf_assets.flexmf import FlexMFImplicitConfig

    monkeypatch.setenv("FLEXMF_NATIVE", "1" if native else "0")
    if native and _native.kernels() is None:
        pytest.skip(_native.status())
    config = FlexMFImplicitConfig(embedding_size=4, epochs=1)
    object.__setattr__(config, "loss", "hinge")
    with pytest.raises(ConfigError, match=r"^loss: 'hinge' is not one of 'logistic', 'pairwise', 'warp'$"):
        FlexMFImplicitScorer(config, device="cpu").fit(ratings)


@pytest.mark.parametrize("preset", [None, "active"])
def test_importing_the_package_makes_openmp_wait_passively(preset):
    """OpenMP threads that spin while waiting starve the working thread on a busy machine (two kernel
    threads were 3-5x slower than one); the package sets OMP_WAIT_POLICY=passive before torch loads
    OpenMP, unless the user chose a policy."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import flexmf_assets.flexmf, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (preset or "passive")
