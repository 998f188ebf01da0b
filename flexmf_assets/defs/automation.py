"""Sweeps and retraining: keep the hparams partitions in step with flexmf.yaml, re-check archives on a
schedule, and retrain exactly the model partitions whose data changed.

- ``sweep`` (sensor): new set names in flexmf.yaml become dynamic partitions; names registered but no
  longer in the file are reported, never deleted. Every model partition of a swept dataset that was
  never trained, or was trained on a split that is not the dataset's current one (by data version),
  gets a run.
- ``retrain_schedule`` (weekly by default, ``schedule.cron``): one ``data_job`` run per swept dataset,
  which re-checks the archive (a cache hit when its sha256 is unchanged). A changed archive gives a new
  split data version and the sensor retrains every registered partition; an unchanged one keeps the
  same data versions all the way down, so nothing is retrained.
"""

import dagster as dg

from flexmf_assets.defs.partitions import DATASET_DIM, HPARAMS_DIM, HPARAMS_PARTITIONS
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import TRACKS, ProjectConfig

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00
#: model metadata key holding the data version of the split it was trained on
SPLIT_VERSION_KEY = "split_data_version"
DATA_VERSION_TAG = "dagster/data_version"


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def model_key(dataset: str, hparams: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({DATASET_DIM: dataset, HPARAMS_DIM: hparams})


def sweep_requests(project: ProjectConfig, instance: dg.DagsterInstance, log=None) -> dg.SensorResult:
    """One tick of the ``sweep`` sensor (a plain function, so tests and the CLI can call it).

    1. Set names in flexmf.yaml that are not partitions yet are added (an invalid set is reported and
       skipped); registered names that left the file are reported, never deleted.
    2. For every swept dataset with a split, every hparams partition (registered or just added) whose
       model is missing or was trained on another split data version gets a run. The run key carries
       the split's data version, so a partition is requested once per data version.
    3. A swept dataset without a split gets a ``data_job`` run first.
    """
    adds: list[dg.AddDynamicPartitionsRequest] = []
    runs: list[dg.RunRequest] = []
    notes: list[str] = []
    names_by_track: dict[str, list[str]] = {}
    for track in TRACKS:
        pdef = HPARAMS_PARTITIONS[track]
        existing = instance.get_dynamic_partitions(pdef.name)
        declared = project.hparam_sets(track)
        new: list[str] = []
        for name in declared:
            if name in existing:
                continue
            try:
                project.resolve_hparams(track, name)
            except ConfigError as exc:  # an invalid set is reported, never registered
                notes.append(f"{track}_hparams.{name} is invalid and was not registered: {exc}")
                continue
            new.append(name)
        if new:
            adds.append(dg.AddDynamicPartitionsRequest(partitions_def_name=pdef.name, partition_keys=new))
        for name in existing:
            if name in declared:
                continue
            try:
                project.resolve_hparams(track, name)  # a UI-style override key: a valid set, kept quietly
            except ConfigError:
                notes.append(f"{track}_hparams partition {name!r} is no longer in flexmf.yaml; kept with "
                             "its history (delete it in the UI if that is intended)")
        names_by_track[track] = [*existing, *new]

    for dataset in project.swept_datasets:
        split = latest_materialization(instance, "split", dataset)
        if split is None:
            runs.append(dg.RunRequest(job_name="data_job", partition_key=dataset, run_key=f"data:{dataset}"))
            continue
        version = split.asset_materialization.tags.get(DATA_VERSION_TAG)
        for track, names in names_by_track.items():
            for name in names:
                key = model_key(dataset, name)
                model = latest_materialization(instance, f"{track}_model", str(key))
                entry = model.asset_materialization.metadata.get(SPLIT_VERSION_KEY) if model else None
                trained_on = entry.value if entry is not None else None
                if model is None or trained_on != version:
                    runs.append(dg.RunRequest(job_name=f"{track}_job", partition_key=key,
                                              run_key=f"train:{track}:{key}:{version}"))
    for note in notes:
        if log is not None:
            log.warning(note)
    if not adds and not runs:
        return dg.SensorResult(skip_reason="; ".join(notes) or "every hparams partition is registered and current")
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=adds)


def schedule_requests(project: ProjectConfig) -> list[dg.RunRequest]:
    return [dg.RunRequest(job_name="data_job", partition_key=dataset) for dataset in project.swept_datasets]


def build_automation(project: ProjectConfig, jobs: dict):
    schedule_cfg = project.schedule
    enabled = bool(schedule_cfg.get("enabled", True))
    status = dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED
    all_jobs = list(jobs.values())

    @dg.sensor(name="sweep", jobs=all_jobs, minimum_interval_seconds=30, default_status=status,
               description="Keeps the hparams partitions in step with flexmf.yaml and trains every "
               "partition of a swept dataset that is missing or whose split changed.")
    def sweep(context: dg.SensorEvaluationContext, project_config: ProjectResource):
        return sweep_requests(project_config.load(), context.instance, context.log)

    @dg.schedule(
        name="retrain_schedule",
        cron_schedule=str(schedule_cfg.get("cron", DEFAULT_CRON)),
        execution_timezone=str(schedule_cfg.get("timezone", "UTC")),
        job=jobs["data_job"],
        default_status=dg.DefaultScheduleStatus.RUNNING if enabled else dg.DefaultScheduleStatus.STOPPED,
        description="Re-checks every swept dataset's archive; the sweep sensor retrains only where the "
        "split's data version changed.",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext, project_config: ProjectResource):
        return schedule_requests(project_config.load())

    return [sweep], [retrain_schedule]
