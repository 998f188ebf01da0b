"""Explicit-feedback FlexMF: biased matrix factorization trained on squared error.

prediction(u, i) = mu + b_u + b_i + P_u . Q_i

The biases ride inside the embedding tables as two extra columns: a user row is
``[P_u, b_u, 1]`` and an item row is ``[Q_i, 1, b_i]``, so one gather per side and one dot product give
the full prediction. The constant ``1`` columns are left out of every update. One extra, never
trained row at the end of each table (all zeros, with its ``1``) stands for "unknown": a cold-start
user or item gets the bias-only prediction ``mu + b_(known side)``.

The hot loop uses no autograd and no DataLoader: per epoch the training arrays are permuted once, and
every batch does a handful of tensor ops into preallocated buffers with hand-derived gradients and
sparse ``index_add_`` row updates (SGD, each row's step scaled by 1/sqrt(its ratings in the batch) so
it stays stable at any batch size), or a hand-written lazy sparse Adam over the batch's distinct rows
(grouped without sorting; parameters and moments gathered and written back together).

On a CPU the same epoch runs fused in C (``_kernels.c`` through :mod:`._native`: two passes over a
batch's ratings and one over its rows, no temporaries); the torch code above is the reference the
kernel is tested against, the GPU path and the fallback when no C compiler is available.
"""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch

from flexmf_assets.errors import DataValidationError
from flexmf_assets.flexmf._common import (
    DivergenceGuard,
    FrameScoring,
    IdIndex,
    TENSOR_FILE,
    SeenItems,
    check_score_range,
    check_tensor_names,
    expect_tensor,
    hot_loop_threads,
    requested_threads,
    load_model_dir,
    make_generator,
    oom_guard,
    recommend_in_batches,
    save_model_dir,
)
from flexmf_assets.flexmf import _native
from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device

KIND = "flexmf-explicit"
_PREDICT_CHUNK = 1 << 20
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def _check_frame(df: pl.DataFrame, name: str) -> None:
    missing = [c for c in ("user_id", "item_id", "rating") if c not in df.columns]
    if missing:
        raise DataValidationError(f"{name}: missing column(s) {', '.join(missing)}; got {df.columns}")
    nulls = [c for c in ("user_id", "item_id", "rating") if df[c].null_count()]
    if nulls:
        raise DataValidationError(f"{name}: null values in column(s) {', '.join(nulls)}")
    if df.height and not np.isfinite(df["rating"].cast(pl.Float64).to_numpy()).all():
        raise DataValidationError(f"{name}: column 'rating' has NaN or infinite values")


class FlexMFExplicitScorer(FrameScoring):
    """Train and score biased MF on explicit ratings (see module docstring)."""

    def __init__(
        self,
        config: FlexMFExplicitConfig | None = None,
        *,
        device: DeviceSettings | str | torch.device | None = None,
        **overrides: Any,
    ):
        config = config or FlexMFExplicitConfig()
        self.config = config.replace(**overrides) if overrides else config
        self._device_spec = device
        self.device: torch.device | None = None
        self.history: list[dict[str, Any]] = []
        self.epochs_run = 0
        self.best_epoch: int | None = None
        self.train_seconds = 0.0
        self.updates_per_second = 0.0
        self.engine = "torch"  # "native" when fit() trained with the fused CPU kernels (_native)
        self.n_users = 0
        self.n_items = 0

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def fit(
        self,
        train: pl.DataFrame,
        validation: pl.DataFrame | None = None,
        *,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> "FlexMFExplicitScorer":
        """Train on ``train`` (user_id, item_id, rating); ``validation`` drives early stopping."""
        _check_frame(train, "train")
        if train.height == 0:
            raise DataValidationError("train: no ratings to train on")
        if validation is not None:
            _check_frame(validation, "validation")
        cfg = self.config
        self.device = dev = resolve_device(self._device_spec)
        t0 = time.perf_counter()

        self.users, u_np = IdIndex.fit(train["user_id"])
        self.items, i_np = IdIndex.fit(train["item_id"])
        self.n_users, self.n_items = len(self.users), len(self.items)
        r_np = np.array(train["rating"].cast(pl.Float32).to_numpy())
        self.global_mean = float(r_np.astype(np.float64).mean())
        self.rating_range = (float(r_np.min()), float(r_np.max()))
        self.seen = SeenItems.build(u_np, i_np, self.n_users, dev)

        gen = make_generator(cfg.seed, dev)
        k = cfg.embedding_size
        width = k + 2 if cfg.bias else k
        tables = f"embedding_size={k} ({self.n_users} users, {self.n_items} items)"
        with oom_guard(cfg.batch_size, "model allocation", setting=tables):
            self.user_table = self._init_table(self.n_users, width, k, gen, user_side=True)
            self.item_table = self._init_table(self.n_items, width, k, gen, user_side=False)

        users = torch.from_numpy(u_np).to(dev)
        items = torch.from_numpy(i_np).to(dev)
        resid = torch.from_numpy(r_np).to(dev) - self.global_mean
        val = self._validation_rows(validation) if validation is not None else None

        self.history = []
        best_rmse, best_state, bad = math.inf, None, 0
        self.best_epoch = None
        batch = min(cfg.batch_size, len(r_np))
        state = None
        if cfg.optimizer == "adam":  # the tables become views into the optimizer state while training
            state = _AdamState(self.user_table, self.item_table, batch)
            self.user_table, self.item_table = state.P[:, 0], state.Q[:, 0]
        lr = cfg.learning_rate
        n = len(resid)
        native = _native.usable(dev)
        self.engine = "native" if native else "torch"
        # expected squared error at initialization: the ratings' variance (the global mean's error)
        # plus E[(p . q)^2] = k * init_scale^4 of the N(0, init_scale) embeddings (biases start at 0)
        guard = DivergenceGuard(float(np.var(r_np, dtype=np.float64)) + k * cfg.init_scale**4, cfg.learning_rate)
        scratch = (
            (_native.Scratch(self.n_users + 1, width), _native.Scratch(self.n_items + 1, width)) if native else None
        )
        with oom_guard(cfg.batch_size), hot_loop_threads(dev, requested_threads(self._device_spec)):
            for epoch in range(1, cfg.epochs + 1):
                e0 = time.perf_counter()
                perm = torch.randperm(n, generator=gen, device=dev)
                run = self._run_epoch_native if native else self._run_epoch
                loss = run(users[perm], items[perm], resid[perm], lr, state, scratch)
                train_loss = float(loss) / n
                guard.check(epoch, train_loss, self.user_table, self.item_table)
                record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "val_rmse": None}
                if val is not None:
                    record["val_rmse"] = self._rmse_rows(*val)
                record["seconds"] = time.perf_counter() - e0
                self.history.append(record)
                self.epochs_run = epoch
                if callback is not None:
                    callback(dict(record))
                lr *= cfg.lr_decay
                if val is None:
                    self.best_epoch = epoch
                    continue
                if record["val_rmse"] < best_rmse:
                    best_rmse, self.best_epoch, bad = record["val_rmse"], epoch, 0
                    if cfg.patience is not None:
                        best_state = (self.user_table.clone(), self.item_table.clone())
                else:
                    bad += 1
                    if cfg.patience is not None and bad >= cfg.patience:
                        break
        if best_state is not None and self.best_epoch != self.epochs_run:
            self.user_table, self.item_table = best_state
        self.user_table, self.item_table = self.user_table.contiguous(), self.item_table.contiguous()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.train_seconds = time.perf_counter() - t0
        self.updates_per_second = self.epochs_run * n / max(self.train_seconds, 1e-9)
        return self

    def _init_table(self, rows: int, width: int, k: int, gen: torch.Generator, *, user_side: bool) -> torch.Tensor:
        """``rows`` trained rows plus one zero 'unknown' row; bias columns as described above."""
        table = torch.zeros(rows + 1, width, device=self.device)
        # drawn contiguous (torch's vectorised normal_ path), then placed: much faster than a strided fill
        table[:rows, :k] = torch.empty(rows, k, device=self.device).normal_(0.0, self.config.init_scale, generator=gen)
        if width > k:
            table[:, k + 1 if user_side else k] = 1.0
        return table

    def _regularization(self) -> tuple[float, float, int | None, int | None]:
        """``(l2, decay, user_const_col, item_const_col)`` of the configuration."""
        cfg = self.config
        reg = cfg.regularization if cfg.reg_method is not None else 0.0
        l2 = reg if cfg.reg_method == "L2" or cfg.optimizer == "sgd" else 0.0
        decay = reg if cfg.reg_method == "AdamW" and cfg.optimizer == "adam" else 0.0
        k = cfg.embedding_size
        # the user table's constant column is k+1, the item table's k (see the module docstring)
        u_const, i_const = (k + 1, k) if cfg.bias else (None, None)
        return l2, decay, u_const, i_const

    def _run_epoch_native(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        resid: torch.Tensor,
        lr: float,
        adam: "_AdamState | None",
        scratch: "tuple[_native.Scratch, _native.Scratch]",
    ) -> float:
        """The same pass as :meth:`_run_epoch`, fused into one call of the C kernel."""
        l2, decay, u_const, i_const = self._regularization()
        w = self.user_table.shape[1]
        P, Q = (self.user_table, self.item_table) if adam is None else (adam.P, adam.Q)  # [param|m|v] rows
        t = ctypes.c_int64(adam.t if adam is not None else 0)
        batch = min(self.config.batch_size, len(resid))
        err = scratch[0].buffer(batch)
        loss = _native.kernels().flexmf_explicit_epoch(
            _native.ptr(P), _native.ptr(Q), P.shape[0], Q.shape[0], w, 0 if adam is None else 1,
            _native.ptr(users), _native.ptr(items), _native.ptr(resid), len(resid),
            batch, lr, l2, decay, ctypes.byref(t),
            -1 if u_const is None else u_const, -1 if i_const is None else i_const,
            *scratch[0].args(), *scratch[1].args(), _native.ptr(err), _native.threads(),
        )
        if adam is not None:
            adam.t = t.value
        return loss

    def _run_epoch(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        resid: torch.Tensor,
        lr: float,
        adam: "_AdamState | None",
        scratch: object = None,
    ) -> torch.Tensor:
        """One pass over already-permuted ratings; returns the summed squared error (a tensor).

        Every batch works in preallocated buffers (no per-batch allocation of ``batch x width``
        temporaries) and leaves the constant ``1`` bias columns out of the update instead of
        restoring them afterwards.
        """
        cfg = self.config
        P, Q = self.user_table, self.item_table
        l2, decay, u_const, i_const = self._regularization()
        loss = torch.zeros((), device=P.device, dtype=torch.float64)
        bs = min(cfg.batch_size, len(resid))
        buf = _Buffers(bs, P.shape[1], self.n_users, self.n_items, P.device)
        for start in range(0, len(resid), bs):
            u = users[start : start + bs]
            i = items[start : start + bs]
            m = len(u)
            pu, qi, gp, gq = (b[:m] for b in (buf.pu, buf.qi, buf.gp, buf.gq))
            err = buf.err[:m]
            torch.index_select(P, 0, u, out=pu)
            torch.index_select(Q, 0, i, out=qi)
            torch.mul(pu, qi, out=gp)
            torch.sum(gp, 1, out=err)
            torch.sub(resid[start : start + bs], err, out=err)
            loss += err.dot(err)
            if adam is None:
                _sgd_side(P, u, pu, qi, err, gp, buf, buf.count_u, lr, l2, u_const)
                _sgd_side(Q, i, qi, pu, err, gq, buf, buf.count_i, lr, l2, i_const)
            else:
                adam.t += 1
                torch.mul(qi, err.unsqueeze(1), out=gp)
                torch.mul(pu, err.unsqueeze(1), out=gq)
                adam.step(adam.P, adam.group_u, u, gp, lr, l2, decay, u_const)
                adam.step(adam.Q, adam.group_i, i, gq, lr, l2, decay, i_const)
        return loss

    def _validation_rows(self, df: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = torch.from_numpy(self._user_rows(df["user_id"])).to(self.device)
        i = torch.from_numpy(self._item_rows(df["item_id"])).to(self.device)
        r = torch.from_numpy(np.array(df["rating"].cast(pl.Float32).to_numpy())).to(self.device)
        return u, i, r

    def _rmse_rows(self, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> float:
        if len(r) == 0:
            return float("nan")
        pred = self._predict_rows(u, i)
        return float(torch.sqrt(((pred.double() - r.double()) ** 2).mean()))

    # ------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------

    def _require_fit(self) -> None:
        if not hasattr(self, "user_table"):
            raise DataValidationError("FlexMFExplicitScorer: call fit() (or load()) before scoring")

    def _user_rows(self, values: Any) -> np.ndarray:
        rows = self.users.lookup(values)
        rows[rows < 0] = self.n_users  # the 'unknown' row
        return rows

    def _item_rows(self, values: Any) -> np.ndarray:
        rows = self.items.lookup(values)
        rows[rows < 0] = self.n_items
        return rows

    @torch.no_grad()
    def _predict_rows(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(u), device=self.user_table.device)
        for s in range(0, len(u), _PREDICT_CHUNK):
            pu = self.user_table.index_select(0, u[s : s + _PREDICT_CHUNK])
            qi = self.item_table.index_select(0, i[s : s + _PREDICT_CHUNK])
            out[s : s + _PREDICT_CHUNK] = (pu * qi).sum(1) + self.global_mean
        if self.config.clamp:
            out.clamp_(*self.rating_range)
        return out

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predicted ratings (float32) for parallel arrays of raw user and item ids.

        Users or items unseen in training get the bias-only prediction (never NaN).
        """
        self._require_fit()
        u = self._user_rows(users)
        i = self._item_rows(items)
        if len(u) != len(i):
            raise DataValidationError(f"predict: {len(u)} users but {len(i)} items")
        dev = self.user_table.device
        return self._predict_rows(torch.from_numpy(u).to(dev), torch.from_numpy(i).to(dev)).cpu().numpy()

    def recommend(
        self,
        users: Any = None,
        n: int = 20,
        exclude_seen: bool = True,
        batch_size: int = 1024,
    ) -> pl.DataFrame:
        """Top-``n`` items per user: ``user_id, item_id, score, rank`` (rank 1-based).

        ``users=None`` means every training user. Scores are unclamped predicted ratings; items the
        user rated in training are excluded when ``exclude_seen``. Users are scored ``batch_size``
        at a time on the model's device (memory ``batch_size x n_items``).
        """
        self._require_fit()
        raw = self.users.ids if users is None else (
            users.to_numpy() if isinstance(users, pl.Series) else np.asarray(users).reshape(-1)
        )
        dev = self.user_table.device
        rows = torch.from_numpy(self.users.lookup(raw)).to(dev)
        P, Q = self.user_table, self.item_table[: self.n_items]
        QT = Q.T.contiguous()

        def score(batch: torch.Tensor) -> torch.Tensor:
            safe = torch.where(batch >= 0, batch, torch.full_like(batch, self.n_users))
            return (P.index_select(0, safe) @ QT).add_(self.global_mean)

        pos, item_rows, scores, ranks = recommend_in_batches(
            score, rows, n, self.n_items, self.seen if exclude_seen else None, batch_size
        )
        return pl.DataFrame(
            {
                "user_id": pl.Series(raw[pos]) if len(pos) else pl.Series(raw[:0]),
                "item_id": pl.Series(self.items.ids[item_rows]) if len(item_rows) else pl.Series(self.items.ids[:0]),
                "score": pl.Series(scores, dtype=pl.Float32),
                "rank": pl.Series(ranks, dtype=pl.Int32),
            }
        )

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model to directory ``path`` atomically (safetensors + json, no pickle)."""
        self._require_fit()
        tensors = {
            "user_table": self.user_table,
            "item_table": self.item_table,
            "seen_indptr": self.seen.indptr,
            "seen_indices": self.seen.indices,
        }
        meta: dict[str, Any] = {
            "kind": KIND,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "global_mean": self.global_mean,
            "rating_range": list(self.rating_range),
            "history": self.history,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
            "updates_per_second": self.updates_per_second,
            "engine": self.engine,
            "device": str(self.device),
        }
        for name, index in (("user", self.users), ("item", self.items)):
            t, m = index.to_state(name)
            tensors.update(t)
            meta.update(m)
        return save_model_dir(path, tensors, self.config.to_dict(), meta)

    @classmethod
    def load(
        cls, path: str | Path, device: DeviceSettings | str | torch.device | None = None
    ) -> "FlexMFExplicitScorer":
        """Load a model saved with :meth:`save`.

        Verifies the tensor file's sha256 first, then every field and tensor against the others
        (types, ranges, shapes against the recorded sizes, finite weights, seen items within the
        catalogue): a forged or corrupt file is a one-line :class:`ConfigError` naming it.
        """
        dev = resolve_device(device)
        tensors, config, meta = load_model_dir(path, dev, kind=KIND)
        tensor_file = Path(path) / TENSOR_FILE
        cfg = FlexMFExplicitConfig.from_dict(config, where=f"{Path(path) / 'config.json'}")
        self = cls(cfg, device=dev)
        self.device = dev
        self.n_users, self.n_items = meta.integer("n_users", lo=1), meta.integer("n_items", lo=1)
        self.users = IdIndex.from_state("user", tensors, meta, tensor_file, self.n_users)
        self.items = IdIndex.from_state("item", tensors, meta, tensor_file, self.n_items)
        width = cfg.embedding_size + (2 if cfg.bias else 0)
        self.user_table = expect_tensor(tensors, "user_table", (self.n_users + 1, width), torch.float32,
                                        tensor_file, finite=True)
        self.item_table = expect_tensor(tensors, "item_table", (self.n_items + 1, width), torch.float32,
                                        tensor_file, finite=True)
        self.seen = SeenItems.from_state(tensors, self.n_users, self.n_items, tensor_file)
        check_tensor_names(tensors, {"user_table", "item_table", "seen_indptr", "seen_indices", "user_ids",
                                     "item_ids"}, tensor_file)
        self.global_mean = meta.number("global_mean")
        check_score_range(self.user_table, self.item_table, tensor_file, extra=abs(self.global_mean))
        self.rating_range = meta.bounds("rating_range")
        self.history = meta.history()
        self.epochs_run = meta.integer("epochs_run", default=0)
        self.best_epoch = meta.integer("best_epoch", lo=1, hi=self.epochs_run, default=None, optional=True)
        self.train_seconds = meta.number("train_seconds", lo=0, default=0.0)
        self.updates_per_second = meta.number("updates_per_second", lo=0, default=0.0)
        self.engine = meta.choice("engine", ("native", "torch"), default="torch")
        return self


class _Buffers:
    """Per-fit scratch tensors for one batch, reused by every batch of every epoch."""

    def __init__(self, batch: int, width: int, n_users: int, n_items: int, device: torch.device):
        self.pu, self.qi, self.gp, self.gq = (torch.empty(batch, width, device=device) for _ in range(4))
        self.err, self.tmp, self.scale = (torch.empty(batch, device=device) for _ in range(3))
        self.ones = torch.ones(batch, device=device)
        # per-row rating counts within a batch (SGD), kept all-zero between batches
        self.count_u = torch.zeros(n_users + 1, device=device)
        self.count_i = torch.zeros(n_items + 1, device=device)


def _sgd_side(
    table: torch.Tensor,
    rows: torch.Tensor,
    own: torch.Tensor,
    other: torch.Tensor,
    err: torch.Tensor,
    out: torch.Tensor,
    buf: _Buffers,
    counts: torch.Tensor,
    lr: float,
    l2: float,
    const: int | None,
) -> None:
    """SGD step of one side: ``row += lr / sqrt(c) * (err * other - l2 * row)`` for each rating.

    ``c`` is the number of ratings of that row in the batch. Summed plain SGD steps grow with the
    batch size (a popular row takes ``c`` steps from the same stale point, and diverges at large
    batches); dividing by ``sqrt(c)`` keeps a row's step bounded while a row seen once in a batch
    moves exactly as in plain SGD. ``const`` is the constant ``1`` column, left out of the update.
    """
    m = len(rows)
    scale, tmp = buf.scale[:m], buf.tmp[:m]
    counts.index_add_(0, rows, buf.ones[:m])
    torch.index_select(counts, 0, rows, out=scale)
    counts.index_fill_(0, rows, 0.0)
    scale.rsqrt_().mul_(lr)
    torch.mul(err, scale, out=tmp)
    torch.mul(other, tmp.unsqueeze(1), out=out)
    if l2:
        out.addcmul_(own, scale.mul_(-l2).unsqueeze(1))
    if const is not None:
        out[:, const] = 0.0
    table.index_add_(0, rows, out)


class _RowGroups:
    """Distinct rows of a batch and each rating's position among them, without sorting.

    Marks the rows in a dense flag vector and reads them back with ``nonzero`` (ascending, like
    ``torch.unique``), which is several times faster than ``torch.unique``'s sort for tables up to
    ~16x the batch; larger tables fall back to ``torch.unique``.
    """

    def __init__(self, n_rows: int, device: torch.device):
        self.n_rows = n_rows
        self.mark = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.slot = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.arange = torch.arange(n_rows, device=device)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_rows > 16 * len(rows):
            return torch.unique(rows, return_inverse=True)
        self.mark.index_fill_(0, rows, True)
        uniq = self.mark.nonzero().squeeze(1)
        self.slot.index_copy_(0, uniq, self.arange[: len(uniq)])
        self.mark.index_fill_(0, uniq, False)
        return uniq, self.slot.index_select(0, rows)


class _AdamState:
    """Lazy sparse Adam for the two tables (a row's moments move only when the row is in a batch).

    A row's parameters and both moments sit side by side in one ``(rows, 3, width)`` tensor, so a
    step is one gather and one scatter of the batch's distinct rows; during training the scorer's
    tables are views of slot 0. Gradients are summed per distinct row into a reused buffer.
    """

    def __init__(self, P: torch.Tensor, Q: torch.Tensor, batch: int):
        dev = P.device
        self.P = torch.zeros(P.shape[0], 3, P.shape[1], device=dev)
        self.Q = torch.zeros(Q.shape[0], 3, Q.shape[1], device=dev)
        self.P[:, 0] = P
        self.Q[:, 0] = Q
        self.group_u = _RowGroups(P.shape[0], dev)
        self.group_i = _RowGroups(Q.shape[0], dev)
        self.grad = torch.empty(batch, P.shape[1], device=dev)
        self.denom = torch.empty(batch, P.shape[1], device=dev)
        self.t = 0

    def step(
        self,
        state: torch.Tensor,
        group: _RowGroups,
        idx: torch.Tensor,
        ascent: torch.Tensor,
        lr: float,
        l2: float,
        decay: float,
        const: int | None,
    ) -> None:
        """One Adam step for the rows in ``idx`` given per-rating ascent directions (= -gradient).

        ``l2`` adds ``-l2 * row`` per rating (the L2 term, summed per row as ``-l2 * count * row``);
        ``decay`` applies decoupled weight decay ``row -= lr * decay * row`` (AdamW).
        """
        t = max(self.t, 1)
        b1, b2 = _ADAM_BETAS
        uniq, inv = group(idx)
        n = len(uniq)
        g = self.grad[:n].zero_().index_add_(0, inv, ascent)
        rows_state = state.index_select(0, uniq)
        rows, m, v = rows_state[:, 0], rows_state[:, 1], rows_state[:, 2]
        if l2:
            count = torch.bincount(inv, minlength=n).to(g.dtype)
            g.addcmul_(rows, count.unsqueeze(1), value=-l2)
        if const is not None:
            g[:, const] = 0.0  # moments of the constant column stay 0, so its update is 0
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        denom = torch.sqrt(v, out=self.denom[:n]).add_(_ADAM_EPS).div_(step)
        update = torch.div(m, denom, out=g)
        if decay:
            update.sub_(rows, alpha=lr * decay)
            if const is not None:
                update[:, const] = 0.0
        rows.add_(update)
        state.index_copy_(0, uniq, rows_state)
