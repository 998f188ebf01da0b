"""Explicit-feedback FlexMF: biased matrix factorization trained on squared error.

prediction(u, i) = mu + b_u + b_i + P_u . Q_i

The biases ride inside the tables of the scorer core (:mod:`.scorer`): a user row is
``[P_u, b_u, 1]`` and an item row ``[Q_i, 1, b_i]``, so one gather per side and one dot product give
the full prediction, ``mu`` being the core's ``score_offset``; a cold-start user or item gets the
bias-only prediction ``mu + b_(known side)``.

Two training strategies, which consume the random generator identically and agree up to float
rounding: on a CPU the fused C kernel (:class:`NativeEngine`, ``_kernels.c``: two passes over a
batch's ratings and one over its rows, no temporaries), else the eager torch engine
(:class:`TorchEngine`: the reference the kernel is tested against, the GPU path and the fallback
when no C compiler is available). Both step SGD (each row's step scaled by 1/sqrt(its ratings in the
batch), so it stays stable at any batch size) or a lazy sparse Adam (:class:`.optim.SparseAdam`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from flexmf_assets.errors import DataValidationError
from flexmf_assets.flexmf import _abi, _native
from flexmf_assets.flexmf.als import ExplicitALSStrategy
from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig
from flexmf_assets.flexmf.model_files import Fields, expect_tensor
from flexmf_assets.flexmf.optim import RowGroups
from flexmf_assets.flexmf.scorer import FlexMFScorer, TableLayout
from flexmf_assets.flexmf.training import MinibatchStrategy, Strategy, TrainingData

KIND = "flexmf-explicit"


def _check_frame(df: pl.DataFrame, name: str) -> None:
    missing = [c for c in ("user_id", "item_id", "rating") if c not in df.columns]
    if missing:
        raise DataValidationError(f"{name}: missing column(s) {', '.join(missing)}; got {df.columns}")
    nulls = [c for c in ("user_id", "item_id", "rating") if df[c].null_count()]
    if nulls:
        raise DataValidationError(f"{name}: null values in column(s) {', '.join(nulls)}")
    if df.height and not np.isfinite(df["rating"].cast(pl.Float64).to_numpy()).all():
        raise DataValidationError(f"{name}: column 'rating' has NaN or infinite values")


class FlexMFExplicitScorer(FlexMFScorer):
    """Train and score biased MF on explicit ratings (see the module docstring); ``predict`` gives
    ratings clipped to the training range (``clamp``), ``recommend`` unclamped predicted ratings."""

    config_class = FlexMFExplicitConfig
    kind = KIND
    metric = "val_rmse"
    higher_is_better = False
    config: FlexMFExplicitConfig

    @property
    def global_mean(self) -> float:
        return self.score_offset

    @property
    def layout(self) -> TableLayout:
        return TableLayout(self.config.embedding_size, self.config.has_bias, self.config.has_bias)

    def _training_pairs(self, train: pl.DataFrame) -> pl.DataFrame:
        _check_frame(train, "train")
        if train.height == 0:
            raise DataValidationError("train: no ratings to train on")
        return train

    def _training_data(self, pairs: pl.DataFrame, users: np.ndarray, items: np.ndarray) -> TrainingData:
        r = np.array(pairs["rating"].cast(pl.Float32).to_numpy())
        self.score_offset = float(r.astype(np.float64).mean())
        self.rating_range = (float(r.min()), float(r.max()))
        self._rating_variance = float(np.var(r, dtype=np.float64))
        dev = self.device
        return TrainingData(torch.from_numpy(users).to(dev), torch.from_numpy(items).to(dev),
                            torch.from_numpy(r).to(dev) - self.score_offset)

    def _initial_embeddings(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # drawn contiguous (torch's vectorised normal_ path), then placed: much faster than a strided fill
        k, scale = self.config.embedding_size, self.config.init_scale
        return tuple(torch.empty(n, k, device=self.device).normal_(0.0, scale, generator=generator)
                     for n in (self.n_users, self.n_items))

    def _initial_loss(self, data: TrainingData) -> float:
        # the ratings' variance (the global mean's error) plus E[(p . q)^2] = k * init_scale^4 of the
        # N(0, init_scale) embeddings (biases start at 0)
        return self._rating_variance + self.config.embedding_size * self.config.init_scale**4

    def _strategy(self) -> Strategy:
        if self.config.solver == "als":
            return ExplicitALSStrategy()
        return NativeEngine() if _native.usable(self.device) else TorchEngine()

    def _validation_set(self, frame: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_frame(frame, "validation")
        dev = self.device
        u = torch.from_numpy(self._rows(self.users, frame["user_id"], self.n_users)).to(dev)
        i = torch.from_numpy(self._rows(self.items, frame["item_id"], self.n_items)).to(dev)
        r = torch.from_numpy(np.array(frame["rating"].cast(pl.Float32).to_numpy())).to(dev)
        return u, i, r

    def _validation_metric(self, validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        """RMSE of the validation ratings."""
        u, i, r = validation
        if len(r) == 0:
            return float("nan")
        pred = self._predict_rows(u, i)
        return float(torch.sqrt(((pred.double() - r.double()) ** 2).mean()))

    def _clamp(self) -> tuple[float, float] | None:
        return self.rating_range if self.config.clamp else None

    def _save_fields(self) -> dict[str, Any]:
        return {"global_mean": self.score_offset, "rating_range": list(self.rating_range)}

    def _load_fields(self, meta: Fields) -> None:
        self.score_offset = meta.number("global_mean")
        self.rating_range = meta.bounds("rating_range")

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"user_table": self.user_table, "item_table": self.item_table}

    def _tables_from(self, tensors, where):
        w = self.layout.width
        user = expect_tensor(tensors, "user_table", (self.n_users + 1, w), torch.float32, where, finite=True)
        item = expect_tensor(tensors, "item_table", (self.n_items + 1, w), torch.float32, where, finite=True)
        return user, item, {"user_table", "item_table"}


# ----------------------------------------------------------------------------------------------
# training strategies
# ----------------------------------------------------------------------------------------------


class _Engine(MinibatchStrategy):
    """What both explicit strategies share: the learning-rate decay and the regularization of the
    configuration."""

    def setup(self, core: FlexMFExplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        cfg = self.cfg
        self.lr = cfg.learning_rate
        self.batch = min(cfg.batch_size, len(data))
        reg = cfg.regularization if cfg.reg_method is not None else 0.0
        # with plain SGD decoupled weight decay equals L2, so both are the L2 step
        self.l2 = reg if cfg.reg_method == "L2" or cfg.optimizer == "sgd" else 0.0
        self.decay = reg if cfg.reg_method == "AdamW" and cfg.optimizer == "adam" else 0.0
        if cfg.optimizer == "adam":
            self.use_adam(self.lr, self.decay, catch_up=False)

    def epoch(self, epoch: int) -> float:
        d, perm = self.data, self.permutation()
        loss = self._pass(d.users[perm], d.items[perm], d.residuals[perm])
        self.lr *= self.cfg.lr_decay
        return float(loss) / len(d)

    def _pass(self, users: torch.Tensor, items: torch.Tensor, resid: torch.Tensor) -> float | torch.Tensor:
        """One pass over permuted ratings at ``self.lr``; the summed squared error."""
        raise NotImplementedError


class NativeEngine(_Engine):
    """The pass fused in the C kernel ``flexmf_explicit_epoch``."""

    name = "native"

    def setup(self, core: FlexMFExplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        self.use_native()
        self.err = torch.empty(self.batch)

    def _pass(self, users: torch.Tensor, items: torch.Tensor, resid: torch.Tensor) -> float:
        train = self.native_train(self.lr, self.l2, self.decay)
        args = _abi.ExplicitArgs(train=train, users=_abi.ptr(users), items=_abi.ptr(items), resid=_abi.ptr(resid),
                                 n=len(resid), batch=self.batch, err=_abi.ptr(self.err))
        _native.run("flexmf_explicit_epoch", args)
        self.step = args.train.step
        return args.train.loss


class TorchEngine(_Engine):
    """The pass in eager torch: a handful of tensor ops per batch into preallocated buffers (no
    per-batch ``batch x width`` temporaries), hand-derived gradients, sparse row updates."""

    name = "torch"

    def setup(self, core: FlexMFExplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        dev, w, b = data.users.device, core.layout.width, self.batch
        self.pu, self.qi, self.gp, self.gq = (torch.empty(b, w, device=dev) for _ in range(4))
        self.err, self.tmp, self.scale = (torch.empty(b, device=dev) for _ in range(3))
        self.ones = torch.ones(b, device=dev)
        # per-row rating counts within a batch (SGD), kept all-zero between batches
        self.counts = (torch.zeros(core.n_users + 1, device=dev), torch.zeros(core.n_items + 1, device=dev))
        self.groups = (RowGroups(core.n_users + 1, dev), RowGroups(core.n_items + 1, dev))
        self.grad = torch.empty(b, w, device=dev)

    def _pass(self, users: torch.Tensor, items: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        P, Q = self.core.user_table, self.core.item_table
        layout = self.core.layout
        loss = torch.zeros((), device=P.device, dtype=torch.float64)
        for start in range(0, len(resid), self.batch):
            u, i = users[start : start + self.batch], items[start : start + self.batch]
            m = len(u)
            pu, qi, gp, gq, err = self.pu[:m], self.qi[:m], self.gp[:m], self.gq[:m], self.err[:m]
            torch.index_select(P, 0, u, out=pu)
            torch.index_select(Q, 0, i, out=qi)
            torch.mul(pu, qi, out=gp)
            torch.sum(gp, 1, out=err)
            torch.sub(resid[start : start + self.batch], err, out=err)
            loss += err.dot(err)
            if self.adam is None:
                self._sgd_side(P, u, pu, qi, gp, self.counts[0], layout.user_const)
                self._sgd_side(Q, i, qi, pu, gq, self.counts[1], layout.item_const)
                continue
            self.step += 1
            torch.mul(qi, err.unsqueeze(1), out=gp)  # the ascent direction of each rating's user row
            torch.mul(pu, err.unsqueeze(1), out=gq)
            for adam, groups, rows, ascent in zip(self.adam, self.groups, (u, i), (gp, gq)):
                uniq, inv = groups(rows)
                grad = self.grad[: len(uniq)].zero_().index_add_(0, inv, ascent).neg_()
                adam.lr = self.lr
                counts = torch.bincount(inv, minlength=len(uniq)) if self.l2 else None
                adam.step(uniq, grad, self.step, l2=self.l2, counts=counts)
        return loss

    def _sgd_side(self, table: torch.Tensor, rows: torch.Tensor, own: torch.Tensor, other: torch.Tensor,
                  out: torch.Tensor, counts: torch.Tensor, const: int | None) -> None:
        """SGD step of one side: ``row += lr / sqrt(c) * (err * other - l2 * row)`` for each rating.

        ``c`` is the number of ratings of that row in the batch. Summed plain SGD steps grow with the
        batch size (a popular row takes ``c`` steps from the same stale point, and diverges at large
        batches); dividing by ``sqrt(c)`` keeps a row's step bounded while a row seen once in a batch
        moves exactly as in plain SGD. ``const`` is the constant ``1`` column, left out of the update.
        """
        m = len(rows)
        scale, tmp = self.scale[:m], self.tmp[:m]
        counts.index_add_(0, rows, self.ones[:m])
        torch.index_select(counts, 0, rows, out=scale)
        counts.index_fill_(0, rows, 0.0)
        scale.rsqrt_().mul_(self.lr)
        torch.mul(self.err[:m], scale, out=tmp)
        torch.mul(other, tmp.unsqueeze(1), out=out)
        if self.l2:
            out.addcmul_(own, scale.mul_(-self.l2).unsqueeze(1))
        if const is not None:
            out[:, const] = 0.0
        table.index_add_(0, rows, out)


__all__ = ["FlexMFExplicitScorer", "NativeEngine", "TorchEngine"]
