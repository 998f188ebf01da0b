"""The versioned store behind the IO manager: atomic pointer switch, crash safety, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
from upath import UPath

from flexmf_assets.storage import POINTER, VersionedStore, current_version


def frame(n: int, value: int) -> pl.DataFrame:
    return pl.DataFrame({"user_id": list(range(n)), "v": [value] * n})


def test_round_trip_of_each_kind(tmp_path):
    store = VersionedStore()
    base = UPath(tmp_path)
    store.write(base / "f", frame(3, 1))
    assert store.read(base / "f").equals(frame(3, 1))
    bundle = {"train": frame(2, 1), "test": frame(1, 2)}
    store.write(base / "b", bundle)
    out = store.read(base / "b")
    assert set(out) == {"train", "test"} and out["test"].equals(frame(1, 2))
    store.write(base / "j", {"sha256": "ab", "size": 3})
    assert store.read(base / "j") == {"sha256": "ab", "size": 3}
    with pytest.raises(TypeError, match="cannot store a set"):
        store.write(base / "x", {1, 2})


def test_nothing_materialized_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing materialized yet"):
        VersionedStore().read(UPath(tmp_path) / "missing")


class CrashingStore(VersionedStore):
    """A writer that dies after writing its version and before switching the pointer."""

    def _commit(self, partition_dir, name):
        raise RuntimeError("simulated crash between write and pointer switch")


def test_crash_between_write_and_pointer_switch_keeps_previous(tmp_path):
    store = VersionedStore()
    part = UPath(tmp_path) / "asset" / "p"
    store.write(part, frame(5, 1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashingStore().write(part, frame(5, 2))
    assert store.read(part).equals(frame(5, 1))  # previous materialization still readable
    store.write(part, frame(5, 3))  # the next run succeeds
    assert store.read(part).equals(frame(5, 3))


def test_pointer_names_a_complete_version_and_old_versions_are_pruned(tmp_path):
    store = VersionedStore(retain_seconds=0)
    part = UPath(tmp_path) / "p"
    for i in range(3):
        store.write(part, frame(2, i))
    versions = sorted(p.name for p in Path(tmp_path, "p").iterdir() if p.name.startswith("v-"))
    assert len(versions) == 1
    assert (Path(tmp_path, "p", POINTER).read_text().strip()) == versions[0]
    manifest = json.loads((current_version(part) / "manifest.json").read_text())
    assert manifest == {"kind": "frame", "files": ["data.parquet"], "rows": 2}


def test_corrupt_pointer_is_rejected(tmp_path):
    part = Path(tmp_path, "p")
    part.mkdir()
    (part / POINTER).write_text("../../etc")
    with pytest.raises(ValueError, match="corrupt pointer"):
        VersionedStore().read(UPath(part))


def _writer(path: str, value: int, n: int) -> None:
    store = VersionedStore()
    for _ in range(n):
        store.write(UPath(path), frame(20_000, value))


def test_same_partition_written_concurrently_is_never_torn(tmp_path):
    part = str(tmp_path / "same")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(part, v, 4)) for v in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    out = VersionedStore().read(UPath(part))
    assert out.height == 20_000 and out["v"].n_unique() == 1 and out["v"][0] in (1, 2)


class _HangingStore(VersionedStore):
    """Writes the version's files, says so, then never finishes: a write to kill or to race with."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def _dump(self, obj, folder):
        manifest = super()._dump(obj, folder)
        Path(self.marker).write_text(folder.name)
        time.sleep(600)
        return manifest


def _hanging_writer(path: str, marker: str) -> None:
    _HangingStore(marker).write(UPath(path), frame(200_000, 9))


def _start_hanging_writer(ctx, part: Path, marker: Path):
    proc = ctx.Process(target=_hanging_writer, args=(str(part), str(marker)))
    proc.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "the writer never reached its data files"
        time.sleep(0.05)
    return proc, marker.read_text()


def test_killed_write_is_pruned_by_the_next_write_but_a_live_writer_is_not(tmp_path):
    part = tmp_path / "p"
    store = VersionedStore()  # default grace: superseded versions stay an hour for readers
    first, _ = store.write(UPath(part), frame(3, 1))
    ctx = mp.get_context("spawn")
    killed, killed_name = _start_hanging_writer(ctx, part, tmp_path / "killed")
    alive, alive_name = _start_hanging_writer(ctx, part, tmp_path / "alive")
    try:
        os.kill(killed.pid, signal.SIGKILL)  # killed mid-write: data written, no manifest, no pointer
        killed.join(30)
        assert killed.exitcode == -signal.SIGKILL
        assert (part / killed_name / "data.parquet").stat().st_size > 100_000
        assert not (part / killed_name / "manifest.json").exists()
        stray = part / f"v-{time.time_ns():020d}-0000000s"  # no manifest, no lock: a remote-style writer
        stray.mkdir()

        second, _ = store.write(UPath(part), frame(3, 2))
        names = {p.name for p in part.iterdir()}
        assert killed_name not in names and f".{killed_name}.lock" not in names  # the killed write is gone
        assert alive_name in names and f".{alive_name}.lock" in names  # a writer still at work is not
        assert {first.name, second.name, stray.name} <= names  # superseded: kept through the grace period
        assert store.read(UPath(part)).equals(frame(3, 2))
    finally:
        alive.kill()
        alive.join(30)
    store.write(UPath(part), frame(3, 3))  # once its writer is dead, the next write removes it too
    assert not (part / alive_name).exists() and not (part / f".{alive_name}.lock").exists()
    assert store.read(UPath(part)).equals(frame(3, 3))
