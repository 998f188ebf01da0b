"""The dataset catalog: built-in MovieLens entries, synthetic presets and archive layouts.

A :class:`DatasetSpec` says where a dataset comes from (``url``), how to check it (``sha256``,
``size``) and how to read it (``format``). User entries from ``flexmf.yaml`` are built with
:func:`user_dataset`; the project config merges them with :func:`builtin_catalog`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Mapping

from flexmf_assets.datasets.frames import CANONICAL_COLUMNS
from flexmf_assets.datasets.synthetic import SYNTHETIC_DATASETS
from flexmf_assets.errors import ConfigError

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
MIRROR_ENV = "FLEXMF_MIRROR_URL"
MIRROR_SUMS_ENV = "FLEXMF_MIRROR_SHA256SUMS"


@dataclass(frozen=True)
class ArchiveLayout:
    """Where the ratings (and items) live inside a MovieLens-style archive and how they are written.

    Files are found by base name anywhere in the archive (``ml-10m`` unpacks to ``ml-10M100K/``).
    """

    ratings_file: str
    separator: str
    has_header: bool
    items_file: str | None = None
    items_separator: str = ","
    items_has_header: bool = True
    encoding: str = "utf-8"
    rating_scale: tuple[float, float] = (0.5, 5.0)
    rating_step: float | None = 0.5


#: the layouts of MovieLens-style archives, keyed by layout name
ARCHIVE_LAYOUTS: dict[str, ArchiveLayout] = {
    # ratings.csv + movies.csv, comma-separated with a header, UTF-8, half stars (ml-latest*, ml-20m on)
    "movielens-csv": ArchiveLayout("ratings.csv", ",", True, "movies.csv", ",", True),
    # u.data (tab) + u.item (pipe, 0/1 genre flags), no header, latin-1, whole stars (ml-100k)
    "movielens-udata": ArchiveLayout(
        "u.data", "\t", False, "u.item", "|", False, encoding="latin-1",
        rating_scale=(1.0, 5.0), rating_step=1.0,
    ),
    # ratings.dat + movies.dat ('::'), no header, latin-1, whole stars (ml-1m)
    "movielens-dat-latin1": ArchiveLayout(
        "ratings.dat", "::", False, "movies.dat", "::", False, encoding="latin-1",
        rating_scale=(1.0, 5.0), rating_step=1.0,
    ),
    # ratings.dat + movies.dat ('::'), no header, UTF-8, half stars (ml-10m)
    "movielens-dat": ArchiveLayout("ratings.dat", "::", False, "movies.dat", "::", False),
}

#: the archive formats a dataset entry may name: the MovieLens release whose zip it is packed like,
#: mapped to that release's layout (a built-in entry's format is its own name)
ARCHIVE_FORMATS: dict[str, ArchiveLayout] = {
    fmt: ARCHIVE_LAYOUTS[layout] for fmt, layout in (
        ("ml-latest-small", "movielens-csv"), ("ml-latest", "movielens-csv"), ("ml-100k", "movielens-udata"),
        ("ml-1m", "movielens-dat-latin1"), ("ml-10m", "movielens-dat"), ("ml-20m", "movielens-csv"),
        ("ml-25m", "movielens-csv"), ("ml-32m", "movielens-csv"),
    )
}
#: the formats of a single file read with a column mapping
PLAIN_FORMATS = ("csv", "parquet")
#: the format of the built-in generated datasets (never a user's)
SYNTHETIC_FORMAT = "synthetic"
#: the formats a user's dataset entry may name
USER_FORMATS = (*ARCHIVE_FORMATS, *PLAIN_FORMATS)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset the code location offers (a ``dataset`` partition).

    name: partition key.
    url: ``http(s)://`` or ``file://`` location of the archive or file; None for synthetic data.
    format: a key of :data:`ARCHIVE_FORMATS` (a zip in that MovieLens release's layout), a plain
        file format of :data:`PLAIN_FORMATS` (read with ``columns``) or :data:`SYNTHETIC_FORMAT`.
    sha256, size: expected checksum and byte size, when known; a mismatch is an error.
    columns: for csv/parquet, canonical column -> source column (``user_id``, ``item_id``,
        ``rating`` required; ``timestamp`` optional).
    separator, has_header: for csv.
    rating_scale, rating_step: the declared scale, checked by validation.
    preset: for synthetic entries, the generator preset name.
    builtin: True for catalog entries (their checksums are enforced, never skipped).
    """

    name: str
    format: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    columns: Mapping[str, str] | None = None
    separator: str = ","
    has_header: bool = True
    rating_scale: tuple[float, float] = (0.5, 5.0)
    rating_step: float | None = 0.5
    preset: str | None = None
    builtin: bool = False
    description: str = ""

    @property
    def layout(self) -> ArchiveLayout | None:
        return ARCHIVE_FORMATS.get(self.format)

    @property
    def is_synthetic(self) -> bool:
        return self.format == SYNTHETIC_FORMAT


def _ml(name: str, size: int | None = None, sha256: str | None = None, desc: str = "") -> DatasetSpec:
    layout = ARCHIVE_FORMATS[name]
    return DatasetSpec(
        name=name,
        format=name,
        url=f"{GROUPLENS_BASE_URL}{name}.zip",
        sha256=sha256,
        size=size,
        rating_scale=layout.rating_scale,
        rating_step=layout.rating_step,
        builtin=True,
        description=desc,
    )


_BUILTIN_MOVIELENS = (
    _ml("ml-latest-small", 978202, "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        "MovieLens latest small: 100,836 ratings, 610 users, 9,724 movies"),
    _ml("ml-100k", 4924029, "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        "MovieLens 100K (1998): 100,000 ratings, 943 users, 1,682 movies"),
    _ml("ml-1m", 5917549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "MovieLens 1M (2003): 1,000,209 ratings, 6,040 users, 3,706 movies"),
    _ml("ml-10m", desc="MovieLens 10M (2009): 10,000,054 ratings, 69,878 users, 10,677 movies"),
    _ml("ml-20m", 198702078, "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        "MovieLens 20M (2015): 20,000,263 ratings"),
    _ml("ml-25m", 261978986, "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        "MovieLens 25M (2019): 25,000,095 ratings"),
    _ml("ml-32m", desc="MovieLens 32M (2024): 32,000,204 ratings"),
)

#: the built-in generated datasets: every named preset of datasets.synthetic
SYNTHETIC_PRESETS = tuple(SYNTHETIC_DATASETS)


def _synthetic(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name, format=SYNTHETIC_FORMAT, preset=name, builtin=True,
        description=f"Seeded synthetic ratings shaped like MovieLens ({name.split('-')[1]} ratings)",
    )


def _read_sums(path: str) -> dict[str, str]:
    """Parse a ``sha256sum``-style file: '<hex>  <file name>' per line."""
    sums: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2 or len(parts[0]) != 64:
                    raise ConfigError(f"{MIRROR_SUMS_ENV}: {path} line {lineno} is not '<sha256>  <file>'")
                sums[parts[1].lstrip("*")] = parts[0].lower()
    except OSError as exc:
        raise ConfigError(f"{MIRROR_SUMS_ENV}: cannot read {path}: {exc.strerror}") from None
    return sums


def builtin_catalog(env: Mapping[str, str] | None = None) -> dict[str, DatasetSpec]:
    """The built-in entries, with ``FLEXMF_MIRROR_URL`` applied to the MovieLens ones.

    A mirror normally serves byte-identical archives, so the catalog checksums still apply. A
    mirror that repacks them publishes its own sums: ``FLEXMF_MIRROR_SHA256SUMS`` names a
    ``sha256sum``-style file whose entries replace the catalog's checksum (and drop the size) of
    the archives it lists.
    """
    env = os.environ if env is None else env
    mirror = env.get(MIRROR_ENV, "").strip()
    sums = _read_sums(env[MIRROR_SUMS_ENV]) if env.get(MIRROR_SUMS_ENV, "").strip() else {}
    out: dict[str, DatasetSpec] = {}
    for spec in _BUILTIN_MOVIELENS:
        if mirror:
            spec = replace(spec, url=mirror.rstrip("/") + "/" + f"{spec.name}.zip")
        file_name = f"{spec.name}.zip"
        if file_name in sums:
            spec = replace(spec, sha256=sums[file_name], size=None)
        out[spec.name] = spec
    for name in SYNTHETIC_PRESETS:
        out[name] = _synthetic(name)
    return out


_USER_KEYS = ("url", "format", "sha256", "size", "columns", "separator", "has_header",
              "rating_scale", "rating_step", "description")

#: a dataset name is a partition key, a cache folder and part of file names: one rule for all of them
DATASET_NAME_RULE = ("1 to 64 characters among letters, digits, '.', '_' and '-', starting with a "
                     "letter or digit, without '..'")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_dataset_name(name: object, where: str = "flexmf.yaml") -> str:
    """``name`` if it is a valid dataset name (see :data:`DATASET_NAME_RULE`), else ConfigError."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{where} datasets: invalid dataset name {name!r}: use {DATASET_NAME_RULE}")
    return name


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _columns(at: str, fmt: str, columns: object) -> dict[str, str] | None:
    """The validated column mapping of a csv/parquet entry (None for archive layouts)."""
    from flexmf_assets.flexmf.config_base import suggest

    if fmt not in PLAIN_FORMATS:
        if columns is not None:
            raise ConfigError(f"{at}.columns: only csv/parquet formats take a column mapping")
        return None
    if not isinstance(columns, Mapping):
        raise ConfigError(f"{at}.columns: format {fmt!r} needs a column mapping, e.g. "
                          "{user_id: userId, item_id: movieId, rating: rating, timestamp: ts}"
                          + (f"; got {_type_name(columns)} {columns!r}" if columns is not None else ""))
    for key, source in columns.items():
        if key not in CANONICAL_COLUMNS:
            raise ConfigError(f"{at}.columns: unknown canonical column {key!r}"
                              f"{suggest(str(key), list(CANONICAL_COLUMNS))}; "
                              f"valid: {', '.join(CANONICAL_COLUMNS)}")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{at}.columns.{key}: expected the name of a column of the file (a "
                              f"non-empty string), got {_type_name(source)} {source!r}")
    missing = [c for c in ("user_id", "item_id", "rating") if c not in columns]
    if missing:
        raise ConfigError(f"{at}.columns: missing required column{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(repr, missing))} (user_id, item_id and rating are required, "
                          f"timestamp is optional)")
    sources = list(columns.values())
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise ConfigError(f"{at}.columns: column {twice[0]!r} is mapped to more than one canonical column")
    return {str(k): str(v) for k, v in columns.items()}


def user_dataset(name: str, entry: Mapping[str, object], *, where: str = "flexmf.yaml") -> DatasetSpec:
    """Build a :class:`DatasetSpec` from a ``flexmf.yaml`` ``datasets:`` entry, validating it.

    Every field has a strict type (a boolean is a YAML boolean, a list a list, a number a finite
    number); any violation is a one-line :class:`ConfigError` naming the field.
    """
    from flexmf_assets.flexmf.config_base import check_known, suggest

    check_dataset_name(name, where)
    at = f"{where} datasets.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{at}: expected a mapping with url and format, got {type(entry).__name__}")
    check_known(entry, _USER_KEYS, prefix=f"{at}: ")
    url = entry.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "file://")):
        raise ConfigError(f"{at}.url: must be an http://, https:// or file:// URL, got {url!r}")
    fmt = entry.get("format")
    if not isinstance(fmt, str) or fmt not in USER_FORMATS:
        raise ConfigError(f"{at}.format: {fmt!r} is not one of {', '.join(USER_FORMATS)}"
                          f"{suggest(str(fmt), list(USER_FORMATS))}")
    sha = entry.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise ConfigError(f"{at}.sha256: expected 64 hex digits, got {sha!r}")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ConfigError(f"{at}.size: expected a positive integer (bytes), got {size!r}")
    columns = _columns(at, fmt, entry.get("columns"))
    layout = ARCHIVE_FORMATS.get(fmt)
    scale = entry.get("rating_scale", layout.rating_scale if layout else (0.5, 5.0))
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2 or not all(map(_is_number, scale))
            or not all(map(math.isfinite, scale)) or scale[0] >= scale[1]):
        raise ConfigError(f"{at}.rating_scale: expected [low, high], two finite numbers with low < high, "
                          f"got {scale!r}")
    step = entry.get("rating_step", layout.rating_step if layout else None)
    if step is not None and (not _is_number(step) or not math.isfinite(step) or step <= 0):
        raise ConfigError(f"{at}.rating_step: expected a finite positive number or null, got {step!r}")
    sep = entry.get("separator", ",")
    if not isinstance(sep, str) or not sep or any(c in sep for c in '\r\n"'):
        raise ConfigError(f"{at}.separator: expected a non-empty string without quotes or line breaks, "
                          f"got {_type_name(sep)} {sep!r}")
    has_header = entry.get("has_header", True)
    if not isinstance(has_header, bool):
        raise ConfigError(f"{at}.has_header: expected a boolean (true or false, unquoted), "
                          f"got {_type_name(has_header)} {has_header!r}")
    description = entry.get("description", "")
    if description is not None and not isinstance(description, str):
        raise ConfigError(f"{at}.description: expected a string, got {_type_name(description)} {description!r}")
    return DatasetSpec(
        name=name,
        format=fmt,
        url=url,
        sha256=sha.lower() if isinstance(sha, str) else None,
        size=size,  # type: ignore[arg-type]
        columns=columns,
        separator=sep,
        has_header=has_header,
        rating_scale=(float(scale[0]), float(scale[1])),
        rating_step=float(step) if step is not None else None,
        builtin=False,
        description=description or "",
    )


__all__ = [
    "ArchiveLayout", "DatasetSpec", "ARCHIVE_LAYOUTS", "ARCHIVE_FORMATS", "PLAIN_FORMATS", "SYNTHETIC_FORMAT",
    "USER_FORMATS",
    "SYNTHETIC_PRESETS", "CANONICAL_COLUMNS", "GROUPLENS_BASE_URL", "MIRROR_ENV", "MIRROR_SUMS_ENV",
    "DATASET_NAME_RULE", "builtin_catalog", "check_dataset_name", "user_dataset",
]
