"""Small file helpers the whole package shares: content hashes, atomic text writes, JSON-safe values."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``: a
    reader sees the old content or the new, never a part (``fsync`` also survives a power cut)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, tuples as lists, keys as strings, NaN/inf as the
    strings 'NaN', 'inf', '-inf' (strict JSON has no such numbers), anything else as its str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, dict, tuple)):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; {} when the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def process_alive_since(pid: int, started: float) -> bool:
    """Whether process ``pid`` is running and existed at time ``started`` (a process created later
    merely reuses the number of a dead one; a zombie is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:  # Linux: state and start time from /proc; elsewhere kill(0) is all we know
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return True
    if fields[0] in ("Z", "X"):
        return False
    created = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, clock ticks after boot
    return created <= started + 2.0  # btime has a one-second resolution


__all__ = ["atomic_write_text", "jsonable", "process_alive_since", "read_json_object", "sha256_file"]
