"""Train / validation / test splits of a ratings frame by a named, seeded protocol.

Protocols (``SplitConfig.protocol``):

* ``random``: a global random ``test_fraction`` of the ratings is the test set.
* ``user_holdout``: each user holds out ``holdout_n`` ratings (LensKit ``SampleN``) or a fraction of
  them (``SampleFrac``), chosen at random; at least one rating per user stays in train.
* ``temporal``: a global timestamp ``cutoff`` (test = ``timestamp >= cutoff``) or each user's
  ``last_n`` ratings by time (at least one stays in train).

Validation (for early stopping) is carved from train by the same family: globally for ``random``
and ``temporal`` cutoff (random rows, resp. the latest rows), per user for the per-user protocols.
Every part keeps the input's row order; the parts partition the input exactly. All work is
vectorised (numpy / polars, no per-user Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import polars as pl

from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.flexmf.config_base import ConfigBase

_PAIR = ["user_id", "item_id"]


@dataclass(frozen=True)
class SplitConfig(ConfigBase):
    """How to split; see the module docstring for the protocols."""

    protocol: Literal["random", "user_holdout", "temporal"] = "random"
    test_fraction: float = 0.2
    holdout_n: int | None = None
    holdout_fraction: float | None = None
    cutoff: int | None = None
    last_n: int | None = None
    validation_fraction: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.protocol not in ("random", "user_holdout", "temporal"):
            raise ConfigError(f"{name}.protocol: {self.protocol!r} is not one of 'random', "
                              f"'user_holdout', 'temporal'")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"{name}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"{name}.validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.holdout_n is not None and self.holdout_n < 1:
            raise ConfigError(f"{name}.holdout_n: must be >= 1, got {self.holdout_n}")
        if self.holdout_fraction is not None and not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"{name}.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        if self.last_n is not None and self.last_n < 1:
            raise ConfigError(f"{name}.last_n: must be >= 1, got {self.last_n}")
        per_user = (self.holdout_n, self.holdout_fraction)
        temporal = (self.cutoff, self.last_n)
        if self.protocol == "user_holdout":
            if all(v is not None for v in per_user):
                raise ConfigError(f"{name}.holdout_n: give holdout_n or holdout_fraction, not both")
            if any(v is not None for v in temporal):
                raise ConfigError(f"{name}.{'cutoff' if self.cutoff is not None else 'last_n'}: "
                                  "only the temporal protocol takes it")
        elif self.protocol == "temporal":
            if (self.cutoff is None) == (self.last_n is None):
                raise ConfigError(f"{name}.cutoff: the temporal protocol needs exactly one of cutoff "
                                  "(global timestamp) or last_n (per user)")
            if any(v is not None for v in per_user):
                raise ConfigError(f"{name}.{'holdout_n' if self.holdout_n is not None else 'holdout_fraction'}"
                                  ": only the user_holdout protocol takes it")
        else:
            for f in ("holdout_n", "holdout_fraction", "cutoff", "last_n"):
                if getattr(self, f) is not None:
                    raise ConfigError(f"{name}.{f}: the random protocol does not take it")

    def describe(self) -> str:
        """A short human-readable protocol description, e.g. for asset metadata."""
        if self.protocol == "random":
            what = f"random {self.test_fraction:g} of ratings"
        elif self.protocol == "user_holdout":
            what = (f"{self.holdout_n} per user" if self.holdout_n is not None
                    else f"{self.holdout_fraction or self.test_fraction:g} of each user's ratings")
        elif self.cutoff is not None:
            what = f"timestamp >= {self.cutoff}"
        else:
            what = f"each user's last {self.last_n} ratings"
        return f"{self.protocol}: test = {what}; validation {self.validation_fraction:g} of train; seed {self.seed}"


@dataclass
class SplitResult:
    """The three parts (canonical ratings frames) and the config that made them."""

    train: pl.DataFrame
    validation: pl.DataFrame
    test: pl.DataFrame
    config: SplitConfig | None = None

    def summary(self) -> dict[str, Any]:
        """Sizes, users and items of each part, cold-start counts and the leakage count (must be 0).

        ``test_cold_users``/``test_cold_items``: test users/items absent from train (likewise for
        validation). ``leakage``: test (user, item) pairs that also occur in train.
        """
        out: dict[str, Any] = {}
        for part in ("train", "validation", "test"):
            df: pl.DataFrame = getattr(self, part)
            out[f"{part}_rows"] = df.height
            out[f"{part}_users"] = df["user_id"].n_unique()
            out[f"{part}_items"] = df["item_id"].n_unique()
        train_users = self.train.select("user_id").unique()
        train_items = self.train.select("item_id").unique()
        for part in ("validation", "test"):
            df = getattr(self, part)
            out[f"{part}_cold_users"] = df.select("user_id").unique().join(
                train_users, on="user_id", how="anti").height
            out[f"{part}_cold_items"] = df.select("item_id").unique().join(
                train_items, on="item_id", how="anti").height
        out["leakage"] = self.test.select(_PAIR).join(self.train.select(_PAIR).unique(), on=_PAIR,
                                                      how="semi").height
        if self.config is not None:
            out["protocol"] = self.config.describe()
        return out


# --------------------------------------------------------------------------- helpers


def _within_user_rank(users: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(0-based position of each row inside its user when sorted by ``order_key``, user row count).

    Sorting uses one float64 key ``dense_user + squash(order_key)`` (a single argsort is much
    faster than a lexsort on large frames).
    """
    codes, counts = np.unique(users, return_inverse=True, return_counts=True)[1:]
    lo, hi = float(order_key.min()) if len(order_key) else 0.0, float(order_key.max()) if len(order_key) else 1.0
    scale = 0.999 / (hi - lo) if hi > lo else 0.0
    key = codes.astype(np.float64) + (order_key - lo) * scale
    order = np.argsort(key, kind="stable")
    del key
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users), dtype=np.int64) - starts[codes[order]]
    return rank, counts[codes]


def _per_user_take(users: np.ndarray, order_key: np.ndarray, n_take: np.ndarray | int | None,
                   fraction: float | None) -> np.ndarray:
    """Mask of the first ``n`` rows of each user by ``order_key`` (random keys = random sample).

    ``n`` is ``n_take`` or ``round(fraction * count)``, capped at ``count - 1`` so that every
    user keeps at least one row.
    """
    rank, count = _within_user_rank(users, order_key)
    if fraction is not None:
        n = np.floor(count * fraction + 0.5).astype(np.int64)
    else:
        n = np.full(len(users), n_take, dtype=np.int64)
    n = np.minimum(n, count - 1)
    return rank < n


def _check(protocol: str, n_train: int, n_test: int, n_total: int) -> None:
    if n_train == 0 or n_test == 0:
        raise DataValidationError(
            f"split protocol {protocol!r} leaves {n_train} training and {n_test} test ratings "
            f"out of {n_total}; it needs both non-empty")


def _timestamps(ratings: pl.DataFrame, protocol: str) -> np.ndarray:
    ts = ratings["timestamp"]
    if ts.null_count():
        raise DataValidationError(f"split protocol {protocol!r} needs timestamps, but "
                                  f"{ts.null_count()} of {ratings.height} ratings have none")
    return ts.to_numpy().astype(np.float64)


# --------------------------------------------------------------------------- protocols


def split_ratings(ratings: pl.DataFrame, config: SplitConfig | None = None) -> SplitResult:
    """Split canonical ratings into train / validation / test by ``config`` (default: random 80/20)."""
    config = config or SplitConfig()
    n = ratings.height
    rng = np.random.default_rng(config.seed)
    users = ratings["user_id"].to_numpy()
    test = np.zeros(n, dtype=bool)
    val = np.zeros(n, dtype=bool)
    label = config.protocol
    if config.protocol == "random":
        perm = rng.permutation(n)
        n_test = int(round(n * config.test_fraction))
        n_val = int(round((n - n_test) * config.validation_fraction))
        test[perm[:n_test]] = True
        val[perm[n_test:n_test + n_val]] = True
    elif config.protocol == "user_holdout":
        noise = rng.random(n)
        if config.holdout_n is not None:
            test = _per_user_take(users, noise, config.holdout_n, None)
        else:
            test = _per_user_take(users, noise, None, config.holdout_fraction or config.test_fraction)
        val = _carve_per_user(users, ~test, rng.random(n), config.validation_fraction)
    else:
        ts = _timestamps(ratings, label)
        tie = rng.random(n)
        if config.cutoff is not None:
            label = f"temporal (cutoff {config.cutoff})"
            test = ts >= config.cutoff
            train_idx = np.flatnonzero(~test)
            n_val = int(round(len(train_idx) * config.validation_fraction))
            if n_val:
                latest = np.lexsort((tie[train_idx], ts[train_idx]))[len(train_idx) - n_val:]
                val[train_idx[latest]] = True
        else:
            label = f"temporal (last {config.last_n} per user)"
            # newest first: negate time; random tie-break inside a second
            test = _per_user_take(users, -(ts + 0.5 * tie), config.last_n, None)
            val = _carve_per_user(users, ~test, -(ts + 0.5 * tie), config.validation_fraction)
    train = ~(test | val)
    _check(label, int(train.sum()), int(test.sum()), n)
    return SplitResult(
        train=ratings.filter(pl.Series(train)),
        validation=ratings.filter(pl.Series(val)),
        test=ratings.filter(pl.Series(test)),
        config=config,
    )


def _carve_per_user(users: np.ndarray, pool: np.ndarray, order_key: np.ndarray,
                    fraction: float) -> np.ndarray:
    """Validation mask: ``fraction`` of each user's rows in ``pool`` (first by ``order_key``)."""
    val = np.zeros(len(users), dtype=bool)
    if fraction <= 0:
        return val
    idx = np.flatnonzero(pool)
    val[idx[_per_user_take(users[idx], order_key[idx], None, fraction)]] = True
    return val


def crossfold_users(
    ratings: pl.DataFrame, n_folds: int = 5, holdout_n: int = 5, seed: int = 42,
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """LensKit's ``crossfold_users(n_folds, SampleN(holdout_n))``: yields ``(train, test)`` per fold.

    Users with more than ``holdout_n`` ratings are shuffled and dealt into ``n_folds`` folds of
    (nearly) equal size; in its fold each such user holds out ``holdout_n`` random ratings and
    train is every other rating. Users with ``holdout_n`` ratings or fewer are never tested (they
    would have nothing left to train on) and stay in every train set.
    """
    if n_folds < 2:
        raise ConfigError(f"crossfold_users.n_folds: must be >= 2, got {n_folds}")
    if holdout_n < 1:
        raise ConfigError(f"crossfold_users.holdout_n: must be >= 1, got {holdout_n}")
    rng = np.random.default_rng(seed)
    users = ratings["user_id"].to_numpy()
    uniq, codes, counts = np.unique(users, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts > holdout_n)
    if len(eligible) < n_folds:
        raise DataValidationError(
            f"crossfold_users: only {len(eligible)} users have more than {holdout_n} ratings, "
            f"fewer than n_folds={n_folds}")
    fold_of_user = np.full(len(uniq), -1, dtype=np.int64)
    fold_of_user[rng.permutation(eligible)] = np.arange(len(eligible)) % n_folds
    rank, _count = _within_user_rank(users, rng.random(len(users)))
    held = rank < holdout_n  # only meaningful for eligible users (count > holdout_n)
    row_fold = fold_of_user[codes]
    for fold in range(n_folds):
        test = held & (row_fold == fold)
        mask = pl.Series(test)
        yield ratings.filter(~mask), ratings.filter(mask)


__all__ = ["SplitConfig", "SplitResult", "split_ratings", "crossfold_users"]
