"""Turn a fetched dataset source into the canonical frames: the entry point of parsing.

Every source ends in the frames of :mod:`~flexmf_assets.datasets.frames` (ratings, and items when
the source has an item file). The work is done by:

* :mod:`~flexmf_assets.datasets.layout_files`: the ratings and item files of a MovieLens archive
  layout (:func:`parse_ratings_file`, :func:`parse_items_file`);
* :mod:`~flexmf_assets.datasets.plain_files`: a user's csv or parquet file (:func:`parse_plain`);
* :mod:`~flexmf_assets.datasets.strict_read`: the fast strict read of a delimited file;
* :mod:`~flexmf_assets.datasets.line_errors`: the line-level error finder, whose one-line
  :class:`ParseError` names the file, the 1-based line and the bad value, e.g.
  ``ml-latest-small/ratings.csv line 17: rating 'abc' is not a number``.
"""

from __future__ import annotations

from pathlib import Path


from flexmf_assets.datasets.catalog import DatasetSpec
from flexmf_assets.datasets.layout_files import ML100K_GENRES, parse_items_file, parse_ratings_file
from flexmf_assets.datasets.plain_files import parse_plain
from flexmf_assets.datasets.frames import ITEMS_SCHEMA, RATINGS_SCHEMA, ParsedDataset
from flexmf_assets.datasets.synthetic import generate
from flexmf_assets.errors import ArchiveError, ParseError


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
