"""Parse a user's plain csv or parquet ratings file, whose columns the dataset entry maps.

``spec.columns`` maps canonical names to the file's columns. A csv file takes the strict read of
:mod:`~flexmf_assets.datasets.strict_read` (errors name the 1-based line, the header counts); a
separator of several characters (``::``) or of one multi-byte character is read by splitting each
line on it. A parquet file is read by column (errors name the 1-based row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from flexmf_assets.datasets.catalog import PLAIN_FORMATS, DatasetSpec
from flexmf_assets.datasets.line_errors import field_values, find_bad_row, locate_bad_row
from flexmf_assets.datasets.frames import RATINGS_SCHEMA
from flexmf_assets.datasets.strict_read import polars_cause, printable, read_file, to_dtype
from flexmf_assets.errors import ParseError

_DTYPE_LABEL = {"user_id": "an integer", "item_id": "an integer", "timestamp": "an integer",
                "rating": "a number"}


def _columns_of(spec: DatasetSpec, name: str) -> dict[str, str]:
    mapping = dict(spec.columns or {})
    missing = [c for c in ("user_id", "item_id", "rating") if not mapping.get(c)]
    if missing:
        raise ParseError(f"{name}: the column mapping (columns:) of dataset {spec.name!r} lacks "
                         f"{', '.join(map(repr, missing))}")
    return mapping


def _mapped_columns(name: str, mapping: dict[str, str], present: Sequence[str]) -> list[str]:
    """The mapped canonical columns in canonical order; every source column must be ``present``."""
    for canonical, source in mapping.items():
        if source not in present:
            shown = ", ".join(printable(c, 60) for c in present[:30])
            more = f", ... ({len(present)} in all)" if len(present) > 30 else ""
            raise ParseError(f"{name}: column {source!r} (for {canonical}) not found; "
                             f"columns present: {shown}{more}")
    return [c for c in RATINGS_SCHEMA if c in mapping]


def _headerless_names(width: int) -> list[str]:
    """The names polars gives the columns of a file without a header."""
    return pl.read_csv(b",".join([b"0"] * width) + b"\n", has_header=False, n_rows=0).columns


def _parse_csv(path: Path, spec: DatasetSpec, name: str) -> pl.DataFrame:
    mapping = _columns_of(spec, name)
    separator = spec.separator
    if len(separator.encode("utf-8")) != 1:
        return _parse_split_lines(path, spec, name, mapping)
    try:
        head = pl.read_csv(path, n_rows=0, separator=separator, has_header=spec.has_header,
                           infer_schema=False)
    except pl.exceptions.NoDataError:
        raise ParseError(f"{name}: the file is empty") from None
    except pl.exceptions.ComputeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    present = [c.strip() for c in head.columns]  # (a header line ending in CR CR LF keeps one CR)
    order = _mapped_columns(name, mapping, present)
    positions = [present.index(mapping[c]) for c in order]
    skip = 1 if spec.has_header else 0

    def read(source: Path | bytes, skip_lines: int, typed: bool) -> pl.DataFrame:
        schema: dict[str, pl.DataType] = {f"f{i}": pl.String() for i in range(len(present))}
        if typed:
            schema.update({f"f{pos}": RATINGS_SCHEMA[c] for c, pos in zip(order, positions)})
        try:
            df = pl.read_csv(source, has_header=False, skip_lines=skip_lines, separator=separator,
                             schema=schema, columns=sorted(positions))
        except pl.exceptions.NoDataError:
            df = pl.DataFrame(schema=schema)
        cols = [pl.col(f"f{pos}") for pos in positions]
        if not typed:
            cols = [to_dtype(col, RATINGS_SCHEMA[c]) for c, col in zip(order, cols)]
        return df.select(col.alias(c) for c, col in zip(order, cols))

    fields = [(mapping[c], RATINGS_SCHEMA[c], True) for c in order]
    return _canonical(read_file(read, path, skip, name, lambda check: find_bad_row(
        path, name, "utf-8", separator, fields, skip, check, column_index=positions)))


def _parse_split_lines(path: Path, spec: DatasetSpec, name: str, mapping: dict[str, str]) -> pl.DataFrame:
    """A csv whose separator polars cannot read (several characters like ml-1m's ``::``, or one
    multi-byte character): each line is split on it, so values cannot contain it (no quoting)."""
    separator = spec.separator
    try:
        lines = pl.read_lines(path)["line"]
    except pl.exceptions.ComputeError as exc:
        err = find_bad_row(path, name, "utf-8", separator, [], 0, check=lambda text: None)
        raise err or ParseError(f"{name}: cannot be read ({polars_cause(exc)})") from None
    nonblank = (lines.str.strip_chars().str.len_chars() > 0).arg_true()
    if nonblank.len() == 0:
        raise ParseError(f"{name}: the file is empty")
    first = lines[0].lstrip("\ufeff")
    if spec.has_header:
        present = [f.strip().removeprefix('"').removesuffix('"').strip() for f in first.split(separator)]
    else:
        present = _headerless_names(len(first.split(separator)))
    order = _mapped_columns(name, mapping, present)
    skip = 1 if spec.has_header else 0
    data = lines.slice(skip, max(int(nonblank[-1]) + 1 - skip, 0))  # without trailing blank lines
    positions = [present.index(mapping[c]) for c in order]
    fields = [(mapping[c], RATINGS_SCHEMA[c], True) for c in order]
    err = locate_bad_row(data, name, separator, fields, 1 + skip, positions, n_fields=len(present))
    if err is not None:
        raise err
    values = field_values(data, separator, len(order), positions)
    return _canonical(values.select(pl.col(f"s{j}").cast(RATINGS_SCHEMA[c]).alias(c)
                                    for j, c in enumerate(order)))


def _canonical(df: pl.DataFrame) -> pl.DataFrame:
    if "timestamp" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Int64).alias("timestamp"))
    return df.select([pl.col(c).cast(t) for c, t in RATINGS_SCHEMA.items()])


def _parse_parquet(path: Path, spec: DatasetSpec, name: str) -> pl.DataFrame:
    mapping = _columns_of(spec, name)
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for a non-parquet file
        raise ParseError(f"{name}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    order = _mapped_columns(name, mapping, list(schema))
    raw = pl.read_parquet(path, columns=[mapping[c] for c in order])
    raw = raw.select([pl.col(mapping[c]).alias(c) for c in order])
    out = []
    for c in order:
        col = raw[c]
        target = RATINGS_SCHEMA[c]
        if c == "timestamp" and col.dtype.is_temporal():
            conv = col.cast(pl.Datetime("us")).dt.epoch("s")
        elif target.is_integer() and col.dtype.is_float():
            conv = col.cast(target, strict=False)
            conv = pl.select(pl.when(col == col.floor()).then(conv)).to_series()
        else:
            conv = col.cast(target, strict=False)
        bad = conv.is_null()
        if conv.dtype.is_float():
            bad = bad | conv.is_nan()
        bad_rows = bad.arg_true()
        if bad_rows.len():
            r = int(bad_rows[0])
            value = col[r]
            source = mapping[c]
            if value is None:
                raise ParseError(f"{name} row {r + 1}: {source} is missing")
            raise ParseError(f"{name} row {r + 1}: {source} {value!r} is not {_DTYPE_LABEL[c]}")
        out.append(conv.alias(c))
    return _canonical(pl.DataFrame(out))


#: one parser per plain file format (:data:`~flexmf_assets.datasets.catalog.PLAIN_FORMATS`)
_PARSERS = {"csv": _parse_csv, "parquet": _parse_parquet}


def parse_plain(path: Path, spec: DatasetSpec, *, name: str | None = None) -> pl.DataFrame:
    """Parse a user csv/parquet ratings file whose columns ``spec.columns`` maps to canonical names.

    Ids must be integers; ``timestamp`` is optional (null when unmapped; parquet datetimes are
    converted to epoch seconds). Parquet errors name the 1-based row, csv errors the line.
    """
    path = Path(path)
    name = name or path.name
    if spec.format not in _PARSERS:
        raise ParseError(f"{name}: format {spec.format!r} is not a plain file format "
                         f"({', '.join(PLAIN_FORMATS)})")
    return _PARSERS[spec.format](path, spec, name)


__all__ = ["parse_plain"]
