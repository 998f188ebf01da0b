"""The fused CPU training kernels (``_kernels.c``): compiled on first use, cached, called via ctypes.

Why: an eager PyTorch minibatch step on CPU is a dozen full passes over ``batch x width``
temporaries plus per-op dispatch; on a 2-core machine that caps MF training near 1M updates/s, far
from the memory-bound ceiling. The kernels do the same minibatch step (same gradients, same
optimizers, same batch semantics) in two passes, in place on the torch tensors' storage.

How: ``_kernels.c`` is compiled once per machine with the system C compiler (``$CC`` or ``cc``;
``-O3 -march=native -fopenmp``, about a second) into ``$FLEXMF_NATIVE_CACHE`` (default
``~/.cache/flexmf-assets/native``), keyed by the source, the flags and the CPU, and written
atomically so concurrent processes can race safely. No compiler, a failed build or
``FLEXMF_NATIVE=0`` means the eager-torch engine trains instead (same results up to float rounding,
slower): :func:`kernels` returns None and :func:`status` says why. GPUs always use the torch engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_status = "not loaded yet"

_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double


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


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(),
                                     platform.machine().encode(), _cpu_key().encode()])).hexdigest()[:20]
    target = cache_dir() / f"flexmf_kernels_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if done.returncode != 0:  # a compiler without OpenMP: single-threaded kernels, same results
                serial = [f for f in FLAGS if f != "-fopenmp"]
                retry = subprocess.run([cc, *serial, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
                if retry.returncode != 0:
                    raise RuntimeError(f"{cc} failed to compile {SOURCE.name}: {done.stderr.strip()[:500]}")
            os.replace(tmp, target)  # atomic: a concurrent build of the same key is identical
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.flexmf_explicit_epoch.restype = _D
    lib.flexmf_explicit_epoch.argtypes = [
        _P, _P, _I, _I, _I, _I, _P, _P, _P, _I, _I, _D, _D, _D, _P, _I, _I, *[_P] * 8, _P, _I,
    ]
    lib.flexmf_implicit_batches.restype = _D
    lib.flexmf_implicit_batches.argtypes = [
        _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _D, _D, _D, _D, _P,
        *[_P] * 8, _P, _I,
    ]
    lib.flexmf_contains.restype = None
    lib.flexmf_contains.argtypes = [_P, _I, _P, _I, _I, _P, _P, _I, _I, _P]
    lib.flexmf_adamw_flush.restype = None
    lib.flexmf_adamw_flush.argtypes = [_P, _P, _I, _I, _I, _D, _D, _I, _I]
    return lib


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when disabled or unbuildable (see :func:`status`)."""
    global _loaded, _status
    if os.environ.get("FLEXMF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "disabled by FLEXMF_NATIVE"
        return None
    with _lock:
        if _loaded is None and not _status.startswith("unavailable"):
            try:
                _loaded = _build()
            except Exception as exc:  # no compiler, read-only cache, ... -> the torch engine trains
                _status = f"unavailable: {exc}"
                log.warning("flexmf: fused CPU kernels %s; training with the eager torch engine", _status)
        if _loaded is not None:
            _status = "loaded"
        return _loaded


def status() -> str:
    """``"loaded"``, ``"disabled by FLEXMF_NATIVE"``, ``"unavailable: <why>"`` or ``"not loaded yet"``."""
    return _status


def threads() -> int:
    """Threads the kernels use: torch's intra-op count (the engine sets it around its hot loop)."""
    return max(1, min(torch.get_num_threads(), MAX_THREADS))


def usable(device: torch.device) -> bool:
    """True when ``device`` is the CPU and the kernels load: the engine then trains with them."""
    return device.type == "cpu" and kernels() is not None


def ptr(t: torch.Tensor | None) -> int | None:
    """Address of a contiguous CPU tensor's first element (None passes NULL)."""
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("native kernels need contiguous CPU tensors")
    return t.data_ptr()


#: most threads the kernels use (bounds the scratch's per-thread padding)
MAX_THREADS = 64


class Scratch:
    """Per-table scratch of the kernels: gradient slots, their counts and rows, and the row -> slot map
    (all -1 between calls)."""

    def __init__(self, rows: int, width: int):
        slots = rows + 16 * (MAX_THREADS + 2)  # per-thread stretches are rounded up to 16 rows
        self.grad = torch.empty(slots, width)
        self.count = torch.empty(slots)
        self.touched = torch.empty(slots, dtype=torch.int64)
        self.slot = torch.full((rows,), -1, dtype=torch.int32)

    def buffer(self, size: int) -> torch.Tensor:
        """A float scratch vector of at least ``size`` elements (kept for the next call)."""
        if getattr(self, "_buffer", None) is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size)
        return self._buffer

    def args(self) -> list[int]:
        return [ptr(self.grad), ptr(self.count), ptr(self.touched), ptr(self.slot)]


__all__ = ["Scratch", "cache_dir", "kernels", "ptr", "status", "threads", "usable"]
