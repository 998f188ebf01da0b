"""Evaluation: rating metrics and baselines (no Dagster imports)."""

from flexmf_assets.evaluation.rating import BiasBaseline, RatingMetrics, per_user_table, rating_metrics

__all__ = ["BiasBaseline", "RatingMetrics", "per_user_table", "rating_metrics"]
