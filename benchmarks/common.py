"""Shared helpers of the benchmark scripts: data, splits, child processes, venvs, tables.

Everything a benchmark compares is run in a *fresh child process* that reads the same split files
(Parquet) and writes one JSON result; the parent only orchestrates and evaluates. Peak RSS is the
child's own ``ru_maxrss`` (Linux reports KiB), taken by the parent with ``os.wait4`` so it covers
the whole child, interpreter start and imports included.

The split protocols (state them beside every number):

* explicit: ml-latest-small ``ratings.csv``, random 80/20 split of ratings,
  ``numpy.random.default_rng(42).permutation``; the first 20% of the permuted rows are the test set
  (the same rows ``benchmarks/explicit_movielens.py`` uses).
* implicit: LensKit's ``crossfold_users(5, SampleN(5))`` with seed 42, written by LensKit itself
  when its venv exists; otherwise the library's :func:`flexmf_assets.datasets.split.crossfold_users`
  (same design, not the same rows).
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
SPLITS = OUT / "splits"
VENVS = BENCH / ".venvs"
SHARED_ZIP = REPO.parent / "shared" / "data" / "movielens" / "ml-latest-small.zip"


# ----------------------------------------------------------------------------------------------
# data and splits
# ----------------------------------------------------------------------------------------------


def load_movielens(zip_path: Path = SHARED_ZIP) -> pl.DataFrame:
    """``user_id, item_id, rating, timestamp`` of an ml-latest-small style zip (``ratings.csv``)."""
    if not zip_path.is_file():
        raise SystemExit(f"{zip_path}: MovieLens zip not found (pass --zip PATH)")
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith("ratings.csv")]
        if not names:
            raise SystemExit(f"{zip_path}: no ratings.csv inside the zip")
        data = zf.read(names[0])
    return pl.read_csv(io.BytesIO(data)).rename({"userId": "user_id", "movieId": "item_id"})


def random_split(ratings: pl.DataFrame, seed: int = 42, test_frac: float = 0.2) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, test): a seeded random ``test_frac`` of the rows is the test set."""
    perm = np.random.default_rng(seed).permutation(ratings.height)
    n_test = int(round(test_frac * ratings.height))
    return ratings[perm[n_test:]], ratings[perm[:n_test]]


def write_parquet(frame: pl.DataFrame, path: Path) -> Path:
    """Write atomically (temp file in the same folder + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(obj: Any, path: Path) -> Path:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)
    return path


def write_text(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(argv: Sequence[str], result_path: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` as a fresh process; return its JSON result plus ``peak_rss_mb`` and ``wall_s``.

    On failure the result is ``{"error": <last line of stderr>}``, so one broken library does not
    stop the run.
    """
    if result_path.exists():
        result_path.unlink()
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=err, env=full_env)
        deadline = t0 + timeout
        status, rusage = 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result_path.exists():
            err.seek(0)
            lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
            return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:300]}
    result = json.loads(result_path.read_text())
    result["peak_rss_mb"] = rusage.ru_maxrss / 1024.0
    result["wall_s"] = wall
    return result


def ensure_venv(name: str, python: str, packages: Sequence[str], check: str, log: Path) -> Path | None:
    """The venv ``benchmarks/.venvs/<name>``'s python, created and filled when ``import check``
    fails; ``None`` (with a printed reason) when it cannot be made."""
    venv = VENVS / name
    py = venv / "bin" / "python"
    if py.exists() and _imports(py, check):
        return py
    if not Path(python).exists():
        print(f"[{name}] {python} not found: skipped", flush=True)
        return None
    print(f"[{name}] creating {venv} and installing {' '.join(packages)} (log: {log}) ...", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        if not py.exists():
            subprocess.run([python, "-m", "venv", str(venv)], stdout=fh, stderr=fh, check=False)
        subprocess.run([str(py), "-m", "pip", "install", *packages], stdout=fh, stderr=fh, check=False)
    if py.exists() and _imports(py, check):
        return py
    print(f"[{name}] installation failed (see {log}): skipped", flush=True)
    return None


def _imports(py: Path, modules: str) -> bool:
    code = "; ".join(f"import {m}" for m in modules.split(","))
    return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are printed as given (format them first)."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width table for the terminal."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) if cells else len(h) for j, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def fmt(value: Any, spec: str = ".2f", missing: str = "-") -> str:
    """Format a number, or ``missing`` for None/NaN."""
    if value is None:
        return missing
    try:
        if value != value:  # NaN
            return missing
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
