"""Trust and robustness of the kernel library's build and load (flexmf/_native.py).

Loading a shared object runs its constructors, so a library planted in the kernel cache must never
be loaded: each planted library here has a constructor that writes a marker file, and the marker
must never appear while training still works (a private rebuild). A compiler that hangs, writes
garbage, or builds a library missing an entry point or computing wrong numbers must not hang
training nor leave anything in the cache, and a later normal build must work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flexmf_assets.flexmf import FlexMFExplicitScorer, _native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the torch engine trains")

NOBODY = 65534


@pytest.fixture(scope="module")
def ratings() -> pl.DataFrame:
    rng = np.random.default_rng(5)
    frame = pl.DataFrame({"user_id": rng.integers(0, 40, 900), "item_id": rng.integers(0, 30, 900)})
    frame = frame.unique(["user_id", "item_id"], maintain_order=True)
    return frame.with_columns(rating=pl.Series(rng.integers(1, 11, frame.height) / 2))


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """A process that has not loaded the kernels yet, its cache under tmp_path, private builds under
    tmp_path/tmp (so the test can see that none is left behind)."""
    _new_process(monkeypatch)
    monkeypatch.setenv("FLEXMF_NATIVE", "1")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("FLEXMF_NATIVE_BUILD_TIMEOUT", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXMF_NATIVE_CACHE", str(cache))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return cache


def _new_process(monkeypatch) -> None:
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_status", "not loaded yet")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _native.__name__ and r.levelno == logging.WARNING]


def _trains_natively(ratings) -> None:
    model = FlexMFExplicitScorer(embedding_size=4, epochs=3, device="cpu").fit(ratings)
    assert model.engine == "native"
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]


def _planted_library(where: Path) -> tuple[Path, Path]:
    """A shared object whose constructor writes `where/RAN` when it is loaded."""
    marker = where / "RAN"
    (where / "planted.c").write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    FILE *f = fopen("{marker}", "w");\n'
        '    if (f) { fputs("planted code ran\\n", f); fclose(f); }\n'
        "}\n"
    )
    lib = where / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(where / "planted.c")], check=True)
    return lib, marker


def _plant(cache: Path, lib: Path, digest: str | None = None, mode: int = 0o755, symlink: bool = False) -> Path:
    """Put `lib` in `cache` where the loader looks: the record of this machine's key names it by its
    sha256 (or by a forged `digest`); also under the pre-record name that older versions loaded."""
    key = _native._key("cc")
    digest = digest or hashlib.sha256(lib.read_bytes()).hexdigest()
    cache.mkdir(mode=0o700, exist_ok=True)
    (cache / _native._record_name(key)).write_text(digest + "\n")
    target = cache / _native._library_name(key, digest)
    if symlink:
        target.symlink_to(lib)
    else:
        shutil.copyfile(lib, target)
        target.chmod(mode)
    shutil.copyfile(lib, cache / f"flexmf_kernels_{key}.so")
    return target


def _assert_cache_trustworthy(cache: Path, planted: bytes) -> None:
    """The cache's record names a library whose bytes hash to it, and no planted bytes are left in
    the cache but under the pre-record name (never loaded)."""
    key = _native._key("cc")
    digest = (cache / _native._record_name(key)).read_text().strip()
    library = cache / _native._library_name(key, digest)
    assert not library.is_symlink() and hashlib.sha256(library.read_bytes()).hexdigest() == digest
    leftovers = [p.name for p in cache.iterdir() if p.is_file() and not p.is_symlink() and p.read_bytes() == planted]
    assert leftovers == [f"flexmf_kernels_{key}.so"]


# (plant arguments, a fragment of the reason in native_status())
FILE_CASES = {
    "wrong-hash": ({"digest": hashlib.sha256(b"the library this user built").hexdigest()}, "not the recorded"),
    "group-writable": ({"mode": 0o775}, "writable by others (mode 775)"),
    "world-writable": ({"mode": 0o757}, "writable by others (mode 757)"),
    "symlink": ({"symlink": True}, "is a symbolic link"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_planted_library_in_the_cache_never_runs(fresh, ratings, tmp_path, monkeypatch, caplog, case):
    plant_args, reason = FILE_CASES[case]
    lib, marker = _planted_library(tmp_path)
    _plant(fresh, lib, **plant_args)
    with caplog.at_level(logging.WARNING):
        _trains_natively(ratings)
    assert not marker.exists(), "the planted library's constructor ran"
    assert _native.status().startswith("loaded (cached kernel library refused: ")
    assert reason in _native.status() and _native.status().endswith("; rebuilt it)")
    assert _warnings(caplog) == ["flexmf: " + _native.status()[len("loaded ("):-1]]
    _assert_cache_trustworthy(fresh, lib.read_bytes())
    # the next process loads the rebuilt library from the cache without a warning
    _new_process(monkeypatch)
    assert _native.kernels() is not None and _native.status() == "loaded"


def test_a_library_owned_by_another_user_never_runs(fresh, ratings, tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    lib, marker = _planted_library(tmp_path)
    os.chown(_plant(fresh, lib), NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING):
        _trains_natively(ratings)
    assert not marker.exists()
    assert f"is owned by uid {NOBODY}, not by this user (uid 0)" in _native.status()
    assert len(_warnings(caplog)) == 1
    _assert_cache_trustworthy(fresh, lib.read_bytes())


def test_a_tampered_record_is_refused(fresh, ratings, tmp_path, caplog):
    """A record others can write (here naming the planted library by its true hash) is refused."""
    lib, marker = _planted_library(tmp_path)
    _plant(fresh, lib)
    record = fresh / _native._record_name(_native._key("cc"))
    record.chmod(0o666)
    with caplog.at_level(logging.WARNING):
        _trains_natively(ratings)
    assert not marker.exists()
    assert f"{record} is writable by others (mode 666)" in _native.status()
    assert len(_warnings(caplog)) == 1
    assert not (record.stat().st_mode & 0o022)  # replaced by this user's record


def _untrusted_dir(kind: str, cache: Path, tmp_path: Path) -> str:
    """Make the cache directory untrusted; returns a fragment of the reason."""
    if kind == "world-writable-dir":
        cache.chmod(0o777)
        return "writable by others (mode 777)"
    if kind == "group-writable-dir":
        cache.chmod(0o770)
        return "writable by others (mode 770)"
    if kind == "sticky-tmp-like-dir":
        cache.chmod(0o1777)
        return "writable by others (mode 1777)"
    if kind == "symlinked-dir":
        real = tmp_path / "real-cache"
        cache.rename(real)
        cache.symlink_to(real)
        return "is a symbolic link"
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    os.chown(cache, NOBODY, NOBODY)
    return f"is owned by uid {NOBODY}, not by this user"


@pytest.mark.parametrize("kind", ["world-writable-dir", "group-writable-dir", "sticky-tmp-like-dir", "symlinked-dir",
                                  "other-owner-dir"])
def test_an_untrusted_cache_directory_is_never_loaded_from_nor_written(fresh, ratings, tmp_path, caplog, kind):
    """A self-consistent plant (its record holds its true hash, good modes) in a directory others
    control: refused; the kernels are built in a private temporary directory, nothing is cached."""
    lib, marker = _planted_library(tmp_path)
    _plant(fresh, lib)
    reason = _untrusted_dir(kind, fresh, tmp_path)
    before = sorted(p.name for p in fresh.iterdir())
    with caplog.at_level(logging.WARNING):
        _trains_natively(ratings)
    assert not marker.exists()
    status = _native.status()
    assert status.startswith("loaded (kernel cache refused: ") and reason in status
    assert status.endswith("; built the kernels in a private temporary directory (not cached))")
    assert len(_warnings(caplog)) == 1
    assert sorted(p.name for p in fresh.iterdir()) == before  # nothing written to the refused directory
    assert not any((tmp_path / "tmp").iterdir())  # the private build directory is gone


def test_a_new_cache_directory_is_private(fresh):
    assert _native.kernels() is not None and _native.status() == "loaded"
    assert fresh.stat().st_mode & 0o777 == 0o700
    record = fresh / _native._record_name(_native._key("cc"))
    digest = record.read_text().strip()
    library = fresh / _native._library_name(_native._key("cc"), digest)
    assert hashlib.sha256(library.read_bytes()).hexdigest() == digest
    assert not (record.stat().st_mode & 0o022) and not (library.stat().st_mode & 0o022)
    assert sorted(p.name for p in fresh.iterdir()) == sorted([record.name, library.name])  # no build leftovers


# ---------------------------------------------------------------------------------------------------------
# compilers that hang or lie


def _fake_compiler(tmp_path: Path, body: str) -> Path:
    """A $CC shell script; `$out` is the -o argument, `$src` the kernels' source."""
    script = tmp_path / "fake-cc"
    script.write_text(
        "#!/bin/sh\nout=; src=; prev=\nfor a in \"$@\"; do\n"
        '  [ "$prev" = "-o" ] && out="$a"\n  case "$a" in *_kernels.c) src="$a";; esac\n  prev="$a"\ndone\n'
        + body
    )
    script.chmod(0o755)
    return script


def _assert_cache_empty_then_normal_build_works(cache: Path, monkeypatch) -> None:
    assert not cache.exists() or list(cache.iterdir()) == []
    _new_process(monkeypatch)
    monkeypatch.delenv("CC")
    monkeypatch.delenv("FLEXMF_NATIVE_BUILD_TIMEOUT", raising=False)
    assert _native.kernels() is not None and _native.status() == "loaded"


def _running(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_hanging_compiler_times_out_and_the_torch_engine_trains(fresh, ratings, tmp_path, monkeypatch, caplog):
    pidfile = tmp_path / "compiler.pid"
    cc = _fake_compiler(tmp_path, f'sleep 600 &\necho $! > "{pidfile}"\nwait\n')
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("FLEXMF_NATIVE_BUILD_TIMEOUT", "1.5")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        model = FlexMFExplicitScorer(embedding_size=4, epochs=2, device="cpu").fit(ratings)
    assert time.monotonic() - start < 30
    assert model.engine == "torch" and model.history[-1]["train_loss"] > 0
    assert _native.status() == (f"unavailable: {cc} did not finish compiling _kernels.c within 1.5 s "
                                "(FLEXMF_NATIVE_BUILD_TIMEOUT)")
    assert len(_warnings(caplog)) == 1
    # the compiler's own children were killed with it (a zombie awaiting its reaper is dead too)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
    _assert_cache_empty_then_normal_build_works(fresh, monkeypatch)


BROKEN_COMPILERS = {
    "random-bytes": ('head -c 65536 /dev/urandom > "$out"\nexit 0\n', "invalid ELF header"),
    "missing-entry-point": (
        'echo "void flexmf_contains(void) {}" > "$out.c"\nexec cc -shared -fPIC -o "$out" "$out.c"\n',
        "it lacks the entry point flexmf_explicit_epoch",
    ),
    "wrong-numbers": (  # the real kernels with the explicit error's sign flipped
        'sed "s/resid\\[j\\] - dotf/resid[j] + dotf/" "$src" > "$out.c"\n'
        'grep -q "resid\\[j\\] + dotf" "$out.c" || exit 1\n'
        'for a in "$@"; do shift; [ "$a" = "$src" ] && a="$out.c"; set -- "$@" "$a"; done\n'
        'exec cc "$@"\n',
        # the error is 5 + 4 = 9 instead of 1: loss 81, P = [1, 2] + 0.9 Q, Q = [3, 0.5] + 0.9 P
        "its self-test computed [81.0, 3.7, 2.45, 3.9, 2.3, 1, 0, 1, 0, 0, 0,",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_COMPILERS))
def test_a_broken_build_caches_nothing_and_the_torch_engine_trains(fresh, ratings, tmp_path, monkeypatch, caplog,
                                                                   case):
    body, reason = BROKEN_COMPILERS[case]
    cc = _fake_compiler(tmp_path, body)
    monkeypatch.setenv("CC", str(cc))
    with caplog.at_level(logging.WARNING):
        model = FlexMFExplicitScorer(embedding_size=4, epochs=2, device="cpu").fit(ratings)
    assert model.engine == "torch"
    status = _native.status()
    assert status.startswith(f"unavailable: {cc} built an unusable kernel library (") and reason in status
    assert status.endswith("); nothing was cached")
    assert len(_warnings(caplog)) == 1
    _assert_cache_empty_then_normal_build_works(fresh, monkeypatch)


def test_a_bad_build_timeout_setting_is_named(fresh, monkeypatch, caplog):
    monkeypatch.setenv("FLEXMF_NATIVE_BUILD_TIMEOUT", "two minutes")
    with caplog.at_level(logging.WARNING):
        assert _native.kernels() is None
    assert _native.status() == ("unavailable: FLEXMF_NATIVE_BUILD_TIMEOUT='two minutes' is not a positive number "
                                "of seconds")
    assert len(_warnings(caplog)) == 1
