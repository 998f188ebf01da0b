"""The FlexMF engine in PyTorch: configs, training, scoring, save/load (no Dagster imports).

>>> from flexmf_assets.flexmf import FlexMFExplicitScorer
>>> model = FlexMFExplicitScorer(epochs=20).fit(train, validation)   # doctest: +SKIP
"""

from flexmf_assets.flexmf.config import EXPLICIT_PRESETS, FlexMFExplicitConfig
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer

__all__ = [
    "EXPLICIT_PRESETS",
    "DeviceSettings",
    "FlexMFExplicitConfig",
    "FlexMFExplicitScorer",
    "resolve_device",
]
