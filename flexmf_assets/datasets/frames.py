"""The canonical frames every dataset format ends in (parsed archives, user files, synthetic data)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

RATINGS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(), "item_id": pl.Int64(), "rating": pl.Float32(), "timestamp": pl.Int64(),
}
ITEMS_SCHEMA: dict[str, pl.DataType] = {"item_id": pl.Int64(), "title": pl.String(), "genres": pl.String()}


@dataclass
class ParsedDataset:
    """The canonical frames of one dataset; ``items`` is None when the source has no item file."""

    ratings: pl.DataFrame
    items: pl.DataFrame | None = None


__all__ = ["RATINGS_SCHEMA", "ITEMS_SCHEMA", "ParsedDataset"]
