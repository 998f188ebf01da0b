"""Parse the ratings and item files of a MovieLens archive layout into the canonical frames.

Ratings files (``u.data``, ``ratings.dat``, ``ratings.csv``) take the strict read of
:mod:`~flexmf_assets.datasets.strict_read`, with the error finder of
:mod:`~flexmf_assets.datasets.line_errors` naming the first bad line; item files (``u.item``,
``movies.dat``, ``movies.csv``) are small and read line by line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import polars as pl

from flexmf_assets.datasets.catalog import ArchiveLayout
from flexmf_assets.datasets.line_errors import find_bad_row
from flexmf_assets.datasets.frames import ITEMS_SCHEMA, RATINGS_SCHEMA
from flexmf_assets.datasets.strict_read import is_utf8, read_file, to_dtype
from flexmf_assets.errors import ParseError

#: header of the MovieLens CSV ratings files (ml-latest*, ml-20m and later)
CSV_RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
CSV_ITEMS_HEADER = ("movieId", "title", "genres")
#: ml-100k u.item genre flag columns, in file order (from the archive's u.genre)
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


def _header_line(path: Path, name: str, encoding: str) -> tuple[str, ...]:
    with open(path, "rb") as fh:
        first = fh.readline(4096)
    try:
        text = first.decode("utf-8-sig" if is_utf8(encoding) else encoding)
    except UnicodeDecodeError:
        raise ParseError(f"{name} line 1: header is not valid UTF-8 (wrong file encoding?)") from None
    return tuple(f.strip().strip('"') for f in text.rstrip("\r\n").split(","))


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
    encoding = "utf8" if is_utf8(layout.encoding) else "utf8-lossy"
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
            df = df.select(to_dtype(pl.col(c), t).alias(c) for c, t in RATINGS_SCHEMA.items())
        return df

    fields = [(lab, dt, True) for lab, dt in zip(labels, RATINGS_SCHEMA.values())]
    return read_file(read, path, skip, name, lambda check: find_bad_row(
        path, name, layout.encoding, layout.separator, fields, skip, check))


def _decode(path: Path, name: str, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if is_utf8(encoding) else encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParseError(f"{name} line {line}: bytes {data[exc.start:exc.start + 4]!r} are not valid "
                         f"{encoding} (wrong file encoding?)") from None


def _item_id(value: str, name: str, line: int, label: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ParseError(f"{name} line {line}: {label} {value!r} is not an integer") from None


def _split_lines(text: str, sep: str, n_fields: int, name: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of each non-blank line split on ``sep`` (no quoting): ``n_fields`` each."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != n_fields:
            raise ParseError(f"{name} line {lineno}: expected {n_fields} fields separated by {sep!r}, "
                             f"found {len(parts)} in {line[:80]!r}")
        yield lineno, parts


def _csv_rows(text: str, sep: str, has_header: bool, name: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of each row of a ``movies.csv`` (quoted titles keep exact line numbers)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    if has_header:
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_ITEMS_HEADER:
            raise ParseError(f"{name} line 1: header {','.join(header or [])!r} is not "
                             f"{','.join(CSV_ITEMS_HEADER)!r}")
    for row in reader:
        if not row:
            continue
        if len(row) != 3:
            raise ParseError(f"{name} line {reader.line_num}: expected 3 fields (movieId,title,genres), "
                             f"found {len(row)}")
        yield reader.line_num, row


def _ml100k_genres(flags: list[str], name: str, lineno: int) -> str:
    """The pipe-separated genres of u.item's 0/1 genre flags."""
    if any(f.strip() not in ("0", "1") for f in flags):
        raise ParseError(f"{name} line {lineno}: genre flags must be 0 or 1, got {'|'.join(flags)!r}")
    return "|".join(g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1")


def parse_items_file(path: Path, layout: ArchiveLayout, *, name: str | None = None) -> pl.DataFrame:
    """Parse a MovieLens item file (``u.item``, ``movies.dat``, ``movies.csv``) to the items frame.

    Item files are small (under 100k rows), so they are read line by line; ``movies.csv`` with the
    csv module, which keeps the line numbers of quoted titles exact.
    """
    path = Path(path)
    name = name or path.name
    if layout.items_file is None:
        raise ParseError(f"{name}: this layout has no item file")
    text = _decode(path, name, layout.encoding)
    sep = layout.items_separator
    if sep == "|":  # u.item: id|title|release date|video release date|IMDb URL|19 genre flags
        rows = [(_item_id(p[0], name, n, "item_id"), p[1], _ml100k_genres(p[5:], name, n))
                for n, p in _split_lines(text, sep, 5 + len(ML100K_GENRES), name)]
    elif sep == "::":
        rows = [(_item_id(p[0], name, n, "item_id"), p[1], p[2]) for n, p in _split_lines(text, sep, 3, name)]
    else:
        rows = [(_item_id(r[0], name, n, "movieId"), r[1], r[2])
                for n, r in _csv_rows(text, sep, layout.items_has_header, name)]
    ids, titles, genres = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    return pl.DataFrame({"item_id": ids, "title": titles, "genres": genres}, schema=ITEMS_SCHEMA)


__all__ = ["CSV_RATINGS_HEADER", "CSV_ITEMS_HEADER", "ML100K_GENRES", "parse_ratings_file", "parse_items_file"]
