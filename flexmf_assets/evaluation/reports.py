"""Evaluation reports: a trained scorer against the test split, its baseline beside it, and the
curves behind the figures. Plain library code: the Dagster layer turns a report into metadata.

- Explicit: RMSE/MAE (global and per user) against the bias baseline; mean prediction per actual
  rating (predicted vs actual) and RMSE by the user's training activity, both for model and baseline.
- Implicit: NDCG, recall, precision, hit rate, MRR and MAP at 10 and 20 against the popularity
  baseline; NDCG@k for k = 1..50 for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import polars as pl

from flexmf_assets.evaluation.charts import Series, line_chart
from flexmf_assets.evaluation.rating import BiasBaseline, per_user_table, rating_metrics
from flexmf_assets.evaluation.topn import (
    Discount,
    PopularityBaseline,
    _align_ids,
    _ranked,
    _require,
    coverage,
    discount_weights,
    mean_popularity,
    topn_metrics,
)

#: cutoffs of the implicit metrics reported (and ranked on the leaderboard)
TOPN_KS = (10, 20)
#: the NDCG curve runs k = 1..CURVE_K
CURVE_K = 50
#: training-activity buckets (ratings per user in train) of the explicit error figure
ACTIVITY_EDGES = (1, 10, 20, 50, 100, 200, 500)


@dataclass(frozen=True)
class Report:
    """One evaluation: the per-user table (stored), the headline numbers and the figures (Markdown)."""

    per_user: pl.DataFrame
    metrics: dict[str, float | int]
    figures: dict[str, str] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)


def metric_curve(recs: pl.DataFrame, test: pl.DataFrame, max_k: int = CURVE_K,
                 discount: Discount = "log2") -> dict[str, np.ndarray]:
    """Macro-averaged NDCG@k and recall@k for k = 1..max_k in one pass (same definitions as
    :func:`topn_metrics`: test users without recommendations count as 0)."""
    _require(test, "test", ("user_id", "item_id"))
    truth = test.select("user_id", "item_id").unique()
    ranked = _align_ids(_ranked(recs), truth)
    n_test = truth.group_by("user_id").agg(pl.len().alias("n")).sort("user_id")
    users = n_test.with_row_index("row").select("user_id", "row")
    hits = (ranked.filter(pl.col("rank") <= max_k).join(truth, on=["user_id", "item_id"])
            .join(users, on="user_id").select("row", "rank"))
    rows, ranks = hits["row"].to_numpy(), hits["rank"].to_numpy() - 1
    weights = discount_weights(max_k, discount)
    dcg = np.zeros((n_test.height, max_k))
    found = np.zeros((n_test.height, max_k))
    np.add.at(dcg, (rows, ranks), weights[ranks])
    np.add.at(found, (rows, ranks), 1.0)
    dcg, found = dcg.cumsum(axis=1), found.cumsum(axis=1)
    n = n_test["n"].to_numpy()[:, None]
    ideal = np.concatenate([[0.0], np.cumsum(weights)])
    idcg = ideal[np.minimum(n, np.arange(1, max_k + 1)[None, :])]
    if n_test.height == 0:
        return {"k": np.arange(1, max_k + 1), "ndcg": np.zeros(max_k), "recall": np.zeros(max_k)}
    return {"k": np.arange(1, max_k + 1), "ndcg": (dcg / idcg).mean(axis=0), "recall": (found / n).mean(axis=0)}


def implicit_report(model, train: pl.DataFrame, test: pl.DataFrame) -> Report:
    """Top-N metrics of ``model`` (a fitted implicit scorer) on ``test``, beside the popularity baseline;
    with the model's ``min_rating``, only ratings at or above it are relevant (and count as popular)."""
    min_rating = model.config.min_rating
    if min_rating is not None:
        train = train.filter(pl.col("rating") >= min_rating)
        test = test.filter(pl.col("rating") >= min_rating)
    n = max(max(TOPN_KS), CURVE_K)
    users = test["user_id"].unique().sort()
    recs = model.recommend(users, n=n)
    result = topn_metrics(recs, test, ks=TOPN_KS)
    base = PopularityBaseline().fit(train).recommend(users, n=n)
    base_result = topn_metrics(base, test, ks=TOPN_KS)
    metrics: dict[str, float | int] = dict(result.means)
    metrics.update({f"baseline_{k}": v for k, v in base_result.means.items()})
    top = max(TOPN_KS)
    shown = recs.filter(pl.col("rank") <= top) if "rank" in recs.columns else recs
    metrics.update({
        "ndcg@10_delta_vs_baseline": result.means["ndcg@10"] - base_result.means["ndcg@10"],
        f"coverage@{top}": coverage(shown, train["item_id"].n_unique()),
        f"mean_popularity@{top}": mean_popularity(shown, train),
        "test_users": users.len(),
    })
    ours, theirs = metric_curve(recs, test), metric_curve(base, test)
    figure = line_chart("NDCG@k, model vs popularity", list(ours["k"]),
                        [Series("model", list(ours["ndcg"])), Series("popularity", list(theirs["ndcg"]), dashed=True)],
                        x_label="k (NDCG@k)")
    curves = {"k": ours["k"].tolist(), "ndcg": ours["ndcg"].tolist(), "baseline_ndcg": theirs["ndcg"].tolist()}
    return Report(result.per_user, metrics, {"ndcg_at_k": figure}, curves)


def _activity_bucket(counts: pl.Expr, edges: Sequence[int] = ACTIVITY_EDGES) -> pl.Expr:
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    expr = pl.lit(labels[-1])
    for (lo, hi), label in reversed(list(zip(zip(edges, edges[1:]), labels))):
        expr = pl.when(counts < hi).then(pl.lit(label)).otherwise(expr)
    return expr


def explicit_report(model, train: pl.DataFrame, test: pl.DataFrame) -> Report:
    """Rating-prediction metrics of ``model`` (a fitted explicit scorer) on ``test``, beside the bias
    baseline; figures: predicted vs actual, and RMSE by the user's training activity."""
    preds = model.predict_frame(test)
    metrics_ = rating_metrics(test, preds)
    base_preds = BiasBaseline().fit(train).predict_frame(test)
    base = rating_metrics(test, base_preds)
    metrics: dict[str, float | int] = {
        "rmse": metrics_.rmse, "mae": metrics_.mae,
        "user_rmse": metrics_.user_rmse, "user_mae": metrics_.user_mae,
        "baseline_rmse": base.rmse, "baseline_mae": base.mae,
        "rmse_delta_vs_baseline": metrics_.rmse - base.rmse,
        "test_ratings": test.height,
    }
    frame = test.select("user_id", "item_id", pl.col("rating").cast(pl.Float64)).with_columns(
        prediction=preds["prediction"].cast(pl.Float64), baseline=base_preds["prediction"].cast(pl.Float64))
    by_rating = (frame.group_by("rating").agg(pl.col("prediction").mean(), pl.col("baseline").mean(), pl.len())
                 .sort("rating"))
    activity = train.group_by("user_id").agg(pl.len().alias("train_ratings"))
    edges = ACTIVITY_EDGES
    by_activity = (
        frame.join(activity, on="user_id", how="left")
        .with_columns(pl.col("train_ratings").fill_null(0))
        .with_columns(_activity_bucket(pl.col("train_ratings"), edges).alias("bucket"),
                      pl.col("train_ratings").alias("order"))
        .group_by("bucket")
        .agg(((pl.col("prediction") - pl.col("rating")) ** 2).mean().sqrt().alias("rmse"),
             ((pl.col("baseline") - pl.col("rating")) ** 2).mean().sqrt().alias("baseline_rmse"),
             pl.col("order").min(), pl.len())
        .sort("order")
    )
    figures = {
        "predicted_vs_actual": line_chart(
            "mean prediction per actual rating", by_rating["rating"].to_list(),
            [Series("model", by_rating["prediction"].to_list()),
             Series("bias baseline", by_rating["baseline"].to_list(), dashed=True)],
            x_label="actual rating (grey: y = x)", diagonal=True),
        "error_by_activity": line_chart(
            "RMSE by the user's training ratings", list(range(1, by_activity.height + 1)),
            [Series("model", by_activity["rmse"].to_list()),
             Series("bias baseline", by_activity["baseline_rmse"].to_list(), dashed=True)],
            x_label="the user's ratings in train", x_ends=(by_activity["bucket"][0], by_activity["bucket"][-1])),
    }
    curves = {"by_rating": by_rating.to_dicts(), "by_activity": by_activity.drop("order").to_dicts()}
    return Report(per_user_table(test, preds), metrics, figures, curves)


def loss_curve(history: Sequence[dict], val_key: str) -> str:
    """The training loss and the validation metric per epoch, each scaled to its own range."""
    epochs = [h["epoch"] for h in history]
    loss = [h.get("train_loss") for h in history]
    val = [h.get(val_key) for h in history]

    def scaled(values):
        finite = [v for v in values if v is not None and np.isfinite(v)]
        if not finite:
            return [None] * len(values), ""
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or 1.0
        return [None if v is None else (v - lo) / span for v in values], f"{finite[0]:.3g}>{finite[-1]:.3g}"

    loss_s, loss_r = scaled(loss)
    val_s, val_r = scaled(val)
    series = [Series(f"train loss {loss_r}", loss_s)]
    if val_r:
        series.append(Series(f"{val_key} {val_r}", val_s, dashed=True))
    return line_chart("training curve", epochs, series, x_label="epoch", y_range=(0.0, 1.0), y_labels=False)
