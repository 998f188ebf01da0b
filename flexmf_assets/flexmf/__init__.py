"""The FlexMF engine in PyTorch: configs, training, scoring, save/load (no Dagster imports).

>>> from flexmf_assets.flexmf import FlexMFExplicitScorer
>>> model = FlexMFExplicitScorer(epochs=20).fit(train, validation)   # doctest: +SKIP
"""

from flexmf_assets.flexmf._native import status as native_status
from flexmf_assets.flexmf.explicit_config import EXPLICIT_HPARAM_SETS, FlexMFExplicitConfig
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer
from flexmf_assets.flexmf.implicit_config import IMPLICIT_HPARAM_SETS, FlexMFImplicitConfig

__all__ = [
    "EXPLICIT_HPARAM_SETS",
    "IMPLICIT_HPARAM_SETS",
    "DeviceSettings",
    "FlexMFExplicitConfig",
    "FlexMFExplicitScorer",
    "FlexMFImplicitConfig",
    "FlexMFImplicitScorer",
    "native_status",
    "resolve_device",
]
