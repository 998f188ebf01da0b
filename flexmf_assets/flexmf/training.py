"""What every training run shares, whatever the strategy: the protocol a training strategy follows,
the data it gets, and the guards of the epoch loop (divergence, memory, threads, seeding).

A :class:`Strategy` is how a scorer's parameters are trained (fused native kernels, the eager torch
engine, ALS solvers): the scorer core (:mod:`.scorer`) owns the parameter tables and the epoch loop
(validation, early stopping, the divergence guard, timing, the callback) and calls the strategy's
``setup`` once, ``epoch`` once per epoch and ``finish`` at the end.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Protocol

import torch

from flexmf_assets.errors import TrainingError
from flexmf_assets.flexmf import _abi, _native
from flexmf_assets.flexmf.optim import SparseAdam

if TYPE_CHECKING:
    from flexmf_assets.flexmf.scorer import FlexMFScorer


@dataclass
class TrainingData:
    """The training pairs, as rows of the scorer's tables (int64 tensors on the training device)."""

    users: torch.Tensor
    items: torch.Tensor
    #: explicit: each pair's rating minus the global mean (float32); implicit: None
    residuals: torch.Tensor | None = None
    #: seeded by the config: draws the order of every epoch, negatives, ... (on the device)
    generator: torch.Generator | None = None

    def __len__(self) -> int:
        return self.users.numel()


class Strategy(Protocol):
    """How a scorer's parameters are trained.

    The tables are ``core.user_table`` and ``core.item_table`` (``[rows + 1, width]``, the last row
    "unknown"; the column layout is the scorer's). A strategy updates them in place, or replaces them
    by views of its own state (e.g. ``[rows, 3, width]`` parameters and Adam moments, the tables being
    ``state[:, 0]``); they are read between epochs (validation, the divergence guard, the best state).
    """

    #: recorded as ``scorer.engine`` (``native``, ``torch``, ...)
    name: str

    def setup(self, core: "FlexMFScorer", data: TrainingData) -> None:
        """Prepare for training: optimizer state, scratch, samplers."""

    def epoch(self, epoch: int) -> float:
        """Train one pass over ``data``; returns the mean training loss per pair (a float)."""

    def finish(self) -> None:
        """Leave ``core.user_table``/``core.item_table`` as plain contiguous tensors; drop the state."""

    def guard(self, core: "FlexMFScorer", data: TrainingData) -> "DivergenceGuard":
        """The divergence rule of this strategy's epochs (called before ``setup``)."""


class MinibatchStrategy:
    """What the minibatch strategies of both tracks (fused kernels, eager torch) share: the core, its
    data, configuration and table layout, each epoch's order, Adam's state for both tables (the
    core's tables become views of it) and the plain tables at the end."""

    name = ""

    def setup(self, core: "FlexMFScorer", data: TrainingData) -> None:
        self.core, self.data, self.cfg, self.layout = core, data, core.config, core.layout
        self.adam: tuple[SparseAdam, SparseAdam] | None = None
        self.step = 0  # Adam's, one per batch

    def use_adam(self, lr: float, weight_decay: float, catch_up: bool) -> None:
        """Train with :class:`.optim.SparseAdam`: the core's tables become views of its state."""
        core, layout = self.core, self.layout
        self.adam = (SparseAdam(core.user_table, lr, weight_decay, layout.user_const, catch_up),
                     SparseAdam(core.item_table, lr, weight_decay, layout.item_const, catch_up))
        core.user_table, core.item_table = self.adam[0].table, self.adam[1].table

    def use_native(self) -> None:
        """Train with the fused kernels: the scratch of both tables (their rows and the unknown row)."""
        w = self.layout.width
        self.scratch = (_abi.Scratch(self.core.n_users + 1, w), _abi.Scratch(self.core.n_items + 1, w))

    def native_train(self, lr: float, l2: float, decay: float) -> _abi.Train:
        """The kernels' :class:`_abi.Train` at this step: both tables (Adam's state and idle steps, when
        training with Adam) with their scratch."""
        core, layout, (su, si) = self.core, self.layout, self.scratch
        if self.adam is None:
            user = _abi.table(core.user_table, su, layout.user_const)
            item = _abi.table(core.item_table, si, layout.item_const)
        else:
            au, ai = self.adam
            user = _abi.table(au.state, su, layout.user_const, au.last)
            item = _abi.table(ai.state, si, layout.item_const, ai.last)
        optimizer = _abi.SGD if self.adam is None else _abi.ADAM
        return _abi.Train(user=user, item=item, width=layout.width, optimizer=optimizer, lr=lr, l2=l2, decay=decay,
                          step=self.step, threads=_native.threads())

    def permutation(self) -> torch.Tensor:
        """This epoch's order of the training pairs."""
        return torch.randperm(len(self.data), generator=self.data.generator, device=self.data.users.device)

    def finish(self) -> None:
        core = self.core
        core.user_table, core.item_table = core.user_table.contiguous(), core.item_table.contiguous()
        self.adam = None

    def guard(self, core: "FlexMFScorer", data: TrainingData) -> "DivergenceGuard":
        return DivergenceGuard(core._initial_loss(data), core.config.learning_rate)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` (CUDA generators must live on the CUDA device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


#: an epoch whose mean training loss is above this multiple of the loss at initialization diverged
#: (the shipped sets never exceed 1.01x; a run at 10x the default Adam learning rate that recovers
#: peaks at 15x; absurd learning rates reach 1e4x and more within two epochs)
DIVERGENCE_FACTOR = 100.0
F32_MAX = float(torch.finfo(torch.float32).max)


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

    Training fails with a one-line :class:`TrainingError` naming the epoch, the ``setting`` to change
    (``learning_rate=...`` by default) and the ``advice`` when the epoch's mean training loss is NaN or infinite, when a parameter is, when the
    parameters are so large that a score could overflow float32 (``width * max|user| * max|item|``),
    or when the loss is above :data:`DIVERGENCE_FACTOR` times ``initial_loss``: the loss the model
    at its initialization is expected to have (near-zero embeddings score like a constant
    predictor). A learning rate that trains never takes an epoch's mean loss to a hundred times where
    training started (an overshooting Adam that recovers peaks near 15x); a run that does has diverged,
    and waiting longer lets its parameters grow by orders of magnitude per epoch or turn NaN between
    two checks (NaN scores then add nothing to the loss, which looks finite again).
    """

    def __init__(self, initial_loss: float, learning_rate: float | None = None, *, setting: str | None = None,
                 advice: str = "lower learning_rate or raise regularization"):
        self.limit = DIVERGENCE_FACTOR * max(float(initial_loss), 1e-12)
        self.initial_loss = float(initial_loss)
        self.setting, self.advice = setting or f"learning_rate={learning_rate}", advice

    def _fail(self, epoch: int, what: str) -> NoReturn:
        raise TrainingError(f"training diverged at epoch {epoch}: {what} ({self.setting}); {self.advice}")

    def check(self, epoch: int, loss: float, user: torch.Tensor, item: torch.Tensor) -> None:
        """Raise when epoch ``epoch`` (mean loss ``loss``, parameter tables ``user``/``item``) diverged."""
        if not math.isfinite(loss):
            self._fail(epoch, f"loss is {'nan' if math.isnan(loss) else 'inf'}")
        largest = []
        for side, table in (("user", user), ("item", item)):
            m = max_abs(table)
            if not math.isfinite(m):
                self._fail(epoch, f"the {side} parameters are {'nan' if math.isnan(m) else 'inf'}")
            largest.append(m)
        bound = user.shape[-1] * largest[0] * largest[1]  # score_bound's value, without a second pass
        if bound > F32_MAX:
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


__all__ = ["DIVERGENCE_FACTOR", "DivergenceGuard", "MinibatchStrategy", "Strategy", "TrainingData", "hot_loop_threads", "make_generator",
           "max_abs", "oom_guard", "requested_threads", "score_bound"]
