"""Machinery shared by the explicit and implicit FlexMF scorers.

What lives here, and how a scorer uses it:

* :class:`IdIndex` -- raw user/item ids <-> contiguous row numbers. ``IdIndex.fit(values)`` returns the
  index and the row number of every value (training); ``index.lookup(values)`` maps new ids and gives
  ``-1`` for ids never seen in training (callers treat ``-1`` as "cold start").
* :class:`SeenItems` -- the training items of every user as a CSR on the device; used to exclude
  already-rated items when recommending.
* :func:`check_finite` -- the NaN/inf guard: raises :class:`TrainingError` naming the epoch and the
  learning rate.
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
  Loading never unpickles anything and rejects a tensor file whose sha256 does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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
    def from_state(cls, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "IdIndex":
        kind = meta.get(f"{name}_ids")
        if kind == "tensor":
            return cls(tensors[f"{name}_ids"].cpu().numpy())
        if isinstance(kind, list):
            return cls(np.asarray(kind, dtype=object))
        raise ConfigError(f"{METADATA_FILE}: missing or invalid '{name}_ids'")


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


def check_finite(value: float, epoch: int, learning_rate: float) -> None:
    """The NaN guard: raise :class:`TrainingError` when an epoch's loss is NaN or infinite."""
    if not np.isfinite(value):
        what = "nan" if np.isnan(value) else "inf"
        raise TrainingError(
            f"training diverged at epoch {epoch}: loss is {what} (learning_rate={learning_rate}); "
            "lower learning_rate or raise regularization"
        )


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
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a directory written by :func:`save_model_dir`; returns (tensors on device, config, metadata).

    Verifies the tensor file's sha256 against metadata.json and that the model ``kind`` matches;
    raises :class:`ConfigError` naming the file otherwise.
    """
    path = Path(path)
    meta_path, cfg_path, tensor_path = path / METADATA_FILE, path / CONFIG_FILE, path / TENSOR_FILE
    for p in (meta_path, cfg_path, tensor_path):
        if not p.is_file():
            raise ConfigError(f"{p}: missing; not a saved FlexMF model directory")
    try:
        meta = json.loads(meta_path.read_text())
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: corrupt json ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ConfigError(f"{meta_path}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    if meta.get("kind") != kind:
        raise ConfigError(f"{meta_path}: model kind is {meta.get('kind')!r}, expected {kind!r}")
    actual = sha256_file(tensor_path)
    if actual != meta.get("tensor_sha256"):
        raise ConfigError(
            f"{tensor_path}: sha256 {actual[:12]}... does not match metadata.json "
            f"({str(meta.get('tensor_sha256'))[:12]}...); the file is corrupt or was modified"
        )
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{tensor_path}: unreadable tensor file ({exc})") from None
    return tensors, config, meta
