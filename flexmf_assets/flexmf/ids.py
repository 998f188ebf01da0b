"""Raw user and item ids <-> table rows, and each user's training items.

* :class:`IdIndex`: ``IdIndex.fit(values)`` returns the index and the row of every value (training);
  ``index.lookup(values)`` maps new ids and gives ``-1`` for ids never seen in training (cold start).
* :class:`SeenItems`: the training items of every user as a CSR on the device; recommending excludes
  them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.model_files import Fields, expect_tensor


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
        starts = torch.zeros(len(indices), dtype=torch.bool, device=indices.device)
        starts[indptr[:-1][steps > 0]] = True
        falls = (indices[1:] < indices[:-1]) & ~starts[1:]
        if bool(falls.any()):  # the top-N kernel walks each user's items in ascending order
            raise ConfigError(f"{tensor_file}: tensor 'seen_indices' is not ascending within a user "
                              f"(at position {int(falls.nonzero()[0]) + 1})")
        return cls(indptr, indices)

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


__all__ = ["IdIndex", "SeenItems"]
