"""Tuning in Dagster: the ``tune_job`` (a study launched from the UI with its config), the
``<track>_tuning_report`` assets, and what a trial's run needs (the study's storage, the epoch reporter,
the trial's result read from the run).

Every trial is an ordinary run of ``<track>_job`` for the partition ``<dataset>|<trial key>``, tagged
``flexmf/study`` and ``flexmf/trial``; the model asset reports its validation values to the trial and
stops when the pruner prunes it (the run succeeds; the model and the evaluation record ``state:
pruned``). The study logic is the library's (:mod:`flexmf_assets.tuning`).
"""


from typing import Any, Callable

import dagster as dg
import polars as pl

from flexmf_assets.defs.failures import user_errors
from flexmf_assets.defs.metadata import rounded, table
from flexmf_assets.defs.partitions import BY_DATASET, DATASET_DIM, HPARAMS_DIM
from flexmf_assets.defs.records import latest_materialization
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.errors import ConfigError
from flexmf_assets.evaluation.charts import Series, bar_chart, line_chart
from flexmf_assets.files import jsonable
from flexmf_assets.project import ProjectConfig
from flexmf_assets.tracks import TRACKS
from flexmf_assets.tracks import track as get_track
from flexmf_assets.tuning import (STUDY_TAG, TRIAL_TAG, StudyOutcome, TrialReporter, TrialResult, best_trial,
                                  open_study, run_study, storage_url, trials_table)

TUNING_GROUP = "tuning"


def study_storage(instance: dg.DagsterInstance) -> str:
    """The Optuna storage of ``instance``: its Postgres (distributed profile), else ``optuna.db`` in
    its ``DAGSTER_HOME``."""
    return storage_url(instance.root_directory, getattr(instance.run_storage, "postgres_url", None))


def open_track_study(project: ProjectConfig, instance: dg.DagsterInstance, track: str, dataset: str,
                     create: bool = True):
    project.dataset(dataset)
    return open_study(project.tune_spec(track), dataset, study_storage(instance),
                      lower_is_better=get_track(track).lower_is_better, create=create)


def trial_reporter(context: dg.AssetExecutionContext, project: ProjectConfig, track: str,
                   dataset: str) -> TrialReporter | None:
    """The epoch reporter of a run tagged as a trial (None for an ordinary run)."""
    tags = context.run.tags
    if STUDY_TAG not in tags or TRIAL_TAG not in tags:
        return None
    study = open_track_study(project, context.instance, track, dataset, create=False)
    if study.study_name != tags[STUDY_TAG]:
        raise ConfigError(f"run tag {STUDY_TAG}={tags[STUDY_TAG]!r} does not name the study of "
                          f"tune.{track} on {dataset} ({study.study_name!r})")
    return TrialReporter(study, int(tags[TRIAL_TAG]), get_track(track).val_key)


def trial_tags(study_name: str, number: int) -> dict[str, str]:
    return {STUDY_TAG: study_name, TRIAL_TAG: str(number)}


def result_of(track: str, assets: dict[str, dict[str, Any]], run_id: str | None, ok: bool,
              error: str | None = None) -> TrialResult:
    """A trial's result from the metadata values of its run's materializations (asset -> values)."""
    if not ok:
        return TrialResult("failed", run_id=run_id, error=error or "the run failed")
    model = assets.get(f"{track}_model", {})
    evaluation = assets.get(f"{track}_evaluation", {})
    board = get_track(track)
    metrics = evaluation.get("metrics") or {}
    value = metrics.get(board.validation_metric) if isinstance(metrics, dict) else None
    state = model.get("state", "trained")
    return TrialResult(state, value=value if isinstance(value, (int, float)) else None, run_id=run_id)


def _materialized(result) -> dict[str, dict[str, Any]]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        out[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    return out


def tune_in_process(project: ProjectConfig, instance: dg.DagsterInstance, track: str, dataset: str, total: int,
                    run_job: Callable[[str, Any, dict[str, str], str, Callable], TrialResult], *,
                    say: Callable[[str], None], timeout: float | None = None) -> StudyOutcome:
    """A study of ``track`` on ``dataset`` up to ``total`` trials; ``run_job(job, partition, tags, label,
    describe)`` runs one trial's track job (the CLI's session, or the tune job's nested runs)."""
    spec = project.tune_spec(track)
    study = open_track_study(project, instance, track, dataset)
    partitions = f"{track}_hparams"

    def train(number: int, key: str, label: str, describe) -> TrialResult:
        if key not in instance.get_dynamic_partitions(partitions):
            instance.add_dynamic_partitions(partitions, [key])
        partition = dg.MultiPartitionKey({DATASET_DIM: dataset, HPARAMS_DIM: key})
        return run_job(f"{track}_job", partition, trial_tags(study.study_name, number), f"{label} {key}", describe)

    return run_study(study, spec, get_track(track).config_class, total, train,
                     check=lambda key: project.resolve_hparams(track, key), say=say,
                     metric=get_track(track).val_key, timeout=timeout)


def outcome_text(outcome: StudyOutcome, metric: str) -> str:
    text = f"study {outcome.name}: {outcome.done} of {outcome.total} trials"
    text += f" ({outcome.pruned} pruned, {outcome.failed} failed this time)"
    if outcome.best_key is not None:
        text += f"; best trial {outcome.best_number + 1}: {outcome.best_key} {metric} {outcome.best_value:.4f}"
    if outcome.stopped:
        text += f"; stopped early: {outcome.stopped}"
    return text


# -- the tune job --------------------------------------------------------------------------------
class TuneConfig(dg.Config):
    """What a tune launched from the Launchpad does."""

    track: str = "explicit"
    dataset: str = ""  # empty: flexmf.yaml's default_dataset
    trials: int = 0  # the study's total; 0: tune.<track>.trials


def build_tune_job() -> dg.JobDefinition:
    @dg.op(description="Runs an Optuna study: each trial is an ordinary run of the track's job for a new "
           "hparams partition (its key is the trial's parameters); the study lives beside the instance, so a "
           "second launch resumes it. Then refreshes the leaderboards and the tuning report.")
    @user_errors
    def tune(context: dg.OpExecutionContext, config: TuneConfig, project_config: ProjectResource) -> None:
        from flexmf_assets.defs.definitions import build_definitions

        project = project_config.load()
        dataset = config.dataset or project.default_dataset
        spec = project.tune_spec(config.track)
        total = config.trials or spec.trials
        defs = build_definitions(project, config_path=project_config.config_path)
        instance = context.instance

        def run_job(job: str, partition, tags, label: str, describe) -> TrialResult:
            context.log.info(f"{label}: training")
            result = defs.resolve_job_def(job).execute_in_process(
                instance=instance, partition_key=str(partition), tags=tags, raise_on_error=False)
            trial = result_of(config.track, _materialized(result), result.run_id, result.success)
            context.log.info(f"{label}: {describe(trial)} (run {result.run_id})")
            return trial

        if latest_materialization(instance, "split", dataset) is None:
            run_job("data_job", dataset, {}, f"data {dataset}", lambda r: r.state)
        outcome = tune_in_process(project, instance, config.track, dataset, total, run_job,
                                  say=context.log.info)
        context.log.info(outcome_text(outcome, get_track(config.track).val_key))
        report = [dg.AssetKey(f"{config.track}_tuning_report")]
        for job, selection in (("leaderboard_job", None), ("tuning_report_job", report)):
            result = defs.resolve_job_def(job).execute_in_process(
                instance=instance, partition_key=dataset, asset_selection=selection, raise_on_error=False)
            context.log.info(f"{job} {dataset}: {'done' if result.success else 'FAILED'} (run {result.run_id})")

    @dg.job(name="tune_job", description="Tune a track on a dataset with Optuna (config: track, dataset, "
            "trials); every trial is an hparams partition trained by its own run.", tags={"flexmf/kind": "tune"})
    def tune_job():
        tune()

    return tune_job


# -- the tuning report ---------------------------------------------------------------------------
def history_chart(rows: list[dict[str, Any]], metric: str, lower_is_better: bool) -> str:
    """Each finished trial's value and the best so far, by trial number."""
    done = [r for r in rows if r["value"] is not None and r["state"] in ("trained", "pruned")]
    best, running = [], None
    for r in done:
        if r["state"] == "trained":
            running = r["value"] if running is None else (min if lower_is_better else max)(running, r["value"])
        best.append(running)
    x = [float(r["trial"] + 1) for r in done]
    return line_chart(f"optimisation history ({metric})", x,
                      [Series("trial", [r["value"] for r in done]), Series("best so far", best, dashed=True)],
                      x_label="trial")


def importance_chart(study) -> str:
    """Optuna's parameter importances: fANOVA where scikit-learn is installed, else PED-ANOVA (no
    dependency)."""
    import importlib.util

    import optuna

    if importlib.util.find_spec("sklearn") is not None:
        name, evaluator = "fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)
    else:
        name, evaluator = "PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator()
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        return f"_parameter importances: not yet ({' '.join(str(exc).split())[:120]})_"
    if not importances:
        return "_parameter importances: not yet (fewer than two finished trials)_"
    return bar_chart(f"parameter importances ({name})", list(importances), list(importances.values()))


def _report_asset(track: str, datasets: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    board = get_track(track)

    @dg.asset(
        name=f"{track}_tuning_report",
        partitions_def=datasets,
        deps=[dg.AssetDep(f"{track}_evaluation", partition_mapping=BY_DATASET)],
        group_name=TUNING_GROUP,
        kinds={"optuna", "polars"},
        code_version="1",
        description=f"The Optuna study of tune.{track} on the dataset: the optimisation history and the "
        "parameter importances as figures, and every trial (key, state trained/pruned/failed, validation "
        f"{board.val_key}, run). Refreshed by `flexmf tune` and the tune job.",
    )
    @user_errors
    def report(context: dg.AssetExecutionContext, project_config: ProjectResource):
        project = project_config.load()
        dataset = context.partition_key
        study = open_track_study(project, context.instance, track, dataset, create=False)
        rows = trials_table(study)
        frame = pl.DataFrame(rows, schema={"trial": pl.Int64, "key": pl.String, "state": pl.String,
                                           "value": pl.Float64, "epochs": pl.Int64, "seconds": pl.Float64,
                                           "run_id": pl.String, "duplicate_of": pl.Int64})
        best = best_trial(study)
        counts = frame.group_by("state").len()
        metadata: dict[str, Any] = {
            "study": study.study_name,
            "trials": frame.height,
            **{f"trials_{s}": n for s, n in counts.iter_rows()},
            "best_trial": best.number + 1 if best else -1,
            "best_key": best.user_attrs.get("key", "") if best else "",
            f"best_{board.val_key}": rounded(best.value) if best else None,
            "history": dg.MetadataValue.md(history_chart(rows, board.val_key, board.lower_is_better)),
            "importances": dg.MetadataValue.md(importance_chart(study)),
            "table": table(frame.drop("run_id").with_columns((pl.col("trial") + 1).alias("trial")), 100),
            "raw": dg.MetadataValue.json(jsonable(rows)),
            "dagster/row_count": frame.height,
        }
        if best is not None:
            metadata["best_partition"] = f"{dataset}|{best.user_attrs.get('key', '')}"
        return dg.Output(frame, metadata={k: v for k, v in metadata.items() if v is not None})

    return report


def build_tuning_assets(datasets: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    return [_report_asset(track, datasets) for track in TRACKS]
