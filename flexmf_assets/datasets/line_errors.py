"""The line-level error finder: after a failed strict read, the first bad line and what is wrong with it.

A second, still vectorised pass reads the file in blocks of whole lines, each with
:func:`~flexmf_assets.datasets.strict_read.strict_read`, to find the *first* bad row and returns a
:class:`ParseError` whose one-line message names the file, the 1-based line (the header counts) and
the bad value, e.g. ``ml-latest-small/ratings.csv line 17: rating 'abc' is not a number``; echoed
text is escaped (``\r``, ``\x1b``), so every message is printable. Memory stays at a few block
sizes even for ML-25M.

``fields`` is, per used column, ``(label, dtype, required)``: the label is how messages name it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import polars as pl

from flexmf_assets.datasets.strict_read import Check, field_text, is_utf8
from flexmf_assets.errors import ParseError

BLOCK_BYTES = 1 << 25  # bytes per block of the error-locating pass
Fields = Sequence[tuple[str, pl.DataType, bool]]


def _trailing_blank_start(body: bytes) -> int | None:
    """Index (0-based line) of the first of the blank lines ending ``body``, or None."""
    stripped = body.rstrip()
    if not stripped:
        return 0 if body else None
    last_data = stripped.count(b"\n")
    return last_data + 1 if body.count(b"\n") > last_data + 1 else None


def find_bad_row(
    path: Path,
    name: str,
    encoding: str,
    separator: str,
    fields: Fields,
    skip: int,
    check: Check,
    column_index: Sequence[int] | None = None,
    n_fields: int | None = None,
) -> ParseError | None:
    """Second pass after a failed strict read: scan the file in blocks of whole lines.

    Each block is checked for undecodable bytes, then read by ``check`` (a fast strict read). In
    a block that fails, :func:`_first_bad_line` finds the line ``check`` stops at,
    whatever the reason, and says what is wrong with it. A blank line followed by more data is
    an error. The scan stops at the first bad line, so memory stays at a few block sizes even
    for ML-25M.
    """
    line_no = 1  # number of the first line of the current block
    carry = b""
    pending_blank: int | None = None  # a blank line ending the previous block
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
            else:
                cut = len(data)
            part, carry = data[:cut], data[cut:]
            del data
            if part:
                if is_utf8(encoding):
                    try:
                        part.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if pending_blank is not None and part[:exc.start].strip():
                            return ParseError(f"{name} line {pending_blank}: blank line inside the data")
                        line = line_no + part.count(b"\n", 0, exc.start)
                        bad = part[exc.start:exc.start + 4]
                        return ParseError(f"{name} line {line}: bytes {bad!r} are not valid UTF-8 "
                                          f"(wrong file encoding?)")
                    text = part
                else:
                    text = part.decode(encoding, errors="replace").encode("utf-8")
                first = line_no
                if line_no == 1:
                    for _ in range(skip):  # header lines
                        nl = text.find(b"\n")
                        text = text[nl + 1:] if nl >= 0 else b""
                        first += 1
                if pending_blank is not None and text.strip():
                    return ParseError(f"{name} line {pending_blank}: blank line inside the data")
                if check(text) is not None:
                    return _first_bad_line(text, first, name, separator, fields, check, column_index,
                                           n_fields)
                if text.strip():  # (a pending blank line was reported above)
                    blank = _trailing_blank_start(text)
                    pending_blank = None if blank is None else first + blank
                elif text and pending_blank is None:
                    pending_blank = first
                line_no += part.count(b"\n")
            if not block:
                return None


def _first_bad_line(
    body: bytes,
    first_line: int,
    name: str,
    separator: str,
    fields: Fields,
    check: Check,
    column_index: Sequence[int] | None,
    n_fields: int | None,
) -> ParseError:
    """The error of the first line of ``body`` (whole lines, failing ``check``) that ``check`` refuses.

    The per-value check of :func:`_naive_bad_row` proposes a line, two strict reads confirm it
    (the lines before it parse, the prefix up to it does not); otherwise, or to narrow it down, a
    bisection with ``check`` finds the line.
    """
    ends = [m.end() for m in re.finditer(b"\n", body)]
    if not ends or ends[-1] != len(body):
        ends.append(len(body))
    lines = pl.Series("line", body.decode("utf-8", errors="replace").split("\n")[: len(ends)])
    lines = lines.str.strip_suffix("\r")
    lo, hi = 0, len(ends) - 1  # the first failing prefix ends at one of ends[lo..hi]
    candidate = _naive_bad_row(lines, separator, fields, column_index, True, n_fields)
    if candidate is not None:
        k = n = int(candidate["i"])
        if not candidate["line"].strip():  # a blank line: the read fails at the next data line
            rest = (lines.slice(k).str.strip_chars().str.len_chars() > 0).arg_true()
            n = k + int(rest[0]) if rest.len() else -1
        if n >= 0 and check(body[: ends[n]]) is not None:
            hi = n
            if k == 0 or check(body[: ends[k - 1]]) is None:
                lo = k
    while lo < hi:
        mid = (lo + hi) // 2
        if check(body[: ends[mid]]) is None:
            lo = mid + 1
        else:
            hi = mid
    # blank lines right before it: a blank line inside the data (a prefix may end with blank lines)
    blank = lo
    while blank > 0 and not lines[blank - 1].strip():
        blank -= 1
    if blank < lo:
        return ParseError(f"{name} line {first_line + blank}: blank line inside the data")
    line = lines[lo]
    row = _naive_bad_row(lines.slice(lo, 1), separator, fields, column_index, False, n_fields)
    if row is not None:
        return _describe_bad_row(row, name, first_line + lo, separator, fields, column_index, n_fields)
    start = ends[lo - 1] if lo else 0
    cause = check(body[start: ends[lo]]) or check(body[: ends[lo]]) or "unreadable row"
    return ParseError(f"{name} line {first_line + lo}: cannot be parsed ({cause}) in {line[:80]!r}")


def field_values(lines: pl.Series, separator: str, n_used: int, idx: Sequence[int]) -> pl.DataFrame:
    """Per line: its row index ``i``, text ``line``, field count ``__n`` and used fields ``s0``..."""
    frame = pl.DataFrame({"line": lines}).with_row_index("i")
    parts = pl.col("line").str.split(separator)
    return frame.select(
        "i", "line", parts.list.len().alias("__n"),
        *[field_text(parts.list.get(idx[j], null_on_oob=True)).alias(f"s{j}") for j in range(n_used)],
    )


def _expected_fields(fields: Sequence, column_index: Sequence[int] | None,
                     n_fields: int | None) -> tuple[int | None, list[int]]:
    """(the exact field count a row needs, or None for 'at least'; each field's position)."""
    if column_index is None:
        return len(fields), list(range(len(fields)))
    return n_fields, list(column_index)


def _naive_bad_row(
    lines: pl.Series,
    separator: str,
    fields: Fields,
    column_index: Sequence[int] | None,
    trailing_blank_ok: bool,
    n_fields: int | None,
) -> dict | None:
    """The first line (as a row of :func:`field_values`) with a wrong field count or value, or None.

    Vectorised: lines are split on ``separator`` (quotes are not parsed), values trimmed and unquoted.
    """
    n_expected, idx = _expected_fields(fields, column_index, n_fields)
    if trailing_blank_ok:
        nonblank = (lines.str.strip_chars().str.len_chars() > 0).arg_true()
        if nonblank.len() == 0:
            return None
        lines = lines.head(int(nonblank[-1]) + 1)
    frame = field_values(lines, separator, len(fields), idx)
    checks = [pl.col("__n") != n_expected] if n_expected is not None else [pl.col("__n") <= max(idx)]
    for j, (_label, dtype, required) in enumerate(fields):
        raw = pl.col(f"s{j}")
        empty = raw.is_null() | (raw.str.len_chars() == 0)
        bad_value = ~empty & raw.cast(dtype, strict=False).is_null()
        checks.append((empty & required) | bad_value)
    bad = frame.filter(pl.any_horizontal(checks)).head(1)
    return bad.row(0, named=True) if bad.height else None


def _describe_bad_row(
    row: dict,
    name: str,
    line: int,
    separator: str,
    fields: Fields,
    column_index: Sequence[int] | None,
    n_fields: int | None,
) -> ParseError:
    """The one-line error for a row :func:`_naive_bad_row` found at 1-based ``line``."""
    n_expected, idx = _expected_fields(fields, column_index, n_fields)
    text = row["line"]
    if not text.strip():
        return ParseError(f"{name} line {line}: blank line inside the data")
    if n_expected is not None and row["__n"] != n_expected:
        sep = "tab" if separator == "\t" else repr(separator)
        return ParseError(f"{name} line {line}: expected {n_expected} fields separated by {sep}, "
                          f"found {row['__n']} in {text[:80]!r}")
    if n_expected is None and row["__n"] <= max(idx):
        return ParseError(f"{name} line {line}: expected at least {max(idx) + 1} fields, "
                          f"found {row['__n']} in {text[:80]!r}")
    for j, (label, dtype, required) in enumerate(fields):
        value = row[f"s{j}"]
        if value is None or value == "":
            if required:
                return ParseError(f"{name} line {line}: {label} is empty")
            continue
        try:
            ok = pl.Series([value]).cast(dtype, strict=False)[0] is not None
        except Exception:  # noqa: BLE001 - any cast failure means 'bad value'
            ok = False
        if not ok:
            kind = "an integer" if dtype.is_integer() else "a number"
            return ParseError(f"{name} line {line}: {label} {value!r} is not {kind}")
    raise AssertionError("_naive_bad_row and _describe_bad_row disagree")  # pragma: no cover


def locate_bad_row(
    lines: pl.Series,
    name: str,
    separator: str,
    fields: Fields,
    first_line: int,
    column_index: Sequence[int] | None = None,
    trailing_blank_ok: bool = True,
    n_fields: int | None = None,
) -> ParseError | None:
    """Find the first malformed data line; ``fields`` = (label, dtype, required) per used column.

    ``first_line`` is the 1-based number of ``lines[0]``; ``column_index`` maps each field to its
    position in the row (default: 0..n-1, with the row needing exactly ``len(fields)`` values);
    ``n_fields`` demands that exact count with a ``column_index`` too. Values are trimmed and
    unquoted. Trailing blank lines are ignored when ``trailing_blank_ok``. Returns None when no
    row is at fault.
    """
    row = _naive_bad_row(lines, separator, fields, column_index, trailing_blank_ok, n_fields)
    if row is None:
        return None
    return _describe_bad_row(row, name, first_line + int(row["i"]), separator, fields, column_index, n_fields)


__all__ = ["BLOCK_BYTES", "Fields", "field_values", "find_bad_row", "locate_bad_row"]
