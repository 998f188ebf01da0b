"""The FlexMF engine in PyTorch: configs, training, scoring, save/load (no Dagster imports).

>>> from flexmf_assets.flexmf import FlexMFExplicitScorer
>>> model = FlexMFExplicitScorer(epochs=20).fit(train, validation)   # doctest: +SKIP

Layout: ``scorer.py`` is the core both feedback types share (ids, tables, epoch loop, predict,
recommend, save/load); ``explicit.py`` and ``implicit.py`` are the two tracks and their training
strategies (fused C kernels through ``_abi.py``/``_native.py``, eager torch); ``losses.py`` and
``sampling.py`` hold the registries of losses and negative samplers; ``optim.py`` the sparse Adam;
``training.py`` the strategy protocol and the guards; docs/contributing.md has the picture.
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
