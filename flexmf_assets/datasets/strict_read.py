"""The fast strict read of a delimited ratings file, with its text fallback.

The happy path is one strict polars read with an explicit schema (no Python loop over rows), so
ML-25M parses in about a gigabyte. When that read fails, or leaves holes (short rows), the
error-locating pass of :mod:`~flexmf_assets.datasets.line_errors` reads the file in blocks with
:func:`strict_read` to find the first bad row; a file without one is then read whole as text with
trimmed values (quoted numbers, spaces around values and a stray carriage return before the line
feed are accepted).

A *reader* is ``read(source, skip_lines, typed) -> frame``: ``typed`` reads with the target dtypes,
otherwise every column is read as text and converted with :func:`to_dtype`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import polars as pl

from flexmf_assets.errors import ParseError

#: what a failed strict read raises (a value that does not convert, a row of the wrong width...)
READ_ERRORS = (pl.exceptions.ComputeError, pl.exceptions.SchemaError, pl.exceptions.InvalidOperationError,
               pl.exceptions.ShapeError)
#: a strict read of some bytes: None when they parse, else why not
Check = Callable[[bytes], "str | None"]
#: ``read(source, skip_lines, typed)``: see the module docstring
Reader = Callable[[Path | bytes, int, bool], pl.DataFrame]


def is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8lossy")


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters escaped (``\r``, ``\x1b``...), cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def polars_cause(exc: BaseException) -> str:
    """The first line of a polars error, printable."""
    return printable(str(exc).split("\n", 1)[0].strip()) or type(exc).__name__


def field_text(expr: pl.Expr) -> pl.Expr:
    """A field's text as a value: surrounding whitespace and double quotes removed."""
    return expr.str.strip_chars().str.strip_prefix('"').str.strip_suffix('"').str.strip_chars()


def to_dtype(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Strict conversion of a text column read as strings: trimmed and unquoted, empty -> null."""
    text = field_text(expr)
    return pl.when(text.str.len_chars() > 0).then(text).cast(dtype, strict=True)


def _drop_trailing_null_rows(df: pl.DataFrame) -> pl.DataFrame | None:
    """The frame without trailing all-null rows (blank lines at the end); None if other holes remain."""
    all_null = df.select(pl.all_horizontal(pl.all().is_null()))[:, 0]
    keep = (~all_null).arg_true()
    trimmed = df.head(int(keep[-1]) + 1 if keep.len() else 0)
    return trimmed if trimmed.null_count().sum_horizontal()[0] == 0 else None


def _finish(df: pl.DataFrame) -> tuple[pl.DataFrame | None, str]:
    """``df`` without trailing all-null rows (blank lines at the end), or (None, why) if holes remain."""
    if df.null_count().sum_horizontal()[0] == 0:
        return df, ""
    trimmed = _drop_trailing_null_rows(df)
    return (trimmed, "") if trimmed is not None else (None, "missing values")


def strict_read(read: Reader, source: Path | bytes, skip_lines: int) -> tuple[pl.DataFrame | None, str]:
    """(frame, '') from a strict read, or (None, why) when some row is at fault.

    ``read(source, skip_lines, typed)``: a fast typed read first; when it fails, a read as text
    that trims every value before converting it (spaces, a stray carriage return).
    """
    try:
        df, cause = _finish(read(source, skip_lines, True))
        if df is not None:
            return df, cause
    except READ_ERRORS:
        pass
    try:
        return _finish(read(source, skip_lines, False))
    except READ_ERRORS as exc:
        return None, polars_cause(exc)


def read_file(read: Reader, path: Path, skip: int, name: str,
              locate: Callable[[Check], ParseError | None]) -> pl.DataFrame:
    """The frame of a whole file: one fast typed read; when it fails, the block pass of ``locate``
    (with :func:`strict_read` on each block) names the first bad line, or, when every block
    reads, the file is read again as text with trimmed values."""
    try:
        df, _ = _finish(read(path, skip, True))
    except READ_ERRORS:
        df = None
    if df is not None:
        return df
    err = locate(lambda text: strict_read(read, text, 0)[1] or None)
    if err is not None:
        raise err
    try:
        df, cause = _finish(read(path, skip, False))
    except READ_ERRORS as exc:
        df, cause = None, polars_cause(exc)
    if df is None:  # every block reads, the whole file does not: rows spanning blocks (quoted newlines)
        raise ParseError(f"{name}: could not be parsed: {cause}")
    return df


__all__ = ["READ_ERRORS", "Check", "Reader", "field_text", "is_utf8", "polars_cause", "printable", "read_file",
           "strict_read", "to_dtype"]
