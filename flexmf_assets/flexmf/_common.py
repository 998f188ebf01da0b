"""Machinery shared by the explicit and implicit FlexMF scorers.

What lives here, and how a scorer uses it:

* :class:`IdIndex` -- raw user/item ids <-> contiguous row numbers. ``IdIndex.fit(values)`` returns the
  index and the row number of every value (training); ``index.lookup(values)`` maps new ids and gives
  ``-1`` for ids never seen in training (callers treat ``-1`` as "cold start").
* :class:`SeenItems` -- the training items of every user as a CSR on the device; used to exclude
  already-rated items when recommending.
* :class:`DivergenceGuard` -- checked after every epoch: a NaN/inf loss or parameter, parameters
  whose scores would overflow float32, or a loss above :data:`DIVERGENCE_FACTOR` times the loss at
  initialization raise :class:`TrainingError` naming the epoch and the learning rate (before
  anything is saved).
* :func:`hot_loop_threads` -- runs a CPU training loop single-threaded unless the user asked for a
  thread count (the per-batch ops are too small for intra-op threads to pay; on a busy machine
  they make it tens of times slower).
* :func:`oom_guard` -- a context manager turning CUDA OOM / allocation failures into a
  :class:`TrainingError` that names ``batch_size``.
* :func:`recommend_in_batches` -- scores all items for batches of users with a scorer-provided
  ``score_batch(user_rows) -> (b, n_items)`` function, masks seen items, takes ``topk``; memory is
  bounded by ``batch_size x n_items``, never ``users x items``.
* :func:`save_model_dir` / :func:`load_model_dir` -- a model directory written atomically:
  ``config.json``, ``metadata.json`` (with the sha256 of the tensor file) and ``tensors.safetensors``.
  Loading never unpickles anything and rejects a tensor file whose sha256 does not match; the JSON
  files are read with size and depth limits (:func:`load_json`), and every field the scorers read is
  checked for type and range (:class:`Fields`, :func:`expect_tensor`, ``from_state``): a forged file
  gives a one-line :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from flexmf_assets.errors import ConfigError, TrainingError

FORMAT_VERSION = 1
TENSOR_FILE = "tensors.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


# ----------------------------------------------------------------------------------------------
# id indexing
# ----------------------------------------------------------------------------------------------


class FrameScoring:
    """``predict_frame`` on top of a scorer's ``predict(users, items)``."""

    def predict_frame(self, df: pl.DataFrame) -> pl.DataFrame:
        """``df`` (with ``user_id``, ``item_id``) plus a Float32 ``prediction`` column."""
        pred = self.predict(df["user_id"], df["item_id"])  # type: ignore[attr-defined]
        return df.with_columns(pl.Series("prediction", pred, dtype=pl.Float32))


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, pl.Series):
        return values.to_numpy()
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    arr = np.asarray(values)
    return arr.reshape(-1) if arr.ndim != 1 else arr


class IdIndex:
    """Sorted unique raw ids; row ``r`` belongs to ``ids[r]``. Integer or string ids."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def fit(cls, values: Any) -> tuple["IdIndex", np.ndarray]:
        """Index the distinct ``values``; returns the index and each value's row (int64)."""
        arr = _as_numpy(values)
        if arr.dtype.kind in "iu" and len(arr):
            lo, hi = int(arr.min()), int(arr.max())
            if hi - lo < max(2 * len(arr), 1 << 20) and -(1 << 62) < lo and hi < 1 << 62:
                # dense id space (the usual case): mark, number the marks, one gather per value,
                # instead of a binary search per value
                shifted = arr.astype(np.int64, copy=False) - lo
                present = np.zeros(hi - lo + 1, dtype=bool)
                present[shifted] = True
                row_of = np.cumsum(present, dtype=np.int64 if len(arr) >= 1 << 31 else np.int32) - 1
                ids = (np.flatnonzero(present) + lo).astype(arr.dtype)
                return cls(ids), row_of[shifted].astype(np.int64, copy=False)
            ids = pl.Series(arr).unique().sort().to_numpy()  # polars' unique beats np.unique's sort
            return cls(ids), np.searchsorted(ids, arr).astype(np.int64, copy=False)
        ids, inverse = np.unique(arr, return_inverse=True)
        return cls(ids), inverse.astype(np.int64, copy=False)

    def lookup(self, values: Any) -> np.ndarray:
        """Rows of ``values`` (int64); ``-1`` where an id is not in the index."""
        arr = _as_numpy(values)
        if len(self.ids) == 0 or len(arr) == 0:
            return np.full(len(arr), -1, dtype=np.int64)
        if self.ids.dtype.kind in "iu" and arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                return np.full(len(arr), -1, dtype=np.int64)
        pos = np.searchsorted(self.ids, arr)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        found = self.ids[pos] == arr
        return np.where(found, pos, -1).astype(np.int64)

    # serialisation: integer ids go into the tensor file, string ids into metadata.json
    def to_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.ids.dtype.kind in "iu":
            return {f"{name}_ids": torch.from_numpy(self.ids.astype(np.int64))}, {f"{name}_ids": "tensor"}
        return {}, {f"{name}_ids": [str(x) for x in self.ids.tolist()]}

    @classmethod
    def from_state(cls, name: str, tensors: dict[str, torch.Tensor], meta: "Fields", tensor_file: Path,
                   n: int | None = None) -> "IdIndex":
        """The index saved by :meth:`to_state`: ``n`` ids (any count when None), strictly ascending."""
        field = f"{name}_ids"
        kind = meta.get(field)
        if kind == "tensor":
            t = expect_tensor(tensors, field, (n,), torch.int64, tensor_file)
            ids = t.cpu().numpy()
            if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ConfigError(f"{tensor_file}: tensor {field!r}: ids are not strictly ascending")
            return cls(ids)
        if isinstance(kind, list):
            if not all(isinstance(x, str) for x in kind):
                meta.fail(field, '"tensor" or a list of strings', kind)
            if n is not None and len(kind) != n:
                raise ConfigError(f"{meta.where}: field {field!r}: expected {n} ids, got {len(kind)}")
            if any(a >= b for a, b in zip(kind, kind[1:])):
                raise ConfigError(f"{meta.where}: field {field!r}: ids are not strictly ascending")
            return cls(np.asarray(kind, dtype=object))
        meta.fail(field, '"tensor" or a list of strings', kind)


# ----------------------------------------------------------------------------------------------
# seen items (CSR)
# ----------------------------------------------------------------------------------------------


@dataclass
class SeenItems:
    """Training items per user as CSR: items of user ``u`` are ``indices[indptr[u]:indptr[u+1]]``."""

    indptr: torch.Tensor  # (n_users + 1,) int64
    indices: torch.Tensor  # (nnz,) int64

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, n_users: int, device: torch.device) -> "SeenItems":
        # polars' parallel sort: several times faster than np.argsort on 10M+ int64 keys
        ordered = pl.DataFrame({"u": users, "i": items}).sort(["u", "i"])["i"].to_numpy()
        counts = np.bincount(users, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(
            torch.from_numpy(indptr).to(device),
            torch.from_numpy(np.array(ordered, dtype=np.int64)).to(device),
        )

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], n_users: int, n_items: int,
                   tensor_file: Path) -> "SeenItems":
        """The CSR saved as ``seen_indptr``/``seen_indices``, checked against the model's sizes."""
        indptr = expect_tensor(tensors, "seen_indptr", (n_users + 1,), torch.int64, tensor_file)
        indices = expect_tensor(tensors, "seen_indices", (None,), torch.int64, tensor_file)
        steps = indptr[1:] - indptr[:-1]
        if int(indptr[0]) != 0 or int(indptr[-1]) != len(indices) or bool((steps < 0).any()):
            raise ConfigError(f"{tensor_file}: tensor 'seen_indptr' is not a CSR index over "
                              f"{len(indices)} seen items (must rise from 0 to {len(indices)})")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ConfigError(f"{tensor_file}: tensor 'seen_indices' holds item rows outside 0..{n_items - 1} "
                              f"(min {int(indices.min())}, max {int(indices.max())})")
        return cls(indptr, indices)

    def to(self, device: torch.device) -> "SeenItems":
        return SeenItems(self.indptr.to(device), self.indices.to(device))

    def pairs(self, user_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch position, item row) of every seen item of ``user_rows``; rows < 0 have none."""
        valid = user_rows >= 0
        safe = torch.where(valid, user_rows, torch.zeros_like(user_rows))
        starts = self.indptr[safe]
        counts = torch.where(valid, self.indptr[safe + 1] - starts, torch.zeros_like(starts))
        total = int(counts.sum())
        batch_pos = torch.repeat_interleave(torch.arange(len(user_rows), device=user_rows.device), counts)
        if total == 0:
            return batch_pos, batch_pos
        seg_start = torch.cumsum(counts, 0) - counts
        offset = torch.arange(total, device=user_rows.device) - seg_start[batch_pos]
        return batch_pos, self.indices[starts[batch_pos] + offset]


# ----------------------------------------------------------------------------------------------
# training helpers
# ----------------------------------------------------------------------------------------------


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` (CUDA generators must live on the CUDA device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


#: an epoch whose mean training loss is above this multiple of the loss at initialization diverged
#: (the shipped sets never exceed 1.01x; a run at 10x the default Adam learning rate that recovers
#: peaks at 15x; absurd learning rates reach 1e4x and more within two epochs)
DIVERGENCE_FACTOR = 100.0
_F32_MAX = float(torch.finfo(torch.float32).max)


def max_abs(t: torch.Tensor) -> float:
    """The largest ``|value|`` of ``t`` as a Python float: nan if any value is NaN, 0 when empty."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(x) for x in torch.aminmax(t.detach()))  # one pass; NaN propagates
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def score_bound(user: torch.Tensor, item: torch.Tensor) -> float:
    """An upper bound of ``|user_row . item_row|`` for any pair of rows (tables of equal width)."""
    return user.shape[-1] * max_abs(user) * max_abs(item)


class DivergenceGuard:
    """The divergence rule every engine, loss and optimizer applies after every epoch.

    Training fails with a one-line :class:`TrainingError` naming the epoch and ``learning_rate``
    when the epoch's mean training loss is NaN or infinite, when a parameter is, when the
    parameters are so large that a score could overflow float32 (``width * max|user| * max|item|``),
    or when the loss is above :data:`DIVERGENCE_FACTOR` times ``initial_loss``: the loss the model
    at its initialization is expected to have (near-zero embeddings score like a constant
    predictor). A learning rate that trains never takes an epoch's mean loss to a hundred times where
    training started (an overshooting Adam that recovers peaks near 15x); a run that does has diverged,
    and waiting longer lets its parameters grow by orders of magnitude per epoch or turn NaN between
    two checks (NaN scores then add nothing to the loss, which looks finite again).
    """

    def __init__(self, initial_loss: float, learning_rate: float):
        self.limit = DIVERGENCE_FACTOR * max(float(initial_loss), 1e-12)
        self.initial_loss = float(initial_loss)
        self.learning_rate = learning_rate

    def _fail(self, epoch: int, what: str) -> NoReturn:
        raise TrainingError(
            f"training diverged at epoch {epoch}: {what} (learning_rate={self.learning_rate}); "
            "lower learning_rate or raise regularization"
        )

    def check(self, epoch: int, loss: float, user: torch.Tensor, item: torch.Tensor) -> None:
        """Raise when epoch ``epoch`` (mean loss ``loss``, parameter tables ``user``/``item``) diverged."""
        if not math.isfinite(loss):
            self._fail(epoch, f"loss is {'nan' if math.isnan(loss) else 'inf'}")
        for side, table in (("user", user), ("item", item)):
            m = max_abs(table)
            if not math.isfinite(m):
                self._fail(epoch, f"the {side} parameters are {'nan' if math.isnan(m) else 'inf'}")
        bound = score_bound(user, item)
        if bound > _F32_MAX:
            self._fail(epoch, f"parameters grew so large that scores overflow float32 (bound {bound:.3g})")
        if loss > self.limit:
            self._fail(epoch, f"loss is {loss:.4g}, over {DIVERGENCE_FACTOR:g}x the loss at initialization "
                              f"({self.initial_loss:.4g})")


def requested_threads(device_spec: Any) -> int | None:
    """The thread count the user set in a :class:`DeviceSettings`, else None."""
    return getattr(device_spec, "threads", None)


@contextlib.contextmanager
def hot_loop_threads(device: torch.device, requested: int | None) -> Iterator[None]:
    """Inside the block, torch uses ``requested`` CPU threads, or 1 on CPU when None; restored after.

    Minibatch MF steps are a dozen small ops of ~1e5 elements: OpenMP fork/join costs more than it
    saves, and with other processes on the cores it stalls badly. GPUs are unaffected.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(requested or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "allocate" in msg)


@contextlib.contextmanager
def oom_guard(batch_size: int, what: str = "training", *, setting: str | None = None) -> Iterator[None]:
    """Turn an out-of-memory failure inside the block into a one-line :class:`TrainingError`.

    The message names ``batch_size``, or ``setting`` (``"name=value"``) when another setting
    decides the size of what is allocated (e.g. ``embedding_size`` for the model tables).
    """
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if isinstance(exc, TrainingError) or not (isinstance(exc, MemoryError) or _is_oom(exc)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        setting = setting or f"batch_size={batch_size}"
        raise TrainingError(
            f"out of memory during {what} with {setting}; lower {setting.split('=', 1)[0]} ({first})"
        ) from exc


# ----------------------------------------------------------------------------------------------
# recommendation
# ----------------------------------------------------------------------------------------------


def recommend_in_batches(
    score_batch: Callable[[torch.Tensor], torch.Tensor],
    user_rows: torch.Tensor,
    n: int,
    n_items: int,
    seen: SeenItems | None,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` items for every user row, scored ``batch_size`` users at a time.

    ``score_batch(rows)`` returns a float ``(len(rows), n_items)`` tensor (rows may be ``-1`` for
    users unknown to the model). Seen items (when ``seen`` is given) get ``-inf`` and are dropped,
    so a user may receive fewer than ``n`` rows. Returns numpy arrays ``(batch position in
    user_rows, item row, score, rank)``, rank 1-based, ordered by user then rank.
    """
    if n < 1:
        raise ConfigError(f"n: must be >= 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    k = min(n, n_items)
    out_u, out_i, out_s, out_r = [], [], [], []
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32), empty
    ranks = torch.arange(1, k + 1, device=user_rows.device).expand(min(batch_size, len(user_rows)), k)
    with oom_guard(batch_size, "recommendation"), torch.no_grad():
        for start in range(0, len(user_rows), batch_size):
            rows = user_rows[start : start + batch_size]
            scores = score_batch(rows)
            if seen is not None:
                pos, items = seen.pairs(rows)
                scores[pos, items] = float("-inf")
            top_s, top_i = torch.topk(scores, k, dim=1)
            keep = torch.isfinite(top_s)
            upos = torch.arange(start, start + len(rows), device=rows.device).unsqueeze(1).expand(-1, k)
            out_u.append(upos[keep].cpu())
            out_i.append(top_i[keep].cpu())
            out_s.append(top_s[keep].cpu())
            out_r.append(ranks[: len(rows)][keep].cpu())
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    return cat(out_u), cat(out_i), cat(out_s), cat(out_r)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    """Write ``path/`` atomically: tensors (safetensors), config.json, metadata.json with sha256.

    Everything is written into a sibling temp directory first, then swapped in with ``os.replace``
    (an existing directory is moved aside and removed only after the swap), so a failure leaves any
    previous model intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / TENSOR_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            **metadata,
            "tensor_file": TENSOR_FILE,
            "tensor_sha256": sha256_file(tmp / TENSOR_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_model_dir(
    path: str | os.PathLike, device: torch.device, *, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], "Fields"]:
    """Read a directory written by :func:`save_model_dir`; returns (tensors on device, config, metadata).

    Reads the JSON files within :data:`JSON_LIMITS`, checks ``format_version``, the model ``kind``
    and the tensor file's sha256 against metadata.json; raises :class:`ConfigError` naming the file
    (and the field) otherwise. The scorers check the remaining fields and the tensors.
    """
    path = Path(path)
    meta_path, cfg_path, tensor_path = path / METADATA_FILE, path / CONFIG_FILE, path / TENSOR_FILE
    for p in (meta_path, cfg_path, tensor_path):
        if not p.is_file():
            raise ConfigError(f"{p}: missing; not a saved FlexMF model directory")
    meta = Fields(load_json(meta_path, JSON_LIMITS[METADATA_FILE]), meta_path)
    config = load_json(cfg_path, JSON_LIMITS[CONFIG_FILE])
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: unsupported format_version {_short(version)}")
    if meta.get("kind") != kind:
        raise ConfigError(f"{meta_path}: model kind is {_short(meta.get('kind'))}, expected {kind!r}")
    actual = sha256_file(tensor_path)
    if actual != meta.get("tensor_sha256"):
        raise ConfigError(
            f"{tensor_path}: sha256 {actual[:12]}... does not match metadata.json "
            f"({str(meta.get('tensor_sha256'))[:12]}...); the file is corrupt or was modified"
        )
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{tensor_path}: unreadable tensor file ({_first_line(exc)})") from None
    return tensors, config, meta


# ----------------------------------------------------------------------------------------------
# checked reading of stored JSON and tensors
# ----------------------------------------------------------------------------------------------

#: the deepest nesting a stored JSON file may have (ours nest at most 3 deep: metadata.history[i].x)
MAX_JSON_DEPTH = 16
#: the largest stored JSON files read, in bytes (metadata.json holds string ids: large catalogues)
JSON_LIMITS = {CONFIG_FILE: 1 << 20, METADATA_FILE: 256 << 20}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(data: bytes | str, where: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)`` with one-line :class:`ConfigError` s naming ``where`` instead of raw
    JSONDecodeError, ValueError (e.g. a 5,000-digit number) or RecursionError, and nesting deeper
    than ``max_depth`` refused."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integer literals
        raise ConfigError(f"{where}: corrupt JSON ({_first_line(exc)})") from None
    stack = [(value, 1)]
    while stack:  # iterative: a deep document must not exhaust the stack here either
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise ConfigError(f"{where}: JSON nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


def load_json(path: Path, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and :func:`parse_json` the file ``path``, refusing files over ``max_bytes``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({_first_line(exc)})") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: larger than the limit of {max_bytes} bytes")
    return parse_json(data, path, max_depth)


_MISSING = object()


class Fields:
    """Typed reads of a stored JSON object's fields; a wrong type or range raises a one-line
    :class:`ConfigError` naming the file and the field. ``default`` is returned for an absent field."""

    def __init__(self, data: Any, where: Path | str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def fail(self, name: str, expected: str, got: Any) -> NoReturn:
        raise ConfigError(f"{self.where}: field {name!r}: expected {expected}, got {_short(got)}")

    def _value(self, name: str, default: Any) -> Any:
        if name not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.where}: field {name!r} is missing")
            return default
        return self.data[name]

    def integer(self, name: str, lo: int = 0, hi: int | None = None, default: Any = _MISSING,
                optional: bool = False) -> Any:
        value = self._value(name, default)
        if value is None and optional:
            return None
        bounds = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            self.fail(name, bounds + (" or null" if optional else ""), value)
        return value

    def number(self, name: str, lo: float | None = None, default: Any = _MISSING) -> float:
        value = self._value(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (lo is not None and value < lo):
            self.fail(name, "a finite number" + (f" >= {lo:g}" if lo is not None else ""), value)
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self._value(name, default)
        if value not in choices or not isinstance(value, str):
            self.fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
        return value

    def bounds(self, name: str) -> tuple[float, float]:
        """A ``[low, high]`` pair of finite numbers with ``low <= high``."""
        value = self._value(name, _MISSING)
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
        if not ok or value[0] > value[1]:
            self.fail(name, "[low, high], two finite numbers with low <= high", value)
        return float(value[0]), float(value[1])

    def history(self, name: str = "history") -> list[dict[str, Any]]:
        """The per-epoch training log: a list of objects of scalars (numbers, strings, null)."""
        value = self._value(name, [])
        scalar = (int, float, str, type(None))
        if not isinstance(value, list) or not all(
            isinstance(row, dict) and all(isinstance(v, scalar) for v in row.values()) for row in value
        ):
            self.fail(name, "a list of objects of numbers, strings or nulls", value)
        return [dict(row) for row in value]


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...],
                  dtype: torch.dtype, where: Path, *, finite: bool = False) -> torch.Tensor:
    """``tensors[name]``, checked: present, of ``dtype`` and ``shape`` (None: any size), and
    without NaN or infinite values when ``finite``; else a one-line :class:`ConfigError`."""
    t = tensors.get(name)
    if t is None:
        raise ConfigError(f"{where}: tensor {name!r} is missing")
    if t.dtype != dtype:
        raise ConfigError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = str(tuple("*" if d is None else d for d in shape)).replace("'*'", "*")
        raise ConfigError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, but metadata.json and "
                          f"config.json give {want}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{where}: tensor {name!r} has NaN or infinite values")
    return t


def check_tensor_names(tensors: dict[str, torch.Tensor], expected: set[str], where: Path) -> None:
    """Refuse a tensor file holding tensors this model kind does not have."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConfigError(f"{where}: unexpected tensor(s) {', '.join(map(repr, extra[:5]))}")


def check_score_range(user: torch.Tensor, item: torch.Tensor, where: Path, extra: float = 0.0) -> None:
    """Refuse weights so large that a score (``user . item`` plus ``extra``) could overflow float32:
    such a model scores everything inf/NaN and recommends nothing."""
    bound = score_bound(user, item) + extra
    if not bound <= _F32_MAX:
        raise ConfigError(f"{where}: weights so large that scores overflow float32 (bound {bound:.3g})")
