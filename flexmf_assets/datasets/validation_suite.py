"""The Great Expectations suite that checks a canonical ratings frame, and the frame it runs on.

Checks (:data:`CHECK_NAMES`), in order:

``schema``               the canonical columns are present with their dtypes (polars schema + GX)
``no_nulls``             user_id, item_id, rating non-null; timestamp too, unless all of it is null
``rating_in_scale``      low <= rating <= high; NaN and inf are unexpected
``rating_on_step``       (rating - low) / step is an integer (skipped when the step is None)
``unique_user_item``     (user_id, item_id) pairs are unique
``timestamp_plausible``  min_timestamp <= timestamp <= max_timestamp (seconds since epoch)
``min_rows``             at least ``min_rows`` rows

Each expectation carries its check's name in ``meta["flexmf_check"]``. GX is imported lazily (it
takes seconds), with analytics and log chatter switched off.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from flexmf_assets.datasets.frames import RATINGS_SCHEMA
from flexmf_assets.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import great_expectations as gx

#: the columns and dtypes the ``schema`` check expects (the canonical ratings frame)
CANONICAL_SCHEMA: dict[str, pl.DataType] = RATINGS_SCHEMA

#: the fewest rows a ratings frame may have (flexmf.yaml validation.min_rows overrides it)
DEFAULT_MIN_ROWS = 1000

CHECK_NAMES: tuple[str, ...] = (
    "schema",
    "no_nulls",
    "rating_in_scale",
    "rating_on_step",
    "unique_user_item",
    "timestamp_plausible",
    "min_rows",
)

#: what each check asserts, for the asset-check declarations (the run-time results carry the exact bounds)
CHECK_DESCRIPTIONS: dict[str, str] = {
    "schema": "user_id, item_id, rating, timestamp present with canonical dtypes (GX + polars schema)",
    "no_nulls": "user_id, item_id and rating never null; timestamp fully present or fully absent",
    "rating_in_scale": "ratings inside the dataset's declared scale (NaN and inf are unexpected)",
    "rating_on_step": "ratings on the dataset's step grid, where it declares one",
    "unique_user_item": "each (user_id, item_id) pair rated at most once",
    "timestamp_plausible": "timestamps between 1990-01-01 and tomorrow",
    "min_rows": f"at least the minimum row count (flexmf.yaml validation.min_rows, default {DEFAULT_MIN_ROWS})",
}

#: 1990-01-01T00:00:00Z, before any MovieLens rating (the first are from 1995/1996).
DEFAULT_MIN_TIMESTAMP = 631_152_000
#: tolerance of ``rating_on_step``, in steps (relative to max(1, |rating| / step) for float32 data)
STEP_TOLERANCE = 1e-6
SUITE_NAME = "flexmf_ratings"
#: the ``meta`` key of an expectation that names its check
CHECK_META = "flexmf_check"

# In the frame GX sees, NaN ratings are encoded as +inf: pandas would take NaN for a null (skip it
# in range checks, count it in the not-null check) where polars keeps the two apart.
STEP_COLUMN = "_rating_step_offset"  # distance of (rating - low) / step to the nearest integer
_NON_NULL_COLUMNS = ("user_id", "item_id", "rating")


def import_gx():
    """Import GX quietly (no analytics, no progress bars, warnings only in logs)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class SuiteSettings:
    """The bounds the checks hold a ratings frame to; invalid bounds raise :class:`ConfigError`."""

    rating_scale: tuple[float, float]
    rating_step: float | None
    min_rows: int
    min_timestamp: int
    max_timestamp: int

    def __post_init__(self) -> None:
        low, high = self.rating_scale
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(
                f"rating_scale: expected finite (low, high) with low < high, got {self.rating_scale!r}"
            )
        step = self.rating_step
        if step is not None and not (math.isfinite(step) and step > 0):
            raise ConfigError(f"rating_step: expected a positive number or None, got {step!r}")
        if self.min_rows < 0:
            raise ConfigError(f"min_rows: expected >= 0, got {self.min_rows!r}")
        if self.min_timestamp > self.max_timestamp:
            raise ConfigError(
                f"min_timestamp {self.min_timestamp} is after max_timestamp {self.max_timestamp}"
            )

    def descriptions(self) -> dict[str, str]:
        """What each check asserts, with these bounds: one line per name of :data:`CHECK_NAMES`."""
        low, high = self.rating_scale
        cols = ", ".join(f"{c}: {t}" for c, t in CANONICAL_SCHEMA.items())
        step = (
            f"ratings lie on the {self.rating_step:g} grid from {low:g}"
            if self.rating_step is not None
            else "ratings on a step grid (no step declared: skipped)"
        )
        return {
            "schema": f"columns present with canonical dtypes ({cols})",
            "no_nulls": (
                "user_id, item_id and rating are never null; timestamp is fully present or fully absent"
            ),
            "rating_in_scale": f"ratings are within [{low:g}, {high:g}] (NaN and inf are unexpected)",
            "rating_on_step": step,
            "unique_user_item": "each (user_id, item_id) pair is rated at most once",
            "timestamp_plausible": (
                f"timestamps lie between {_iso(self.min_timestamp)} and {_iso(self.max_timestamp)}"
            ),
            "min_rows": f"at least {self.min_rows} ratings",
        }

    def expectations(self, *, require_timestamps: bool = True) -> list:
        """The GX expectations, each tagged with its check name in ``meta``."""
        E = import_gx().expectations
        low, high = self.rating_scale

        def tag(check: str) -> dict:
            return {CHECK_META: check}

        not_null = [*_NON_NULL_COLUMNS, *(("timestamp",) if require_timestamps else ())]
        out = [
            E.ExpectTableColumnsToMatchSet(
                column_set=list(CANONICAL_SCHEMA), exact_match=False, meta=tag("schema")
            ),
            *(E.ExpectColumnValuesToNotBeNull(column=c, meta=tag("no_nulls")) for c in not_null),
            E.ExpectColumnValuesToBeBetween(
                column="rating", min_value=low, max_value=high, meta=tag("rating_in_scale")
            ),
        ]
        if self.rating_step is not None:
            out.append(
                E.ExpectColumnValuesToBeBetween(
                    column=STEP_COLUMN,
                    min_value=0.0,
                    max_value=STEP_TOLERANCE,
                    meta=tag("rating_on_step"),
                )
            )
        out += [
            E.ExpectCompoundColumnsToBeUnique(
                column_list=["user_id", "item_id"], meta=tag("unique_user_item")
            ),
            E.ExpectColumnValuesToBeBetween(
                column="timestamp",
                min_value=int(self.min_timestamp),
                max_value=int(self.max_timestamp),
                meta=tag("timestamp_plausible"),
            ),
            E.ExpectTableRowCountToBeBetween(min_value=int(self.min_rows), meta=tag("min_rows")),
        ]
        return out


def ratings_suite(
    *,
    rating_scale: tuple[float, float],
    rating_step: float | None,
    min_rows: int,
    min_timestamp: int,
    max_timestamp: int,
    require_timestamps: bool = True,
) -> "gx.ExpectationSuite":
    """The GX suite for a ratings frame prepared by :func:`validation_frame`.

    Each expectation's ``meta["flexmf_check"]`` names the check (of :data:`CHECK_NAMES`) it
    belongs to. ``require_timestamps=False`` drops the timestamp not-null expectation (sources
    without timestamps).
    """
    settings = SuiteSettings(rating_scale, rating_step, min_rows, min_timestamp, max_timestamp)
    return import_gx().ExpectationSuite(
        name=SUITE_NAME, expectations=settings.expectations(require_timestamps=require_timestamps)
    )


def validation_frame(
    ratings: pl.DataFrame, *, rating_scale: tuple[float, float], rating_step: float | None
):
    """The pandas frame GX validates: canonical columns present in ``ratings`` plus a helper.

    NaN ratings become +inf (so pandas does not read them as nulls); the helper column holds
    the distance of ``(rating - low) / step`` to the nearest integer, in steps, relative to
    max(1, |rating| / step) so float32 rounding of large ratings is not an error. Row ``i`` of
    the result is row ``i`` of ``ratings`` (RangeIndex), so GX's unexpected index lists are
    polars row numbers. Converted once, column-wise (no Python row loops).
    """
    low, _ = rating_scale
    present = [c for c in CANONICAL_SCHEMA if c in ratings.columns]
    exprs: list[pl.Expr] = [pl.col(c) for c in present]
    if "rating" in ratings.columns and ratings.schema["rating"].is_numeric():
        r = pl.col("rating").cast(pl.Float64)
        nan_as_inf = pl.when(r.is_nan()).then(math.inf).otherwise(r).alias("rating")
        exprs[present.index("rating")] = nan_as_inf
        if rating_step is not None:
            q = (r - low) / rating_step
            scale = pl.max_horizontal(pl.lit(1.0), r.abs() / rating_step)
            offset = (q - q.round(0)).abs() / scale
            exprs.append(pl.when(r.is_finite()).then(offset).otherwise(None).alias(STEP_COLUMN))
    return ratings.select(exprs).to_pandas()


__all__ = [
    "CANONICAL_SCHEMA", "CHECK_NAMES", "CHECK_DESCRIPTIONS", "CHECK_META", "DEFAULT_MIN_ROWS",
    "DEFAULT_MIN_TIMESTAMP", "STEP_TOLERANCE", "SUITE_NAME", "SuiteSettings", "import_gx", "ratings_suite",
    "validation_frame",
]
