"""Parse MovieLens archives and user rating files into canonical polars frames.

Every format ends in the same two frames:

* ratings: ``user_id: Int64, item_id: Int64, rating: Float32, timestamp: Int64`` (seconds since
  the epoch; null when the source has none);
* items: ``item_id: Int64, title: String, genres: String`` (pipe-separated genres).

The happy path is one strict polars read with an explicit schema (no Python loop over rows), so
ML-25M parses in about a gigabyte. When that read fails, or leaves holes (short rows), a second,
still vectorised pass reads the file as lines to find the *first* bad row and raises a
:class:`ParseError` whose one-line message names the file, the 1-based line (the header counts)
and the bad value, e.g. ``ml-latest-small/ratings.csv line 17: rating 'abc' is not a number``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from flexmf_assets.datasets.catalog import ArchiveLayout, DatasetSpec
from flexmf_assets.errors import ArchiveError, ParseError

RATINGS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(), "item_id": pl.Int64(), "rating": pl.Float32(), "timestamp": pl.Int64(),
}
ITEMS_SCHEMA: dict[str, pl.DataType] = {"item_id": pl.Int64(), "title": pl.String(), "genres": pl.String()}

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


@dataclass
class ParsedDataset:
    """The canonical frames of one dataset; ``items`` is None when the source has no item file."""

    ratings: pl.DataFrame
    items: pl.DataFrame | None = None


# --------------------------------------------------------------------------- error location


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8lossy")


def _find_bad_row(
    path: Path,
    name: str,
    encoding: str,
    separator: str,
    fields: Sequence[tuple[str, pl.DataType, bool]],
    skip: int,
    column_index: Sequence[int] | None = None,
    block_ok: Callable[[bytes, int], bool] | None = None,
) -> ParseError | None:
    """Second pass after a failed strict read: scan the file in blocks of whole lines.

    Each block is checked for undecodable bytes, then read strictly by ``block_ok`` (fast); only a
    block that fails is split into lines and checked column by column (:func:`_locate_bad_row`).
    The scan stops at the first bad line, so memory
    stays at a few block sizes even for ML-25M.
    """
    line_no = 1  # number of the first line of the current block
    carry = b""
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
                        line = line_no + part.count(b"\n", 0, exc.start)
                        bad = part[exc.start:exc.start + 4]
                        return ParseError(f"{name} line {line}: bytes {bad!r} are not valid UTF-8 "
                                          f"(wrong file encoding?)")
                    text = part
                else:
                    text = part.decode(encoding, errors="replace").encode("utf-8")
                if block_ok is not None and block_ok(text, skip if line_no == 1 else 0):
                    line_no += part.count(b"\n")
                    continue
                lines = pl.read_lines(text)["line"]
                first = line_no
                if line_no == 1 and skip:
                    lines, first = lines[skip:], 1 + skip
                err = _locate_bad_row(lines, name, separator, fields, first, column_index,
                                      trailing_blank_ok=not block)
                if err is not None:
                    return err
                line_no += part.count(b"\n")
            if not block:
                return None


def _locate_bad_row(
    lines: pl.Series,
    name: str,
    separator: str,
    fields: Sequence[tuple[str, pl.DataType, bool]],
    first_line: int,
    column_index: Sequence[int] | None = None,
    trailing_blank_ok: bool = True,
) -> ParseError | None:
    """Find the first malformed data line; ``fields`` = (label, dtype, required) per used column.

    ``first_line`` is the 1-based number of ``lines[0]``; ``column_index`` maps each field to its
    position in the row (default: 0..n-1, with the row needing exactly ``len(fields)`` values).
    Trailing blank lines are ignored when ``trailing_blank_ok``. Returns None when no row is at fault.
    """
    n_expected = len(fields) if column_index is None else None
    idx = list(range(len(fields))) if column_index is None else list(column_index)
    frame = pl.DataFrame({"line": lines}).with_row_index("i")
    blank = frame["line"].str.strip_chars().str.len_chars() == 0
    if trailing_blank_ok:
        nonblank = (~blank).arg_true()
        if nonblank.len() == 0:
            return None
        frame = frame.head(int(nonblank[-1]) + 1)
    parts = pl.col("line").str.split(separator)
    exprs = [parts.list.len().alias("__n")]
    for j, (label, dtype, _required) in enumerate(fields):
        exprs.append(parts.list.get(idx[j], null_on_oob=True).str.strip_chars().alias(f"s{j}"))
    frame = frame.select("i", "line", *exprs)
    checks = []
    if n_expected is not None:
        checks.append(pl.col("__n") != n_expected)
    else:
        checks.append(pl.col("__n") <= max(idx))
    for j, (_label, dtype, required) in enumerate(fields):
        raw = pl.col(f"s{j}")
        empty = raw.is_null() | (raw.str.len_chars() == 0)
        bad_value = ~empty & raw.cast(dtype, strict=False).is_null()
        checks.append((empty & required) | bad_value)
    bad = frame.filter(pl.any_horizontal(checks)).head(1)
    if bad.height == 0:
        return None
    row = bad.row(0, named=True)
    line = first_line + int(row["i"])
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
    return None  # pragma: no cover - the filter and the per-field checks agree


def _drop_trailing_null_rows(df: pl.DataFrame) -> pl.DataFrame | None:
    """The frame without trailing all-null rows (blank lines at the end); None if other holes remain."""
    all_null = df.select(pl.all_horizontal(pl.all().is_null()))[:, 0]
    keep = (~all_null).arg_true()
    trimmed = df.head(int(keep[-1]) + 1 if keep.len() else 0)
    return trimmed if trimmed.null_count().sum_horizontal()[0] == 0 else None


# --------------------------------------------------------------------------- ratings


def _header_line(path: Path, name: str, encoding: str) -> tuple[str, ...]:
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        text = first.decode("utf-8-sig" if _is_utf8(encoding) else encoding)
    except UnicodeDecodeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    return tuple(f.strip().strip('"') for f in text.rstrip("\r\n").split(","))


def parse_ratings_file(path: Path, layout: ArchiveLayout, *, name: str | None = None) -> pl.DataFrame:
    """Parse a MovieLens ratings file (``u.data``, ``ratings.dat`` or ``ratings.csv``).

    ``name`` is how messages call the file (its path inside the archive); default: its base name.
    """
    path = Path(path)
    name = name or path.name
    labels = ("user_id", "item_id", "rating", "timestamp")
    skip = 0
    if layout.has_header:
        header = _header_line(path, name, layout.encoding)
        if header[:4] != CSV_RATINGS_HEADER or len(header) != 4:
            raise ParseError(f"{name} line 1: header {','.join(header)!r} is not "
                             f"{','.join(CSV_RATINGS_HEADER)!r}")
        labels = CSV_RATINGS_HEADER
        skip = 1
    encoding = "utf8" if _is_utf8(layout.encoding) else "utf8-lossy"
    double_colon = layout.separator == "::"
    if double_colon:
        # '1::2::5::978300760' split on ':' gives 7 fields with empty ones between the values
        cols = [f"c{i}" for i in range(7)]
        dtypes = [pl.Int64(), pl.String(), pl.Int64(), pl.String(), pl.Float32(), pl.String(), pl.Int64()]
        schema = dict(zip(cols, dtypes))
        separator = ":"
    else:
        schema = dict(zip(labels, RATINGS_SCHEMA.values()))
        separator = layout.separator
    if len(separator) != 1:
        raise ParseError(f"{name}: unsupported separator {layout.separator!r}")

    def strict(source: Path | bytes, skip_lines: int) -> tuple[pl.DataFrame | None, str]:
        """(frame, '') from one strict polars read, or (None, why) when some row is at fault."""
        try:
            df = pl.read_csv(
                source, has_header=False, skip_lines=skip_lines, separator=separator, schema=schema,
                quote_char=None if not layout.has_header else '"', encoding=encoding,
            )
        except (pl.exceptions.ComputeError, pl.exceptions.SchemaError) as exc:
            return None, str(exc).splitlines()[0]
        except pl.exceptions.NoDataError:
            df = pl.DataFrame(schema=schema)
        if double_colon:
            stray = df.select(pl.any_horizontal(pl.col("c1", "c3", "c5").is_not_null())).to_series()
            if stray.any():
                return None, "values separated by a single ':'"
            df = df.select(pl.col("c0"), pl.col("c2"), pl.col("c4"), pl.col("c6"))
        df.columns = list(RATINGS_SCHEMA)
        if df.null_count().sum_horizontal()[0] > 0:
            trimmed = _drop_trailing_null_rows(df)
            if trimmed is None:
                return None, "missing values"
            df = trimmed
        return df, ""

    df, cause = strict(path, skip)
    if df is None:
        fields = [(lab, dt, True) for lab, dt in zip(labels, RATINGS_SCHEMA.values())]
        err = _find_bad_row(path, name, layout.encoding, layout.separator, fields, skip,
                            block_ok=lambda text, skip_lines: strict(text, skip_lines)[0] is not None)
        raise err or ParseError(f"{name}: could not be parsed: {cause}")
    return df


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
    if not spec.columns:
        raise ParseError(f"{name}: dataset {spec.name!r} has no column mapping (columns:)")
    mapping = dict(spec.columns)
    for required in ("user_id", "item_id", "rating"):
        if required not in mapping:
            raise ParseError(f"{name}: column mapping of {spec.name!r} lacks {required!r}")
    return mapping


def _missing_column(name: str, canonical: str, source: str, present: Sequence[str]) -> ParseError:
    return ParseError(f"{name}: column {source!r} (for {canonical}) not found; "
                      f"columns present: {', '.join(present)}")


def _parse_plain_csv(path: Path, spec: DatasetSpec, name: str) -> pl.DataFrame:
    mapping = _columns_of(spec, name)
    try:
        head = pl.read_csv(path, n_rows=0, separator=spec.separator, has_header=spec.has_header,
                           infer_schema=False)
    except pl.exceptions.NoDataError:
        raise ParseError(f"{name}: the file is empty") from None
    except pl.exceptions.ComputeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    present = head.columns
    for canonical, source in mapping.items():
        if source not in present:
            raise _missing_column(name, canonical, source, present)
    order = [c for c in RATINGS_SCHEMA if c in mapping]
    overrides = {mapping[c]: RATINGS_SCHEMA[c] for c in order}

    def locate(cause: str) -> ParseError:
        fields = [(mapping[c], RATINGS_SCHEMA[c], True) for c in order]
        err = _find_bad_row(path, name, "utf-8", spec.separator, fields, 1 if spec.has_header else 0,
                            column_index=[present.index(mapping[c]) for c in order])
        return err or ParseError(f"{name}: could not be parsed: {cause}")

    try:
        df = pl.read_csv(path, separator=spec.separator, has_header=spec.has_header,
                         columns=[mapping[c] for c in order], infer_schema=False,
                         schema_overrides=overrides)
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError) as exc:
        raise locate(str(exc).splitlines()[0]) from None
    df = df.select([pl.col(mapping[c]).alias(c) for c in order])
    if df.null_count().sum_horizontal()[0] > 0:
        trimmed = _drop_trailing_null_rows(df)
        if trimmed is None:
            raise locate("missing values") from None
        df = trimmed
    return _canonical(df)


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
        from flexmf_assets.datasets.synthetic import generate

        return generate(spec.preset or spec.name)
    if source is None:
        raise ParseError(f"dataset {spec.name!r}: no source file to parse")
    source = Path(source)
    layout = spec.layout
    if layout is None:
        return ParsedDataset(parse_plain(source, spec), None)
    from flexmf_assets.datasets.archive import find_member, safe_extract

    dest = Path(workdir) / spec.name
    safe_extract(source, dest)
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
