"""The implicit-feedback losses, each declared once in :data:`LOSSES`.

A loss is a function of a batch's scores ``s[b, 1 + c]`` (column 0 the positive, then ``c`` sampled
negatives) and the validity of each negative. Adding one takes:

* its torch form here: ``fn(s, valid, positive_weight, warp_weight) -> (d loss / d s, summed loss)``,
  summed over the batch (not yet divided by the batch size), and a :class:`Loss` entry in
  :data:`LOSSES` (its kernel kind, the bound of its value at initialization the divergence guard
  scales from, and whether it needs rank-weighted violators as WARP does);
* its C form in ``_kernels.c``: a ``loss_<name>(const PairScores *, float *dj)`` function, a case in
  ``implicit_batch``'s switch, and a value in ``enum flexmf_loss`` of ``_kernels.h`` equal to
  ``Loss.kind``.

A name not in :data:`LOSSES` is a :class:`ConfigError` in every engine (:func:`loss_named`), and a
kind the kernel does not know is an error status there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from flexmf_assets.errors import ConfigError

Gradients = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def _logistic(s: torch.Tensor, valid: torch.Tensor, positive_weight: float, warp_weight: torch.Tensor | None):
    """``w * softplus(-s+) + sum softplus(s-)`` (BCE on the positive and the sampled negatives)."""
    ds = torch.sigmoid(s)
    ds[:, 0].sub_(1.0).mul_(positive_weight)  # d softplus(-x)/dx = sigmoid(x) - 1
    ds[:, 1:].mul_(valid)
    total = (positive_weight * F.softplus(-s[:, 0]).sum(dtype=torch.float64)
             + (F.softplus(s[:, 1:]) * valid).sum(dtype=torch.float64))
    return ds, total


def _pairwise(s: torch.Tensor, valid: torch.Tensor, positive_weight: float, warp_weight: torch.Tensor | None):
    """BPR: ``sum softplus(s- - s+)``."""
    diff = s[:, 1:] - s[:, :1]
    g = torch.sigmoid(diff).mul_(valid)
    ds = torch.cat([-g.sum(1, keepdim=True), g], 1)
    total = (F.softplus(diff) * valid).sum(dtype=torch.float64)
    return ds, total


def _warp(s: torch.Tensor, valid: torch.Tensor, positive_weight: float, warp_weight: torch.Tensor | None):
    """WARP: ``L(trials) * relu(1 - s+ + s-)`` with one negative, the first violator found."""
    margin = 1.0 - s[:, 0] + s[:, 1]
    w = warp_weight * valid[:, 0]
    g = w * (margin > 0).to(s.dtype)
    ds = torch.stack([-g, g], 1)
    total = (w * margin.clamp(min=0)).sum(dtype=torch.float64)
    return ds, total


_SPREAD = 1 / math.sqrt(2 * math.pi)  # E[max(x, 0)] / sd of a centred normal x


@dataclass(frozen=True)
class Loss:
    """One implicit loss: its torch gradient, its kernel kind, its scale at initialization."""

    name: str
    #: its value in ``enum flexmf_loss`` of ``_kernels.h``
    kind: int
    gradients: Gradients
    #: ``(positive_weight, negatives, sigma, n_items) -> `` an upper bound of the expected loss per
    #: positive at initialization, where a score is centred with standard deviation ``sigma`` (a
    #: difference of two scores: ``sqrt(2) * sigma``); ``softplus(x) <= ln 2 + max(x, 0)``
    initial: Callable[[float, int, float, int], float]
    #: one negative per positive, the first of the sampler's candidates to violate the margin,
    #: weighted by the rank its number of tries estimates (:func:`warp_rank_weights`)
    rank_weighted: bool = False


LOSSES: dict[str, Loss] = {
    "logistic": Loss("logistic", 0, _logistic, lambda pw, c, sigma, n: (pw + c) * (math.log(2) + sigma * _SPREAD)),
    "pairwise": Loss("pairwise", 1, _pairwise,
                     lambda pw, c, sigma, n: c * (math.log(2) + math.sqrt(2) * sigma * _SPREAD)),
    "warp": Loss("warp", 2, _warp,
                 lambda pw, c, sigma, n: float(warp_rank_weights(n)[1]) * (1 + math.sqrt(2) * sigma * _SPREAD),
                 rank_weighted=True),
}


def loss_named(name: str) -> Loss:
    """The loss called ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"loss: {name!r} is not one of {', '.join(map(repr, LOSSES))}") from None


def score_gradients(loss: str, s: torch.Tensor, valid: torch.Tensor, b: int, positive_weight: float,
                    warp_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """d(batch loss)/d(score) for scores ``s[b, 1 + c]`` and the batch loss, the mean over the ``b``
    positives of loss ``loss``; invalid negatives (collisions with positives, no violator found)
    contribute nothing."""
    ds, total = loss_named(loss).gradients(s, valid, positive_weight, warp_weight)
    return ds.div_(b), total / b


def backprop(ds: torch.Tensor, X: torch.Tensor, pu: torch.Tensor, uinv: torch.Tensor, iinv: torch.Tensor,
             n_user_rows: int, n_item_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule through ``s[o] = pu[o] . X[o]`` for pairs ``o``: gradients summed per distinct row.

    ``ds`` holds d(loss)/d(s) per pair, ``pu``/``X`` the pair's user and item rows, and
    ``uinv``/``iinv`` the pair's index into the distinct user and item rows.
    """
    ds1 = ds.reshape(-1, 1)
    g_user = torch.zeros(n_user_rows, X.shape[1], device=X.device).index_add_(0, uinv, X * ds1)
    g_item = torch.zeros(n_item_rows, X.shape[1], device=X.device).index_add_(0, iinv, pu * ds1)
    return g_user, g_item


def warp_rank_weights(n_items: int, device: torch.device | None = None) -> torch.Tensor:
    """``table[t] = L(floor((n_items - 1) / t))`` with ``L(r) = sum_{j<=r} 1/j`` (index 0 unused)."""
    n = max(int(n_items) - 1, 1)
    harmonic = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64), 0)])
    trials = torch.arange(0, n + 1, dtype=torch.int64).clamp_(min=1)
    table = harmonic[torch.div(n, trials, rounding_mode="floor")]
    return table.to(dtype=torch.float32, device=device)


__all__ = ["LOSSES", "Loss", "backprop", "loss_named", "score_gradients", "warp_rank_weights"]
