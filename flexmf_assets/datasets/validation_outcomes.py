"""Turn Great Expectations results into :class:`ExpectationOutcome`s, one per named check.

``unexpected_count`` counts offending rows (``no_nulls``: null cells; ``unique_user_item``: every
row of a duplicated pair, as GX counts), offending columns for ``schema`` and the shortfall for
``min_rows``. Examples are ``{"row": i, <column>: value}`` dicts taken from the original frame
(NaN/inf as the strings ``"NaN"``/``"inf"``, so details stay strict JSON).
"""

from __future__ import annotations

from typing import Any, Iterable

import polars as pl

from flexmf_assets.datasets.validation_report import ExpectationOutcome
from flexmf_assets.datasets.validation_suite import CANONICAL_SCHEMA
from flexmf_assets.files import jsonable

#: the most offending rows an outcome lists (and GX is asked for)
MAX_EXAMPLES = 10


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


def _map_outcome(check: str, description: str, result, ratings: pl.DataFrame, columns: list[str],
                 details: dict, *, list_rows: bool = False) -> ExpectationOutcome:
    """Outcome of a map expectation (one verdict per row): ``details`` plus the GX error, if any, and
    (``list_rows``) the first offending row numbers; examples are the original polars values."""
    res = result.result or {}
    error = _error_of(result)
    unexpected = int(res.get("unexpected_count") or 0)
    rows = res.get("partial_unexpected_index_list") or []
    if error:
        details["error"] = error
    if list_rows and unexpected:
        details["first_unexpected_rows"] = [int(i) for i in rows[:MAX_EXAMPLES]]
    return ExpectationOutcome(
        check_name=check,
        description=description,
        success=bool(result.success) and not error,
        unexpected_count=unexpected,
        unexpected_examples=_row_examples(ratings, rows, columns),
        details=details,
    )


def column_outcome(
    check: str, description: str, result, ratings: pl.DataFrame, column: str, extra: dict
) -> ExpectationOutcome:
    """Outcome of one column-map expectation."""
    res = result.result or {}
    details = {
        **extra,
        "element_count": int(res.get("element_count") or 0),
        "missing_count": int(res.get("missing_count") or 0),
        "unexpected_percent": jsonable(res.get("unexpected_percent")),
    }
    return _map_outcome(check, description, result, ratings, [column], details, list_rows=True)


def schema_outcome(description: str, ratings: pl.DataFrame, result) -> ExpectationOutcome:
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


def nulls_outcome(description: str, results: list, ts_all_null: bool) -> ExpectationOutcome:
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


def unique_outcome(description: str, ratings: pl.DataFrame, result) -> ExpectationOutcome:
    """Duplicated pairs; unexpected_count counts every row of a duplicated pair (GX semantics)."""
    res = result.result or {}
    details: dict[str, Any] = {
        "element_count": int(res.get("element_count") or 0),
        "unexpected_percent": jsonable(res.get("unexpected_percent")),
    }
    return _map_outcome("unique_user_item", description, result, ratings, ["user_id", "item_id"], details)


def rows_outcome(
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


__all__ = ["MAX_EXAMPLES", "column_outcome", "nulls_outcome", "rows_outcome", "schema_outcome", "unique_outcome"]
