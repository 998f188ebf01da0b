"""FlexMF for implicit feedback: the losses of :mod:`.losses` with negatives from :mod:`.sampling`.

Training is minibatch Adam(W) over pre-permuted interactions (no DataLoader, no autograd): the
gradients of the losses are derived by hand, and a lazy AdamW (:class:`.optim.SparseAdam` with
catch-up) touches only the batch's distinct user and item rows; biases live in the same rows (the
table layout of :mod:`.scorer`), so one gather serves scores and gradients. Negatives are drawn for
a whole chunk of batches at once; the misranked sampler scores a batch-wide candidate pool with the
current model in one matrix product, one batch at a time.

Two training strategies, which draw the same negatives (the samplers run in torch for both) and
agree up to float rounding: on a CPU the fused C kernel (:class:`NativeEngine`) takes the gradient
and optimizer work of every batch of a chunk, else the eager torch engine (:class:`TorchEngine`:
the reference, the GPU path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import torch

from flexmf_assets.errors import DataValidationError
from flexmf_assets.flexmf import _abi, _native
from flexmf_assets.flexmf.als import ImplicitALSStrategy
from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig
from flexmf_assets.flexmf.losses import backprop, loss_named, score_gradients, warp_rank_weights
from flexmf_assets.flexmf.model_files import expect_tensor
from flexmf_assets.flexmf.optim import RowGroups, SparseAdam
from flexmf_assets.flexmf.sampling import NegativeSample, PositiveSet, make_sampler
from flexmf_assets.flexmf.scorer import FlexMFScorer, TableLayout
from flexmf_assets.flexmf.training import MinibatchStrategy, Strategy, TrainingData

KIND = "flexmf-implicit"
#: random (uniform/popular) negatives are drawn for this many batches at once; misranked ones,
#: which depend on the current model, one batch at a time
_CHUNK_BATCHES = 64


def interactions(frame: pl.DataFrame, min_rating: float | None, *, what: str = "train") -> pl.DataFrame:
    """Distinct ``user_id, item_id`` pairs of ``frame`` that count as interactions under ``min_rating``."""
    for col in ("user_id", "item_id"):
        if col not in frame.columns:
            raise DataValidationError(f"{what} frame lacks column {col!r}; it has {', '.join(frame.columns)}")
    if min_rating is not None:
        if "rating" not in frame.columns:
            raise DataValidationError(
                f"{what} frame has no 'rating' column but min_rating={min_rating} is set"
            )
        frame = frame.filter(pl.col("rating") >= min_rating)
    pairs = frame.select("user_id", "item_id")
    if _all_distinct(pairs):  # ratings usually are (a tenth of polars' order-keeping unique)
        return pairs
    return pairs.unique(maintain_order=True)


def _all_distinct(pairs: pl.DataFrame) -> bool:
    """True when the integer ``user_id, item_id`` pairs are known to be distinct (False: not known)."""
    if pairs.height < 2:
        return True
    for col in pairs.iter_columns():
        if not col.dtype.is_integer() or col.null_count() or not -(1 << 61) <= col.min() <= col.max() < 1 << 61:
            return False
    u, i = (pairs[c].to_numpy().astype(np.int64) for c in ("user_id", "item_id"))
    u, i = u - u.min(), i - i.min()
    span = int(i.max()) + 1
    if (int(u.max()) + 1) * span >= 1 << 62:
        return False
    keys = np.sort(u * span + i)
    return bool((keys[1:] != keys[:-1]).all())


class FlexMFImplicitScorer(FlexMFScorer):
    """Implicit-feedback matrix factorization; the same library API as the explicit scorer. Scores
    are logits (higher = more likely); validation is NDCG@``eval_k`` of the validation pairs."""

    config_class = FlexMFImplicitConfig
    kind = KIND
    metric = "val_ndcg"
    higher_is_better = True
    config: FlexMFImplicitConfig

    @property
    def layout(self) -> TableLayout:
        cfg = self.config
        if cfg.solver == "als":  # weighted ALS fits no biases
            return TableLayout(cfg.embedding_size, False, False)
        return TableLayout(cfg.embedding_size, bool(cfg.user_bias), cfg.item_bias)

    def _training_pairs(self, train: pl.DataFrame) -> pl.DataFrame:
        pairs = interactions(train, self.config.min_rating)
        if pairs.height == 0:
            raise DataValidationError(
                f"train: no interactions left (rows={train.height}, min_rating={self.config.min_rating})"
            )
        return pairs

    def _training_data(self, pairs: pl.DataFrame, users: np.ndarray, items: np.ndarray) -> TrainingData:
        if self.n_items < 2:
            raise DataValidationError("train: needs at least 2 distinct items to sample negatives")
        return TrainingData(torch.from_numpy(users).to(self.device), torch.from_numpy(items).to(self.device))

    def _initial_embeddings(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        init = torch.Generator().manual_seed(self.config.seed)  # on the CPU: the same start on every device
        k, scale = self.config.embedding_size, self.config.init_scale
        return tuple(torch.randn(n, k, generator=init) * scale for n in (self.n_users, self.n_items))

    def _initial_loss(self, data: TrainingData) -> float:
        """An upper bound of the expected mean loss per positive at initialization (the guard's scale).

        Biases start at 0 and a score is ``p . q`` of N(0, init_scale) embeddings: a centred value
        with standard deviation ``sigma = sqrt(k) * init_scale^2``; the loss's own bound
        (:attr:`.losses.Loss.initial`) plus the L2 term ``l2 * ||row||^2`` for the user and the
        ``1 + c`` items of every positive.
        """
        cfg = self.config
        k, c = cfg.embedding_size, cfg.negative_count
        l2 = cfg.regularization if cfg.reg_method == "L2" else 0.0
        sigma = math.sqrt(k) * cfg.init_scale**2
        loss = loss_named(cfg.loss).initial(cfg.positive_weight, c, sigma, self.n_items)
        return loss + l2 * (2 + c) * k * cfg.init_scale**2

    def _strategy(self) -> Strategy:
        if self.config.solver == "als":
            return ImplicitALSStrategy()
        native = _native.usable(self.device) and self.config.negative_count <= _abi.MAX_NEGATIVES
        return NativeEngine() if native else TorchEngine()

    def _validation_set(self, frame: pl.DataFrame) -> tuple[torch.Tensor, pl.DataFrame]:
        pairs = interactions(frame, self.config.min_rating, what="validation")
        pairs = pairs.filter(pl.Series(self.users.lookup(pairs["user_id"]) >= 0))
        users = np.unique(self.users.lookup(pairs["user_id"]))
        return torch.from_numpy(users).to(self.device), pairs

    def _validation_metric(self, validation: tuple[torch.Tensor, pl.DataFrame]) -> float:
        """NDCG@``eval_k`` of the validation pairs (known users only)."""
        from flexmf_assets.evaluation.topn import topn_metrics

        rows, truth = validation
        k = self.config.eval_k
        pos, item_rows, scores, ranks = self._recommend_rows(rows, k, True, 1024)
        if len(pos) == 0 or truth.height == 0:
            return 0.0
        recs = pl.DataFrame({"user_id": self.users.ids[rows.cpu().numpy()[pos]],
                             "item_id": self.items.ids[item_rows],
                             "score": scores.astype(np.float32), "rank": ranks.astype(np.int32)})
        return topn_metrics(recs, truth, ks=(k,)).means[f"ndcg@{k}"]

    def _save_fields(self) -> dict[str, Any]:
        return {"eval_k": self.config.eval_k}

    def parameters(self) -> dict[str, torch.Tensor]:
        """``user_embedding``, ``item_embedding`` and the biases the configuration learns."""
        layout, U, I = self.layout, self.user_table[:-1], self.item_table[:-1]
        out = {"user_embedding": U[:, : layout.k].contiguous(), "item_embedding": I[:, : layout.k].contiguous()}
        if layout.user_bias_col is not None:
            out["user_bias"] = U[:, layout.user_bias_col].contiguous()
        if layout.item_bias_col is not None:
            out["item_bias"] = I[:, layout.item_bias_col].contiguous()
        return out

    def _tables_from(self, tensors, where):
        layout, nu, ni = self.layout, self.n_users, self.n_items
        shapes = {"user_embedding": (nu, layout.k), "item_embedding": (ni, layout.k)}
        if layout.user_bias:
            shapes["user_bias"] = (nu,)
        if layout.item_bias:
            shapes["item_bias"] = (ni,)
        p = {name: expect_tensor(tensors, name, shape, torch.float32, where, finite=True)
             for name, shape in shapes.items()}
        user = layout.table(p["user_embedding"], self.device, user_side=True)
        item = layout.table(p["item_embedding"], self.device, user_side=False)
        if layout.user_bias:
            user[:-1, layout.user_bias_col] = p["user_bias"]
        if layout.item_bias:
            item[:-1, layout.item_bias_col] = p["item_bias"]
        return user, item, set(shapes)


# ----------------------------------------------------------------------------------------------
# training strategies
# ----------------------------------------------------------------------------------------------


class _Engine(MinibatchStrategy):
    """What both implicit strategies share: the negatives, AdamW with catch-up of idle rows (at the
    end of every epoch too)."""

    adam: tuple[SparseAdam, SparseAdam]

    def setup(self, core: FlexMFImplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        cfg = self.cfg
        self.loss = loss_named(cfg.loss)
        self.wd = cfg.regularization if cfg.reg_method == "AdamW" else 0.0
        self.l2 = cfg.regularization if cfg.reg_method == "L2" else 0.0
        self.use_adam(cfg.learning_rate, self.wd, catch_up=True)
        positives = PositiveSet(data.users, data.items, core.n_items)
        self.sampler = make_sampler(cfg.negative_strategy, positives, data.items,
                                    candidates=cfg.misranked_candidates)
        self.warp_table = None
        if self.loss.rank_weighted:  # indexed by trials, 1..misranked_candidates: on a catalogue smaller
            # than that, trials past n_items - 1 estimate a rank of 0, whose weight L(0) is 0
            table = warp_rank_weights(core.n_items, data.users.device)
            short = max(0, cfg.misranked_candidates + 1 - len(table))
            self.warp_table = torch.cat([table, table.new_zeros(short)])
        self.user_groups = RowGroups(core.n_users + 1, data.users.device)
        self.chunk = cfg.batch_size * (1 if self.sampler.needs_model else _CHUNK_BATCHES)

    def epoch(self, epoch: int) -> float:
        d, n, perm = self.data, len(self.data), self.permutation()
        total = torch.zeros((), device=d.users.device, dtype=torch.float64)
        for start in range(0, n, self.chunk):
            idx = perm[start : start + self.chunk]
            us, ps = d.users.index_select(0, idx), d.items.index_select(0, idx)  # 4x faster than d.users[idx]
            neg = self._negatives(us, ps)
            weight = None if self.warp_table is None else self.warp_table[neg.trials[:, 0]]
            total += self._batches(us, ps, neg, weight)
        self._flush()
        return float(total) / n

    def _negatives(self, us: torch.Tensor, pos: torch.Tensor) -> NegativeSample:
        cfg, gen = self.cfg, self.data.generator
        if not self.sampler.needs_model:
            return self.sampler.sample(us, cfg.negative_count, generator=gen)
        # scored with the current model: the batch's distinct users against a pool of items
        U, I = self.core.user_table, self.core.item_table
        urows, uinv = self.user_groups(us)
        P = U.index_select(0, urows)
        pool_scores = lambda pool: (P @ I.index_select(0, pool).T, uinv)  # noqa: E731
        if self.loss.rank_weighted:
            s_pos = (P.index_select(0, uinv) * I.index_select(0, pos)).sum(1)
            return self.sampler.sample(us, 1, pos_scores=s_pos, generator=gen, pool_scores=pool_scores)
        return self.sampler.sample(us, cfg.negative_count, generator=gen, pool_scores=pool_scores)

    def _batches(self, us: torch.Tensor, pos: torch.Tensor, neg: NegativeSample,
                 weight: torch.Tensor | None) -> float | torch.Tensor:
        """Every batch of a chunk, one Adam step each (``self.step`` counts them); the summed loss."""
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError


class NativeEngine(_Engine):
    """The batches of a chunk fused in the C kernel ``flexmf_implicit_batches``."""

    name = "native"

    def setup(self, core: FlexMFImplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        self.use_native()
        self.ds = torch.empty(self.cfg.batch_size * (1 + self.cfg.negative_count))

    def _train(self) -> _abi.Train:
        return self.native_train(self.cfg.learning_rate, self.l2, self.wd)

    def _batches(self, us, pos, neg, weight):
        us, pos, items = us.contiguous(), pos.contiguous(), neg.items.to(torch.int64).contiguous()
        valid = neg.valid.contiguous()
        weight = None if weight is None else weight.to(torch.float32).contiguous()
        args = _abi.ImplicitArgs(
            train=self._train(), loss_kind=self.loss.kind, k=self.layout.k, negatives=items.shape[1],
            users=_abi.ptr(us), pos=_abi.ptr(pos), neg=_abi.ptr(items), valid=_abi.ptr(valid),
            weight=_abi.ptr(weight), n=us.numel(), batch=self.cfg.batch_size,
            positive_weight=self.cfg.positive_weight, ds=_abi.ptr(self.ds))
        _native.run("flexmf_implicit_batches", args)
        self.step = args.train.step
        return args.train.loss

    def _flush(self) -> None:
        _native.run("flexmf_adam_flush", self._train())


class TorchEngine(_Engine):
    """Every batch in eager torch: hand-derived gradients (:func:`.losses.score_gradients`,
    :func:`.losses.backprop`), then one Adam step of the touched rows."""

    name = "torch"

    def setup(self, core: FlexMFImplicitScorer, data: TrainingData) -> None:
        super().setup(core, data)
        self.item_groups = RowGroups(core.n_items + 1, data.users.device)

    def _batches(self, us, pos, neg, weight):
        total = torch.zeros((), device=us.device, dtype=torch.float64)
        b = self.cfg.batch_size
        for s in range(0, us.numel(), b):
            self.step += 1
            part = slice(s, s + b)
            total += self._step(us[part], pos[part], neg.items[part], neg.valid[part],
                                None if weight is None else weight[part])
        return total

    def _step(self, us: torch.Tensor, pos: torch.Tensor, neg_items: torch.Tensor, neg_valid: torch.Tensor,
              warp_weight: torch.Tensor | None) -> torch.Tensor:
        """One minibatch with its negatives; returns its summed loss (a 0-d float64 tensor, no sync)."""
        cfg, U, I = self.cfg, self.core.user_table, self.core.item_table
        b, c = us.numel(), neg_items.shape[1]
        urows, uinv = self.user_groups(us)
        P = U.index_select(0, urows)  # the batch's distinct user rows
        all_items = torch.cat([pos.unsqueeze(1), neg_items], 1)  # [b, 1 + c], positive first
        irows, iinv = self.item_groups(all_items.reshape(-1))
        Q = I.index_select(0, irows)
        # one row per (positive or negative) pair, all 2-D: tiny bmm's and mid-axis broadcasts are
        # several times slower on CPU than a gather plus a flat elementwise product
        X = Q.index_select(0, iinv)  # [b * (1 + c), w]
        uinv_rep = uinv.unsqueeze(1).expand(b, 1 + c).reshape(-1)
        pu_rep = P.index_select(0, uinv_rep)
        s = (X * pu_rep).sum(1).view(b, 1 + c)
        ds, loss = score_gradients(cfg.loss, s, neg_valid.to(s.dtype), b, cfg.positive_weight, warp_weight)
        g_user, g_item = backprop(ds, X, pu_rep, uinv_rep, iinv, P.shape[0], Q.shape[0])
        if self.l2:
            k = self.layout.k
            counts = (torch.bincount(uinv, minlength=len(urows)), torch.bincount(iinv, minlength=len(irows)))
            for g, rows, cnt in ((g_user, P, counts[0]), (g_item, Q, counts[1])):
                weighted = rows[:, :k] * cnt.unsqueeze(1).to(rows.dtype)
                g[:, :k].add_(weighted, alpha=2 * self.l2 / b)
                loss = loss + self.l2 * (weighted * rows[:, :k]).sum(dtype=torch.float64) / b
        self.adam[0].step(urows, g_user, self.step)
        self.adam[1].step(irows, g_item, self.step)
        return loss * b

    def _flush(self) -> None:
        for adam in self.adam:
            adam.flush(self.step)


__all__ = ["FlexMFImplicitScorer", "NativeEngine", "TorchEngine", "interactions"]
