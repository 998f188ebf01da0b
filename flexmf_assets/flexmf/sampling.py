"""Negative samplers for implicit-feedback training, vectorised over a whole batch.

Every sampler returns a :class:`NegativeSample`: ``items`` of shape ``[B, count]`` and a boolean
``valid`` mask of the same shape. A sampled item that is a training positive of its user is
redrawn (up to ``max_rounds`` times for the random samplers) and masked out if it still collides,
so the loss never treats a positive as a negative. Membership is one gather in a dense bool table
(small catalogues) or a ``searchsorted`` in sorted ``user * n_items + item`` keys: no Python loop
per sample and, on accelerators, no device sync per try.

The misranked sampler scores its candidates with the current model in *pooled* mode: the batch
draws one pool of items, every row draws its candidates from that pool, and the engine scores the
batch's distinct users against the pool in one matrix product (``pool_scores``), instead of
gathering ``batch x candidates`` item rows. Marginally each candidate is still a uniform item.

A sampler is declared once, in :data:`SAMPLERS` (the config's ``negative_strategy`` names it): adding
one is a class with ``build`` and ``sample`` (and ``needs_model = True`` when it scores candidates
with the current model, so the engine passes ``pool_scores`` and draws its negatives batch by batch)
and one entry there. The fused kernels only see the sampled items, so a sampler has no C side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf import _abi, _native

PoolScoreFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``pool_scores(pool[C]) -> (scores[R, C], row[B])``: scores of the batch's R distinct users
against the pool, and each batch row's index into those R rows."""


@dataclass
class NegativeSample:
    """Sampled negatives, their validity mask and (misranked/WARP only) tries to the first violator."""

    items: torch.Tensor
    valid: torch.Tensor
    trials: torch.Tensor | None = None


#: below this many user x item cells, membership is a lookup in a dense bool table (one gather)
DENSE_LIMIT = 1 << 26


class PositiveSet:
    """The training (user, item) pairs for batched membership tests.

    Small catalogues use a dense ``users x items`` bool table (one gather per test); larger ones a
    sorted array of ``user * n_items + item`` keys searched with ``searchsorted``.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, n_items: int,
                 dense_limit: int = DENSE_LIMIT) -> None:
        self.n_items = int(n_items)
        keys = users.to(torch.int64) * self.n_items + items.to(torch.int64)
        self.keys = torch.unique(keys)  # sorted, duplicates removed
        n_users = int(users.max()) + 1 if users.numel() else 0
        self.table: torch.Tensor | None = None
        self._bits: torch.Tensor | None = None  # the table packed 8 cells a byte, for the CPU kernel
        if n_users * self.n_items <= dense_limit:
            self.table = torch.zeros(n_users * self.n_items, dtype=torch.bool, device=keys.device)
            self.table[self.keys] = True

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Boolean tensor shaped like ``items``: is ``(users[b], items[b, ...])`` a positive?"""
        if (self.keys.device.type == "cpu" and users.dim() == 1 and items.dim() in (1, 2)
                and items.shape[0] == users.shape[0] and _native.usable(self.keys.device)):
            # one fused pass on CPU (the same answer as the torch ops below)
            u = users.to(torch.int64).contiguous()
            it = items.to(torch.int64).contiguous()
            out = torch.empty(items.shape, dtype=torch.bool)
            if self.table is not None and self._bits is None:
                self._bits = torch.from_numpy(np.packbits(self.table.numpy(), bitorder="little"))
            _native.run("flexmf_contains", _abi.ContainsArgs(
                bits=_abi.ptr(self._bits), cells=0 if self.table is None else self.table.numel(),
                keys=_abi.ptr(self.keys), n_keys=self.keys.numel(), n_items=self.n_items, users=_abi.ptr(u),
                items=_abi.ptr(it), n=u.numel(), c=1 if it.dim() == 1 else it.shape[1], out=_abi.ptr(out)))
            return out
        u = users.to(torch.int64)
        while u.dim() < items.dim():
            u = u.unsqueeze(-1)
        keys = (u * self.n_items + items.to(torch.int64)).reshape(-1)
        if self.table is not None:
            inside = keys < self.table.numel()  # users beyond the training range have no positives
            return (self.table[torch.where(inside, keys, 0)] & inside).reshape(items.shape)
        if self.keys.numel() == 0:
            return torch.zeros_like(items, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        return (self.keys[pos] == keys).reshape(items.shape)


class NegativeSampler(Protocol):
    #: scores candidates with the current model: ``sample`` needs ``pool_scores``
    needs_model: bool

    def sample(self, users: torch.Tensor, count: int, *, pos_scores: torch.Tensor | None = None,
               generator: torch.Generator | None = None, pool_scores: PoolScoreFn | None = None) -> NegativeSample:
        """``count`` negatives for each of ``users`` (``pos_scores``: WARP's positive scores;
        ``pool_scores``: the current model, for samplers that need it)."""


class _RandomSampler:
    """Shared redraw-and-mask loop of the uniform and popularity samplers."""

    needs_model = False

    @classmethod
    def build(cls, positives: PositiveSet, train_items: torch.Tensor, **options) -> "_RandomSampler":
        """The sampler for training pairs ``positives`` (``options``: :func:`make_sampler`'s)."""
        return cls(positives)

    def __init__(self, positives: PositiveSet, max_rounds: int = 8) -> None:
        self.positives = positives
        self.max_rounds = max_rounds

    def _draw(self, shape: tuple[int, ...], device: torch.device, generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, users: torch.Tensor, count: int, *, pos_scores: torch.Tensor | None = None,
               generator: torch.Generator | None = None, pool_scores: PoolScoreFn | None = None) -> NegativeSample:
        items = self._draw((users.shape[0], count), users.device, generator)
        bad = self.positives.contains(users, items)
        if users.device.type == "cpu":
            # CPU: redraw just the collisions (a few percent), found with nonzero (no sync to avoid)
            flat_items, flat_bad = items.view(-1), bad.view(-1)
            at = flat_bad.nonzero().squeeze(1)
            for _ in range(self.max_rounds):
                if at.numel() == 0:
                    break
                fresh = self._draw((at.numel(),), users.device, generator)
                flat_items[at] = fresh
                still = self.positives.contains(users[at // count], fresh)
                flat_bad[at] = still
                at = at[still]
            return NegativeSample(items=items, valid=~bad)
        for _ in range(self.max_rounds):
            # redraw everywhere but keep only the redraws where the old draw collided: no sync needed
            fresh = self._draw(items.shape, users.device, generator)
            items = torch.where(bad, fresh, items)
            bad = bad & self.positives.contains(users, items)
        return NegativeSample(items=items, valid=~bad)


class UniformSampler(_RandomSampler):
    """Items drawn uniformly from the catalogue, positives redrawn then masked."""

    def _draw(self, shape, device, generator) -> torch.Tensor:
        return torch.randint(
            0, self.positives.n_items, shape, device=device, generator=generator
        )


class PopularSampler(_RandomSampler):
    """Items drawn proportionally to their training popularity (a random training interaction's item)."""

    @classmethod
    def build(cls, positives: PositiveSet, train_items: torch.Tensor, **options) -> "PopularSampler":
        return cls(positives, train_items)

    def __init__(self, positives: PositiveSet, train_items: torch.Tensor, max_rounds: int = 8) -> None:
        super().__init__(positives, max_rounds)
        self.train_items = train_items.to(torch.int64)

    def _draw(self, shape, device, generator) -> torch.Tensor:
        idx = torch.randint(0, self.train_items.numel(), shape, device=device, generator=generator)
        return self.train_items[idx]


class MisrankedSampler:
    """Scores ``candidates`` uniform items per row with the current model and picks hard negatives.

    Without ``pos_scores`` it returns, per requested negative, the highest-scoring non-positive of a
    fresh block of candidates. With ``pos_scores`` (WARP) it returns the first candidate that
    violates the margin (``score > pos_score - margin``) and ``trials`` = its 1-based position;
    rows with no violator are marked invalid.

    Candidates are drawn from one batch-wide pool of ``pool_size`` uniform items (default
    ``max(8 * T, 512)``, at most the catalogue), scored by the caller's ``pool_scores`` in one matrix
    product.
    """

    needs_model = True

    @classmethod
    def build(cls, positives: PositiveSet, train_items: torch.Tensor, *, candidates: int = 20, margin: float = 1.0,
              pool_size: int | None = None) -> "MisrankedSampler":
        return cls(positives, candidates=candidates, margin=margin, pool_size=pool_size)

    def __init__(self, positives: PositiveSet, candidates: int = 20, margin: float = 1.0,
                 pool_size: int | None = None) -> None:
        self.positives = positives
        self.candidates = int(candidates)
        self.margin = margin
        self.pool_size = pool_size

    def _pool(self, count: int) -> int:
        size = self.pool_size or max(8 * self.candidates * count, 512)
        return max(1, min(size, self.positives.n_items))

    def sample(self, users: torch.Tensor, count: int, *, pos_scores: torch.Tensor | None = None,
               generator: torch.Generator | None = None, pool_scores: PoolScoreFn | None = None) -> NegativeSample:
        if pool_scores is None:
            raise ValueError("MisrankedSampler.sample needs pool_scores (the current model)")
        b, t = users.shape[0], self.candidates
        dev = users.device
        size = self._pool(count)
        pool = torch.randint(0, self.positives.n_items, (size,), device=dev, generator=generator)
        slot = torch.randint(0, size, (b, count * t), device=dev, generator=generator)
        with torch.no_grad():
            table, row = pool_scores(pool)
            flat = (row.to(torch.int64) * size).unsqueeze(1) + slot
            scores = table.reshape(-1)[flat.reshape(-1)].reshape(b, count, t)
        cand = pool[slot]
        is_pos = self.positives.contains(users, cand).reshape(b, count, t)
        cand = cand.reshape(b, count, t)
        if pos_scores is None:
            scores = scores.masked_fill(is_pos, float("-inf"))
            best = scores.argmax(dim=2, keepdim=True)
            items = cand.gather(2, best).squeeze(2)
            valid = ~is_pos.gather(2, best).squeeze(2)
            return NegativeSample(items=items, valid=valid)
        violates = (scores > pos_scores.reshape(b, 1, 1) - self.margin) & ~is_pos
        first = violates.to(torch.uint8).argmax(dim=2, keepdim=True)  # first True (0 when none)
        items = cand.gather(2, first).squeeze(2)
        valid = violates.gather(2, first).squeeze(2)
        return NegativeSample(items=items, valid=valid, trials=first.squeeze(2) + 1)


#: negative_strategy -> the sampler class (``build(positives, train_items, **options)`` makes one)
SAMPLERS: dict[str, type] = {
    "uniform": UniformSampler,
    "popular": PopularSampler,
    "misranked": MisrankedSampler,
}


def make_sampler(
    strategy: str,
    positives: PositiveSet,
    train_items: torch.Tensor,
    *,
    candidates: int = 20,
    margin: float = 1.0,
    pool_size: int | None = None,
) -> NegativeSampler:
    """The sampler named by a config's ``negative_strategy`` (:data:`SAMPLERS`); an unknown name is a
    :class:`ConfigError` listing the valid ones."""
    if strategy not in SAMPLERS:
        raise ConfigError(f"negative_strategy: {strategy!r} is not one of {', '.join(map(repr, SAMPLERS))}")
    return SAMPLERS[strategy].build(positives, train_items, candidates=candidates, margin=margin, pool_size=pool_size)


__all__ = [
    "MisrankedSampler",
    "NegativeSample",
    "NegativeSampler",
    "PoolScoreFn",
    "PopularSampler",
    "PositiveSet",
    "SAMPLERS",
    "UniformSampler",
    "make_sampler",
]
