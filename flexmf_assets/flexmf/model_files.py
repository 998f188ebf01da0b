"""Model directories on disk: written atomically, read with every field and tensor checked.

A model directory holds ``config.json``, ``metadata.json`` (with the sha256 of the tensor file) and
``tensors.safetensors``; :func:`save_model_dir` writes it into a sibling temporary directory and
swaps it in. :func:`load_model_dir` never unpickles anything: it reads the JSON files within size and
depth limits (:func:`load_json`), checks ``format_version``, the model ``kind`` and the tensor file's
sha256, and the scorer then checks every field it reads (:class:`Fields`, :func:`expect_tensor`):
a forged file is a one-line :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexmf_assets.errors import ConfigError
from flexmf_assets.files import sha256_file
from flexmf_assets.flexmf.training import F32_MAX, score_bound

FORMAT_VERSION = 1
TENSOR_FILE = "tensors.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


def save_model_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    """Write ``path/`` atomically: tensors (safetensors), config.json, metadata.json with sha256.

    Everything is written into a sibling temp directory first, then swapped in with ``os.replace``
    (an existing directory is moved aside and removed only after the swap), so a failure leaves any
    previous model intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / TENSOR_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            **metadata,
            "tensor_file": TENSOR_FILE,
            "tensor_sha256": sha256_file(tmp / TENSOR_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_model_dir(
    path: str | os.PathLike, device: torch.device, *, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], "Fields"]:
    """Read a directory written by :func:`save_model_dir`; returns (tensors on device, config, metadata).

    Reads the JSON files within :data:`JSON_LIMITS`, checks ``format_version``, the model ``kind``
    and the tensor file's sha256 against metadata.json; raises :class:`ConfigError` naming the file
    (and the field) otherwise. The scorers check the remaining fields and the tensors.
    """
    path = Path(path)
    meta_path, cfg_path, tensor_path = path / METADATA_FILE, path / CONFIG_FILE, path / TENSOR_FILE
    for p in (meta_path, cfg_path, tensor_path):
        if not p.is_file():
            raise ConfigError(f"{p}: missing; not a saved FlexMF model directory")
    meta = Fields(load_json(meta_path, JSON_LIMITS[METADATA_FILE]), meta_path)
    config = load_json(cfg_path, JSON_LIMITS[CONFIG_FILE])
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: unsupported format_version {_short(version)}")
    if meta.get("kind") != kind:
        raise ConfigError(f"{meta_path}: model kind is {_short(meta.get('kind'))}, expected {kind!r}")
    actual = sha256_file(tensor_path)
    if actual != meta.get("tensor_sha256"):
        raise ConfigError(
            f"{tensor_path}: sha256 {actual[:12]}... does not match metadata.json "
            f"({str(meta.get('tensor_sha256'))[:12]}...); the file is corrupt or was modified"
        )
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{tensor_path}: unreadable tensor file ({_first_line(exc)})") from None
    return tensors, config, meta


# ----------------------------------------------------------------------------------------------
# checked reading of stored JSON and tensors
# ----------------------------------------------------------------------------------------------

#: the deepest nesting a stored JSON file may have (ours nest at most 3 deep: metadata.history[i].x)
MAX_JSON_DEPTH = 16
#: the largest stored JSON files read, in bytes (metadata.json holds string ids: large catalogues)
JSON_LIMITS = {CONFIG_FILE: 1 << 20, METADATA_FILE: 256 << 20}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(data: bytes | str, where: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)`` with one-line :class:`ConfigError` s naming ``where`` instead of raw
    JSONDecodeError, ValueError (e.g. a 5,000-digit number) or RecursionError, and nesting deeper
    than ``max_depth`` refused."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integer literals
        raise ConfigError(f"{where}: corrupt JSON ({_first_line(exc)})") from None
    stack = [(value, 1)]
    while stack:  # iterative: a deep document must not exhaust the stack here either
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise ConfigError(f"{where}: JSON nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


def load_json(path: Path, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and :func:`parse_json` the file ``path``, refusing files over ``max_bytes``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({_first_line(exc)})") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: larger than the limit of {max_bytes} bytes")
    return parse_json(data, path, max_depth)


_MISSING = object()


class Fields:
    """Typed reads of a stored JSON object's fields; a wrong type or range raises a one-line
    :class:`ConfigError` naming the file and the field. ``default`` is returned for an absent field."""

    def __init__(self, data: Any, where: Path | str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def fail(self, name: str, expected: str, got: Any) -> NoReturn:
        raise ConfigError(f"{self.where}: field {name!r}: expected {expected}, got {_short(got)}")

    def _value(self, name: str, default: Any) -> Any:
        if name not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.where}: field {name!r} is missing")
            return default
        return self.data[name]

    def integer(self, name: str, lo: int = 0, hi: int | None = None, default: Any = _MISSING,
                optional: bool = False) -> Any:
        value = self._value(name, default)
        if value is None and optional:
            return None
        bounds = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            self.fail(name, bounds + (" or null" if optional else ""), value)
        return value

    def number(self, name: str, lo: float | None = None, default: Any = _MISSING) -> float:
        value = self._value(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (lo is not None and value < lo):
            self.fail(name, "a finite number" + (f" >= {lo:g}" if lo is not None else ""), value)
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self._value(name, default)
        if value not in choices or not isinstance(value, str):
            self.fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
        return value

    def bounds(self, name: str) -> tuple[float, float]:
        """A ``[low, high]`` pair of finite numbers with ``low <= high``."""
        value = self._value(name, _MISSING)
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
        if not ok or value[0] > value[1]:
            self.fail(name, "[low, high], two finite numbers with low <= high", value)
        return float(value[0]), float(value[1])

    def history(self, name: str = "history") -> list[dict[str, Any]]:
        """The per-epoch training log: a list of objects of scalars (numbers, strings, null)."""
        value = self._value(name, [])
        scalar = (int, float, str, type(None))
        if not isinstance(value, list) or not all(
            isinstance(row, dict) and all(isinstance(v, scalar) for v in row.values()) for row in value
        ):
            self.fail(name, "a list of objects of numbers, strings or nulls", value)
        return [dict(row) for row in value]


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...],
                  dtype: torch.dtype, where: Path, *, finite: bool = False) -> torch.Tensor:
    """``tensors[name]``, checked: present, of ``dtype`` and ``shape`` (None: any size), and
    without NaN or infinite values when ``finite``; else a one-line :class:`ConfigError`."""
    t = tensors.get(name)
    if t is None:
        raise ConfigError(f"{where}: tensor {name!r} is missing")
    if t.dtype != dtype:
        raise ConfigError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = str(tuple("*" if d is None else d for d in shape)).replace("'*'", "*")
        raise ConfigError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, but metadata.json and "
                          f"config.json give {want}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{where}: tensor {name!r} has NaN or infinite values")
    return t


def check_tensor_names(tensors: dict[str, torch.Tensor], expected: set[str], where: Path) -> None:
    """Refuse a tensor file holding tensors this model kind does not have."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConfigError(f"{where}: unexpected tensor(s) {', '.join(map(repr, extra[:5]))}")


def check_score_range(user: torch.Tensor, item: torch.Tensor, where: Path, extra: float = 0.0) -> None:
    """Refuse weights so large that a score (``user . item`` plus ``extra``) could overflow float32:
    such a model scores everything inf/NaN and recommends nothing."""
    bound = score_bound(user, item) + extra
    if not bound <= F32_MAX:
        raise ConfigError(f"{where}: weights so large that scores overflow float32 (bound {bound:.3g})")


__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "Fields", "METADATA_FILE", "TENSOR_FILE", "check_score_range",
           "check_tensor_names", "expect_tensor", "load_json", "load_model_dir", "parse_json", "save_model_dir"]
