"""Alternating least squares for FlexMF: biased explicit ALS and weighted implicit ALS.

These are training strategies, not scorers: the scorer core owns the factor tensors, calls
``setup(...)`` once and then ``epoch()`` once per epoch (or ``user_step()`` / ``item_step()``).
Every half-step solves all rows of one side given the other, IN PLACE on the tensors given (which
may be column views of wider tables: a row stride is fine, the last dimension must be dense).

Explicit (LensKit's ``BiasedMFScorer``): prediction ``mu + b_u + b_i + p_u . q_i``, minimising

    sum (r - mu - b_u - b_i - p_u . q_i)^2 + regularization * (sum_u n_u |p_u|^2 + sum_i n_i |q_i|^2)

(the penalty of a row scaled by its count ``n``, as LensKit does; ``reg_exponent`` e scales it by
``n ** e`` instead). ``bias="damped"``: LensKit's
damped means, computed once, ``b_i = sum(r - mu) / (n_i + damping)`` and
``b_u = sum(r - mu - b_i) / (n_u + damping)``; ``bias="learned"``: the biases are solved with the
factors (``[p_u, b_u]`` against ``[q_i, 1]``), start from the damped means and are penalised like
the factors (``+ bias_regularization * (sum_u n_u b_u^2 + sum_i n_i b_i^2)``, ``regularization`` when
None).

Implicit (Hu, Koren and Volinsky; LensKit's ``ImplicitMFScorer``, ``implicit``'s ALS): minimising

    sum over ALL (u, i) of c_ui (p_ui - x_u . y_i)^2 + regularization * (|X|^2 + |Y|^2)

with ``p = 1`` and ``c = 1 + weight * r`` on observed pairs (``confidence="log"``:
``1 + weight * log(1 + r / epsilon)``), ``p = 0`` and ``c = 1`` everywhere else. The unobserved pairs
enter only through ``Y^T Y`` (never materialised): a row's system is
``(Y^T Y + reg I + Y_u^T (C_u - I) Y_u) x = Y_u^T C_u p_u``, solved by ``cg_steps`` conjugate-gradient
steps warm-started from the current row (Takacs et al.), or exactly by Cholesky (``exact``).
``implicit`` (0.7) scales its input by ``alpha`` instead (confidence ``alpha * r``): on binary data
its ``alpha = a`` is our ``weight = a - 1``.

Engines: the fused C kernels (``_kernels_als.c``, rows split across OpenMP threads, each row solved by
one thread in a fixed order, so the factors are bit-identical for any thread count) on CPU when
they load; else the torch engine, the reference (float64 on CPU) and the GPU path (float32):
batched Cholesky / CG over rows grouped by their count (``_als_torch.py``).

Each step returns the objective after it (data term plus both penalties) divided by the number of
training entries; a non-finite one raises :class:`TrainingError` naming the setting to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flexmf_assets.errors import ConfigError, DataValidationError, TrainingError
from flexmf_assets.flexmf import _abi, _als_torch, _native
from flexmf_assets.flexmf._als_torch import Side
from flexmf_assets.flexmf.training import DivergenceGuard, TrainingData, make_generator

BIAS_MODES = ("damped", "learned")
CONFIDENCES = ("linear", "log")
ENGINES = ("auto", "native", "torch")


@dataclass(frozen=True)
class ALSSettings:
    """Settings of the ALS solvers (LensKit's names; defaults are LensKit's).

    embedding_size: factors per row. epochs: iterations (one user and one item half-step each).
    regularization: ridge penalty (explicit: times the row's count ``n``, as LensKit; more exactly
    times ``n ** reg_exponent``, 1 by default; implicit: not scaled).
    bias (explicit): ``damped`` means computed once with ``damping``, or ``learned`` with the factors,
    penalised by ``bias_regularization`` (None: ``regularization``) times the same count scale.
    weight, confidence, epsilon (implicit): confidence ``1 + weight * r`` (``linear``) or
    ``1 + weight * log(1 + r / epsilon)`` (``log``) of an observed pair.
    cg_steps (implicit): conjugate-gradient steps per row and half-step, warm-started.
    exact (implicit): solve each row by Cholesky instead (cost k^3 per row: for small k).
    seed, init_scale: initial factors ~ N(0, init_scale^2).
    """

    embedding_size: int = 50
    epochs: int = 10
    regularization: float = 0.1
    reg_exponent: float = 1.0
    bias: str = "damped"
    bias_regularization: float | None = None
    damping: float = 5.0
    weight: float = 40.0
    confidence: str = "linear"
    epsilon: float = 1.0
    cg_steps: int = 3
    exact: bool = False
    seed: int = 42
    init_scale: float = 0.1

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"ALSSettings.{field}: {why}, got {getattr(self, field)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for f in ("embedding_size", "epochs", "cg_steps"):
            check(is_int(getattr(self, f)) and getattr(self, f) >= 1, f, "must be an integer >= 1")
        check(is_int(self.seed), "seed", "must be an integer")
        for f in ("regularization", "reg_exponent", "damping", "weight", "init_scale"):
            v = getattr(self, f)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf, f,
                  "must be a finite number >= 0")
        check(isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < math.inf, "epsilon",
              "must be a finite number > 0")
        check(self.bias in BIAS_MODES, "bias", f"must be one of {', '.join(BIAS_MODES)}")
        b = self.bias_regularization
        check(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < math.inf),
              "bias_regularization", "must be a finite number >= 0 or None (= regularization)")
        check(self.confidence in CONFIDENCES, "confidence", f"must be one of {', '.join(CONFIDENCES)}")
        check(isinstance(self.exact, bool), "exact", "must be true or false")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "ALSSettings":
        """The settings named like attributes of ``config`` (a scorer configuration), then ``overrides``."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{**{n: getattr(config, n) for n in names if hasattr(config, n)}, **overrides})


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def _as(values: Any, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if t.ndim != 1:
        raise ValueError(f"ALS setup: {name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _check_rows(rows: torch.Tensor, n: int, name: str) -> None:
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"ALS setup: {name} must lie in [0, {n}), got [{int(rows.min())}, {int(rows.max())}]")


def _triples(user_rows: Any, item_rows: Any, values: Any, what: str, n_users: int, n_items: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (user row, item row, value) entries as int64, int64 and float64 tensors on ``device``,
    checked: as many of each (at least one), rows inside the tables."""
    u = _as(user_rows, torch.int64, device, "user_rows")
    i = _as(item_rows, torch.int64, device, "item_rows")
    r = _as(values, torch.float64, device, what)
    if not len(u) == len(i) == len(r) or len(r) == 0:
        raise ValueError(f"ALS setup: need as many user rows, item rows and {what} (>= 1), got "
                         f"{len(u)}, {len(i)}, {len(r)}")
    _check_rows(u, n_users, "user_rows")
    _check_rows(i, n_items, "item_rows")
    return u, i, r


def _ptr(t: torch.Tensor | None) -> int | None:
    return _abi.ptr(t, strided=True)


def _check_table(t: torch.Tensor, shape: tuple[int, ...], device: torch.device, name: str) -> None:
    dense_rows = len(shape) == 1 or t.stride(-1) == 1
    on_device = t.device.type == device.type and device.index in (None, t.device.index)
    if tuple(t.shape) != shape or t.dtype != torch.float32 or not on_device or not dense_rows:
        raise ValueError(f"ALS setup: {name} must be a float32 tensor of shape {shape} on {device} with dense "
                         f"rows, got {t.dtype} {tuple(t.shape)} on {t.device} (strides {t.stride()})")


def _sum_sq(t: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """sum_r w_r |t_r|^2 in float64 numpy (the same bits for any thread count)."""
    a = t.detach().cpu().double().numpy()
    sq = (a * a).sum(axis=1) if a.ndim > 1 else a * a
    return float(np.sum(sq if weights is None else sq * weights.cpu().double().numpy()))


def _damped_means(users: np.ndarray, items: np.ndarray, resid: np.ndarray, n_users: int, n_items: int,
                  damping: float) -> tuple[np.ndarray, np.ndarray]:
    """LensKit's damped item then user means of ``resid`` (ratings less the global mean)."""
    bi = np.bincount(items, resid, n_items) / (np.bincount(items, minlength=n_items) + damping)
    bu = np.bincount(users, resid - bi[items], n_users) / (np.bincount(users, minlength=n_users) + damping)
    return bu, bi


# ----------------------------------------------------------------------------------------------
# the solvers
# ----------------------------------------------------------------------------------------------


class _ALS:
    """What both solvers share: engine choice, scratch, the objective and its guard."""

    track = ""

    def __init__(self, settings: ALSSettings | None = None, device: torch.device | str = "cpu",
                 threads: int | None = None, engine: str = "auto"):
        self.settings = settings or ALSSettings()
        self.device = torch.device(device)
        if engine not in ENGINES:
            raise ConfigError(f"ALS engine: {engine!r} is not one of {', '.join(ENGINES)}")
        usable = engine != "torch" and _native.usable(self.device)
        if engine == "native" and not usable:
            raise ConfigError(f"ALS engine 'native' needs the CPU and the compiled kernels "
                              f"(device {self.device}, kernels {_native.status()})")
        self.engine = "native" if usable else "torch"
        if threads is not None and threads < 1:
            raise ConfigError(f"ALS threads: must be >= 1, got {threads}")
        self.threads = threads or _native.threads()
        # the torch reference works in float64 on CPU; GPUs solve in float32
        self.dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.epochs_run = 0
        self.objective = self.data_loss = math.nan  # per entry: full objective, its data term alone
        self.n = 0
        self._penalty: dict[str, float] = {}

    def _scratch(self, n_rows: int, max_count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.settings.embedding_size
        work = torch.empty(self.threads * _abi.als_work(k, max_count), dtype=torch.float64)
        return work, torch.empty(2 * n_rows, dtype=torch.float64)

    def _init_factors(self, gen: torch.Generator, *tables: torch.Tensor) -> None:
        for t in tables:  # drawn contiguous (torch's vectorised normal_), then placed
            t.copy_(torch.empty(t.shape, device=self.device).normal_(0.0, self.settings.init_scale, generator=gen))

    def _finish(self, side: str, data: float, failed: int) -> float:
        objective = (data + self._penalty["user"] + self._penalty["item"]) / self.n
        if not math.isfinite(objective):
            s = self.settings
            what = "nan" if math.isnan(objective) else "inf"
            why = f"; the systems of {failed} {side} rows are not positive definite" if failed else ""
            fix = f"raise regularization (now {s.regularization:g})"
            if self.track == "implicit":
                fix += f" or lower weight (now {s.weight:g})"
            raise TrainingError(f"ALS diverged at epoch {self.epochs_run} ({side} half-step): objective is "
                                f"{what}{why}; {fix}")
        self.objective, self.data_loss = objective, data / self.n
        return objective

    def user_step(self) -> float:
        """Solve every user row given the items; the objective after it."""
        return self._step("user")

    def item_step(self) -> float:
        """Solve every item row given the users; the objective after it."""
        return self._step("item")

    def epoch(self) -> float:
        """One iteration (the user then the item half-step); the objective after it."""
        self.epochs_run += 1
        self.user_step()
        return self.item_step()

    def _step(self, side: str) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


class ExplicitALS(_ALS):
    """Biased ALS on ratings (LensKit's ``BiasedMFScorer``); see the module docstring.

    ``setup`` takes the user and item row of each rating (0-based), the ratings, the table sizes,
    the factor tables ``P [n_users, k]``, ``Q [n_items, k]`` and bias vectors ``bu``, ``bi`` (float32,
    on the solver's device, trained in place) and the global mean ``mu`` (held fixed). The biases
    start as the damped means (and stay so with ``bias="damped"``); with ``init`` the factors are
    drawn, without, the values given are the start.
    """

    track = "explicit"

    def setup(self, user_rows: Any, item_rows: Any, ratings: Any, n_users: int, n_items: int,
              P: torch.Tensor, Q: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor, mu: float,
              *, init: bool = True) -> "ExplicitALS":
        s, dev, k = self.settings, self.device, self.settings.embedding_size
        u, i, r = _triples(user_rows, item_rows, ratings, "ratings", n_users, n_items, dev)
        if not bool(torch.isfinite((r - mu).float()).all()):
            raise DataValidationError(f"ratings: ALS needs finite ratings (float32) and global mean, got mu={mu!r} "
                                      f"and ratings in [{float(r.min())}, {float(r.max())}]")
        for t, shape, name in ((P, (n_users, k), "P"), (Q, (n_items, k), "Q"), (bu, (n_users,), "bu"),
                               (bi, (n_items,), "bi")):
            _check_table(t, shape, dev, name)
        self.P, self.Q, self.bu, self.bi, self.mu = P, Q, bu, bi, float(mu)
        resid = r - self.mu
        if init:
            self._init_factors(make_generator(s.seed, dev), P, Q)
        b_u, b_i = _damped_means(u.cpu().numpy(), i.cpu().numpy(), resid.cpu().numpy(), n_users, n_items, s.damping)
        bu.copy_(torch.from_numpy(b_u)), bi.copy_(torch.from_numpy(b_i))
        resid = resid.float()
        self.n = len(r)
        self.sides = {"user": Side(u, i, resid, n_users), "item": Side(i, u, resid, n_items)}
        self.learn = s.bias == "learned"
        self._bias_reg = s.regularization if s.bias_regularization is None else s.bias_regularization
        for side, X, xb in (("user", P, bu), ("item", Q, bi)):
            counts = self.sides[side].counts
            scale = counts.double() ** s.reg_exponent
            self._penalty[side] = s.regularization * _sum_sq(X, scale) + (self._bias_reg * _sum_sq(xb, scale)
                                                                         if self.learn else 0.0)
        if self.engine == "native":
            self._work, self._row_loss = self._scratch(max(n_users, n_items))
        return self

    def _tables(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.P, self.bu, self.Q, self.bi) if side == "user" else (self.Q, self.bi, self.P, self.bu)

    def _step(self, side: str) -> float:
        run = self._half_native if self.engine == "native" else self._half_torch
        data, penalty, failed = run(self.sides[side], *self._tables(side))
        self._penalty[side] = penalty
        return self._finish(side, data, failed)

    def _half_native(self, this: Side, X: torch.Tensor, xb: torch.Tensor, Y: torch.Tensor,
                     yb: torch.Tensor) -> tuple[float, float, int]:
        a = _abi.ALSExplicitArgs(
            X=_ptr(X), ldx=X.stride(0), xb=_ptr(xb), sxb=xb.stride(0), Y=_ptr(Y), ldy=Y.stride(0), yb=_ptr(yb),
            syb=yb.stride(0), indptr=_ptr(this.indptr), indices=_ptr(this.indices), values=_ptr(this.values),
            n_rows=this.n_rows, k=X.shape[1], learn_bias=int(self.learn), nthreads=self.threads,
            reg=self.settings.regularization, reg_exponent=self.settings.reg_exponent, bias_reg=self._bias_reg,
            work=_ptr(self._work), loss=_abi.ALSLoss(row_loss=_ptr(self._row_loss)))
        _native.run("flexmf_als_explicit_half", a)
        return a.loss.data, a.loss.penalty, a.loss.failed

    def _half_torch(self, this: Side, X: torch.Tensor, xb: torch.Tensor, Y: torch.Tensor,
                    yb: torch.Tensor) -> tuple[float, float, int]:
        s = self.settings
        return _als_torch.explicit_half(this, X, xb, Y, yb, reg=s.regularization, reg_exponent=s.reg_exponent,
                                        bias_reg=self._bias_reg, learn=self.learn, dtype=self.dtype)


class ImplicitALS(_ALS):
    """Weighted ALS on implicit feedback (Hu, Koren and Volinsky); see the module docstring.

    ``setup`` takes the user and item row of each interaction (0-based; repeated pairs are summed),
    its value ``r >= 0`` (1 for plain interactions), the table sizes and the factor tables
    ``X [n_users, k]``, ``Y [n_items, k]`` (float32, on the solver's device, trained in place).
    """

    track = "implicit"

    def setup(self, user_rows: Any, item_rows: Any, values: Any, n_users: int, n_items: int,
              X: torch.Tensor, Y: torch.Tensor, *, init: bool = True) -> "ImplicitALS":
        s, dev, k = self.settings, self.device, self.settings.embedding_size
        u, i, r = _triples(user_rows, item_rows, values, "values", n_users, n_items, dev)
        if not bool((torch.isfinite(r) & (r >= 0)).all()):
            raise DataValidationError("values: implicit ALS needs finite interaction values >= 0")
        _check_table(X, (n_users, k), dev, "X")
        _check_table(Y, (n_items, k), dev, "Y")
        keys, inverse = torch.unique(u * n_items + i, return_inverse=True)
        r = torch.zeros(len(keys), dtype=torch.float64, device=dev).index_add_(0, inverse, r)
        u, i = keys // n_items, keys % n_items
        if s.confidence == "linear":
            conf = 1.0 + s.weight * r
        else:
            conf = 1.0 + s.weight * torch.log1p(r / s.epsilon)
        self.X, self.Y, self.n = X, Y, len(keys)
        if init:
            self._init_factors(make_generator(s.seed, dev), X, Y)
        conf = conf.float()
        self.sides = {"user": Side(u, i, conf, n_users), "item": Side(i, u, conf, n_items)}
        self._penalty = {"user": s.regularization * _sum_sq(X), "item": s.regularization * _sum_sq(Y)}
        if self.engine == "native":
            self._max_count = max(int(side.counts.max()) for side in self.sides.values())
            self._work, self._row_loss = self._scratch(max(n_users, n_items), self._max_count)
            self._gram = torch.empty(k, k)
        return self

    def _step(self, side: str) -> float:
        X, Y = (self.X, self.Y) if side == "user" else (self.Y, self.X)
        run = self._half_native if self.engine == "native" else self._half_torch
        data, penalty, failed = run(self.sides[side], X, Y)
        self._penalty[side] = penalty
        return self._finish(side, data, failed)

    def gram(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y^T Y``: float32 [k, k] for the kernels, one BLAS product on ONE thread (the same bits
        whatever the thread settings); the engine's dtype for torch."""
        if self.engine == "native":
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                g = torch.mm(Y.T, Y, out=self._gram)
                return g.copy_((g + g.T) * 0.5)  # exactly symmetric (the kernels read either triangle)
            finally:
                torch.set_num_threads(before)
        Yd = Y.to(self.dtype)
        return Yd.T @ Yd

    def _half_native(self, this: Side, X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float, int]:
        s = self.settings
        gram = self.gram(Y)
        a = _abi.ALSImplicitArgs(
            X=_ptr(X), ldx=X.stride(0), Y=_ptr(Y), ldy=Y.stride(0), indptr=_ptr(this.indptr),
            indices=_ptr(this.indices), conf=_ptr(this.values), gram=_ptr(gram), n_rows=this.n_rows,
            k=X.shape[1], cg_steps=0 if s.exact else s.cg_steps, nthreads=self.threads,
            max_count=self._max_count, reg=s.regularization, work=_ptr(self._work),
            loss=_abi.ALSLoss(row_loss=_ptr(self._row_loss)))
        _native.run("flexmf_als_implicit_half", a)
        return a.loss.data, a.loss.penalty, a.loss.failed

    def _half_torch(self, this: Side, X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float, int]:
        s = self.settings
        return _als_torch.implicit_half(this, X, Y, reg=s.regularization, cg_steps=0 if s.exact else s.cg_steps,
                                        dtype=self.dtype)


# ----------------------------------------------------------------------------------------------
# the training strategies of the scorer core (solver: als)
# ----------------------------------------------------------------------------------------------


class _ALSStrategy:
    """A :class:`.training.Strategy` running an ALS solver in place on column views of the core's
    tables (the unknown row left out): one epoch is one iteration; its loss the data term per entry."""

    name = "als"
    solver: _ALS

    def setup(self, core: Any, data: TrainingData) -> None:
        cfg = core.config
        bias = {"bias": "learned" if cfg.bias is True else cfg.bias} if hasattr(cfg, "bias") else {}
        settings = ALSSettings.from_config(cfg, **bias)
        self.solver = self._attach(core, data, settings)

    def _attach(self, core: Any, data: TrainingData, settings: ALSSettings) -> _ALS:  # pragma: no cover
        raise NotImplementedError

    def guard(self, core: Any, data: TrainingData) -> DivergenceGuard:
        """NaN and overflow checks only: ALS lowers its objective at every half-step (its solver
        raises on a non-finite one itself)."""
        reg = core.config.regularization
        return DivergenceGuard(math.inf, setting=f"regularization={reg:g}", advice="raise regularization")

    def epoch(self, epoch: int) -> float:
        self.solver.epoch()
        return self.solver.data_loss

    def finish(self) -> None:
        pass  # the core's tables were trained in place


class ExplicitALSStrategy(_ALSStrategy):
    """Biased ALS on the explicit tables ``[P | b_u | 1]`` and ``[Q | 1 | b_i]``."""

    def _attach(self, core: Any, data: TrainingData, settings: ALSSettings) -> _ALS:
        lay, U, I = core.layout, core.user_table[:-1], core.item_table[:-1]
        return ExplicitALS(settings, core.device).setup(
            data.users, data.items, data.residuals, core.n_users, core.n_items, U[:, : lay.k], I[:, : lay.k],
            U[:, lay.user_bias_col], I[:, lay.item_bias_col], 0.0, init=False)


class ImplicitALSStrategy(_ALSStrategy):
    """Weighted ALS on the implicit tables (no biases), every training pair of value 1."""

    def _attach(self, core: Any, data: TrainingData, settings: ALSSettings) -> _ALS:
        U, I = core.user_table[:-1], core.item_table[:-1]
        ones = torch.ones(len(data), dtype=torch.float64, device=core.device)
        return ImplicitALS(settings, core.device).setup(data.users, data.items, ones, core.n_users, core.n_items,
                                                        U, I, init=False)


__all__ = ["ALSSettings", "ExplicitALS", "ExplicitALSStrategy", "ImplicitALS", "ImplicitALSStrategy"]
