"""Our storage layer: polars frames, frame bundles, JSON records and models, written atomically.

Each asset partition lives in a folder holding immutable version folders and a ``CURRENT`` pointer:

    <base>/<asset key>/<dataset>/<hparams>/CURRENT          -> "v-<ns>-<id>"
    <base>/<asset key>/<dataset>/<hparams>/latest.parquet   the newest table (frames only)
    <base>/<asset key>/<dataset>/<hparams>/v-<ns>-<id>/manifest.json, data.parquet | <name>.parquet | model/

A writer fills a fresh version folder, writes ``manifest.json`` last, then replaces ``CURRENT``
(``os.replace`` locally; a single PUT on object stores). Readers follow ``CURRENT``, so a run killed
mid-write leaves the previous materialization readable, and two writers of one partition never tear
each other's files: the last pointer written wins. Superseded versions are pruned after a grace period;
a killed write's folder (no manifest, its writer's lock free) on the next successful write of the partition.

Plain library code (no Dagster): the Dagster IO manager in ``defs/io_managers.py`` stores every asset
through :class:`VersionedStore`, and ``flexmf leaderboard`` or a notebook reads the same way.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
from upath import UPath

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock (Windows): killed writes are pruned by age only
    fcntl = None

from flexmf_assets.errors import ConfigError
from flexmf_assets.files import atomic_write_text
from flexmf_assets.flexmf.model_files import parse_json

POINTER = "CURRENT"
#: the newest table of a partition, at a stable path (see VersionedStore._publish_latest)
LATEST = "latest.parquet"
MANIFEST = "manifest.json"
#: what a ``CURRENT`` pointer may hold: one version folder name (no dots, no separators)
_VERSION_NAME = re.compile(r"v-[A-Za-z0-9_-]{1,200}")
#: the largest manifest.json and value.json read, in bytes
MANIFEST_LIMIT = 1 << 20
VALUE_LIMIT = 64 << 20

#: model classes the manager may load: name -> module (never arbitrary import paths from disk)
MODEL_CLASSES = {
    "FlexMFExplicitScorer": "flexmf_assets.flexmf.explicit",
    "FlexMFImplicitScorer": "flexmf_assets.flexmf.implicit",
}


def _is_local(path: UPath) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


def _local(path: UPath) -> Path:
    return Path(path.path if hasattr(path, "path") else str(path))


def _atomic_write_text(path: UPath, text: str) -> None:
    if _is_local(path):
        atomic_write_text(_local(path), text, fsync=True)
    else:  # object stores: a single PUT is atomic
        path.write_text(text, encoding="utf-8")


def _read_limited(path: UPath, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path`` (one plain GET on object stores); more is an error."""
    if _is_local(path):
        with open(_local(path), "rb") as fh:
            data = fh.read(limit + 1)
    else:  # never a cached listing/HEAD (see current_version)
        data = path.fs.cat_file(path.path)
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than the limit of {limit} bytes")
    return data


def current_version(partition_dir: UPath) -> UPath | None:
    """The version folder ``CURRENT`` points at, or None when nothing was materialized."""
    pointer = partition_dir / POINTER
    if _is_local(pointer):
        if not pointer.exists():
            return None
    try:  # object stores: one plain GET; never a cached listing/HEAD (a long-lived worker would see a
        # stale pointer, and s3fs's open() sends If-Match with the cached ETag: PreconditionFailed)
        raw = _read_limited(pointer, 256)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{pointer}: corrupt pointer (a directory, not a file)") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _VERSION_NAME.fullmatch(name):
        raise ConfigError(f"{pointer}: corrupt pointer {raw[:80]!r}; expected a version folder name 'v-...'")
    return partition_dir / name


def _bundle_file(name: Any) -> bool:
    """A file name a frame bundle's manifest may list: ``<identifier>.parquet``, as :meth:`VersionedStore._dump`
    writes (so never a path out of the version folder)."""
    return isinstance(name, str) and name.endswith(".parquet") and name[: -len(".parquet")].isidentifier()


def _lock_path(partition_dir: UPath, name: str) -> Path:
    return _local(partition_dir) / f".{name}.lock"


def _take_write_lock(partition_dir: UPath, name: str):
    """Local stores: an exclusive flock on ``<partition>/.<version>.lock``, taken before the version
    folder exists and held until the write returns. The kernel drops it when the writer dies, so a free
    lock beside a folder without a manifest marks a killed write (see ``VersionedStore._prune``)."""
    if fcntl is None or not _is_local(partition_dir):
        return None
    path = _lock_path(partition_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 - released by _release_write_lock (or the writer's death)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _release_write_lock(partition_dir: UPath, name: str, handle) -> None:
    if handle is not None:
        _lock_path(partition_dir, name).unlink(missing_ok=True)
        handle.close()


def _killed_write(partition_dir: UPath, version: UPath) -> bool:
    """True when ``version`` is a write whose writer died before committing: its lock file is there
    and free, and (checked after the lock: a writer writes the manifest before it lets go) it has no
    manifest. False for a writer still at work, a complete version, or a folder without a lock file."""
    if fcntl is None or not _is_local(version):
        return False
    try:
        handle = open(_lock_path(partition_dir, version.name))  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
    return not (version / MANIFEST).exists()


def read_manifest(version_dir: UPath) -> dict[str, Any]:
    """The version's manifest.json, checked; a missing version folder or manifest is a one-line
    :class:`ConfigError` naming the path (``CURRENT`` names a version that is not there)."""
    path = version_dir / MANIFEST
    try:
        data = _read_limited(path, MANIFEST_LIMIT)
    except (FileNotFoundError, NotADirectoryError):
        missing = version_dir if _is_local(version_dir) and not _local(version_dir).is_dir() else path
        raise ConfigError(f"{missing}: does not exist, but {version_dir.parent / POINTER} names it "
                          "(the partition's storage is damaged; rematerialize it)") from None
    manifest = parse_json(data, path)
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    kind, files = manifest.get("kind"), manifest.get("files")
    if kind not in ("frame", "frames", "json", "model"):
        raise ConfigError(f"{path}: unknown kind {str(kind)[:60]!r}")
    if kind == "frames" and not (isinstance(files, list) and files and all(map(_bundle_file, files))):
        raise ConfigError(f"{path}: field 'files' must list plain '<name>.parquet' file names, "
                          f"got {str(files)[:80]}")
    return manifest


class VersionedStore:
    """The write/read protocol described in the module docstring, usable without Dagster too."""

    def __init__(self, retain_seconds: float = 3600.0):
        self.retain_seconds = retain_seconds

    # -- writing ----------------------------------------------------------------------
    def write(self, partition_dir: UPath, obj: Any) -> tuple[UPath, dict]:
        name = f"v-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        version = partition_dir / name
        lock = _take_write_lock(partition_dir, name)  # released on return, or when the writer dies
        if _is_local(version):
            _local(version).mkdir(parents=True, exist_ok=False)
            manifest = self._dump(obj, _local(version))
        else:
            with tempfile.TemporaryDirectory(prefix="flexmf-") as tmp:
                manifest = self._dump(obj, Path(tmp))
                for file in sorted(Path(tmp).rglob("*")):
                    if file.is_file() and file.name != MANIFEST:
                        (version / file.relative_to(tmp).as_posix()).write_bytes(file.read_bytes())
        _atomic_write_text(version / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        self._commit(partition_dir, name)
        self._publish_latest(partition_dir, version, manifest)
        self._prune(partition_dir, keep=name)
        _release_write_lock(partition_dir, name, lock)
        return version, manifest

    def _commit(self, partition_dir: UPath, name: str) -> None:
        """Switch ``CURRENT`` to the complete version ``name``: the one step that publishes a write."""
        _atomic_write_text(partition_dir / POINTER, name)

    def _publish_latest(self, partition_dir: UPath, version: UPath, manifest: dict[str, Any]) -> None:
        """A stable path to the newest table(s): ``latest.parquet`` (``latest_<name>.parquet`` for a
        bundle) beside ``CURRENT``, replaced atomically after the pointer (locally a hard link to the
        version's immutable file), so DuckDB and polars read one path and a glob never double-counts."""
        if manifest["kind"] == "frame":
            pairs = [("data.parquet", LATEST)]
        elif manifest["kind"] == "frames":
            pairs = [(f, f"latest_{f}") for f in manifest["files"]]
        else:
            return
        for source, target in pairs:
            if _is_local(version):
                src, dst = _local(version / source), _local(partition_dir / target)
                tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
                try:
                    os.link(src, tmp)
                except OSError:  # no hard links here (some network file systems): a copy
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            else:  # object stores: a single PUT is atomic
                (partition_dir / target).write_bytes((version / source).read_bytes())

    def _dump(self, obj: Any, folder: Path) -> dict[str, Any]:
        if isinstance(obj, pl.DataFrame):
            obj.write_parquet(folder / "data.parquet")
            return {"kind": "frame", "files": ["data.parquet"], "rows": obj.height}
        if isinstance(obj, dict) and obj and all(isinstance(v, pl.DataFrame) for v in obj.values()):
            files = []
            for key, frame in obj.items():
                if not str(key).isidentifier():
                    raise ValueError(f"frame bundle key {key!r} is not a plain name")
                frame.write_parquet(folder / f"{key}.parquet")
                files.append(f"{key}.parquet")
            return {"kind": "frames", "files": files, "rows": {k: v.height for k, v in obj.items()}}
        cls_name = type(obj).__name__
        if cls_name in MODEL_CLASSES and hasattr(obj, "save"):
            obj.save(folder / "model")
            return {"kind": "model", "class": cls_name, "files": ["model"]}
        if isinstance(obj, dict):
            (folder / "value.json").write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            return {"kind": "json", "files": ["value.json"]}
        raise TypeError(f"cannot store a {cls_name}: expected a polars DataFrame, a dict of them, "
                        "a JSON-able dict or a FlexMF scorer")

    def _prune(self, partition_dir: UPath, keep: str) -> None:
        """Remove killed writes of the partition at once, and superseded versions older than ``keep`` and
        older than the grace period (a reader may still be reading them)."""
        now = time.time_ns()
        try:
            entries = list(partition_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            if not name.startswith("v-") or name == keep:
                continue
            killed = _killed_write(partition_dir, entry)
            if not killed:
                if name > keep:
                    continue
                try:
                    written_ns = int(name.split("-")[1])
                except (IndexError, ValueError):
                    continue
                if (now - written_ns) / 1e9 < self.retain_seconds:
                    continue
            if _is_local(entry):
                shutil.rmtree(_local(entry), ignore_errors=True)
                _lock_path(partition_dir, name).unlink(missing_ok=True)
            else:
                entry.fs.rm(entry.path, recursive=True)

    # -- reading ----------------------------------------------------------------------
    def read(self, partition_dir: UPath, *, device: Any = None) -> Any:
        """The partition's current value. Nothing materialized is a ``FileNotFoundError``; a damaged
        or forged pointer, manifest or file a one-line :class:`ConfigError` naming the path."""
        version = current_version(partition_dir)
        if version is None:
            raise FileNotFoundError(f"{partition_dir}: nothing materialized yet (no {POINTER})")
        manifest = read_manifest(version)
        kind = manifest["kind"]
        if kind == "frame":
            return self._read_parquet(version / "data.parquet")
        if kind == "frames":
            return {f[: -len(".parquet")]: self._read_parquet(version / f) for f in manifest["files"]}
        if kind == "json":
            value = version / "value.json"
            try:
                return parse_json(_read_limited(value, VALUE_LIMIT), value)
            except FileNotFoundError:
                raise ConfigError(f"{value}: does not exist, but {version / MANIFEST} lists it") from None
        cls_name = manifest.get("class")
        if not isinstance(cls_name, str) or cls_name not in MODEL_CLASSES:
            raise ConfigError(f"{version}: unknown model class {str(cls_name)[:60]!r}")
        cls = getattr(importlib.import_module(MODEL_CLASSES[cls_name]), cls_name)
        return cls.load(self._local_dir(version / "model"), device=device)

    def _read_parquet(self, path: UPath) -> pl.DataFrame:
        try:
            return pl.read_parquet(_local(path) if _is_local(path) else io.BytesIO(path.read_bytes()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: does not exist, but {path.parent / MANIFEST} lists it") from None
        except (OSError, pl.exceptions.PolarsError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"{path}: unreadable parquet file ({first})") from None

    def _local_dir(self, path: UPath) -> Path:
        if _is_local(path):
            return _local(path)
        tmp = Path(tempfile.mkdtemp(prefix="flexmf-model-"))
        path.fs.get(path.path, str(tmp), recursive=True)
        return tmp / path.name if (tmp / path.name).exists() else tmp


