"""The Dagster IO manager of the project: every asset is stored by :class:`flexmf_assets.storage.
VersionedStore` (immutable version folders, a ``CURRENT`` pointer switched last, ``latest.parquet``)
under ``base_dir``, a local path or an fsspec URL.

dagster-polars does not work with polars 2.x, hence this small manager on ``UPathIOManager``.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from upath import UPath

from flexmf_assets.defs.failures import as_failure
from flexmf_assets.errors import FlexMFError
from flexmf_assets.storage import POINTER, VersionedStore, _is_local, current_version


class _FlexMFUPathIOManager(dg.UPathIOManager):
    def __init__(self, base_path: UPath, store: VersionedStore):
        super().__init__(base_path=base_path)
        self.store = store

    def make_safe_partition_path(self, base_path: UPath, partition: str) -> UPath:
        from dagster._core.storage.upath_io_manager import escape_dotdot_segments, escape_leading_slash

        return base_path / escape_dotdot_segments(escape_leading_slash(partition))

    def has_output(self, context: dg.OutputContext) -> bool:  # pragma: no cover - UI helper
        return current_version(self._get_path(context)) is not None

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        version, manifest = self.store.write(path, obj)
        context.add_output_metadata({
            "storage_version": dg.MetadataValue.path(str(version)),
            "storage_kind": manifest["kind"],
        })

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        try:
            return self.store.read(path)
        except FlexMFError as exc:  # e.g. a tampered model file: one line, not a wrapped traceback
            raise as_failure(exc) from None

    def path_exists(self, path: UPath) -> bool:
        if _is_local(path):
            return (path / POINTER).exists()
        return current_version(path) is not None

    def read_partition(self, asset: str, *partition: str) -> Any:
        """Read an asset partition outside an input (e.g. the champion's table picked at run time)."""
        path = self._base_path / asset
        for part in partition:
            path = self.make_safe_partition_path(path, part)
        return self.store.read(path)


class FlexMFIOManager(dg.ConfigurableIOManagerFactory):
    """Stores every asset of the project under ``base_dir`` (a local path or an fsspec URL)."""

    base_dir: str
    retain_seconds: float = 3600.0
    #: fsspec options for a remote base_dir (e.g. {"endpoint_url": ...} for an S3-compatible store)
    storage_options: dict = {}

    def create_io_manager(self, context) -> _FlexMFUPathIOManager:
        return _FlexMFUPathIOManager(UPath(self.base_dir, **self.storage_options), VersionedStore(self.retain_seconds))
