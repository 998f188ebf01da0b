"""Resources: the project config and the one place that decides the training device."""

from __future__ import annotations

import dagster as dg

from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.project import ProjectConfig, load_project


class ProjectResource(dg.ConfigurableResource):
    """``flexmf.yaml`` (``config_path``, else ``$FLEXMF_CONFIG``, else ``./flexmf.yaml``)."""

    config_path: str | None = None

    def load(self) -> ProjectConfig:
        return load_project(self.config_path)


class DeviceResource(dg.ConfigurableResource):
    """Training/scoring hardware: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    ``cuda`` asked for but absent fails the step with a clear error, unless ``allow_fallback``.
    """

    device: str = "auto"
    threads: int | None = None
    matmul_precision: str = "highest"
    allow_fallback: bool = False

    def settings(self) -> DeviceSettings:
        return DeviceSettings(
            device=self.device,
            threads=self.threads,
            matmul_precision=self.matmul_precision,
            allow_fallback=self.allow_fallback,
        )
