"""Top-N evaluation: ranking metrics per user, their macro means, and a popularity baseline.

The exact definitions (formulae, tie handling, users with fewer test items than k) are in
``docs/metrics.md``. Everything here is plain polars + numpy; no Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import polars as pl

from flexmf_assets.errors import DataValidationError

Discount = Literal["log2", "lenskit"]
METRICS = ("ndcg", "recall", "precision", "hit", "mrr", "map")


@dataclass(frozen=True)
class TopNResult:
    """Per-user metric table (one row per test user) and the macro means over those users."""

    per_user: pl.DataFrame
    means: dict[str, float]


def discount_weights(n: int, discount: Discount = "log2") -> np.ndarray:
    """Discount of ranks 1..n: ``1/log2(rank+1)`` ("log2") or ``1/log2(max(rank, 2))`` ("lenskit")."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    if discount == "log2":
        return 1.0 / np.log2(ranks + 1.0)
    if discount == "lenskit":
        return 1.0 / np.log2(np.maximum(ranks, 2.0))
    raise DataValidationError(f"discount: {discount!r} is not one of 'log2', 'lenskit'")


def _require(frame: pl.DataFrame, name: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"{name} frame lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}"
        )


def _ranked(recs: pl.DataFrame) -> pl.DataFrame:
    """``user_id, item_id, rank`` with ordinal ranks; derives them from ``score`` if absent."""
    if "rank" not in recs.columns:
        _require(recs, "recs", ("user_id", "item_id", "score"))
        # deterministic tie-break: higher score first, then smaller item id
        recs = recs.sort(["user_id", "score", "item_id"], descending=[False, True, False])
        recs = recs.with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
    _require(recs, "recs", ("user_id", "item_id", "rank"))
    recs = recs.select("user_id", "item_id", pl.col("rank").cast(pl.Int64))
    if recs.height:
        low = recs["rank"].min()
        if low is None or low < 1:
            raise DataValidationError(f"recs: rank must be >= 1, found {low}")
        for column, problem in (
            ("rank", "has rank {rank} more than once; ranks must be unique per user (break ties before evaluating)"),
            ("item_id", "is recommended item {item_id!r} more than once"),
        ):
            dup = recs.filter(pl.struct("user_id", column).is_duplicated())
            if dup.height:
                row = dup.row(0, named=True)
                raise DataValidationError(f"recs: user {row['user_id']!r} " + problem.format(**row))
    return recs


def _align_ids(recs: pl.DataFrame, test: pl.DataFrame) -> pl.DataFrame:
    for col in ("user_id", "item_id"):
        if recs.schema[col] != test.schema[col]:
            try:
                recs = recs.with_columns(pl.col(col).cast(test.schema[col], strict=True))
            except Exception:  # noqa: BLE001 - polars raises several types on failed casts
                raise DataValidationError(
                    f"recs.{col} has type {recs.schema[col]} but test.{col} has {test.schema[col]}"
                ) from None
    return recs


def topn_metrics(
    recs: pl.DataFrame,
    test: pl.DataFrame,
    ks: Iterable[int] = (10, 20),
    discount: Discount = "log2",
) -> TopNResult:
    """NDCG, recall, precision, hit rate, MRR and MAP at each k, per test user and macro-averaged.

    ``recs`` has ``user_id, item_id`` and ``rank`` (1 = best; unique per user) or ``score`` (ranks
    are then derived: higher score first, ties broken by smaller ``item_id``). ``test`` has
    ``user_id, item_id`` (duplicates ignored). Test users without recommendations score 0;
    recommended users absent from ``test`` are ignored.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataValidationError(f"ks: cutoffs must be positive integers, got {ks}")
    weights = discount_weights(ks[-1], discount)
    ideal = np.concatenate([[0.0], np.cumsum(weights)])  # ideal[n] = sum of the first n weights

    _require(test, "test", ("user_id", "item_id"))
    truth = test.select("user_id", "item_id").unique()
    recs = _align_ids(_ranked(recs), truth)
    n_test = truth.group_by("user_id").agg(pl.len().cast(pl.Int64).alias("n_test")).sort("user_id")

    hits = (
        recs.filter(pl.col("rank") <= ks[-1])
        .join(truth, on=["user_id", "item_id"], how="inner")
        .sort(["user_id", "rank"])
        .with_columns(
            pl.int_range(1, pl.len() + 1).over("user_id").alias("hit_no"),
            pl.col("rank").map_batches(
                lambda r: pl.Series(weights[r.to_numpy() - 1]), return_dtype=pl.Float64
            ).alias("gain"),
        )
    )

    per_user = n_test
    for k in ks:
        at_k = (
            hits.filter(pl.col("rank") <= k)
            .group_by("user_id")
            .agg(
                pl.len().cast(pl.Float64).alias("hits"),
                pl.col("gain").sum().alias("dcg"),
                (1.0 / pl.col("rank").min()).alias(f"mrr@{k}"),
                (pl.col("hit_no") / pl.col("rank")).sum().alias("ap_sum"),
            )
        )
        per_user = per_user.join(at_k, on="user_id", how="left").with_columns(
            pl.col("hits", "dcg", f"mrr@{k}", "ap_sum").fill_null(0.0)
        )
        denom = pl.min_horizontal(pl.col("n_test"), pl.lit(k))
        idcg = denom.map_batches(lambda n: pl.Series(ideal[n.to_numpy()]), return_dtype=pl.Float64)
        per_user = per_user.with_columns(
            (pl.col("dcg") / idcg).alias(f"ndcg@{k}"),
            (pl.col("hits") / pl.col("n_test")).alias(f"recall@{k}"),
            (pl.col("hits") / k).alias(f"precision@{k}"),
            (pl.col("hits") > 0).cast(pl.Float64).alias(f"hit@{k}"),
            (pl.col("ap_sum") / denom).alias(f"map@{k}"),
        ).drop("hits", "dcg", "ap_sum")

    order = ["user_id", "n_test"] + [f"{m}@{k}" for k in ks for m in METRICS]
    per_user = per_user.select(order)
    means = {c: float(per_user[c].mean()) if per_user.height else 0.0 for c in order[2:]}
    return TopNResult(per_user=per_user, means=means)


def coverage(recs: pl.DataFrame, n_items: int) -> float:
    """Catalogue coverage: distinct recommended items / ``n_items``."""
    if n_items <= 0:
        raise DataValidationError(f"coverage: n_items must be positive, got {n_items}")
    _require(recs, "recs", ("item_id",))
    return recs["item_id"].n_unique() / n_items


def mean_popularity(recs: pl.DataFrame, train: pl.DataFrame) -> float:
    """Mean popularity of recommended items: the share of training users who interacted with each
    recommended item, averaged over all recommendation rows (0 for items unseen in training)."""
    _require(recs, "recs", ("item_id",))
    _require(train, "train", ("user_id", "item_id"))
    if recs.height == 0:
        return 0.0
    n_users = max(train["user_id"].n_unique(), 1)
    pop = train.group_by("item_id").agg((pl.col("user_id").n_unique() / n_users).alias("pop"))
    joined = recs.select("item_id").join(pop, on="item_id", how="left")
    return float(joined["pop"].fill_null(0.0).mean())


class PopularityBaseline:
    """Recommends the items with the most distinct training users (ties: smaller item id first)."""

    def __init__(self) -> None:
        self.items_: pl.DataFrame | None = None
        self.seen_: pl.DataFrame | None = None

    def fit(self, train: pl.DataFrame) -> "PopularityBaseline":
        _require(train, "train", ("user_id", "item_id"))
        seen = train.select("user_id", "item_id").unique()
        items = (
            seen.group_by("item_id")
            .agg(pl.len().cast(pl.Float64).alias("score"))
            .sort(["score", "item_id"], descending=[True, False])
            .with_row_index("pos")
            .with_columns(pl.col("pos").cast(pl.Int64))
        )
        self.items_, self.seen_ = items, seen
        return self

    def recommend(
        self, users: Sequence | pl.Series | None = None, n: int = 20, exclude_seen: bool = True
    ) -> pl.DataFrame:
        """Top ``n`` per user as ``user_id, item_id, score, rank`` (unknown users get the global list)."""
        if self.items_ is None or self.seen_ is None:
            raise DataValidationError("PopularityBaseline.recommend called before fit")
        if n < 1:
            raise DataValidationError(f"n: must be >= 1, got {n}")
        dtype = self.seen_.schema["user_id"]
        if users is None:
            frame = self.seen_.select("user_id").unique().sort("user_id")
        else:
            frame = pl.DataFrame({"user_id": pl.Series(list(users))}).cast({"user_id": dtype}).unique(
                maintain_order=True
            )
        # a user with s seen items needs at most n + s candidates from the popularity list
        if exclude_seen:
            counts = self.seen_.group_by("user_id").agg(pl.len().cast(pl.Int64).alias("s"))
            frame = frame.join(counts, on="user_id", how="left").with_columns(pl.col("s").fill_null(0))
        else:
            frame = frame.with_columns(pl.lit(0, dtype=pl.Int64).alias("s"))
        limit = pl.min_horizontal(pl.col("s") + n, pl.lit(self.items_.height))
        cand = (
            frame.with_columns(pl.int_ranges(0, limit).alias("pos"))
            .explode("pos")
            .drop("s")
            .drop_nulls("pos")
            .join(self.items_, on="pos", how="inner")
        )
        if exclude_seen:
            cand = cand.join(self.seen_, on=["user_id", "item_id"], how="anti")
        return (
            cand.sort(["user_id", "pos"])
            .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
            .filter(pl.col("rank") <= n)
            .select("user_id", "item_id", "score", pl.col("rank").cast(pl.Int64))
        )


__all__ = [
    "METRICS",
    "PopularityBaseline",
    "TopNResult",
    "coverage",
    "discount_weights",
    "mean_popularity",
    "topn_metrics",
]
