"""One place that decides the torch device, thread count and matmul precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flexmf_assets.errors import ConfigError

log = logging.getLogger(__name__)

_PRECISIONS = ("highest", "high", "medium")


@dataclass(frozen=True)
class DeviceSettings:
    """How training and scoring pick their hardware.

    device: ``auto`` (CUDA if present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    threads: CPU intra-op threads for torch (None leaves torch's default).
    matmul_precision: torch's float32 matmul precision (``highest``, ``high``, ``medium``).
    allow_fallback: when the asked-for accelerator is absent, log a warning and use the CPU instead
        of failing.
    """

    device: str = "auto"
    threads: int | None = None
    matmul_precision: str = "highest"
    allow_fallback: bool = False

    def __post_init__(self) -> None:
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(
                f"device: {dev!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")
        if self.matmul_precision not in _PRECISIONS:
            raise ConfigError(
                f"matmul_precision: {self.matmul_precision!r} is not one of {', '.join(_PRECISIONS)}"
            )


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(settings: DeviceSettings | str | torch.device | None = None) -> torch.device:
    """Return the torch device for ``settings`` and apply its thread and precision settings.

    Asking for ``cuda`` (or ``mps``) where it is absent raises :class:`ConfigError`, unless
    ``allow_fallback`` is set, in which case a warning is logged and the CPU is used.
    """
    if isinstance(settings, torch.device):
        return settings
    if settings is None:
        settings = DeviceSettings()
    elif isinstance(settings, str):
        settings = DeviceSettings(device=settings)

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    torch.set_float32_matmul_precision(settings.matmul_precision)

    dev = settings.device
    if dev == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if dev == "cpu":
        return torch.device("cpu")
    if dev.startswith("cuda"):
        index = int(dev[5:]) if ":" in dev else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return torch.device(dev)
        why = (
            "no CUDA device is available (torch.cuda.is_available() is False)"
            if not torch.cuda.is_available()
            else f"only {torch.cuda.device_count()} CUDA device(s) are present"
        )
        return _fallback_or_fail(settings, why)
    # mps
    if _mps_available():
        return torch.device("mps")
    return _fallback_or_fail(settings, "MPS is not available on this machine")


def _fallback_or_fail(settings: DeviceSettings, why: str) -> torch.device:
    if settings.allow_fallback:
        log.warning("device %r requested but %s; falling back to cpu", settings.device, why)
        return torch.device("cpu")
    raise ConfigError(
        f"device: {settings.device!r} requested but {why}; use device 'cpu' or 'auto', "
        "or set allow_fallback: true"
    )
