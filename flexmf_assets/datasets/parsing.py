"""Parse MovieLens archives and user rating files into canonical polars frames.

Every format ends in the same two frames:

* ratings: ``user_id: Int64, item_id: Int64, rating: Float32, timestamp: Int64`` (seconds since
  the epoch; null when the source has none);
* items: ``item_id: Int64, title: String, genres: String`` (pipe-separated genres).

The happy path is one strict polars read with an explicit schema (no Python loop over rows), so
ML-25M parses in about a gigabyte. When that read fails, or leaves holes (short rows), a second,
still vectorised pass reads the file in blocks, each as text with trimmed values (quoted numbers,
spaces around values and a stray carriage return before the line feed are accepted), to find the
*first* bad row and raises a :class:`ParseError` whose one-line message names the file, the 1-based
line (the header counts) and the bad value, e.g. ``ml-latest-small/ratings.csv line 17: rating
'abc' is not a number``; echoed text is escaped (``\r``, ``\x1b``), so every message is printable.
A file without a bad row is then read whole as text. User csv files may use a separator of
several characters (``::``): their lines are split on it.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from flexmf_assets.datasets.catalog import ArchiveLayout, DatasetSpec
from flexmf_assets.datasets.frames import ITEMS_SCHEMA, RATINGS_SCHEMA, ParsedDataset
from flexmf_assets.datasets.synthetic import generate
from flexmf_assets.errors import ArchiveError, ParseError

#: header of the MovieLens CSV ratings files (ml-latest*, ml-20m and later)
CSV_RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
CSV_ITEMS_HEADER = ("movieId", "title", "genres")
#: ml-100k u.item genre flag columns, in file order (from the archive's u.genre)
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
_CHUNK = 1 << 25  # bytes per block of the error-locating pass


# --------------------------------------------------------------------------- error location

#: what a failed strict read raises (a value that does not convert, a row of the wrong width...)
_READ_ERRORS = (pl.exceptions.ComputeError, pl.exceptions.SchemaError, pl.exceptions.InvalidOperationError,
                pl.exceptions.ShapeError)
#: a strict read of some bytes: None when they parse, else why not
Check = Callable[[bytes], "str | None"]


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8lossy")


def _printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters escaped (``\r``, ``\x1b``...), cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _cause(exc: BaseException) -> str:
    """The first line of a polars error, printable."""
    return _printable(str(exc).split("\n", 1)[0].strip()) or type(exc).__name__


def _value(expr: pl.Expr) -> pl.Expr:
    """A field's text as a value: surrounding whitespace and double quotes removed."""
    return expr.str.strip_chars().str.strip_prefix('"').str.strip_suffix('"').str.strip_chars()


def _to_dtype(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Strict conversion of a text column read as strings: trimmed and unquoted, empty -> null."""
    text = _value(expr)
    return pl.when(text.str.len_chars() > 0).then(text).cast(dtype, strict=True)


def _trailing_blank_start(body: bytes) -> int | None:
    """Index (0-based line) of the first of the blank lines ending ``body``, or None."""
    stripped = body.rstrip()
    if not stripped:
        return 0 if body else None
    last_data = stripped.count(b"\n")
    return last_data + 1 if body.count(b"\n") > last_data + 1 else None


def _find_bad_row(
    path: Path,
    name: str,
    encoding: str,
    separator: str,
    fields: Sequence[tuple[str, pl.DataType, bool]],
    skip: int,
    check: Check,
    column_index: Sequence[int] | None = None,
    n_fields: int | None = None,
) -> ParseError | None:
    """Second pass after a failed strict read: scan the file in blocks of whole lines.

    Each block is checked for undecodable bytes, then read by ``check`` (:func:`_strict_read`,
    fast). In a block that fails, :func:`_first_bad_line` finds the line ``check`` stops at,
    whatever the reason, and says what is wrong with it. A blank line followed by more data is
    an error. The scan stops at the first bad line, so memory stays at a few block sizes even
    for ML-25M.
    """
    line_no = 1  # number of the first line of the current block
    carry = b""
    pending_blank: int | None = None  # a blank line ending the previous block
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
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
                if _is_utf8(encoding):
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
    fields: Sequence[tuple[str, pl.DataType, bool]],
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


def _field_values(lines: pl.Series, separator: str, n_used: int, idx: Sequence[int]) -> pl.DataFrame:
    """Per line: its row index ``i``, text ``line``, field count ``__n`` and used fields ``s0``..."""
    frame = pl.DataFrame({"line": lines}).with_row_index("i")
    parts = pl.col("line").str.split(separator)
    return frame.select(
        "i", "line", parts.list.len().alias("__n"),
        *[_value(parts.list.get(idx[j], null_on_oob=True)).alias(f"s{j}") for j in range(n_used)],
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
    fields: Sequence[tuple[str, pl.DataType, bool]],
    column_index: Sequence[int] | None,
    trailing_blank_ok: bool,
    n_fields: int | None,
) -> dict | None:
    """The first line (as a row of :func:`_field_values`) with a wrong field count or value, or None.

    Vectorised: lines are split on ``separator`` (quotes are not parsed), values trimmed and unquoted.
    """
    n_expected, idx = _expected_fields(fields, column_index, n_fields)
    if trailing_blank_ok:
        nonblank = (lines.str.strip_chars().str.len_chars() > 0).arg_true()
        if nonblank.len() == 0:
            return None
        lines = lines.head(int(nonblank[-1]) + 1)
    frame = _field_values(lines, separator, len(fields), idx)
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
    fields: Sequence[tuple[str, pl.DataType, bool]],
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


def _locate_bad_row(
    lines: pl.Series,
    name: str,
    separator: str,
    fields: Sequence[tuple[str, pl.DataType, bool]],
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


def _drop_trailing_null_rows(df: pl.DataFrame) -> pl.DataFrame | None:
    """The frame without trailing all-null rows (blank lines at the end); None if other holes remain."""
    all_null = df.select(pl.all_horizontal(pl.all().is_null()))[:, 0]
    keep = (~all_null).arg_true()
    trimmed = df.head(int(keep[-1]) + 1 if keep.len() else 0)
    return trimmed if trimmed.null_count().sum_horizontal()[0] == 0 else None


# --------------------------------------------------------------------------- ratings


def _header_line(path: Path, name: str, encoding: str) -> tuple[str, ...]:
    with open(path, "rb") as fh:
        first = fh.readline(4096)
    try:
        text = first.decode("utf-8-sig" if _is_utf8(encoding) else encoding)
    except UnicodeDecodeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    return tuple(f.strip().strip('"') for f in text.rstrip("\r\n").split(","))


def _finish(df: pl.DataFrame) -> tuple[pl.DataFrame | None, str]:
    """``df`` without trailing all-null rows (blank lines at the end), or (None, why) if holes remain."""
    if df.null_count().sum_horizontal()[0] == 0:
        return df, ""
    trimmed = _drop_trailing_null_rows(df)
    return (trimmed, "") if trimmed is not None else (None, "missing values")


def _strict_read(read: Callable[[Path | bytes, int, bool], pl.DataFrame], source: Path | bytes,
                 skip_lines: int) -> tuple[pl.DataFrame | None, str]:
    """(frame, '') from a strict read, or (None, why) when some row is at fault.

    ``read(source, skip_lines, typed)``: a fast typed read first; when it fails, a read as text
    that trims every value before converting it (spaces, a stray carriage return).
    """
    try:
        df, cause = _finish(read(source, skip_lines, True))
        if df is not None:
            return df, cause
    except _READ_ERRORS:
        pass
    try:
        return _finish(read(source, skip_lines, False))
    except _READ_ERRORS as exc:
        return None, _cause(exc)


def _read_file(read: Callable[[Path | bytes, int, bool], pl.DataFrame], path: Path, skip: int, name: str,
               locate: Callable[[Check], ParseError | None]) -> pl.DataFrame:
    """The frame of a whole file: one fast typed read; when it fails, the block pass of ``locate``
    (with :func:`_strict_read` on each block) names the first bad line, or, when every block
    reads, the file is read again as text with trimmed values."""
    try:
        df, _ = _finish(read(path, skip, True))
    except _READ_ERRORS:
        df = None
    if df is not None:
        return df
    err = locate(lambda text: _strict_read(read, text, 0)[1] or None)
    if err is not None:
        raise err
    try:
        df, cause = _finish(read(path, skip, False))
    except _READ_ERRORS as exc:
        df, cause = None, _cause(exc)
    if df is None:  # every block reads, the whole file does not: rows spanning blocks (quoted newlines)
        raise ParseError(f"{name}: could not be parsed: {cause}")
    return df


def parse_ratings_file(path: Path, layout: ArchiveLayout, *, name: str | None = None) -> pl.DataFrame:
    """Parse a MovieLens ratings file (``u.data``, ``ratings.dat`` or ``ratings.csv``).

    ``name`` is how messages call the file (its path inside the archive); default: its base name.
    Values may be quoted (``"1","10","4.0"``) and surrounded by spaces; lines may end in CRLF.
    """
    path = Path(path)
    name = name or path.name
    labels = ("user_id", "item_id", "rating", "timestamp")
    skip = 0
    if layout.has_header:
        header = _header_line(path, name, layout.encoding)
        if header[:4] != CSV_RATINGS_HEADER or len(header) != 4:
            raise ParseError(f"{name} line 1: header {','.join(header)[:80]!r} is not "
                             f"{','.join(CSV_RATINGS_HEADER)!r}")
        labels = CSV_RATINGS_HEADER
        skip = 1
    encoding = "utf8" if _is_utf8(layout.encoding) else "utf8-lossy"
    double_colon = layout.separator == "::"
    if double_colon:
        # '1::2::5::978300760' split on ':' gives 7 fields with empty ones between the values
        cols = [f"c{i}" for i in range(7)]
        dtypes = [pl.Int64(), pl.String(), pl.Int64(), pl.String(), pl.Float32(), pl.String(), pl.Int64()]
        separator = ":"
    else:
        cols, dtypes = list(labels), list(RATINGS_SCHEMA.values())
        separator = layout.separator
    if len(separator) != 1:
        raise ParseError(f"{name}: unsupported separator {layout.separator!r}")

    def read(source: Path | bytes, skip_lines: int, typed: bool) -> pl.DataFrame:
        schema = dict(zip(cols, dtypes if typed else [pl.String()] * len(cols)))
        try:
            df = pl.read_csv(source, has_header=False, skip_lines=skip_lines, separator=separator,
                             schema=schema, quote_char='"', encoding=encoding)
        except pl.exceptions.NoDataError:
            df = pl.DataFrame(schema=schema)
        if double_colon:
            stray = df.select(pl.any_horizontal(pl.col("c1", "c3", "c5").is_not_null())).to_series()
            if stray.any():
                raise pl.exceptions.ComputeError("values separated by a single ':'")
            df = df.select(pl.col("c0"), pl.col("c2"), pl.col("c4"), pl.col("c6"))
        df.columns = list(RATINGS_SCHEMA)
        if not typed:  # spaces around values, a stray carriage return: trim, then convert strictly
            df = df.select(_to_dtype(pl.col(c), t).alias(c) for c, t in RATINGS_SCHEMA.items())
        return df

    fields = [(lab, dt, True) for lab, dt in zip(labels, RATINGS_SCHEMA.values())]
    return _read_file(read, path, skip, name, lambda check: _find_bad_row(
        path, name, layout.encoding, layout.separator, fields, skip, check))


# --------------------------------------------------------------------------- items


def _decode(path: Path, name: str, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if _is_utf8(encoding) else encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParseError(f"{name} line {line}: bytes {data[exc.start:exc.start + 4]!r} are not valid "
                         f"{encoding} (wrong file encoding?)") from None


def _item_id(value: str, name: str, line: int, label: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ParseError(f"{name} line {line}: {label} {value!r} is not an integer") from None


def parse_items_file(path: Path, layout: ArchiveLayout, *, name: str | None = None) -> pl.DataFrame:
    """Parse a MovieLens item file (``u.item``, ``movies.dat``, ``movies.csv``) to the items frame.

    Item files are small (under 100k rows), so they are read with the csv module, which keeps the
    line numbers of quoted titles exact.
    """
    path = Path(path)
    name = name or path.name
    if layout.items_file is None:
        raise ParseError(f"{name}: this layout has no item file")
    text = _decode(path, name, layout.encoding)
    ids: list[int] = []
    titles: list[str] = []
    genres: list[str] = []
    sep = layout.items_separator
    if sep == "::":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3:
                raise ParseError(f"{name} line {lineno}: expected 3 fields separated by '::', "
                                 f"found {len(parts)} in {line[:80]!r}")
            ids.append(_item_id(parts[0], name, lineno, "item_id"))
            titles.append(parts[1])
            genres.append(parts[2])
    elif sep == "|":
        n_fields = 5 + len(ML100K_GENRES)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != n_fields:
                raise ParseError(f"{name} line {lineno}: expected {n_fields} fields separated by '|', "
                                 f"found {len(parts)} in {line[:80]!r}")
            ids.append(_item_id(parts[0], name, lineno, "item_id"))
            titles.append(parts[1])
            flags = parts[5:]
            if any(f.strip() not in ("0", "1") for f in flags):
                raise ParseError(f"{name} line {lineno}: genre flags must be 0 or 1, got {'|'.join(flags)!r}")
            genres.append("|".join(g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1"))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
        if layout.items_has_header:
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != CSV_ITEMS_HEADER:
                raise ParseError(f"{name} line 1: header {','.join(header or [])!r} is not "
                                 f"{','.join(CSV_ITEMS_HEADER)!r}")
        for row in reader:
            if not row:
                continue
            lineno = reader.line_num
            if len(row) != 3:
                raise ParseError(f"{name} line {lineno}: expected 3 fields (movieId,title,genres), "
                                 f"found {len(row)}")
            ids.append(_item_id(row[0], name, lineno, "movieId"))
            titles.append(row[1])
            genres.append(row[2])
    return pl.DataFrame({"item_id": ids, "title": titles, "genres": genres}, schema=ITEMS_SCHEMA)


# --------------------------------------------------------------------------- plain user files

_DTYPE_LABEL = {"user_id": "an integer", "item_id": "an integer", "timestamp": "an integer",
                "rating": "a number"}


def _columns_of(spec: DatasetSpec, name: str) -> dict[str, str]:
    mapping = dict(spec.columns or {})
    missing = [c for c in ("user_id", "item_id", "rating") if not mapping.get(c)]
    if missing:
        raise ParseError(f"{name}: the column mapping (columns:) of dataset {spec.name!r} lacks "
                         f"{', '.join(map(repr, missing))}")
    return mapping


def _missing_column(name: str, canonical: str, source: str, present: Sequence[str]) -> ParseError:
    shown = ", ".join(_printable(c, 60) for c in present[:30])
    more = f", ... ({len(present)} in all)" if len(present) > 30 else ""
    return ParseError(f"{name}: column {source!r} (for {canonical}) not found; "
                      f"columns present: {shown}{more}")


def _headerless_names(width: int) -> list[str]:
    """The names polars gives the columns of a file without a header."""
    return pl.read_csv(b",".join([b"0"] * width) + b"\n", has_header=False, n_rows=0).columns


def _parse_plain_csv(path: Path, spec: DatasetSpec, name: str) -> pl.DataFrame:
    mapping = _columns_of(spec, name)
    separator = spec.separator
    if len(separator.encode("utf-8")) != 1:
        return _parse_plain_split(path, spec, name, mapping)
    try:
        head = pl.read_csv(path, n_rows=0, separator=separator, has_header=spec.has_header,
                           infer_schema=False)
    except pl.exceptions.NoDataError:
        raise ParseError(f"{name}: the file is empty") from None
    except pl.exceptions.ComputeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    present = [c.strip() for c in head.columns]  # (a header line ending in CR CR LF keeps one CR)
    for canonical, source in mapping.items():
        if source not in present:
            raise _missing_column(name, canonical, source, present)
    order = [c for c in RATINGS_SCHEMA if c in mapping]
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
            cols = [_to_dtype(col, RATINGS_SCHEMA[c]) for c, col in zip(order, cols)]
        return df.select(col.alias(c) for c, col in zip(order, cols))

    fields = [(mapping[c], RATINGS_SCHEMA[c], True) for c in order]
    return _canonical(_read_file(read, path, skip, name, lambda check: _find_bad_row(
        path, name, "utf-8", separator, fields, skip, check, column_index=positions)))


def _parse_plain_split(path: Path, spec: DatasetSpec, name: str, mapping: dict[str, str]) -> pl.DataFrame:
    """A csv whose separator polars cannot read (several characters like ml-1m's ``::``, or one
    multi-byte character): each line is split on it, so values cannot contain it (no quoting)."""
    separator = spec.separator
    try:
        lines = pl.read_lines(path)["line"]
    except pl.exceptions.ComputeError as exc:
        err = _find_bad_row(path, name, "utf-8", separator, [], 0, check=lambda text: None)
        raise err or ParseError(f"{name}: cannot be read ({_cause(exc)})") from None
    nonblank = (lines.str.strip_chars().str.len_chars() > 0).arg_true()
    if nonblank.len() == 0:
        raise ParseError(f"{name}: the file is empty")
    first = lines[0].lstrip("\ufeff")
    if spec.has_header:
        present = [f.strip().removeprefix('"').removesuffix('"').strip() for f in first.split(separator)]
    else:
        present = _headerless_names(len(first.split(separator)))
    for canonical, source in mapping.items():
        if source not in present:
            raise _missing_column(name, canonical, source, present)
    skip = 1 if spec.has_header else 0
    data = lines.slice(skip, max(int(nonblank[-1]) + 1 - skip, 0))  # without trailing blank lines
    order = [c for c in RATINGS_SCHEMA if c in mapping]
    positions = [present.index(mapping[c]) for c in order]
    fields = [(mapping[c], RATINGS_SCHEMA[c], True) for c in order]
    err = _locate_bad_row(data, name, separator, fields, 1 + skip, positions, n_fields=len(present))
    if err is not None:
        raise err
    values = _field_values(data, separator, len(order), positions)
    return _canonical(values.select(pl.col(f"s{j}").cast(RATINGS_SCHEMA[c]).alias(c)
                                    for j, c in enumerate(order)))


def _canonical(df: pl.DataFrame) -> pl.DataFrame:
    if "timestamp" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Int64).alias("timestamp"))
    return df.select([pl.col(c).cast(t) for c, t in RATINGS_SCHEMA.items()])


def _parse_plain_parquet(path: Path, spec: DatasetSpec, name: str) -> pl.DataFrame:
    mapping = _columns_of(spec, name)
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for a non-parquet file
        raise ParseError(f"{name}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    present = list(schema)
    for canonical, source in mapping.items():
        if source not in present:
            raise _missing_column(name, canonical, source, present)
    order = [c for c in RATINGS_SCHEMA if c in mapping]
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


def parse_plain(path: Path, spec: DatasetSpec, *, name: str | None = None) -> pl.DataFrame:
    """Parse a user csv/parquet ratings file whose columns ``spec.columns`` maps to canonical names.

    Ids must be integers; ``timestamp`` is optional (null when unmapped; parquet datetimes are
    converted to epoch seconds). Parquet errors name the 1-based row, csv errors the line.
    """
    path = Path(path)
    name = name or path.name
    if spec.format == "csv":
        return _parse_plain_csv(path, spec, name)
    if spec.format == "parquet":
        return _parse_plain_parquet(path, spec, name)
    raise ParseError(f"{name}: format {spec.format!r} is not a plain file format (csv, parquet)")


# --------------------------------------------------------------------------- datasets


def load_dataset(spec: DatasetSpec, source: Path | None, workdir: Path) -> ParsedDataset:
    """Turn a fetched source (archive or plain file) into canonical frames.

    Archives are extracted safely under ``workdir/<spec.name>`` and their ratings (and items)
    member is found by base name; synthetic specs ignore ``source`` and generate their preset.
    """
    if spec.is_synthetic:
        return generate(spec.preset or spec.name)
    if source is None:
        raise ParseError(f"dataset {spec.name!r}: no source file to parse")
    source = Path(source)
    layout = spec.layout
    if layout is None:
        return ParsedDataset(parse_plain(source, spec), None)
    from flexmf_assets.datasets.archive import find_member, safe_extract

    dest = Path(workdir) / spec.name
    # only the members the layout reads are written (padding members cost no disk)
    safe_extract(source, dest, members=[f for f in (layout.ratings_file, layout.items_file) if f])
    ratings_path = find_member(dest, layout.ratings_file)
    ratings = parse_ratings_file(ratings_path, layout, name=_member_name(ratings_path, dest))
    items = None
    if layout.items_file:
        try:
            items_path = find_member(dest, layout.items_file)
        except ArchiveError:
            items_path = None
        if items_path is not None:
            items = parse_items_file(items_path, layout, name=_member_name(items_path, dest))
    return ParsedDataset(ratings, items)


def _member_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


__all__ = [
    "RATINGS_SCHEMA", "ITEMS_SCHEMA", "ParsedDataset", "parse_ratings_file", "parse_items_file",
    "parse_plain", "load_dataset", "ML100K_GENRES",
]
