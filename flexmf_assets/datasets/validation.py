"""Great Expectations 1.x validation of the canonical ratings frame.

:func:`validate_ratings` runs a GX suite (:func:`ratings_suite`) on a polars ratings frame and
groups the expectation results into a few named checks (:data:`CHECK_NAMES`); the Dagster layer
turns each :class:`ExpectationOutcome` into a blocking asset check. GX is imported lazily (it
takes seconds) and one ephemeral context is reused per process, with progress bars, analytics
and log chatter switched off.

Checks, in order:

``schema``               the canonical columns are present with their dtypes (polars schema + GX)
``no_nulls``             user_id, item_id, rating non-null; timestamp too, unless all of it is null
``rating_in_scale``      low <= rating <= high; NaN and inf are unexpected
``rating_on_step``       (rating - low) / step is an integer (skipped when the step is None)
``unique_user_item``     (user_id, item_id) pairs are unique
``timestamp_plausible``  min_timestamp <= timestamp <= max_timestamp (seconds since epoch)
``min_rows``             at least ``min_rows`` rows

``unexpected_count`` counts offending rows (``no_nulls``: null cells; ``unique_user_item``: every
row of a duplicated pair, as GX counts), offending columns for ``schema`` and the shortfall for
``min_rows``. Examples are ``{"row": i, <column>: value}`` dicts taken from the original frame
(NaN/inf as the strings ``"NaN"``/``"inf"``, so details stay strict JSON).

A check whose columns are missing (or not numeric, where it computes on them) cannot run: it
fails with ``details["not_evaluated"]`` naming the column, beside the failing ``schema`` check.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import polars as pl

from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.files import jsonable

if TYPE_CHECKING:  # pragma: no cover - typing only
    import great_expectations as gx

CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "item_id": pl.Int64(),
    "rating": pl.Float32(),
    "timestamp": pl.Int64(),
}

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
    "min_rows": "at least the minimum row count (flexmf.yaml validation.min_rows, default 1000)",
}

#: 1990-01-01T00:00:00Z, before any MovieLens rating (the first are from 1995/1996).
DEFAULT_MIN_TIMESTAMP = 631_152_000
#: tolerance of ``rating_on_step``, in steps (relative to max(1, |rating| / step) for float32 data)
STEP_TOLERANCE = 1e-6
MAX_EXAMPLES = 10

# In the frame GX sees, NaN ratings are encoded as +inf: pandas would take NaN for a null (skip it
# in range checks, count it in the not-null check) where polars keeps the two apart.
_STEP_COL = "_rating_step_offset"  # distance of (rating - low) / step to the nearest integer

_CHECK_META = "flexmf_check"
_NON_NULL_COLUMNS = ("user_id", "item_id", "rating")

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


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one named check (one or more GX expectations)."""

    check_name: str  #: stable snake_case name, the Dagster asset-check name
    description: str  #: one line a user reads in the UI
    success: bool
    unexpected_count: int
    unexpected_examples: list = field(default_factory=list)  #: up to 10 offending values/rows
    details: dict = field(default_factory=dict)  #: observed values etc., JSON-serialisable

    @property
    def message(self) -> str:
        """One line: ``'rating_in_scale: FAILED (2 unexpected, e.g. ...)'``."""
        if self.success:
            return f"{self.check_name}: passed"
        keys = ("not_evaluated", "error", "reason")
        reason = next((self.details[k] for k in keys if self.details.get(k)), None)
        if reason:
            return f"{self.check_name}: FAILED ({reason})"
        examples = ", ".join(_short(e) for e in self.unexpected_examples[:3])
        more = f", e.g. {examples}" if examples else ""
        return f"{self.check_name}: FAILED ({self.unexpected_count} unexpected{more})"


@dataclass(frozen=True)
class ValidationReport:
    """All check outcomes of one validation, in :data:`CHECK_NAMES` order."""

    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def __getitem__(self, check_name: str) -> ExpectationOutcome:
        for outcome in self.outcomes:
            if outcome.check_name == check_name:
                return outcome
        raise KeyError(f"no check named {check_name!r}; checks are {', '.join(CHECK_NAMES)}")

    def summary(self) -> str:
        """One line naming every failed check (or saying that all passed)."""
        if self.success:
            return f"all {len(self.outcomes)} ratings checks passed"
        return "; ".join(o.message for o in self.failed)

    def raise_for_failure(self, source: str = "ratings") -> None:
        """Raise :class:`DataValidationError` with a one-line message when a check failed."""
        if not self.success:
            raise DataValidationError(f"{source} failed validation: {self.summary()}")


# --------------------------------------------------------------------------------------- GX


def _gx():
    """Import GX quietly (no analytics, no progress bars, warnings only in logs)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


_GX_LOCK = threading.RLock()
_GX_STATE: dict[str, Any] = {}


def _batch_definition():
    """The process-wide ephemeral context's whole-dataframe batch definition (built once)."""
    with _GX_LOCK:
        if "batch_definition" not in _GX_STATE:
            gx = _gx()
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(
                globally=False, metric_calculations=False
            )
            asset = context.data_sources.add_pandas("flexmf").add_dataframe_asset("ratings")
            _GX_STATE["context"] = context
            _GX_STATE["batch_definition"] = asset.add_batch_definition_whole_dataframe("all")
        return _GX_STATE["batch_definition"]


def _check_settings(
    rating_scale: tuple[float, float],
    rating_step: float | None,
    min_rows: int,
    min_timestamp: int,
    max_timestamp: int,
) -> None:
    low, high = rating_scale
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(
            f"rating_scale: expected finite (low, high) with low < high, got {rating_scale!r}"
        )
    if rating_step is not None and not (math.isfinite(rating_step) and rating_step > 0):
        raise ConfigError(f"rating_step: expected a positive number or None, got {rating_step!r}")
    if min_rows < 0:
        raise ConfigError(f"min_rows: expected >= 0, got {min_rows!r}")
    if min_timestamp > max_timestamp:
        raise ConfigError(
            f"min_timestamp {min_timestamp} is after max_timestamp {max_timestamp}"
        )


def _descriptions(
    rating_scale: tuple[float, float],
    rating_step: float | None,
    min_rows: int,
    min_timestamp: int,
    max_timestamp: int,
) -> dict[str, str]:
    low, high = rating_scale
    cols = ", ".join(f"{c}: {t}" for c, t in CANONICAL_SCHEMA.items())
    step = (
        f"ratings lie on the {rating_step:g} grid from {low:g}"
        if rating_step is not None
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
            f"timestamps lie between {_iso(min_timestamp)} and {_iso(max_timestamp)}"
        ),
        "min_rows": f"at least {min_rows} ratings",
    }


def _expectations(
    *,
    rating_scale: tuple[float, float],
    rating_step: float | None,
    min_rows: int,
    min_timestamp: int,
    max_timestamp: int,
    require_timestamps: bool = True,
) -> list:
    """The GX expectations, each tagged with its check name in ``meta``."""
    E = _gx().expectations
    low, high = rating_scale

    def tag(check: str) -> dict:
        return {_CHECK_META: check}

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
    if rating_step is not None:
        out.append(
            E.ExpectColumnValuesToBeBetween(
                column=_STEP_COL,
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
            min_value=int(min_timestamp),
            max_value=int(max_timestamp),
            meta=tag("timestamp_plausible"),
        ),
        E.ExpectTableRowCountToBeBetween(min_value=int(min_rows), meta=tag("min_rows")),
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
    _check_settings(rating_scale, rating_step, min_rows, min_timestamp, max_timestamp)
    gx = _gx()
    return gx.ExpectationSuite(
        name="flexmf_ratings",
        expectations=_expectations(
            rating_scale=rating_scale,
            rating_step=rating_step,
            min_rows=min_rows,
            min_timestamp=min_timestamp,
            max_timestamp=max_timestamp,
            require_timestamps=require_timestamps,
        ),
    )


# ------------------------------------------------------------------------------ the frame


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
            exprs.append(pl.when(r.is_finite()).then(offset).otherwise(None).alias(_STEP_COL))
    return ratings.select(exprs).to_pandas()


# ------------------------------------------------------------------------------ outcomes


def _short(example: Any) -> str:
    if isinstance(example, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in example.items()) + ")"
    return str(example)


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _row_examples(ratings: pl.DataFrame, rows: Iterable[int], columns: list[str]) -> list[dict]:
    rows = [int(i) for i in list(rows)[:MAX_EXAMPLES]]
    if not rows:
        return []
    picked = ratings.select(columns)[rows]
    # float32 values print as written (3.3, not 3.299999952316284)
    picked = picked.with_columns(
        pl.col(c).cast(pl.Float64).round_sig_figs(7)
        for c in columns
        if picked.schema[c] == pl.Float32
    )
    return [
        {"row": i, **{c: jsonable(picked[j, c]) for c in columns}} for j, i in enumerate(rows)
    ]


def _error_of(result) -> str | None:
    info = result.exception_info or {}
    if isinstance(info, dict) and info.get("raised_exception"):
        return str(info.get("exception_message") or "GX raised an exception").splitlines()[0]
    # several metrics failing: {metric_id: {...}}
    if isinstance(info, dict):
        for sub in info.values():
            if isinstance(sub, dict) and sub.get("raised_exception"):
                return str(sub.get("exception_message") or "GX raised an exception").splitlines()[0]
    return None


def _column_outcome(
    check: str, description: str, result, ratings: pl.DataFrame, column: str, extra: dict
) -> ExpectationOutcome:
    """Outcome of one column-map expectation; examples are the original polars values."""
    res = result.result or {}
    error = _error_of(result)
    unexpected = int(res.get("unexpected_count") or 0)
    rows = res.get("partial_unexpected_index_list") or []
    details = {
        **extra,
        "element_count": int(res.get("element_count") or 0),
        "missing_count": int(res.get("missing_count") or 0),
        "unexpected_percent": jsonable(res.get("unexpected_percent")),
    }
    if error:
        details["error"] = error
    if unexpected:
        details["first_unexpected_rows"] = [int(i) for i in rows[:MAX_EXAMPLES]]
    return ExpectationOutcome(
        check_name=check,
        description=description,
        success=bool(result.success) and not error,
        unexpected_count=unexpected,
        unexpected_examples=_row_examples(ratings, rows, [column]),
        details=details,
    )


def _schema_outcome(description: str, ratings: pl.DataFrame, result) -> ExpectationOutcome:
    missing = [c for c in CANONICAL_SCHEMA if c not in ratings.columns]
    wrong = {
        c: str(ratings.schema[c])
        for c, dtype in CANONICAL_SCHEMA.items()
        if c in ratings.columns and ratings.schema[c] != dtype
    }
    found = {**{c: "missing" for c in missing}, **wrong}
    examples = [
        {"column": c, "dtype": d, "expected": str(CANONICAL_SCHEMA[c])} for c, d in found.items()
    ]
    details: dict[str, Any] = {
        "observed_schema": {c: str(t) for c, t in ratings.schema.items()},
        "missing_columns": missing,
        "wrong_dtypes": wrong,
        "gx_columns_match": bool(result.success),
    }
    problems = [f"column {c} is missing" for c in missing]
    problems += [
        f"column {c} has dtype {d}, expected {CANONICAL_SCHEMA[c]}" for c, d in wrong.items()
    ]
    if problems:
        details["reason"] = "; ".join(problems)
    return ExpectationOutcome(
        check_name="schema",
        description=description,
        success=not problems and bool(result.success),
        unexpected_count=len(examples),
        unexpected_examples=examples,
        details=details,
    )


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
    min_rows: int = 1000,
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
    _check_settings(rating_scale, rating_step, min_rows, min_timestamp, max_timestamp)
    descriptions = _descriptions(rating_scale, rating_step, min_rows, min_timestamp, max_timestamp)

    ts_all_null = (
        "timestamp" in ratings.columns and ratings["timestamp"].null_count() == ratings.height
    )
    skipped = {c: r for c in CHECK_NAMES if (r := _not_evaluated(ratings, c))}
    expectations = [
        e
        for e in _expectations(
            rating_scale=rating_scale,
            rating_step=rating_step,
            min_rows=min_rows,
            min_timestamp=min_timestamp,
            max_timestamp=max_timestamp,
            require_timestamps=not ts_all_null,
        )
        if e.meta[_CHECK_META] not in skipped
    ]
    frame = validation_frame(ratings, rating_scale=rating_scale, rating_step=rating_step)
    gx = _gx()
    suite = gx.ExpectationSuite(name="flexmf_ratings", expectations=expectations)
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
        by_check[r.expectation_config.meta[_CHECK_META]].append(r)

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
            outcome = _column_outcome(check, desc, results[0], ratings, column, extra)
        elif check == "schema":
            outcome = _schema_outcome(desc, ratings, results[0])
        elif check == "no_nulls":
            outcome = _nulls_outcome(desc, results, ts_all_null)
        elif check == "unique_user_item":
            outcome = _unique_outcome(desc, ratings, results[0])
        else:
            outcome = _rows_outcome(desc, ratings, results[0], min_rows)
        outcomes.append(outcome)
    return ValidationReport(outcomes)


def _nulls_outcome(description: str, results: list, ts_all_null: bool) -> ExpectationOutcome:
    per_column: dict[str, int] = {}
    examples: list[dict] = []
    errors = []
    for r in results:
        column = r.expectation_config.kwargs["column"]
        res = r.result or {}
        per_column[column] = int(res.get("unexpected_count") or 0)
        rows = res.get("partial_unexpected_index_list") or []
        examples += [{"row": int(i), "column": column} for i in rows]
        if error := _error_of(r):
            errors.append(f"{column}: {error}")
    details: dict[str, Any] = {"null_counts": per_column}
    if ts_all_null:
        details["timestamp"] = "all null (the source has no timestamps)"
    if errors:
        details["error"] = "; ".join(errors)
    return ExpectationOutcome(
        check_name="no_nulls",
        description=description,
        success=all(r.success for r in results) and not errors,
        unexpected_count=sum(per_column.values()),
        unexpected_examples=examples[:MAX_EXAMPLES],
        details=details,
    )


def _unique_outcome(description: str, ratings: pl.DataFrame, result) -> ExpectationOutcome:
    """Duplicated pairs; unexpected_count counts every row of a duplicated pair (GX semantics)."""
    res = result.result or {}
    rows = res.get("partial_unexpected_index_list") or []
    error = _error_of(result)
    details: dict[str, Any] = {
        "element_count": int(res.get("element_count") or 0),
        "unexpected_percent": jsonable(res.get("unexpected_percent")),
    }
    if error:
        details["error"] = error
    return ExpectationOutcome(
        check_name="unique_user_item",
        description=description,
        success=bool(result.success) and not error,
        unexpected_count=int(res.get("unexpected_count") or 0),
        unexpected_examples=_row_examples(ratings, rows, ["user_id", "item_id"]),
        details=details,
    )


def _rows_outcome(
    description: str, ratings: pl.DataFrame, result, min_rows: int
) -> ExpectationOutcome:
    """unexpected_count is the shortfall: how many rows are missing to reach ``min_rows``."""
    observed_value = (result.result or {}).get("observed_value")
    observed = ratings.height if observed_value is None else int(observed_value)
    details: dict[str, Any] = {"observed_value": observed, "min_value": min_rows}
    if observed < min_rows:
        details["reason"] = f"{observed} rows, fewer than min_rows={min_rows}"
    if error := _error_of(result):
        details["error"] = error
    return ExpectationOutcome(
        check_name="min_rows",
        description=description,
        success=bool(result.success) and "error" not in details,
        unexpected_count=max(0, min_rows - observed),
        unexpected_examples=[],
        details=details,
    )
