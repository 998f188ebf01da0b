"""Great Expectations 1.x validation of the canonical ratings frame: running the checks.

:func:`validate_ratings` runs the GX suite of :mod:`~flexmf_assets.datasets.validation_suite` on
a polars ratings frame and groups the expectation results into the named checks of
:data:`CHECK_NAMES` (:mod:`~flexmf_assets.datasets.validation_outcomes`); the Dagster layer turns
each :class:`ExpectationOutcome` of the :class:`ValidationReport`
(:mod:`~flexmf_assets.datasets.validation_report`) into a blocking asset check. GX is imported
lazily (it takes seconds) and one ephemeral context is reused per process, with progress bars,
analytics and log chatter switched off.

A check whose columns are missing (or not numeric, where it computes on them) cannot run: it
fails with ``details["not_evaluated"]`` naming the column, beside the failing ``schema`` check.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import polars as pl

from flexmf_assets.datasets.validation_outcomes import (
    MAX_EXAMPLES,
    column_outcome,
    nulls_outcome,
    rows_outcome,
    schema_outcome,
    unique_outcome,
)
from flexmf_assets.datasets.validation_report import ExpectationOutcome, ValidationReport
from flexmf_assets.datasets.validation_suite import (
    CANONICAL_SCHEMA,
    CHECK_DESCRIPTIONS,
    CHECK_META,
    CHECK_NAMES,
    DEFAULT_MIN_ROWS,
    DEFAULT_MIN_TIMESTAMP,
    STEP_TOLERANCE,
    SUITE_NAME,
    SuiteSettings,
    import_gx,
    ratings_suite,
    validation_frame,
)

# columns a check needs: present (any dtype) / numeric
_NEEDS_PRESENT: dict[str, tuple[str, ...]] = {
    "no_nulls": ("user_id", "item_id", "rating", "timestamp"),
    "unique_user_item": ("user_id", "item_id"),
}
_NEEDS_NUMERIC: dict[str, tuple[str, ...]] = {
    "rating_in_scale": ("rating",),
    "rating_on_step": ("rating",),
    "timestamp_plausible": ("timestamp",),
}

log = logging.getLogger(__name__)

_GX_LOCK = threading.RLock()
_GX_STATE: dict[str, Any] = {}


def _batch_definition():
    """The process-wide ephemeral context's whole-dataframe batch definition (built once)."""
    with _GX_LOCK:
        if "batch_definition" not in _GX_STATE:
            gx = import_gx()
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(
                globally=False, metric_calculations=False
            )
            asset = context.data_sources.add_pandas("flexmf").add_dataframe_asset("ratings")
            _GX_STATE["context"] = context
            _GX_STATE["batch_definition"] = asset.add_batch_definition_whole_dataframe("all")
        return _GX_STATE["batch_definition"]


def _not_evaluated(ratings: pl.DataFrame, check: str) -> str | None:
    for c in _NEEDS_PRESENT.get(check, ()) + _NEEDS_NUMERIC.get(check, ()):
        if c not in ratings.columns:
            return f"column {c} is missing"
    for c in _NEEDS_NUMERIC.get(check, ()):
        if not ratings.schema[c].is_numeric():
            return f"column {c} has non-numeric dtype {ratings.schema[c]}"
    return None


def validate_ratings(
    ratings: pl.DataFrame,
    *,
    rating_scale: tuple[float, float] = (0.5, 5.0),
    rating_step: float | None = 0.5,
    min_rows: int = DEFAULT_MIN_ROWS,
    min_timestamp: int = DEFAULT_MIN_TIMESTAMP,
    max_timestamp: int | None = None,
) -> ValidationReport:
    """Validate a canonical ratings frame with GX; one outcome per name of :data:`CHECK_NAMES`.

    ``max_timestamp`` defaults to now + 1 day. Never raises on bad data (see
    :meth:`ValidationReport.raise_for_failure`); raises :class:`ConfigError` on bad settings.
    """
    if max_timestamp is None:
        max_timestamp = int(time.time()) + 86_400
    rating_scale = (float(rating_scale[0]), float(rating_scale[1]))
    settings = SuiteSettings(rating_scale, rating_step, min_rows, min_timestamp, max_timestamp)
    descriptions = settings.descriptions()

    ts_all_null = (
        "timestamp" in ratings.columns and ratings["timestamp"].null_count() == ratings.height
    )
    skipped = {c: r for c in CHECK_NAMES if (r := _not_evaluated(ratings, c))}
    expectations = [
        e
        for e in settings.expectations(require_timestamps=not ts_all_null)
        if e.meta[CHECK_META] not in skipped
    ]
    frame = validation_frame(ratings, rating_scale=rating_scale, rating_step=rating_step)
    gx = import_gx()
    suite = gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
    started = time.perf_counter()
    with _GX_LOCK:
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": MAX_EXAMPLES,
                "include_unexpected_rows": False,
            },
        )
    log.debug("GX validated %d rows in %.2f s", ratings.height, time.perf_counter() - started)

    by_check: dict[str, list] = {c: [] for c in CHECK_NAMES}
    for r in result.results:
        by_check[r.expectation_config.meta[CHECK_META]].append(r)

    column_details = {
        "rating_in_scale": ("rating", {"min_value": rating_scale[0], "max_value": rating_scale[1]}),
        "rating_on_step": (
            "rating",
            {"step": rating_step, "origin": rating_scale[0], "tolerance": STEP_TOLERANCE},
        ),
        "timestamp_plausible": (
            "timestamp",
            {"min_value": min_timestamp, "max_value": max_timestamp, "all_null": ts_all_null},
        ),
    }
    outcomes: list[ExpectationOutcome] = []
    for check in CHECK_NAMES:
        desc, results = descriptions[check], by_check[check]
        if check in skipped:
            why = {"not_evaluated": skipped[check]}
            outcome = ExpectationOutcome(check, desc, False, 0, [], why)
        elif check == "rating_on_step" and rating_step is None:
            why = {"skipped": "rating_step is None"}
            outcome = ExpectationOutcome(check, desc, True, 0, [], why)
        elif check in column_details:
            column, extra = column_details[check]
            outcome = column_outcome(check, desc, results[0], ratings, column, extra)
        elif check == "schema":
            outcome = schema_outcome(desc, ratings, results[0])
        elif check == "no_nulls":
            outcome = nulls_outcome(desc, results, ts_all_null)
        elif check == "unique_user_item":
            outcome = unique_outcome(desc, ratings, results[0])
        else:
            outcome = rows_outcome(desc, ratings, results[0], min_rows)
        outcomes.append(outcome)
    return ValidationReport(outcomes)


__all__ = [
    "CANONICAL_SCHEMA", "CHECK_NAMES", "CHECK_DESCRIPTIONS", "DEFAULT_MIN_ROWS", "DEFAULT_MIN_TIMESTAMP",
    "STEP_TOLERANCE", "MAX_EXAMPLES", "ExpectationOutcome", "ValidationReport", "ratings_suite",
    "validation_frame", "validate_ratings",
]
