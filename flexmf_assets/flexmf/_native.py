"""The fused CPU training kernels (``_kernels.c``): compiled on first use, checked, cached and loaded;
:mod:`._abi` calls them through ctypes.

Why: an eager PyTorch minibatch step on CPU is a dozen full passes over ``batch x width``
temporaries plus per-op dispatch; on a 2-core machine that caps MF training near 1M updates/s, far
from the memory-bound ceiling. The kernels do the same minibatch step (same gradients, same
optimizers, same batch semantics) in two passes, in place on the torch tensors' storage.

How: ``_kernels.c`` and ``_kernels_als.c`` (including ``_kernels.h``, the interface, and
``_kernels_rows.h``) are compiled
once per machine with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native -fopenmp``, about
a second; at most ``$FLEXMF_NATIVE_BUILD_TIMEOUT`` seconds, default 120) into
``$FLEXMF_NATIVE_CACHE`` (default ``~/.cache/flexmf-assets/native``), keyed by the source, the
headers, the flags and the CPU. No compiler, a failed build or ``FLEXMF_NATIVE=0`` means the
eager-torch engine trains instead (same results up to float rounding, slower): :func:`kernels`
returns None and :func:`status` says why. GPUs always use the torch engine.

Trust: loading a library runs its code, so only a library this user built is loaded. The cache
directory must be a real directory (not a symlink) owned by this user that nobody else can write
(created 0700); an entry is a record ``flexmf_kernels_<key>.sha256`` holding the sha256 of the
library ``flexmf_kernels_<key>-<sha256[:16]>.so``, both regular files owned by this user and not
group- or world-writable, the library's bytes hashing to the record; the descriptor that was checked
and hashed is the one loaded (no window to swap the file). A build happens in a fresh
``mkdtemp`` directory (0700) and is validated there (every entry point present, a tiny computation
with a known answer) before it is moved into the cache and the record is switched last with
``os.replace``, so concurrent processes race safely and a failed build caches nothing. A refused
cache directory means a private build that is not cached; a refused entry is rebuilt.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from flexmf_assets.flexmf import _abi

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_kernels.c")
#: every C file of the library: the minibatch kernels, the ALS solvers, the top-N scoring kernel
SOURCES = (SOURCE, Path(__file__).with_name("_kernels_als.c"), Path(__file__).with_name("_kernels_topn.c"))
#: the interface (_kernels.h, mirrored by _abi.py) and the row machinery the kernels share
HEADERS = (Path(__file__).with_name("_kernels.h"), Path(__file__).with_name("_kernels_rows.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
#: seconds a build may take (``$FLEXMF_NATIVE_BUILD_TIMEOUT`` overrides) before the torch engine trains
BUILD_TIMEOUT = 120.0

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_loaded_status = "loaded"
_status = "not loaded yet"

class _Refused(Exception):
    """A cache directory or file this process must not trust (the message says why)."""


def _cpu_key() -> str:
    """The CPU's model and feature flags (a cache built with -march=native is only valid there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$FLEXMF_NATIVE_CACHE``, else under ``~/.cache``)."""
    env = os.environ.get("FLEXMF_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexmf-assets" / "native"


def _key(cc: str) -> str:
    """The cache key of a build: the source and headers, the flags, the compiler and the CPU."""
    sources = [p.read_bytes() for p in (*SOURCES, *HEADERS)]
    return hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), cc.encode(),
                                      platform.machine().encode(), _cpu_key().encode()])).hexdigest()[:20]


def _record_name(key: str) -> str:
    return f"flexmf_kernels_{key}.sha256"


def _library_name(key: str, digest: str) -> str:
    return f"flexmf_kernels_{key}-{digest[:16]}.so"


def _check_owned(st: os.stat_result, path: Path, directory: bool = False) -> None:
    """Refuse anything but a real file (directory) of this user that no one else can write."""
    if stat.S_ISLNK(st.st_mode):
        raise _Refused(f"{path} is a symbolic link")
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        raise _Refused(f"{path} is not a {'directory' if directory else 'regular file'}")
    if st.st_uid != os.geteuid():
        raise _Refused(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise _Refused(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


def _private_cache() -> Path:
    """The cache directory (created 0700), refused unless it is this user's and nobody else can write it."""
    path = cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise _Refused(f"cannot create {path}: {exc.strerror}") from None
    _check_owned(st, path, directory=True)
    return path


def _open_checked(path: Path) -> int:
    """A descriptor of ``path``, opened without following a symlink and checked by :func:`_check_owned`."""
    try:  # O_NONBLOCK: a FIFO planted under the name must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise _Refused(f"{path} is a symbolic link") from None
        raise
    try:
        _check_owned(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as f:
        return f.read()


def _validate(lib: ctypes.CDLL) -> None:
    """Declare every entry point the engine calls and run a tiny computation whose answer is known."""
    for name in _abi.KERNELS:
        if not hasattr(lib, name):
            raise RuntimeError(f"it lacks the entry point {name}")
    _abi.declare(lib)
    # explicit SGD, one rating 5 of user 0 for item 0, learning rate 0.1, two threads: the prediction
    # [1, 2] . [3, 0.5] = 4 misses by 1, so the loss is 1, P += 0.1 * Q = [1.3, 2.05] and
    # Q += 0.1 * P = [3.1, 0.7] (both gradients taken before either row moves)
    # (every tensor is bound to a name: a temporary would be freed before the call reads it)
    P, Q, rating, err = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.5]]), torch.tensor([5.0]), torch.empty(1)
    zero = torch.zeros(1, dtype=torch.int64)
    su, si = _abi.Scratch(1, 2), _abi.Scratch(1, 2)
    train = _abi.Train(user=_abi.table(P, su, None), item=_abi.table(Q, si, None), width=2, optimizer=_abi.SGD,
                       lr=0.1, threads=2)
    args = _abi.ExplicitArgs(train=train, users=_abi.ptr(zero), items=_abi.ptr(zero), resid=_abi.ptr(rating), n=1,
                             batch=1, err=_abi.ptr(err))
    _abi.call(lib, "flexmf_explicit_epoch", args)
    got, want = [args.train.loss, *P.flatten().tolist(), *Q.flatten().tolist()], [1.0, 1.3, 2.05, 3.1, 0.7]
    # membership of 2 users x 3 items holding (0, 1) and (1, 2): bits 1 and 5, or the sorted keys 1, 5;
    # user 5 is outside the table
    users, items, keys = torch.tensor([0, 1, 5]), torch.tensor([[1, 2], [2, 0], [1, 1]]), torch.tensor([1, 5])
    for bits in (torch.tensor([0b00100010], dtype=torch.uint8), None):
        out = torch.empty(3, 2, dtype=torch.uint8)
        _abi.call(lib, "flexmf_contains", _abi.ContainsArgs(
            bits=_abi.ptr(bits), cells=6, keys=_abi.ptr(keys), n_keys=2, n_items=3, users=_abi.ptr(users),
            items=_abi.ptr(items), n=3, c=2, out=_abi.ptr(out)))
        got, want = got + out.flatten().tolist(), want + [1, 0, 1, 0, 0, 0]
    # Adam catch-up of one idle step at t = 1 (lr 0.1, no decay) of p, m, v = 1, 0.5, 0.25:
    # p -= step * q * m / sqrt(v) with step = 0.1 sqrt(1 - 0.999) / (1 - 0.9) and q = 0.9 / sqrt(0.999)
    # (= 0.9715255), m *= 0.9, v *= 0.999
    state, last = torch.tensor([[1.0, 0.5, 0.25]]), torch.zeros(1, dtype=torch.int64)
    none = torch.empty(0, 1)
    flush = _abi.Train(user=_abi.table(state, _abi.Scratch(1, 1), None, last),
                       item=_abi.table(none, _abi.Scratch(0, 1), None), width=1, optimizer=_abi.ADAM, lr=0.1,
                       step=1, threads=1)
    _abi.call(lib, "flexmf_adam_flush", flush)
    got, want = got + [*state.flatten().tolist(), float(last)], want + [0.9715255, 0.45, 0.24975, 1.0]
    # top-2 of user [1, 2] over items [1, 0], [0, 1], [1, 1] (scores 1, 2, 3), item 0 seen, plus 0.5
    U, V, rows = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), zero
    indptr, indices, scratch = torch.tensor([0, 1]), torch.tensor([0]), torch.empty(2 * _abi.TOPN_USERS * 16)
    top_s, top_i, count = torch.empty(2), torch.empty(2, dtype=torch.int64), torch.empty(1, dtype=torch.int64)
    _abi.call(lib, "flexmf_topn", _abi.TopNArgs(
        users=_abi.ptr(U), n_user_rows=2, unknown_row=1, items=_abi.ptr(V), n_items=3, width=2, rows=_abi.ptr(rows),
        m=1, seen_indptr=_abi.ptr(indptr), seen_indices=_abi.ptr(indices), n_seen_users=1, offset=0.5, k=2,
        threads=2, packed=_abi.ptr(scratch), upack=_abi.ptr(scratch[16 * 2:]), out_scores=_abi.ptr(top_s),
        out_items=_abi.ptr(top_i), out_count=_abi.ptr(count)))
    got, want = got + [*top_s.tolist(), *top_i.tolist(), float(count)], want + [3.5, 2.5, 2.0, 1.0, 2.0]
    if not all(math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-6) for g, w in zip(got, want)):
        raise RuntimeError(f"its self-test computed {[round(g, 6) for g in got]}, expected {want}")


def _load_checked(path: Path, digest: str | None = None) -> tuple[ctypes.CDLL, str]:
    """Load the library at ``path`` (checked; its sha256 must equal ``digest`` when given), validated.
    The file loaded is the descriptor that was checked and hashed (``/proc/self/fd/N`` where there is
    one), so nobody can swap the file in between."""
    fd = _open_checked(path)
    try:
        actual = hashlib.sha256(_read(fd)).hexdigest()
        if digest is not None and actual != digest:
            raise _Refused(f"{path} has sha256 {actual[:16]}..., not the recorded {digest[:16]}...")
    except BaseException:
        os.close(fd)
        raise
    # the descriptor stays open for the life of the process: dlopen knows a library by the name it
    # was loaded under, so /proc/self/fd/<fd> must never name another file later
    lib = ctypes.CDLL(f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path))
    _validate(lib)
    return lib, actual


def _load_cached(cache: Path, key: str) -> ctypes.CDLL | None:
    """The cached library of ``key``; None when there is none; :class:`_Refused` when it is not trusted
    (a refused library file is removed: the cache directory is this user's)."""
    record = cache / _record_name(key)
    try:
        fd = _open_checked(record)
    except FileNotFoundError:
        return None
    try:
        digest = _read(fd).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not re.fullmatch("[0-9a-f]{64}", digest):
        raise _Refused(f"{record} is not a sha256 record")
    library = cache / _library_name(key, digest)
    try:
        return _load_checked(library, digest)[0]
    except FileNotFoundError:
        return None
    except (_Refused, OSError, RuntimeError) as exc:
        library.unlink(missing_ok=True)
        raise _Refused(str(exc)) from None


def _build_timeout() -> float:
    raw = os.environ.get("FLEXMF_NATIVE_BUILD_TIMEOUT", "").strip()
    if not raw:
        return BUILD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise RuntimeError(f"FLEXMF_NATIVE_BUILD_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


def _compile(cc: str, out: Path) -> None:
    """Compile ``SOURCES`` into ``out`` (without OpenMP when the compiler refuses it) within the timeout;
    a compiler still running then is killed with every process it started."""
    limit = _build_timeout()
    deadline = time.monotonic() + limit
    failure = ""
    for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: an orphaned child cannot block the read
            proc = subprocess.Popen([cc, *flags, "-I", str(SOURCE.parent), "-o", str(out), *map(str, SOURCES), "-lm"],
                                    stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if proc.wait(timeout=max(0.0, deadline - time.monotonic())) == 0:
                    return
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                raise RuntimeError(f"{cc} did not finish compiling {SOURCE.name} within {limit:g} s "
                                   "(FLEXMF_NATIVE_BUILD_TIMEOUT)") from None
            err.seek(0)
            failure = failure or " ".join(err.read().decode(errors="replace").split())[:500]
    raise RuntimeError(f"{cc} failed to compile {' + '.join(p.name for p in SOURCES)}: {failure}")


def _build(cc: str, key: str, cache: Path | None, build: Path) -> ctypes.CDLL:
    """Compile into the private directory ``build``, validate, then (``cache`` given) move the library
    into the cache and switch its record last."""
    out = build / "kernels.so"
    _compile(cc, out)
    try:
        os.chmod(out, 0o755)  # whatever the umask: group- or world-writable would be refused when loaded
        lib, digest = _load_checked(out)
    except (_Refused, OSError, RuntimeError) as exc:
        raise RuntimeError(f"{cc} built an unusable kernel library ({exc}); nothing was cached") from None
    if cache is not None:
        os.replace(out, cache / _library_name(key, digest))  # loaded already: the mapping survives the move
        fd = os.open(build / "record", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(build / "record", cache / _record_name(key))
    return lib


def _load() -> tuple[ctypes.CDLL, str | None]:
    """The kernel library and, when the cache was refused, why and what was done instead."""
    cc = os.environ.get("CC") or "cc"
    key, refused, cache = _key(cc), None, None
    try:
        cache = _private_cache()
        lib = _load_cached(cache, key)
        if lib is not None:
            return lib, None
    except _Refused as exc:
        refused = f"{'kernel cache' if cache is None else 'cached kernel library'} refused: {exc}"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)" + (f"; {refused}" if refused else ""))
    build = None
    if cache is not None:
        try:
            build = tempfile.mkdtemp(prefix=".build-", dir=cache)  # 0700, same filesystem: atomic moves
        except OSError as exc:
            cache, refused = None, f"kernel cache {cache} is not writable ({exc.strerror})"
    build = Path(build or tempfile.mkdtemp(prefix="flexmf-kernels-"))
    try:
        lib = _build(cc, key, cache, build)
    except Exception as exc:
        raise RuntimeError(f"{exc}; {refused}" if refused else str(exc)) from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if refused is None:
        return lib, None
    return lib, f"{refused}; " + ("rebuilt it" if cache is not None else
                                  "built the kernels in a private temporary directory (not cached)")


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when disabled or unbuildable (see :func:`status`)."""
    global _loaded, _loaded_status, _status
    if os.environ.get("FLEXMF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "disabled by FLEXMF_NATIVE"
        return None
    with _lock:
        if _loaded is None and not _status.startswith("unavailable"):
            try:
                _loaded, note = _load()
            except Exception as exc:  # no compiler, a hung or broken build, ... -> the torch engine trains
                _status = f"unavailable: {exc}"
                log.warning("flexmf: fused CPU kernels %s; training with the eager torch engine", _status)
            else:
                _loaded_status = "loaded" if note is None else f"loaded ({note})"
                if note is not None:
                    log.warning("flexmf: %s", note)
        if _loaded is not None:
            _status = _loaded_status
        return _loaded


def status() -> str:
    """``"loaded"``, ``"loaded (<why the cache was refused>; <what was built instead>)"``,
    ``"disabled by FLEXMF_NATIVE"``, ``"unavailable: <why>"`` or ``"not loaded yet"``."""
    return _status


def threads() -> int:
    """Threads the kernels use: torch's intra-op count (the engine sets it around its hot loop)."""
    return max(1, min(torch.get_num_threads(), _abi.MAX_THREADS))


def usable(device: torch.device) -> bool:
    """True when ``device`` is the CPU and the kernels load: the engine then trains with them."""
    return device.type == "cpu" and kernels() is not None


def run(name: str, args: ctypes.Structure) -> None:
    """Run kernel ``name`` of the loaded library on ``args`` (see :func:`._abi.call`)."""
    lib = kernels()
    if lib is None:
        raise RuntimeError(f"the fused CPU kernels are not loaded ({status()})")
    _abi.call(lib, name, args)


__all__ = ["cache_dir", "kernels", "run", "status", "threads", "usable"]
