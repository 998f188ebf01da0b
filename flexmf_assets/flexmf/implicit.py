"""FlexMF for implicit feedback: logistic, pairwise (BPR) and WARP losses with sampled negatives.

Training is minibatch Adam(W) over pre-permuted index tensors (no DataLoader, no autograd): the
gradients of the three losses are derived by hand, and a lazy AdamW touches only the batch's
distinct user and item rows (biases live in the same rows, so one gather serves scores and
gradients). Negatives come from :mod:`flexmf_assets.flexmf.sampling` and are drawn for a whole batch
at once; the misranked sampler scores a batch-wide candidate pool in one matrix product. Scoring and recommendation reuse the shared
machinery of :mod:`flexmf_assets.flexmf._common`.

On a CPU the gradient and optimizer work of each batch runs fused in C (``_kernels.c`` through
:mod:`._native`; rows then keep parameters and moments side by side); negatives are still drawn
by the samplers here, so both engines see the same negatives and agree up to float rounding.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from flexmf_assets.errors import ConfigError, DataValidationError
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
    load_model_dir,
    max_abs,
    make_generator,
    oom_guard,
    recommend_in_batches,
    requested_threads,
    save_model_dir,
)
from flexmf_assets.flexmf import _native
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device
from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig
from flexmf_assets.flexmf.sampling import PositiveSet, make_sampler, warp_rank_weights

KIND = "flexmf-implicit"
Callback = Callable[[dict[str, Any]], None]


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
    return frame.select("user_id", "item_id").unique(maintain_order=True)


_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: random (uniform/popular) negatives are drawn for this many batches at once; misranked ones,
#: which depend on the current model, one batch at a time
_CHUNK_BATCHES = 64
_LOSS_KIND = {"logistic": 0, "pairwise": 1, "warp": 2}


def _score_gradients(loss: str, s: torch.Tensor, valid: torch.Tensor, b: int, positive_weight: float,
                     warp_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """d(batch loss)/d(score) for scores ``s[b, 1 + c]`` (column 0 the positive) and the summed loss.

    The batch loss is the mean over the ``b`` positives of: logistic ``w * softplus(-s+) +
    sum softplus(s-)``; pairwise (BPR) ``sum softplus(s- - s+)``; WARP ``L(trials) * relu(1 - s+ + s-)``.
    Invalid negatives (collisions with positives, no violator found) contribute nothing.
    """
    if loss == "logistic":
        ds = torch.sigmoid(s)
        ds[:, 0].sub_(1.0).mul_(positive_weight)  # d softplus(-x)/dx = sigmoid(x) - 1
        ds[:, 1:].mul_(valid)
        total = (positive_weight * F.softplus(-s[:, 0]).sum(dtype=torch.float64)
                 + (F.softplus(s[:, 1:]) * valid).sum(dtype=torch.float64))
    elif loss == "pairwise":
        diff = s[:, 1:] - s[:, :1]
        g = torch.sigmoid(diff).mul_(valid)
        ds = torch.cat([-g.sum(1, keepdim=True), g], 1)
        total = (F.softplus(diff) * valid).sum(dtype=torch.float64)
    else:  # warp: one negative per positive
        margin = 1.0 - s[:, 0] + s[:, 1]
        w = warp_weight * valid[:, 0]
        g = w * (margin > 0).to(s.dtype)
        ds = torch.stack([-g, g], 1)
        total = (w * margin.clamp(min=0)).sum(dtype=torch.float64)
    return ds.div_(b), total / b


def _distinct(idx: torch.Tensor, n: int, counts: bool = False):
    """``(rows, inverse, counts | None)`` of ``idx`` over ``range(n)``, rows sorted ascending.

    For small ``n`` a mark-and-cumsum pass over ``range(n)`` replaces ``torch.unique``'s sort.
    """
    if n <= 16 * idx.numel():
        mark = torch.zeros(n, dtype=torch.bool, device=idx.device)
        mark[idx] = True
        rows = mark.nonzero().squeeze(1)
        inv = (torch.cumsum(mark, 0) - 1).index_select(0, idx)
        cnt = torch.bincount(inv, minlength=rows.numel()) if counts else None
        return rows, inv, cnt
    rows, inv, cnt = torch.unique(idx, return_inverse=True, return_counts=True)
    return rows, inv, cnt if counts else None


def _backprop(ds: torch.Tensor, X: torch.Tensor, pu: torch.Tensor, uinv: torch.Tensor,
              iinv: torch.Tensor, n_user_rows: int, n_item_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule through ``s[o] = pu[o] . X[o]`` for pairs ``o``: gradients summed per distinct row.

    ``ds`` holds d(loss)/d(s) per pair, ``pu``/``X`` the pair's user and item rows, and
    ``uinv``/``iinv`` the pair's index into the distinct user and item rows.
    """
    ds1 = ds.reshape(-1, 1)
    g_user = torch.zeros(n_user_rows, X.shape[1], device=X.device).index_add_(0, uinv, X * ds1)
    g_item = torch.zeros(n_item_rows, X.shape[1], device=X.device).index_add_(0, iinv, pu * ds1)
    return g_user, g_item


class _Tables:
    """User and item rows fused with their biases so that ``score = user_row . item_row``.

    Layout: ``user = [embedding | user_bias? | 1?]`` and ``item = [embedding | 1? | item_bias?]``
    (the user-bias column meets a constant 1 on the item side and vice versa). The constant columns
    are restored after every update. Tables stay contiguous: row gathers from strided views are
    several times slower on CPU.
    """

    def __init__(self, user: torch.Tensor, item: torch.Tensor, k: int, user_bias: bool,
                 item_bias: bool) -> None:
        self.k, self.w = k, user.shape[1]
        self.user, self.item = user, item
        col = k
        self.ub_col = self.ib_col = None
        user_const, item_const = [], []
        if user_bias:
            self.ub_col = col
            item_const.append(col)
            col += 1
        if item_bias:
            self.ib_col = col
            user_const.append(col)
        self.user_const = torch.tensor(user_const, dtype=torch.int64, device=user.device)
        self.item_const = torch.tensor(item_const, dtype=torch.int64, device=user.device)

    @classmethod
    def build(cls, user_emb: torch.Tensor, item_emb: torch.Tensor, user_bias: bool, item_bias: bool,
              device: torch.device) -> "_Tables":
        k = user_emb.shape[1]
        w = k + int(user_bias) + int(item_bias)
        user = torch.zeros(user_emb.shape[0], w)
        item = torch.zeros(item_emb.shape[0], w)
        user[:, :k], item[:, :k] = user_emb, item_emb
        t = cls(user.to(device), item.to(device), k, user_bias, item_bias)
        t.user.index_fill_(1, t.user_const, 1.0)
        t.item.index_fill_(1, t.item_const, 1.0)
        return t

    def params(self) -> dict[str, torch.Tensor]:
        """Named parameter tensors (contiguous copies) as saved and used for scoring."""
        k = self.k
        p = {"user_embedding": self.user[:, :k].contiguous(), "item_embedding": self.item[:, :k].contiguous()}
        if self.ub_col is not None:
            p["user_bias"] = self.user[:, self.ub_col].contiguous()
        if self.ib_col is not None:
            p["item_bias"] = self.item[:, self.ib_col].contiguous()
        return p


class _LazyAdamW:
    """AdamW over the rows of a batch only, with the idle steps of a row caught up in closed form.

    Dense AdamW keeps moving a row it saw once: its moments decay (``m * b1^j``, ``v * b2^j``) but
    keep stepping it for many steps, and weight decay shrinks it every step. Skipping that (plain
    "lazy" Adam) shrinks the effective step of rare items about tenfold and cost us 0.01 to 0.02
    NDCG. So when a row comes back after ``d`` idle steps, it first gets what dense AdamW would
    have done meanwhile with zero gradient, in closed form (weight decay, the decaying momentum
    steps, ``m *= b1^d, v *= b2^d``). Only Adam's bias correction is taken at the current step
    instead of per idle step (it matters in the first ~1000 steps) and eps is neglected in the
    tail. :meth:`flush` catches every row up (end of an epoch), so the parameters then match dense
    AdamW up to those two approximations.
    """

    def __init__(self, table: torch.Tensor, lr: float, weight_decay: float, const_cols: torch.Tensor,
                 state: torch.Tensor | None = None):
        self.table, self.lr, self.wd, self.const = table, lr, weight_decay, const_cols
        # the kernels' form of ``const_cols``: the one constant column, or -1 (a side has at most one)
        self.const_col = int(const_cols[0]) if const_cols.numel() else -1
        # the native kernels keep a row's parameters and moments side by side: ``state`` is
        # ``(rows, 3, w)`` with ``table = state[:, 0]``; the torch engine keeps separate contiguous
        # moments (strided math is slow on CPU)
        self.state = state
        self.m = torch.zeros_like(table) if state is None else state[:, 1]
        self.v = torch.zeros_like(table) if state is None else state[:, 2]
        self.last = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)

    def _step_size(self, t: int) -> float:
        b1, b2 = _ADAM_BETAS
        return self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)

    def _catch_up(self, rows: torch.Tensor | None, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  t: int) -> None:
        """Apply the zero-gradient steps ``last+1 .. t`` to the gathered rows (in place)."""
        b1, b2 = _ADAM_BETAS
        last = self.last if rows is None else self.last.index_select(0, rows)
        d = (t - last).to(p.dtype).unsqueeze(1)
        # idle step j: p <- a p - step q^j a^j m / sqrt(v), a = 1 - lr wd, q a = b1 / sqrt(b2); so
        # after d steps: p a^d - step m / sqrt(v) a^d sum_j q^j
        a = 1 - self.lr * self.wd
        q = b1 / math.sqrt(b2) / a
        decay = torch.pow(a, d)
        tail = (1 - torch.pow(q, d)).mul_(decay).mul_(self._step_size(max(t, 1)) * q / (1 - q))
        if self.wd:
            p.mul_(decay)
        p.addcdiv_(m * tail, v.sqrt().add_(_ADAM_EPS), value=-1.0)
        m.mul_(torch.pow(b1, d))
        v.mul_(torch.pow(b2, d))

    def step(self, rows: torch.Tensor, p: torch.Tensor, grad: torch.Tensor, t: int) -> None:
        """One AdamW step at global step ``t`` for the distinct ``rows`` (gathered values ``p``,
        updated in place and written back) with their summed gradient ``grad``."""
        b1, b2 = _ADAM_BETAS
        m = self.m.index_select(0, rows)
        v = self.v.index_select(0, rows)
        self._catch_up(rows, p, m, v, t - 1)
        self.last.index_fill_(0, rows, t)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self.wd:
            p.mul_(1 - self.lr * self.wd)
        p.addcdiv_(m, v.sqrt().add_(_ADAM_EPS), value=-self._step_size(t))
        if self.const.numel():
            p.index_fill_(1, self.const, 1.0)
        self.m.index_copy_(0, rows, m)
        self.v.index_copy_(0, rows, v)
        self.table.index_copy_(0, rows, p)

    def flush(self, t: int) -> None:
        """Catch every row up to step ``t`` (what dense AdamW's parameters would be now)."""
        if self.state is not None:
            _native.kernels().flexmf_adamw_flush(
                _native.ptr(self.state), _native.ptr(self.last), self.state.shape[0], self.state.shape[2],
                self.const_col, self.lr, self.wd, t, _native.threads(),
            )
            return
        self._catch_up(None, self.table, self.m, self.v, t)
        self.last.fill_(t)
        if self.const.numel():
            self.table.index_fill_(1, self.const, 1.0)


class FlexMFImplicitScorer(FrameScoring):
    """Implicit-feedback matrix factorization; same library API as the explicit scorer.

    ``FlexMFImplicitScorer(config=None, *, device=None, **overrides)``: ``config`` is a
    :class:`FlexMFImplicitConfig` or a mapping of its fields; ``overrides`` replace fields.
    """

    def __init__(
        self,
        config: FlexMFImplicitConfig | Mapping[str, Any] | None = None,
        *,
        device: DeviceSettings | str | torch.device | None = None,
        **overrides: Any,
    ) -> None:
        if config is None or isinstance(config, Mapping):
            self.config = FlexMFImplicitConfig.from_dict({**dict(config or {}), **overrides})
        elif isinstance(config, FlexMFImplicitConfig):
            self.config = config.replace(**overrides) if overrides else config
        else:
            raise ConfigError(f"config: expected FlexMFImplicitConfig or a mapping, got {type(config).__name__}")
        self._device_spec = device
        self.device = resolve_device(device)
        self.history: list[dict[str, Any]] = []
        self.epochs_run = 0
        self.best_epoch: int | None = None
        self.train_seconds = 0.0
        self.updates_per_second = 0.0
        self.engine = "torch"  # "native" when fit() trained with the fused CPU kernels (_native)
        self.users_: IdIndex | None = None
        self.items_: IdIndex | None = None
        self.seen_: SeenItems | None = None
        self.params_: dict[str, torch.Tensor] = {}

    @property
    def n_users(self) -> int:
        """Users seen in training (0 before ``fit``)."""
        return len(self.users_) if self.users_ is not None else 0

    @property
    def n_items(self) -> int:
        """Items seen in training (0 before ``fit``)."""
        return len(self.items_) if self.items_ is not None else 0

    # ------------------------------------------------------------------------------------------
    # scoring primitives
    # ------------------------------------------------------------------------------------------

    def _score(self, p: dict[str, torch.Tensor], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``users[B]`` against ``items[B]`` or ``items[B, T]``."""
        uvec = p["user_embedding"][users]
        ivec = p["item_embedding"][items]
        if items.dim() == 2:
            s = torch.bmm(ivec, uvec.unsqueeze(2)).squeeze(2)
        else:
            s = (uvec * ivec).sum(-1)
        if "item_bias" in p:
            s = s + p["item_bias"][items]
        if "user_bias" in p:
            ub = p["user_bias"][users]
            s = s + (ub.unsqueeze(1) if items.dim() == 2 else ub)
        return s

    def _score_all(self, rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), n_items)`` scores; rows ``-1`` (unknown users) get item biases only."""
        p = self.params_
        known = rows >= 0
        safe = torch.where(known, rows, torch.zeros_like(rows))
        uvec = p["user_embedding"][safe] * known.unsqueeze(1)
        s = uvec @ p["item_embedding"].T
        if "item_bias" in p:
            s = s + p["item_bias"].unsqueeze(0)
        if "user_bias" in p:
            s = s + (p["user_bias"][safe] * known).unsqueeze(1)
        return s

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def fit(
        self,
        train: pl.DataFrame,
        validation: pl.DataFrame | None = None,
        *,
        callback: Callback | None = None,
    ) -> "FlexMFImplicitScorer":
        """Train on ``train`` (``user_id, item_id[, rating]``); early-stop on ``validation`` NDCG."""
        cfg = self.config
        dev = self.device
        pairs = interactions(train, cfg.min_rating)
        if pairs.height == 0:
            raise DataValidationError(
                f"train: no interactions left (rows={train.height}, min_rating={cfg.min_rating})"
            )
        self.users_, u_np = IdIndex.fit(pairs["user_id"])
        self.items_, i_np = IdIndex.fit(pairs["item_id"])
        n_users, n_items = len(self.users_), len(self.items_)
        if n_items < 2:
            raise DataValidationError("train: needs at least 2 distinct items to sample negatives")
        self.seen_ = SeenItems.build(u_np, i_np, n_users, dev)
        users_t = torch.from_numpy(u_np).to(dev)
        items_t = torch.from_numpy(i_np).to(dev)

        val = self._validation_pairs(validation) if validation is not None else None

        init = torch.Generator().manual_seed(cfg.seed)  # CPU init: same start on every device
        sizes = f"embedding_size={cfg.embedding_size} ({n_users} users, {n_items} items)"
        wd = cfg.regularization if cfg.reg_method == "AdamW" else 0.0
        l2 = cfg.regularization if cfg.reg_method == "L2" else 0.0
        with oom_guard(cfg.batch_size, "model allocation", setting=sizes):
            user_emb = torch.randn(n_users, cfg.embedding_size, generator=init) * cfg.init_scale
            item_emb = torch.randn(n_items, cfg.embedding_size, generator=init) * cfg.init_scale
            tables = _Tables.build(user_emb, item_emb, cfg.user_bias, cfg.item_bias, dev)
            native = _native.usable(dev) and cfg.negative_count <= 64
            states = [None, None]
            if native:  # rows [param | m | v] for the kernels; the tables become views of slot 0
                for side, name in enumerate(("user", "item")):
                    table = getattr(tables, name)
                    states[side] = torch.zeros(table.shape[0], 3, table.shape[1])
                    states[side][:, 0] = table
                    setattr(tables, name, states[side][:, 0])
            opt_u = _LazyAdamW(tables.user, cfg.learning_rate, wd, tables.user_const, states[0])
            opt_i = _LazyAdamW(tables.item, cfg.learning_rate, wd, tables.item_const, states[1])
        self._tables = tables
        self.params_ = tables.params()
        gen = make_generator(cfg.seed, dev)
        positives = PositiveSet(users_t, items_t, n_items)
        sampler = make_sampler(cfg.negative_strategy, positives, items_t,
                               candidates=cfg.misranked_candidates)
        warp_table = None
        if cfg.loss == "warp":  # indexed by trials, 1..misranked_candidates: on a catalogue smaller than
            # that, trials past n_items - 1 estimate a rank of 0, whose weight L(0) is 0
            warp_table = warp_rank_weights(n_items, dev)
            short = max(0, cfg.misranked_candidates + 1 - len(warp_table))
            warp_table = torch.cat([warp_table, warp_table.new_zeros(short)])
        guard = DivergenceGuard(self._initial_loss(n_items, l2), cfg.learning_rate)

        self.history, self.best_epoch, self.epochs_run = [], None, 0
        best_metric, best_state, stale = -math.inf, None, 0
        n = users_t.numel()
        train_time = 0.0
        self.engine = "native" if native else "torch"
        scratch = (_native.Scratch(n_users, tables.w), _native.Scratch(n_items, tables.w)) if native else None
        hard = cfg.negative_strategy == "misranked"
        chunk = cfg.batch_size * (1 if hard else _CHUNK_BATCHES)
        step = 0
        with oom_guard(cfg.batch_size), hot_loop_threads(dev, requested_threads(self._device_spec)), \
                torch.no_grad():
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                total = torch.zeros((), device=dev, dtype=torch.float64)
                perm = torch.randperm(n, generator=gen, device=dev)
                for start in range(0, n, chunk):
                    idx = perm[start : start + chunk]
                    us, ps = users_t[idx], items_t[idx]
                    if hard:
                        neg = self._hard_negatives(tables, us, ps, sampler, gen)
                    else:
                        neg = sampler.sample(us, cfg.negative_count, generator=gen)
                    weight = None if warp_table is None else warp_table[neg.trials[:, 0]]
                    if native:
                        loss, step = self._native_batches(tables, opt_u, opt_i, step, us, ps, neg.items,
                                                          neg.valid, weight, l2, scratch)
                        total += loss
                        continue
                    for s in range(0, us.numel(), cfg.batch_size):
                        step += 1
                        part = slice(s, s + cfg.batch_size)
                        total += self._step(tables, opt_u, opt_i, step, us[part], ps[part], neg.items[part],
                                            neg.valid[part], None if weight is None else weight[part], l2)
                opt_u.flush(step)
                opt_i.flush(step)
                epoch_loss = float(total) / n
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - t0
                train_time += seconds
                guard.check(epoch, epoch_loss, tables.user, tables.item)
                row: dict[str, Any] = {"epoch": epoch, "train_loss": epoch_loss, "val_ndcg": None,
                                       "seconds": seconds}
                self.epochs_run = epoch
                if val is not None:
                    self.params_ = tables.params()
                    metric = self._validation_ndcg(*val)
                    row["val_ndcg"] = metric
                    if metric > best_metric:
                        best_metric, self.best_epoch, stale = metric, epoch, 0
                        best_state = (tables.user.clone(), tables.item.clone())
                    else:
                        stale += 1
                self.history.append(row)
                if callback is not None:
                    callback(dict(row))
                if val is not None and cfg.patience is not None and stale >= cfg.patience:
                    break
        if best_state is not None:
            tables.user.copy_(best_state[0])
            tables.item.copy_(best_state[1])
        elif val is None:
            self.best_epoch = self.epochs_run
        self.params_ = tables.params()
        self._tables = None
        self.train_seconds = train_time
        self.updates_per_second = n * self.epochs_run / train_time if train_time > 0 else 0.0
        return self

    def _initial_loss(self, n_items: int, l2: float) -> float:
        """An upper bound of the expected mean loss per positive at initialization (the guard's scale).

        Biases start at 0 and a score is ``p . q`` of N(0, init_scale) embeddings: a centred value
        with standard deviation ``sigma = sqrt(k) * init_scale^2`` (a difference of two scores:
        ``sqrt(2) * sigma``). ``softplus(x) <= ln 2 + max(x, 0)`` and ``E[max(x, 0)] = sd / sqrt(2 pi)``
        bound the logistic and pairwise terms; WARP's is at most the largest rank weight times
        ``E[1 + max(s- - s+, 0)]``. The L2 term adds ``l2 * ||row||^2`` for the user and the ``1 + c``
        items of every positive.
        """
        cfg = self.config
        k, c = cfg.embedding_size, cfg.negative_count
        sigma = math.sqrt(k) * cfg.init_scale**2
        spread = 1 / math.sqrt(2 * math.pi)
        if cfg.loss == "logistic":
            loss = (cfg.positive_weight + c) * (math.log(2) + sigma * spread)
        elif cfg.loss == "pairwise":
            loss = c * (math.log(2) + math.sqrt(2) * sigma * spread)
        else:
            loss = float(warp_rank_weights(n_items)[1]) * (1 + math.sqrt(2) * sigma * spread)
        return loss + l2 * (2 + c) * k * cfg.init_scale**2

    def _hard_negatives(self, tables: "_Tables", us: torch.Tensor, pos: torch.Tensor, sampler, gen):
        """Misranked negatives for one batch, scored with the current model (pooled candidates)."""
        cfg = self.config
        U, I = tables.user, tables.item
        urows, uinv, _ = _distinct(us, U.shape[0])
        P = U.index_select(0, urows)  # the batch's distinct user rows (embedding | bias | 1)
        pool_scores = lambda pool: (P @ I.index_select(0, pool).T, uinv)  # noqa: E731
        if cfg.loss == "warp":
            s_pos = (P.index_select(0, uinv) * I.index_select(0, pos)).sum(1)
            return sampler.sample(us, 1, pos_scores=s_pos, generator=gen, pool_scores=pool_scores)
        return sampler.sample(us, cfg.negative_count, generator=gen, pool_scores=pool_scores)

    def _native_batches(self, tables: "_Tables", opt_u: "_LazyAdamW", opt_i: "_LazyAdamW", t: int,
                        us: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
                        weight: torch.Tensor | None, l2: float,
                        scratch: "tuple[_native.Scratch, _native.Scratch]") -> tuple[float, int]:
        """:meth:`_step` for every batch of a chunk, fused in the C kernel; returns (loss, step)."""
        cfg = self.config
        step = ctypes.c_int64(t)
        neg = neg.to(torch.int64).contiguous()
        valid = valid.contiguous()
        weight = None if weight is None else weight.to(torch.float32).contiguous()
        ds = scratch[0].buffer(cfg.batch_size * (1 + neg.shape[1]))
        loss = _native.kernels().flexmf_implicit_batches(
            _native.ptr(opt_u.state), _native.ptr(opt_u.last), opt_u.state.shape[0],
            _native.ptr(opt_i.state), _native.ptr(opt_i.last), opt_i.state.shape[0],
            tables.w, tables.k, opt_u.const_col, opt_i.const_col,
            *[_native.ptr(x) for x in (us.contiguous(), pos.contiguous(), neg, valid, weight)],
            us.numel(), neg.shape[1], cfg.batch_size, _LOSS_KIND[cfg.loss], cfg.positive_weight,
            l2, cfg.learning_rate, opt_u.wd, ctypes.byref(step), *scratch[0].args(), *scratch[1].args(),
            _native.ptr(ds), _native.threads(),
        )
        return loss, step.value

    def _step(self, tables: "_Tables", opt_u: "_LazyAdamW", opt_i: "_LazyAdamW", t: int,
              us: torch.Tensor, pos: torch.Tensor, neg_items: torch.Tensor, neg_valid: torch.Tensor,
              warp_weight: torch.Tensor | None, l2: float) -> torch.Tensor:
        """One minibatch with its negatives: hand-derived gradients, lazy AdamW on the touched rows.

        Returns the batch's summed loss (a 0-d float64 tensor; no device sync).
        """
        cfg = self.config
        U, I = tables.user, tables.item
        b = us.numel()
        urows, uinv, ucount = _distinct(us, U.shape[0], counts=bool(l2))
        P = U.index_select(0, urows)  # the batch's distinct user rows (embedding | bias | 1)
        c = neg_items.shape[1]
        all_items = torch.cat([pos.unsqueeze(1), neg_items], 1)  # [b, 1 + c], positive first
        irows, iinv, icount = _distinct(all_items.reshape(-1), I.shape[0], counts=bool(l2))
        Q = I.index_select(0, irows)
        # one row per (positive or negative) pair, all 2-D: tiny bmm's and mid-axis broadcasts are
        # several times slower on CPU than a gather plus a flat elementwise product
        X = Q.index_select(0, iinv)  # [b * (1 + c), w]
        uinv_rep = uinv.unsqueeze(1).expand(b, 1 + c).reshape(-1)
        pu_rep = P.index_select(0, uinv_rep)
        s = (X * pu_rep).sum(1).view(b, 1 + c)
        valid = neg_valid.to(s.dtype)
        ds, loss = _score_gradients(cfg.loss, s, valid, b, cfg.positive_weight, warp_weight)
        g_user, g_item = _backprop(ds, X, pu_rep, uinv_rep, iinv, P.shape[0], Q.shape[0])
        if l2:
            k = cfg.embedding_size
            for g, rows, cnt in ((g_user, P, ucount), (g_item, Q, icount)):
                weighted = rows[:, :k] * cnt.unsqueeze(1).to(rows.dtype)
                g[:, :k].add_(weighted, alpha=2 * l2 / b)
                loss = loss + l2 * (weighted * rows[:, :k]).sum(dtype=torch.float64) / b
        opt_u.step(urows, P, g_user, t)
        opt_i.step(irows, Q, g_item, t)
        return loss * b

    def _validation_pairs(self, validation: pl.DataFrame) -> tuple[torch.Tensor, pl.DataFrame]:
        pairs = interactions(validation, self.config.min_rating, what="validation")
        rows = self.users_.lookup(pairs["user_id"])
        pairs = pairs.filter(pl.Series(rows >= 0))
        users = np.unique(self.users_.lookup(pairs["user_id"]))
        return torch.from_numpy(users).to(self.device), pairs

    def _validation_ndcg(self, rows: torch.Tensor, truth: pl.DataFrame) -> float:
        from flexmf_assets.evaluation.topn import topn_metrics

        k = self.config.eval_k
        with torch.no_grad():
            recs = self._recommend_rows(rows, k, True, 1024)
        if recs.height == 0 or truth.height == 0:
            return 0.0
        return topn_metrics(recs, truth, ks=(k,)).means[f"ndcg@{k}"]

    # ------------------------------------------------------------------------------------------
    # scoring API
    # ------------------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self.users_ is None or self.items_ is None or not self.params_:
            raise DataValidationError("FlexMFImplicitScorer: call fit() or load() before scoring")

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Scores of aligned ``users``/``items`` (logits; higher = more likely).

        As in the explicit scorer, an id unseen in training is never an error or NaN: an unknown
        user gets the item's bias (what ``recommend`` ranks unknown users by), an unknown item the
        user's bias, and both unknown 0.
        """
        self._require_fitted()
        u = torch.from_numpy(self.users_.lookup(users)).to(self.device)
        i = torch.from_numpy(self.items_.lookup(items)).to(self.device)
        if len(u) != len(i):
            raise DataValidationError(f"predict: {len(u)} users but {len(i)} items")
        p = self.params_
        ku, ki = u >= 0, i >= 0
        su, si = torch.where(ku, u, 0), torch.where(ki, i, 0)
        with torch.no_grad():
            dot = (p["user_embedding"][su] * p["item_embedding"][si]).sum(1) * (ku & ki)
            if "item_bias" in p:
                dot = dot + p["item_bias"][si] * ki
            if "user_bias" in p:
                dot = dot + p["user_bias"][su] * ku
        return dot.to(torch.float32).cpu().numpy()

    def recommend(
        self,
        users: Any = None,
        n: int = 20,
        exclude_seen: bool = True,
        batch_size: int = 1024,
    ) -> pl.DataFrame:
        """Top-``n`` items per user as ``user_id, item_id, score, rank`` (rank 1 = best).

        ``users=None`` recommends for every training user. Unknown users get the items with the
        highest item bias. Items the user interacted with in training are excluded by default.
        """
        self._require_fitted()
        if users is None:
            rows = np.arange(len(self.users_), dtype=np.int64)
            raw = self.users_.ids
        else:
            raw = users.to_numpy() if isinstance(users, pl.Series) else np.asarray(list(users))
            rows = self.users_.lookup(raw)
        recs = self._recommend_rows(torch.from_numpy(rows).to(self.device), n, exclude_seen, batch_size)
        upos = recs["_pos"].to_numpy()
        return recs.select(
            pl.Series("user_id", np.asarray(raw)[upos]),
            "item_id", "score", "rank",
        )

    def _recommend_rows(self, rows: torch.Tensor, n: int, exclude_seen: bool, batch_size: int) -> pl.DataFrame:
        upos, irow, score, rank = recommend_in_batches(
            self._score_all, rows, n, len(self.items_), self.seen_ if exclude_seen else None, batch_size
        )
        user_ids = self.users_.ids[np.clip(rows.cpu().numpy()[upos], 0, None)]
        return pl.DataFrame(
            {
                "_pos": upos,
                "user_id": user_ids,
                "item_id": self.items_.ids[irow],
                "score": score.astype(np.float32),
                "rank": rank.astype(np.int32),
            }
        )

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory atomically (safetensors + JSON; no pickle)."""
        self._require_fitted()
        tensors = dict(self.params_)
        meta: dict[str, Any] = {"kind": KIND, "device": str(self.device), "eval_k": self.config.eval_k}
        for name, index in (("user", self.users_), ("item", self.items_)):
            t, m = index.to_state(name)
            tensors.update(t)
            meta.update(m)
        tensors["seen_indptr"] = self.seen_.indptr
        tensors["seen_indices"] = self.seen_.indices
        meta.update(
            history=self.history, epochs_run=self.epochs_run, best_epoch=self.best_epoch,
            train_seconds=self.train_seconds, updates_per_second=self.updates_per_second,
            engine=self.engine,
        )
        return save_model_dir(path, tensors, self.config.to_dict(), meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: DeviceSettings | str | torch.device | None = None
    ) -> "FlexMFImplicitScorer":
        """Read a directory written by :meth:`save` onto ``device``.

        Verifies the tensor file's sha256 first, then every field and tensor against the others
        (types, ranges, shapes against the id counts and the config, finite weights, seen items
        within the catalogue): a forged or corrupt file is a one-line :class:`ConfigError` naming it.
        """
        dev = resolve_device(device)
        tensors, config, meta = load_model_dir(path, dev, kind=KIND)
        tensor_file = Path(path) / TENSOR_FILE
        cfg = FlexMFImplicitConfig.from_dict(config, where=f"{path}/config.json")
        model = cls(cfg, device=dev)
        model.users_ = IdIndex.from_state("user", tensors, meta, tensor_file)
        model.items_ = IdIndex.from_state("item", tensors, meta, tensor_file)
        n_users, n_items, k = len(model.users_), len(model.items_), cfg.embedding_size
        if not n_users or not n_items:
            raise ConfigError(f"{tensor_file}: a model without users or items ({n_users} users, {n_items} items)")
        shapes = {"user_embedding": (n_users, k), "item_embedding": (n_items, k)}
        if cfg.user_bias:
            shapes["user_bias"] = (n_users,)
        if cfg.item_bias:
            shapes["item_bias"] = (n_items,)
        p = {name: expect_tensor(tensors, name, shape, torch.float32, tensor_file, finite=True)
             for name, shape in shapes.items()}
        model.seen_ = SeenItems.from_state(tensors, n_users, n_items, tensor_file)
        check_tensor_names(tensors, {*shapes, "seen_indptr", "seen_indices", "user_ids", "item_ids"}, tensor_file)
        biases = sum(max_abs(p[name]) for name in ("user_bias", "item_bias") if name in p)
        check_score_range(p["user_embedding"], p["item_embedding"], tensor_file, extra=biases)
        model.params_ = p
        model.history = meta.history()
        model.epochs_run = meta.integer("epochs_run", default=0)
        model.best_epoch = meta.integer("best_epoch", lo=1, hi=model.epochs_run, default=None, optional=True)
        model.train_seconds = meta.number("train_seconds", lo=0, default=0.0)
        model.updates_per_second = meta.number("updates_per_second", lo=0, default=0.0)
        model.engine = meta.choice("engine", ("native", "torch"), default="torch")
        return model


__all__ = ["FlexMFImplicitScorer", "interactions"]
