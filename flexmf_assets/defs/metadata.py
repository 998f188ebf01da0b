"""Helpers that turn frames and dicts into Dagster metadata values."""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def md_table(frame: pl.DataFrame, max_rows: int = 20) -> dg.MarkdownMetadataValue:
    """A Markdown table of the first ``max_rows`` rows."""
    head = frame.head(max_rows)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in head.iter_rows()]
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows:,} more rows_")
    return dg.MetadataValue.md("\n".join(lines))


def frame_stats(ratings: pl.DataFrame) -> dict[str, Any]:
    users = ratings["user_id"].n_unique() if ratings.height else 0
    items = ratings["item_id"].n_unique() if ratings.height else 0
    density = ratings.height / (users * items) if users and items else 0.0
    return {"rows": ratings.height, "users": users, "items": items, "density": round(density, 6)}


def rating_histogram(ratings: pl.DataFrame) -> dg.MarkdownMetadataValue:
    hist = ratings.group_by("rating").len().sort("rating").rename({"len": "count"})
    return md_table(hist, max_rows=50)


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(n, str(t)) for n, t in frame.schema.items()])


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` to ``digits`` significant digits when it is a float (what the UI shows); the raw values
    stay in the stored tables and in a JSON entry beside."""
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return float(f"{value:.{digits}g}")
    return value


def table(frame: pl.DataFrame, max_rows: int = 50) -> dg.TableMetadataValue:
    """The first ``max_rows`` rows as Dagster table metadata (drawn in place by the UI), floats rounded."""
    head = frame.head(max_rows)
    columns = [dg.TableColumn(name, _column_type(dtype)) for name, dtype in head.schema.items()]
    records = [dg.TableRecord({k: rounded(v) if not isinstance(v, (list, dict)) else str(v)
                               for k, v in row.items()}) for row in head.iter_rows(named=True)]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _column_type(dtype: pl.DataType) -> str:
    if dtype.is_float():
        return "float"
    if dtype.is_integer():
        return "int"
    if dtype == pl.Boolean:
        return "bool"
    return "string"
