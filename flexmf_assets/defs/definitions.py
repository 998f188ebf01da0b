"""Assemble the code location: assets by stage, resources, IO manager, jobs.

``defs`` is built from ``flexmf.yaml`` (``$FLEXMF_CONFIG``) at load time; tests call
:func:`build_definitions` with their own project config.
"""

from __future__ import annotations

import dagster as dg

from flexmf_assets.defs.assets.data import build_data_assets
from flexmf_assets.defs.assets.leaderboard import build_leaderboard_assets
from flexmf_assets.defs.assets.models import build_track_assets
from flexmf_assets.defs.automation import build_automation
from flexmf_assets.defs.io_managers import FlexMFIOManager
from flexmf_assets.defs.partitions import dataset_partitions
from flexmf_assets.defs.profiles import select_profile, uses_cuda
from flexmf_assets.defs.resources import DeviceResource, ProjectResource
from flexmf_assets.defs.slots import build_slots_sensor
from flexmf_assets.defs.tuning import TUNING_GROUP, build_tune_job, build_tuning_assets
from flexmf_assets.project import ProjectConfig, load_project
from flexmf_assets.tracks import TRACKS

DATA_GROUP = "data"


def build_definitions(project: ProjectConfig, *, config_path: str | None = None,
                      storage_dir: str | None = None) -> dg.Definitions:
    profile = select_profile(project, storage_dir)
    datasets = dataset_partitions(project)
    data_assets = build_data_assets(datasets)
    device = project.device
    # two trainings never share a GPU: CUDA training steps take the `gpu` pool (set its limit with
    # `dagster instance concurrency set gpu 1`); CPU training uses `flexmf_training`
    pool = "gpu" if uses_cuda(project) else "flexmf_training"
    model_assets = [a for track in TRACKS for a in build_track_assets(project, track, pool=pool,
                                                                      op_tags=profile.training_tags)]
    board_assets = build_leaderboard_assets(datasets)
    tuning_assets = build_tuning_assets(datasets)
    resources = {
        "project_config": ProjectResource(config_path=config_path or (str(project.path) if project.path else None)),
        "device": DeviceResource(
            device=str(device.get("device", "auto")),
            threads=device.get("threads"),
            matmul_precision=str(device.get("matmul_precision", "highest")),
            allow_fallback=bool(device.get("allow_fallback", False)),
        ),
        "io_manager": FlexMFIOManager(base_dir=profile.storage_base, storage_options=profile.storage_options),
    }
    jobs = {
        "data_job": dg.define_asset_job(
            "data_job", selection=dg.AssetSelection.groups(DATA_GROUP),
            description="Download, parse, validate and split one dataset partition."),
        **{f"{name}_job": dg.define_asset_job(
            f"{name}_job", selection=dg.AssetSelection.groups(name),
            description=f"Train, evaluate and publish one dataset|hparams {name} partition.")
           for name in TRACKS},
        "leaderboard_job": dg.define_asset_job(
            "leaderboard_job", selection=dg.AssetSelection.groups("leaderboard"),
            description="Rank every trained hparams partition of a dataset and publish the champions."),
        "tuning_report_job": dg.define_asset_job(
            "tuning_report_job", selection=dg.AssetSelection.groups(TUNING_GROUP),
            description="The tuning reports of a dataset: every track's Optuna study, figures and trials."),
    }
    assets = [*data_assets, *model_assets, *board_assets, *tuning_assets]
    automated = [key for a in assets for key, cond in a.automation_conditions_by_key.items() if cond]
    sensors, schedules = build_automation(project, jobs, automated)
    return dg.Definitions(
        assets=assets,
        resources=resources,
        jobs=[*jobs.values(), build_tune_job()],
        sensors=[*sensors, build_slots_sensor()],
        schedules=schedules,
        executor=profile.executor,
    )


defs = build_definitions(load_project())
