"""Reliability of training and of stored models (issue 14, items 17 and 18).

* Divergence: every engine (fused C kernels, eager torch) x every loss and optimizer, trained with
  absurd learning rates on a small synthetic dataset, fails with a one-line TrainingError naming the
  epoch and ``learning_rate``, before anything is saved; through Dagster the previous model
  partition (and what was published from it) stays current.
* Forged model files: a real model written by ``save()``, then one field or tensor tampered with (the
  tensor file's sha256 recomputed, so the forgery is self-consistent); loading fails with a one-line
  ConfigError naming the file and the field. The versioned store's read path likewise.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from upath import UPath

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.storage import POINTER, VersionedStore, current_version
from flexmf_assets.errors import ConfigError, TrainingError
from flexmf_assets.flexmf import _native
from flexmf_assets.files import sha256_file
from flexmf_assets.flexmf.training import DIVERGENCE_FACTOR, DivergenceGuard
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer

# --------------------------------------------------------------------------- training divergence


@pytest.fixture(scope="module")
def ratings() -> pl.DataFrame:
    config = SyntheticConfig(n_users=60, n_items=80, n_ratings=1500, min_user_ratings=10)
    return generate(config, seed=1).ratings


#: every loss and optimizer of the two tracks
TRAINERS: dict[str, tuple[type, dict[str, Any]]] = {
    "explicit sgd": (FlexMFExplicitScorer, {"optimizer": "sgd"}),
    "explicit adam L2": (FlexMFExplicitScorer, {"optimizer": "adam", "reg_method": "L2"}),
    "explicit adam AdamW": (FlexMFExplicitScorer, {"optimizer": "adam", "reg_method": "AdamW"}),
    "implicit logistic": (FlexMFImplicitScorer, {"loss": "logistic"}),
    "implicit logistic L2 misranked": (FlexMFImplicitScorer, {"loss": "logistic", "reg_method": "L2",
                                                              "negative_strategy": "misranked"}),
    "implicit pairwise": (FlexMFImplicitScorer, {"loss": "pairwise", "negative_count": 3}),
    "implicit warp": (FlexMFImplicitScorer, {"preset": "warp"}),
}
#: the fused CPU kernels, eager torch on the CPU, eager torch on a GPU (skipped without one)
ENGINES = ("native", "torch", "cuda")
REASONS = (r"loss is (nan|inf)", r"the (user|item) parameters are (nan|inf)",
           r"parameters grew so large that scores overflow float32 \(bound [0-9.e+]+\)",
           rf"loss is [0-9.e+]+, over {DIVERGENCE_FACTOR:g}x the loss at initialization \([0-9.e+-]+\)")


def diverged(lr: float, reason: str = "|".join(REASONS)) -> str:
    """The whole message of a diverged fit (one line)."""
    return (rf"training diverged at epoch (?P<epoch>\d+): (?:{reason}) \(learning_rate={re.escape(str(lr))}\); "
            r"lower learning_rate or raise regularization")


def select_engine(engine: str, monkeypatch) -> str:
    """Make the next fit train with ``engine``; returns the device to train on."""
    monkeypatch.setenv("FLEXMF_NATIVE", "1" if engine == "native" else "0")
    if engine == "native" and _native.kernels() is None:
        pytest.skip(f"fused kernels unavailable here: {_native.status()}")
    if engine == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return "cuda" if engine == "cuda" else "cpu"


def parameters(model) -> list[torch.Tensor]:
    return [model.user_table, model.item_table] if hasattr(model, "user_table") else list(model.params_.values())


@pytest.mark.parametrize("lr", [100.0, 1000.0])  # 1000: the largest learning_rate a config accepts
@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("engine", ENGINES)
def test_absurd_learning_rate_fails_as_diverged_on_every_engine(ratings, monkeypatch, engine, trainer, lr):
    device = select_engine(engine, monkeypatch)
    cls, config = TRAINERS[trainer]
    model = cls(device=device, epochs=6, embedding_size=8, learning_rate=lr, **config)
    with pytest.raises(TrainingError) as info:
        model.fit(ratings)
    assert model.engine == ("native" if engine == "native" else "torch")
    match = re.fullmatch(diverged(lr), str(info.value))
    assert match, str(info.value)
    # caught at once: the first epoch, or the second where the first epoch's loss is still that of the
    # initial model (implicit: the optimizer's first steps are bounded by the learning rate)
    assert int(match["epoch"]) <= 2, str(info.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_finite_but_diverged_loss_fails(ratings, monkeypatch, engine):
    # explicit Adam at learning_rate=1000: the loss stays finite (about 2e12 on 0.5-5 star ratings,
    # going up and down), the model was published before; now it fails on the loss rule
    device = select_engine(engine, monkeypatch)
    model = FlexMFExplicitScorer(device=device, epochs=6, embedding_size=8, learning_rate=1000.0, optimizer="adam")
    with pytest.raises(TrainingError) as info:
        model.fit(ratings)
    message = str(info.value)
    assert re.fullmatch(diverged(1000.0, REASONS[3]), message), message
    assert "epoch 1:" in message
    loss = float(re.search(r"loss is ([0-9.e+]+),", message)[1])
    assert 1e9 < loss < math.inf


@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("engine", ENGINES)
def test_sound_learning_rates_never_trip_the_guard(ratings, monkeypatch, engine, trainer):
    device = select_engine(engine, monkeypatch)
    cls, config = TRAINERS[trainer]
    model = cls(device=device, epochs=6, embedding_size=8, **config).fit(ratings)
    losses = [h["train_loss"] for h in model.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(bool(torch.isfinite(t).all()) for t in parameters(model))


@pytest.mark.parametrize("engine", ENGINES)
def test_warp_on_a_catalogue_smaller_than_its_candidates(monkeypatch, engine):
    # the shipped warp set (preset warp: 64 candidates) on 30 items: once the model ranks positives
    # well, a violator found at trial 40 indexed past the rank-weight table (a raw IndexError); such a
    # trial estimates rank 0, whose weight is 0
    device = select_engine(engine, monkeypatch)
    rows = [(u, i, 4.0) for u in range(1, 41) for i in range(1, 31) if (u * 7 + i * 3) % 5 < 2]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "rating"], orient="row")
    model = FlexMFImplicitScorer(device=device, preset="warp", epochs=30, embedding_size=32).fit(frame)
    assert model.config.misranked_candidates == 64 and model.n_items == 30
    assert model.recommend(n=3).height == 40 * 3


GUARD_CASES = {
    # name: (loss, user table, item table, reason or None when the epoch passes)
    "nan loss": (math.nan, torch.ones(3, 4), torch.ones(5, 4), "loss is nan"),
    "inf loss": (math.inf, torch.ones(3, 4), torch.ones(5, 4), "loss is inf"),
    # native WARP at learning_rate=100 logged [527951, 0.0]: NaN scores add nothing to the loss
    "NaN parameters behind a zero loss": (0.0, torch.tensor([[1.0, math.nan]]), torch.ones(5, 2),
                                          "the user parameters are nan"),
    "inf parameters": (0.5, torch.ones(3, 4), torch.tensor([[1.0, -math.inf]]), "the item parameters are inf"),
    "scores overflow float32": (0.5, torch.full((3, 4), 1e19), torch.full((5, 4), 1e19),
                                "parameters grew so large that scores overflow float32 (bound 4e+38)"),
    "loss over the factor": (2.02 * DIVERGENCE_FACTOR, torch.ones(3, 4), torch.ones(5, 4),
                             f"loss is {2.02 * DIVERGENCE_FACTOR:.4g}, over {DIVERGENCE_FACTOR:g}x the loss at "
                             "initialization (2)"),
    "loss under the factor": (1.99 * DIVERGENCE_FACTOR, torch.ones(3, 4), torch.ones(5, 4), None),
    "large but sound parameters": (0.5, torch.full((3, 4), 1e9), torch.full((5, 4), 1e9), None),
}


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_divergence_rule(case):
    loss, user, item, reason = GUARD_CASES[case]
    guard = DivergenceGuard(initial_loss=2.0, learning_rate=0.5)
    if reason is None:
        guard.check(3, loss, user, item)
        return
    with pytest.raises(TrainingError) as info:
        guard.check(3, loss, user, item)
    assert str(info.value) == (f"training diverged at epoch 3: {reason} (learning_rate=0.5); "
                               "lower learning_rate or raise regularization")


# --------------------------------------------------------------------------- forged model files


def _fit_models(ratings: pl.DataFrame) -> dict[str, Any]:
    strings = ratings.with_columns(pl.format("u{}", "user_id").alias("user_id"))
    return {
        "explicit": FlexMFExplicitScorer(device="cpu", epochs=2, embedding_size=4).fit(ratings),
        "explicit-str": FlexMFExplicitScorer(device="cpu", epochs=1, embedding_size=4).fit(strings),
        "implicit": FlexMFImplicitScorer(device="cpu", epochs=2, embedding_size=4).fit(ratings),
    }


@pytest.fixture(scope="module")
def saved(ratings, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: model.save(root / name) for name, model in _fit_models(ratings).items()}


def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """Rewrite ``name`` (metadata.json or config.json) with ``change(value)`` (returns the new value)."""
    def tamper(path: Path) -> None:
        file = path / name
        value = json.loads(file.read_text())
        new = change(value)
        file.write_text(json.dumps(value if new is None else new))
    return tamper


def set_meta(field: str, value: Any) -> Callable[[Path], None]:
    return edit_json("metadata.json", lambda meta: meta.__setitem__(field, value))


def raw_meta(field: str, text: str) -> Callable[[Path], None]:
    """Put ``text`` verbatim as the JSON value of ``field`` (deep nesting, huge literals)."""
    def tamper(path: Path) -> None:
        file = path / "metadata.json"
        meta = json.loads(file.read_text())
        meta[field] = "@@RAW@@"
        file.write_text(json.dumps(meta).replace('"@@RAW@@"', text))
    return tamper


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrite the tensor file with ``change(tensors)`` and record its new sha256 (self-consistent)."""
    def tamper(path: Path) -> None:
        file = path / "tensors.safetensors"
        tensors = dict(load_file(str(file)))
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
        set_meta("tensor_sha256", sha256_file(file))(path)
    return tamper


def set_tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return edit_tensors(lambda t: t.__setitem__(name, make(t[name])))


def with_value(t: torch.Tensor, index: Any, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def swap_first_two(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:2], t[:1], t[2:]])


N_USERS, N_ITEMS = "(?P<u>\\d+)", "(?P<i>\\d+)"

FORGERIES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # name: (model, tamper, regex of the message after "<model dir>/")
    "n_users a string": ("explicit", set_meta("n_users", "lots"),
                         r"metadata\.json: field 'n_users': expected an integer >= 1, got 'lots'"),
    "n_users a float": ("explicit", set_meta("n_users", 60.0),
                        r"metadata\.json: field 'n_users': expected an integer >= 1, got 60\.0"),
    "n_items a boolean": ("explicit", set_meta("n_items", True),
                          r"metadata\.json: field 'n_items': expected an integer >= 1, got True"),
    "n_users off by one": ("explicit", edit_json("metadata.json", lambda m: m.update(n_users=m["n_users"] + 1)),
                           r"tensors\.safetensors: tensor 'user_ids' has shape \(\d+,\), but metadata\.json and "
                           r"config\.json give \(\d+,\)"),
    "global_mean NaN": ("explicit", set_meta("global_mean", math.nan),
                        r"metadata\.json: field 'global_mean': expected a finite number, got nan"),
    "rating_range reversed": ("explicit", set_meta("rating_range", [5.0, 0.5]),
                              r"metadata\.json: field 'rating_range': expected \[low, high\], two finite "
                              r"numbers with low <= high, got \[5\.0, 0\.5\]"),
    "rating_range a string": ("explicit", set_meta("rating_range", "1-5"),
                              r"metadata\.json: field 'rating_range': expected \[low, high\].*, got '1-5'"),
    "history of lists": ("explicit", set_meta("history", [[1, 2]]),
                         r"metadata\.json: field 'history': expected a list of objects of numbers, strings or "
                         r"nulls, got \[\[1, 2\]\]"),
    "best_epoch past epochs_run": ("explicit", set_meta("best_epoch", 99),
                                   r"metadata\.json: field 'best_epoch': expected an integer >= 1 and <= 2 or "
                                   r"null, got 99"),
    "unknown engine": ("explicit", set_meta("engine", "quantum"),
                       r"metadata\.json: field 'engine': expected one of 'native', 'torch', 'als', got 'quantum'"),
    "format_version true": ("explicit", set_meta("format_version", True),
                            r"metadata\.json: unsupported format_version True"),
    "JSON nested 100,000 deep": ("explicit", raw_meta("history", "[" * 100_000 + "]" * 100_000),
                                 r"metadata\.json: JSON nested deeper than 16 levels"),
    "JSON nested 40 deep": ("explicit", raw_meta("history", "[" * 40 + "]" * 40),
                            r"metadata\.json: JSON nested deeper than 16 levels"),
    "5,000-digit integer": ("explicit", raw_meta("n_users", "1" + "0" * 5000),
                            r"metadata\.json: corrupt JSON \(.*4300 digits.*\)"),
    "string ids out of order": ("explicit-str", edit_json("metadata.json", lambda m: m["user_ids"].reverse()),
                                r"metadata\.json: field 'user_ids': ids are not strictly ascending"),
    "string ids not strings": ("explicit-str", set_meta("user_ids", [1, 2]),
                               r"metadata\.json: field 'user_ids': expected \"tensor\" or a list of strings, "
                               r"got \[1, 2\]"),
    "ids a number": ("explicit", set_meta("item_ids", 42),
                     r"metadata\.json: field 'item_ids': expected \"tensor\" or a list of strings, got 42"),
    "config field of the wrong type": ("explicit", edit_json("config.json", lambda c: c.update(embedding_size="lots")),
                                       r"config\.json: FlexMFExplicitConfig\.embedding_size: expected an integer, "
                                       r"got 'lots'"),
    "config a list": ("explicit", edit_json("config.json", lambda c: [c]),
                      r"config\.json: expected a JSON object, got list"),
    "config over its size limit": ("explicit", lambda p: (p / "config.json").write_text("{" + " " * (1 << 20) + "}"),
                                   r"config\.json: larger than the limit of 1048576 bytes"),
    # tensors, with the sha256 in metadata.json recomputed
    "seen item past the catalogue": ("explicit", set_tensor("seen_indices", lambda t: with_value(t, 0, 10_000)),
                                     r"tensors\.safetensors: tensor 'seen_indices' holds item rows outside "
                                     r"0\.\.\d+ \(min 0, max 10000\)"),
    "negative seen item": ("explicit", set_tensor("seen_indices", lambda t: with_value(t, 3, -7)),
                           r"tensors\.safetensors: tensor 'seen_indices' holds item rows outside 0\.\.\d+ "
                           r"\(min -7, max \d+\)"),
    "seen items out of order": ("explicit", set_tensor("seen_indices", lambda t: t.flip(0)),
                                r"tensors\.safetensors: tensor 'seen_indices' is not ascending within a user "
                                r"\(at position \d+\)"),
    "seen_indptr not rising": ("explicit", set_tensor("seen_indptr", lambda t: with_value(t, 5, 0)),
                               r"tensors\.safetensors: tensor 'seen_indptr' is not a CSR index over \d+ seen "
                               r"items \(must rise from 0 to \d+\)"),
    "NaN weight": ("explicit", set_tensor("user_table", lambda t: with_value(t, (2, 1), math.nan)),
                   r"tensors\.safetensors: tensor 'user_table' has NaN or infinite values"),
    "weights that overflow scores": ("explicit", edit_tensors(lambda t: t.update(user_table=t["user_table"] * 1e20,
                                                                             item_table=t["item_table"] * 1e20)),
                                     r"tensors\.safetensors: weights so large that scores overflow float32 "
                                     r"\(bound [0-9.e+]+\)"),
    "table one row short": ("explicit", set_tensor("user_table", lambda t: t[:-1]),
                            r"tensors\.safetensors: tensor 'user_table' has shape \(60, 6\), but metadata\.json "
                            r"and config\.json give \(61, 6\)"),
    "table of float64": ("explicit", set_tensor("item_table", lambda t: t.double()),
                         r"tensors\.safetensors: tensor 'item_table' has dtype torch\.float64, expected "
                         r"torch\.float32"),
    "tensor ids out of order": ("explicit", set_tensor("item_ids", swap_first_two),
                                r"tensors\.safetensors: tensor 'item_ids': ids are not strictly ascending"),
    "extra tensor": ("explicit", edit_tensors(lambda t: t.__setitem__("payload", torch.zeros(3))),
                     r"tensors\.safetensors: unexpected tensor\(s\) 'payload'"),
    "missing tensor": ("explicit", edit_tensors(lambda t: t.pop("seen_indices")),
                       r"tensors\.safetensors: tensor 'seen_indices' is missing"),
    # the implicit model
    "implicit NaN embedding": ("implicit", set_tensor("item_embedding", lambda t: with_value(t, (0, 0), math.nan)),
                               r"tensors\.safetensors: tensor 'item_embedding' has NaN or infinite values"),
    "implicit inf bias": ("implicit", set_tensor("item_bias", lambda t: with_value(t, 4, math.inf)),
                          r"tensors\.safetensors: tensor 'item_bias' has NaN or infinite values"),
    "implicit bias missing": ("implicit", edit_tensors(lambda t: t.pop("item_bias")),
                              r"tensors\.safetensors: tensor 'item_bias' is missing"),
    "implicit bias the config lacks": ("implicit", edit_json("config.json", lambda c: c.update(item_bias=False)),
                                       r"tensors\.safetensors: unexpected tensor\(s\) 'item_bias'"),
    "implicit embedding_size changed": ("implicit", edit_json("config.json", lambda c: c.update(embedding_size=5)),
                                        r"tensors\.safetensors: tensor 'user_embedding' has shape \(60, 4\), but "
                                        r"metadata\.json and config\.json give \(60, 5\)"),
    "implicit seen item past the catalogue": ("implicit", set_tensor("seen_indices",
                                                                     lambda t: with_value(t, -1, 80)),
                                              r"tensors\.safetensors: tensor 'seen_indices' holds item rows "
                                              r"outside 0\.\.79 \(min 0, max 80\)"),
    "implicit huge embeddings": ("implicit", edit_tensors(lambda t: t.update(user_embedding=t["user_embedding"] * 1e20,
                                                                         item_embedding=t["item_embedding"] * 1e20)),
                                 r"tensors\.safetensors: weights so large that scores overflow float32 "
                                 r"\(bound [0-9.e+]+\)"),
    "implicit negative epochs_run": ("implicit", set_meta("epochs_run", -1),
                                     r"metadata\.json: field 'epochs_run': expected an integer >= 0, got -1"),
    "implicit history a string": ("implicit", set_meta("history", "long"),
                                  r"metadata\.json: field 'history': expected a list of objects.*, got 'long'"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_model_file_is_a_one_line_error_naming_file_and_field(saved, tmp_path, case):
    model, tamper, pattern = FORGERIES[case]
    path = Path(shutil.copytree(saved[model], tmp_path / "model"))
    tamper(path)
    cls = FlexMFImplicitScorer if model == "implicit" else FlexMFExplicitScorer
    with pytest.raises(ConfigError) as info:
        cls.load(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert re.fullmatch(re.escape(str(path)) + "/" + pattern, message), message


def test_untampered_models_load_and_score(saved):
    # the checks pass real files: every saved model loads and recommends as before
    for name, path in saved.items():
        cls = FlexMFImplicitScorer if name == "implicit" else FlexMFExplicitScorer
        recs = cls.load(path).recommend(n=3)
        assert recs.height == 60 * 3 and recs["score"].is_finite().all(), name


# --------------------------------------------------------------------------- the versioned store


def stored_partition(tmp_path: Path, value: Any) -> tuple[UPath, Path]:
    part = UPath(tmp_path) / "asset" / "p"
    version, _ = VersionedStore().write(part, value)
    return part, Path(str(version))


def _frame() -> pl.DataFrame:
    return pl.DataFrame({"user_id": [1, 2], "v": [3, 4]})


STORE_FORGERIES: dict[str, tuple[Any, Callable[[Path, Path], None], str]] = {
    # name: (stored value, tamper(partition dir, version dir), regex of the message after "<partition dir>/")
    "CURRENT names a missing version": (
        _frame(), lambda p, v: (p / POINTER).write_text("v-00000000000000000001-deadbeef"),
        r"v-00000000000000000001-deadbeef: does not exist, but .*/p/CURRENT names it \(the partition's storage "
        r"is damaged; rematerialize it\)"),
    "version without a manifest": (
        _frame(), lambda p, v: (v / "manifest.json").unlink(),
        r"v-[0-9a-f-]+/manifest\.json: does not exist, but .*/p/CURRENT names it .*"),
    "CURRENT with a NUL byte": (
        _frame(), lambda p, v: (p / POINTER).write_bytes(b"v-1\x00"),
        r"CURRENT: corrupt pointer b'v-1\\x00'; expected a version folder name 'v-\.\.\.'"),
    "CURRENT of 1 MB": (
        _frame(), lambda p, v: (p / POINTER).write_text("v-" + "1" * (1 << 20)),
        r"CURRENT: larger than the limit of 256 bytes"),
    "manifest nested 100,000 deep": (
        _frame(), lambda p, v: (v / "manifest.json").write_text('{"kind": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        r"v-[0-9a-f-]+/manifest\.json: JSON nested deeper than 16 levels"),
    "manifest not JSON": (
        _frame(), lambda p, v: (v / "manifest.json").write_text("{kind: frame"),
        r"v-[0-9a-f-]+/manifest\.json: corrupt JSON \(Expecting property name enclosed in double quotes: .*\)"),
    "manifest of an unknown kind": (
        _frame(), lambda p, v: (v / "manifest.json").write_text('{"kind": "pickle", "files": ["x"]}'),
        r"v-[0-9a-f-]+/manifest\.json: unknown kind 'pickle'"),
    "manifest listing a path outside the version": (
        {"train": _frame()},
        lambda p, v: (v / "manifest.json").write_text('{"kind": "frames", "files": ["../../../etc/passwd.parquet"]}'),
        r"v-[0-9a-f-]+/manifest\.json: field 'files' must list plain '<name>\.parquet' file names, got "
        r"\['\.\./\.\./\.\./etc/passwd\.parquet'\]"),
    "data file missing": (
        _frame(), lambda p, v: (v / "data.parquet").unlink(),
        r"v-[0-9a-f-]+/data\.parquet: does not exist, but .*/manifest\.json lists it"),
    "data file not parquet": (
        _frame(), lambda p, v: (v / "data.parquet").write_bytes(b"PAR1 not really"),
        r"v-[0-9a-f-]+/data\.parquet: unreadable parquet file \(.+\)"),
    "json value nested 100,000 deep": (
        {"a": 1}, lambda p, v: (v / "value.json").write_text("[" * 100_000 + "]" * 100_000),
        r"v-[0-9a-f-]+/value\.json: JSON nested deeper than 16 levels"),
}


@pytest.mark.parametrize("case", list(STORE_FORGERIES))
def test_damaged_or_forged_store_is_a_one_line_error_naming_the_path(tmp_path, case):
    value, tamper, pattern = STORE_FORGERIES[case]
    part, version = stored_partition(tmp_path, value)
    tamper(Path(str(part)), version)
    with pytest.raises(ConfigError) as info:
        VersionedStore().read(part)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert re.fullmatch(re.escape(str(part)) + "/" + pattern, message), message


def test_store_reads_models_after_the_checks(saved, tmp_path):
    model = FlexMFExplicitScorer.load(saved["explicit"])
    part, _ = stored_partition(tmp_path, model)
    again = VersionedStore().read(part)
    assert np.array_equal(again.predict([1, 2], [3, 4]), model.predict([1, 2], [3, 4]))


# --------------------------------------------------------------------------- through Dagster


IMPLICIT_CONFIG = """
implicit_hparams:
  default: {{preset: warp, epochs: 3, embedding_size: 8, learning_rate: {lr}}}
device: {{device: cpu}}
"""


def test_diverging_or_forged_model_never_replaces_the_published_one(tmp_path, dagster_instance):
    from test_reliability_dagster import (dataset_yaml, key, make_project, ml_zip, ok, one_line_failure, run,
                                          sparse_rows, stored, stored_version)

    instance = dagster_instance
    source = ml_zip(tmp_path / "www" / "demo.zip", sparse_rows(60, 80))  # more items than WARP's 64 candidates
    project, defs = make_project(tmp_path, dataset_yaml(source.as_uri()) + IMPLICIT_CONFIG.format(lr=0.01))
    ok(run(defs, "data_job", "demo", instance))
    instance.add_dynamic_partitions("implicit_hparams", ["default"])
    ok(run(defs, "implicit_job", key("default"), instance))
    assets = ("implicit_model", "implicit_evaluation", "implicit_recommendations")
    before = {asset: stored_version(project, asset, "demo", "default") for asset in assets}
    recs_before = stored(project, "implicit_recommendations", "demo", "default")
    assert recs_before.height > 0 and recs_before["score"].is_finite().all()

    # the same partition retrained with an absurd learning rate (the set was edited): WARP on the
    # native engine published NaN embeddings and an empty recommendation table before
    _, diverging = make_project(tmp_path, dataset_yaml(source.as_uri()) + IMPLICIT_CONFIG.format(lr=100))
    message = one_line_failure(run(diverging, "implicit_job", key("default"), instance), "TrainingError: ")
    assert re.fullmatch("TrainingError: " + diverged(100.0), message), message
    assert {asset: stored_version(project, asset, "demo", "default") for asset in assets} == before
    assert stored(project, "implicit_recommendations", "demo", "default").equals(recs_before)
    model = stored(project, "implicit_model", "demo", "default")
    assert model.config.learning_rate == 0.01 and model.epochs_run == 3

    # a forged (self-consistent) NaN weight in the stored model is refused when read: nothing is published
    version = current_version(UPath(project.storage_dir) / "implicit_model" / "demo" / "default")
    model_dir = Path(str(version)) / "model"
    set_tensor("item_embedding", lambda t: with_value(t, (0, 0), math.nan))(model_dir)
    result = run(diverging, "implicit_job", key("default"), instance,
                 asset_selection=[dg.AssetKey("implicit_recommendations")])
    message = one_line_failure(result, "ConfigError: ")
    assert message == (f"ConfigError: {model_dir}/tensors.safetensors: tensor 'item_embedding' has NaN or "
                       "infinite values")
    assert stored_version(project, "implicit_recommendations", "demo", "default") == before["implicit_recommendations"]
