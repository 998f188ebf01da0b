"""The canonical frames every dataset ends in, whatever its source.

* ratings: ``user_id: Int64, item_id: Int64, rating: Float32, timestamp: Int64`` (seconds since
  the epoch; null when the source has none);
* items: ``item_id: Int64, title: String, genres: String`` (pipe-separated genres).

Parsing produces them, the synthetic generator writes them, validation checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

#: the ratings columns every source is mapped to (a plain file's ``columns:`` maps onto these)
CANONICAL_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
RATINGS_SCHEMA: dict[str, pl.DataType] = dict(
    zip(CANONICAL_COLUMNS, (pl.Int64(), pl.Int64(), pl.Float32(), pl.Int64()), strict=True)
)
ITEMS_SCHEMA: dict[str, pl.DataType] = {"item_id": pl.Int64(), "title": pl.String(), "genres": pl.String()}


@dataclass
class ParsedDataset:
    """The canonical frames of one dataset; ``items`` is None when the source has no item file."""

    ratings: pl.DataFrame
    items: pl.DataFrame | None = None


__all__ = ["CANONICAL_COLUMNS", "RATINGS_SCHEMA", "ITEMS_SCHEMA", "ParsedDataset"]
