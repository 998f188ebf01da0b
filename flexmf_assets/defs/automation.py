"""What runs without a click, and what runs only when asked.

Nothing heavy starts unasked: a fresh ``flexmf dev`` trains nothing until the user launches a run,
starts a backfill, runs ``flexmf sweep`` or turns the ``sweep`` sensor on.

- ``register_sets`` (sensor, running): the set names of flexmf.yaml become dynamic partitions (so the
  UI lists them); a registered key that does not parse is reported once, naming the field. It never
  launches a run.
- ``sweep`` (sensor, **stopped** until the user turns it on): trains every registered set of a swept
  dataset that was never trained there; one run per configuration (keys that resolve to the same
  configuration are trained once), never a partition that already has a queued or running run, never a
  key that does not parse.
- ``retrain_schedule`` (``schedule.cron``): one ``data_job`` run per swept dataset, which re-checks the
  archive (a cache hit when unchanged).
- Declarative automation (the ``automation`` sensor, running; conditions below): a model partition that
  was trained retrains when its split's data version changes; evaluations and recommendations follow
  their model; a track's leaderboard follows its evaluations; ``champion_recommendations`` follows the
  leaderboards. A partition that was never trained stays untrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import dagster as dg

from flexmf_assets.defs.partitions import HPARAMS_PARTITIONS
from flexmf_assets.defs.records import DATA_VERSION_TAG, latest_materialization, model_partition_key
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import TRACKS, ProjectConfig

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00
#: the assets of a track's job, in the order they materialize
TRACK_ASSETS = ("model", "evaluation", "recommendations")
#: run statuses that count as "already on its way" for a partition
PENDING_STATUSES = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED]


def pending_partitions(instance: dg.DagsterInstance) -> set[str]:
    """Partition keys with a queued or running run (of any job)."""
    runs = instance.get_runs(dg.RunsFilter(statuses=PENDING_STATUSES))
    return {run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags}


# -- registration -------------------------------------------------------------------------------
@dataclass
class Registration:
    """What one look at flexmf.yaml and the instance finds."""

    new: dict[str, list[str]] = field(default_factory=dict)  # track -> set names to add as partitions
    valid: dict[str, list[str]] = field(default_factory=dict)  # track -> every usable key (registered or new)
    invalid: dict[str, str] = field(default_factory=dict)  # "<track>_hparams partition 'key'" -> why

    def requests(self) -> list[dg.AddDynamicPartitionsRequest]:
        return [dg.AddDynamicPartitionsRequest(partitions_def_name=HPARAMS_PARTITIONS[t].name, partition_keys=names)
                for t, names in self.new.items() if names]


def registration(project: ProjectConfig, instance: dg.DagsterInstance) -> Registration:
    """The set names of flexmf.yaml not yet registered, and every registered key checked: a set of the
    file or a key that parses is usable; anything else is invalid (with the one-line reason)."""
    out = Registration()
    for track in TRACKS:
        existing = instance.get_dynamic_partitions(HPARAMS_PARTITIONS[track].name)
        declared = project.hparam_sets(track)
        valid, new = [], []
        for name in [*declared, *(k for k in existing if k not in declared)]:
            try:
                project.resolve_hparams(track, name)
            except ConfigError as exc:
                where = "set" if name in declared else "partition"
                out.invalid[f"{track}_hparams {where} {name!r}"] = str(exc)
                continue
            valid.append(name)
            if name not in existing:
                new.append(name)
        out.valid[track], out.new[track] = valid, new
    return out


def _report_once(invalid: dict[str, str], cursor: str | None, log) -> str:
    """Log each invalid key the first time it is seen; returns the new cursor (the reported keys)."""
    seen = set(json.loads(cursor)) if cursor else set()
    for what, why in invalid.items():
        if what not in seen and log is not None:
            log.warning(f"{what} is invalid and will never be trained: {why}")
    return json.dumps(sorted(seen | set(invalid)))


# -- the sweep ----------------------------------------------------------------------------------
@dataclass
class SweepPlan:
    registration: Registration
    runs: list[dg.RunRequest] = field(default_factory=list)
    same_as: dict[str, str] = field(default_factory=dict)  # "track:dataset|key" -> the key trained instead
    pending: list[str] = field(default_factory=list)  # partitions skipped: a run is queued or running


def sweep_plan(project: ProjectConfig, instance: dg.DagsterInstance) -> SweepPlan:
    """One tick of the ``sweep`` sensor (a plain function, so tests and ``flexmf sweep`` call it too).

    For every swept dataset with a split: every usable key that was never trained on the dataset gets
    a run, unless a run for its partition is queued or running, or another key that resolves to the
    same configuration is trained or requested (named sets of the file first). A swept dataset without
    a split gets a ``data_job`` run first. Keys that do not parse never get a run.
    """
    reg = registration(project, instance)
    plan = SweepPlan(registration=reg)
    pending = pending_partitions(instance)
    for dataset in project.swept_datasets:
        split = latest_materialization(instance, "split", dataset)
        if split is None:
            if dataset not in pending:
                plan.runs.append(dg.RunRequest(job_name="data_job", partition_key=dataset, run_key=f"data:{dataset}"))
            continue
        version = split.asset_materialization.tags.get(DATA_VERSION_TAG)
        for track in TRACKS:
            covered: dict[str, str] = {}  # fingerprint -> key trained or requested
            keys = reg.valid[track]
            trained = [k for k in keys
                       if latest_materialization(instance, f"{track}_model", str(model_partition_key(dataset, k)))]
            for key in [*trained, *(k for k in keys if k not in trained)]:
                partition = model_partition_key(dataset, key)
                fingerprint = project.fingerprint(track, key)
                if fingerprint in covered:
                    if key not in trained:
                        plan.same_as[f"{track}:{partition}"] = covered[fingerprint]
                    continue
                covered[fingerprint] = key
                if key in trained:
                    continue
                if str(partition) in pending:
                    plan.pending.append(f"{track}:{partition}")
                    continue
                # the asset selection is recorded on the run: automation then knows the evaluation and
                # recommendations were made with the model in this run (a job name alone records none)
                plan.runs.append(dg.RunRequest(job_name=f"{track}_job", partition_key=partition,
                                               asset_selection=[dg.AssetKey(f"{track}_{a}") for a in TRACK_ASSETS],
                                               run_key=f"train:{track}:{partition}:{version}"))
    return plan


def schedule_requests(project: ProjectConfig) -> list[dg.RunRequest]:
    return [dg.RunRequest(job_name="data_job", partition_key=dataset) for dataset in project.swept_datasets]


# -- declarative automation ---------------------------------------------------------------------
AC = dg.AutomationCondition


def retrain_on_new_split() -> dg.AutomationCondition:
    """A model partition that was trained retrains once its split's data version changes (a changed
    archive or new split settings); a partition never trained is never started by this."""
    return (
        AC.any_deps_match(AC.data_version_changed()).since_last_handled()
        & ~AC.missing() & ~AC.in_progress() & ~AC.any_deps_in_progress()
    ).with_label("retrain when the split's data version changes")


def follow_upstream(*ignore: str, require_all: bool = True) -> dg.AutomationCondition:
    """Materialize after an upstream partition updates (or is requested on the same tick), once none is
    in progress and (``require_all``) every upstream partition exists. Upstream assets in ``ignore`` do
    not count at all (a champion reads a few of its dataset's recommendation tables, most never made)."""
    updated, missing, running = AC.any_deps_updated(), AC.any_deps_missing(), AC.any_deps_in_progress()
    if ignore:
        selection = dg.AssetSelection.assets(*ignore)
        updated, missing, running = updated.ignore(selection), missing.ignore(selection), running.ignore(selection)
    condition = updated.since_last_handled() & ~running & ~AC.in_progress()
    if require_all:
        condition = condition & ~missing
    return condition.with_label("follow the upstream partition")


def follow_any_partition() -> dg.AutomationCondition:
    """For boards over many partitions, most never trained (so ``eager`` would wait forever): refresh
    after any upstream partition has updated since this asset was last requested, once none is in
    progress (a sweep's burst of evaluations gives one refresh at its end)."""
    return (
        AC.any_deps_match(AC.newly_updated()).since(AC.newly_requested() | AC.initial_evaluation())
        & ~AC.any_deps_in_progress() & ~AC.in_progress()
    ).with_label("refresh after any evaluation")


# -- sensors and schedule -----------------------------------------------------------------------
def build_automation(project: ProjectConfig, jobs: dict, automated: Iterable[dg.AssetKey]):
    schedule_cfg = project.schedule
    enabled = bool(schedule_cfg.get("enabled", True))
    all_jobs = list(jobs.values())

    @dg.sensor(name="register_sets", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Adds the hyperparameter sets of flexmf.yaml as partitions so the UI lists them, and "
               "reports (once) a partition key that does not parse. Never launches a run.")
    def register_sets(context: dg.SensorEvaluationContext, project_config: ProjectResource):
        reg = registration(project_config.load(), context.instance)
        cursor = _report_once(reg.invalid, context.cursor, context.log)
        requests = reg.requests()
        return dg.SensorResult(dynamic_partitions_requests=requests, cursor=cursor,
                               skip_reason=None if requests else "every set of flexmf.yaml is registered")

    @dg.sensor(name="sweep", jobs=all_jobs, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Opt-in (starts stopped): trains every registered hyperparameter set of the swept "
               "datasets that was never trained there, one run per configuration. Retraining on new data "
               "and the leaderboards follow by declarative automation, whether this runs or not.")
    def sweep(context: dg.SensorEvaluationContext, project_config: ProjectResource):
        plan = sweep_plan(project_config.load(), context.instance)
        cursor = _report_once(plan.registration.invalid, context.cursor, context.log)
        for what, key in plan.same_as.items():
            context.log.info(f"{what} resolves to the same configuration as {key!r}: trained once")
        return dg.SensorResult(run_requests=plan.runs, dynamic_partitions_requests=plan.registration.requests(),
                               cursor=cursor,
                               skip_reason=None if plan.runs else "every set of the swept datasets is trained")

    @dg.schedule(
        name="retrain_schedule",
        cron_schedule=str(schedule_cfg.get("cron", DEFAULT_CRON)),
        execution_timezone=str(schedule_cfg.get("timezone", "UTC")),
        job=jobs["data_job"],
        default_status=dg.DefaultScheduleStatus.RUNNING if enabled else dg.DefaultScheduleStatus.STOPPED,
        description="Re-checks every swept dataset's archive; where the split's data version changes, the "
        "sets already trained on it retrain (declarative automation).",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext, project_config: ProjectResource):
        return schedule_requests(project_config.load())

    automation = dg.AutomationConditionSensorDefinition(
        "automation", target=dg.AssetSelection.assets(*automated), minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Declarative automation: retrains trained models when their split changes, and "
        "refreshes evaluations, recommendations, leaderboards and champions after their inputs update. "
        "Starts nothing that was never trained.")
    return [register_sets, sweep, automation], [retrain_schedule]
