"""Rating-prediction metrics (RMSE, MAE; micro and per-user macro) and the damped bias baseline.

Definitions (``e = prediction - rating`` over the test rows):
  * ``rmse = sqrt(mean(e^2))``, ``mae = mean(|e|)`` over all rows (micro / global);
  * ``user_rmse = mean_u sqrt(mean_{rows of u}(e^2))``, ``user_mae = mean_u mean_{rows of u}|e|``
    (macro: every user weighs the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

from flexmf_assets.errors import ConfigError, DataValidationError

_KEYS = ["user_id", "item_id"]


@dataclass(frozen=True)
class RatingMetrics:
    """Global (micro) and per-user (macro) error of rating predictions."""

    rmse: float
    mae: float
    user_rmse: float
    user_mae: float
    n: int
    n_users: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(df: pl.DataFrame, cols: list[str], name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataValidationError(f"{name}: missing column(s) {', '.join(missing)}; got {df.columns}")


def _errors_frame(
    truth: pl.DataFrame, predictions: Any, missing: Literal["error", "skip"] = "error"
) -> pl.DataFrame:
    """``truth`` rows with a Float64 ``error`` column (prediction - rating)."""
    _require(truth, [*_KEYS, "rating"], "truth")
    if missing not in ("error", "skip"):
        raise ConfigError(f"missing: {missing!r} is not one of 'error', 'skip'")
    if isinstance(predictions, pl.DataFrame):
        _require(predictions, [*_KEYS, "prediction"], "predictions")
        preds = predictions.select(*_KEYS, pl.col("prediction").cast(pl.Float64))
        if preds.select(pl.struct(_KEYS).is_duplicated().any()).item():
            raise DataValidationError("predictions: duplicate (user_id, item_id) rows")
        joined = truth.select(*_KEYS, "rating").join(preds, on=_KEYS, how="left")
    else:
        arr = np.asarray(predictions, dtype=np.float64).reshape(-1)
        if len(arr) != truth.height:
            raise DataValidationError(
                f"predictions: {len(arr)} values for {truth.height} truth rows"
            )
        joined = truth.select(*_KEYS, "rating").with_columns(
            pl.Series("prediction", arr).fill_nan(None)
        )
    joined = joined.with_columns(pl.col("prediction").fill_nan(None))
    n_missing = joined["prediction"].null_count()
    if n_missing:
        if missing == "error":
            raise DataValidationError(
                f"predictions: {n_missing} of {truth.height} truth rows have no (or a NaN) prediction"
            )
        joined = joined.drop_nulls("prediction")
    return joined.with_columns(error=pl.col("prediction") - pl.col("rating").cast(pl.Float64))


def per_user_table(
    truth: pl.DataFrame, predictions: Any, *, missing: Literal["error", "skip"] = "error"
) -> pl.DataFrame:
    """Per-user ``user_id, n, rmse, mae``, sorted by user_id."""
    err = _errors_frame(truth, predictions, missing)
    return (
        err.group_by("user_id")
        .agg(
            n=pl.len().cast(pl.Int64),
            rmse=(pl.col("error") ** 2).mean().sqrt(),
            mae=pl.col("error").abs().mean(),
        )
        .sort("user_id")
    )


def rating_metrics(
    truth: pl.DataFrame, predictions: Any, *, missing: Literal["error", "skip"] = "error"
) -> RatingMetrics:
    """RMSE/MAE of ``predictions`` against ``truth`` (user_id, item_id, rating).

    ``predictions`` is a frame with ``user_id, item_id, prediction`` (joined on the keys) or an
    array aligned with ``truth``'s rows. A truth row without a prediction raises
    :class:`DataValidationError` unless ``missing="skip"``.
    """
    err = _errors_frame(truth, predictions, missing)
    if err.height == 0:
        raise DataValidationError("truth: no rows to evaluate")
    e = err["error"].to_numpy()
    users = per_user_table(truth, predictions, missing=missing)
    return RatingMetrics(
        rmse=float(np.sqrt(np.mean(e * e))),
        mae=float(np.mean(np.abs(e))),
        user_rmse=float(users["rmse"].mean()),
        user_mae=float(users["mae"].mean()),
        n=int(err.height),
        n_users=int(users.height),
    )


class BiasBaseline:
    """Global mean + damped item bias + damped user bias (LensKit's ``BiasScorer`` model).

    ``b_i = sum_u (r_ui - mu) / (n_i + d_item)``; ``b_u = sum_i (r_ui - mu - b_i) / (n_u + d_user)``.
    ``damping`` is one number for both or ``(user_damping, item_damping)``. Unknown users/items get
    zero bias.
    """

    def __init__(self, damping: float | tuple[float, float] = 5.0):
        d_user, d_item = (damping, damping) if np.isscalar(damping) else tuple(damping)  # type: ignore[misc]
        if d_user < 0 or d_item < 0:
            raise ConfigError(f"damping: must be >= 0, got {damping!r}")
        self.user_damping, self.item_damping = float(d_user), float(d_item)

    def fit(self, train: pl.DataFrame) -> "BiasBaseline":
        _require(train, [*_KEYS, "rating"], "train")
        if train.height == 0:
            raise DataValidationError("train: no ratings to fit the bias baseline on")
        r = train.select(*_KEYS, pl.col("rating").cast(pl.Float64))
        self.global_mean = float(r["rating"].mean())
        self.item_bias = r.group_by("item_id").agg(
            item_bias=(pl.col("rating") - self.global_mean).sum() / (pl.len() + self.item_damping)
        )
        self.user_bias = (
            r.join(self.item_bias, on="item_id")
            .group_by("user_id")
            .agg(
                user_bias=(pl.col("rating") - self.global_mean - pl.col("item_bias")).sum()
                / (pl.len() + self.user_damping)
            )
        )
        return self

    def predict_frame(self, df: pl.DataFrame) -> pl.DataFrame:
        """``df`` with a Float64 ``prediction`` column (row order kept)."""
        _require(df, _KEYS, "frame")
        if not hasattr(self, "global_mean"):
            raise DataValidationError("BiasBaseline: call fit() before predicting")
        ub = self.user_bias.with_columns(pl.col("user_id").cast(df["user_id"].dtype, strict=False))
        ib = self.item_bias.with_columns(pl.col("item_id").cast(df["item_id"].dtype, strict=False))
        out = (
            df.join(ub, on="user_id", how="left", maintain_order="left")
            .join(ib, on="item_id", how="left", maintain_order="left")
            .with_columns(
                prediction=self.global_mean
                + pl.col("user_bias").fill_null(0.0)
                + pl.col("item_bias").fill_null(0.0)
            )
            .drop("user_bias", "item_bias")
        )
        return out

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predictions for parallel arrays of raw ids."""
        df = pl.DataFrame({"user_id": pl.Series(np.asarray(users)), "item_id": pl.Series(np.asarray(items))})
        return self.predict_frame(df)["prediction"].to_numpy()
