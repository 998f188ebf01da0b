"""Evaluation: rating and top-N metrics and their baselines (no Dagster imports)."""

from flexmf_assets.evaluation.rating import BiasBaseline, RatingMetrics, per_user_table, rating_metrics
from flexmf_assets.evaluation.topn import (
    PopularityBaseline,
    TopNResult,
    coverage,
    mean_popularity,
    topn_metrics,
)

__all__ = [
    "BiasBaseline",
    "PopularityBaseline",
    "RatingMetrics",
    "TopNResult",
    "coverage",
    "mean_popularity",
    "per_user_table",
    "rating_metrics",
    "topn_metrics",
]
