"""Sweeps, retraining and lineage with Dagster's own test helpers (issue 5)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.defs.automation import _report_once, sweep_plan
from flexmf_assets.defs.records import latest_materialization, model_partition_key
from flexmf_assets.defs.definitions import build_definitions
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.project import load_project

from conftest import MINE_CSV, failure_text

BASE = MINE_CSV + """\
explicit_hparams:
  default: {{epochs: 12, embedding_size: 8, patience: null}}
  short: {{epochs: 1, embedding_size: 8, learning_rate: 0.002}}
{extra}
implicit_hparams:
  default: {{epochs: 2, embedding_size: 8}}
sweep: {{datasets: [mine]}}
schedule: {{cron: "15 4 * * 0"}}
"""


def write_ratings(path: Path, seed: int) -> None:
    cfg = SyntheticConfig(n_users=120, n_items=150, n_ratings=6000, seed=seed)
    generate(cfg).ratings.write_csv(path)


class Env:
    def __init__(self, tmp_path: Path, instance: dg.DagsterInstance):
        self.tmp = tmp_path
        self.instance = instance
        self.csv = tmp_path / "ratings.csv"
        write_ratings(self.csv, seed=1)
        self.cfg = tmp_path / "flexmf.yaml"
        self.write()

    def write(self, extra: str = "") -> None:
        self.cfg.write_text(BASE.format(url=self.csv.as_uri(), extra=extra))
        self.project = load_project(self.cfg, env={"FLEXMF_DATA_DIR": str(self.tmp / "state")})
        self.defs = build_definitions(self.project, config_path=str(self.cfg))

    def tick(self):
        return sweep_plan(self.project, self.instance)

    def apply(self, result) -> None:
        """What the daemon does with a sensor result (or a sweep plan): add partitions, run the requests."""
        adds = result.registration.requests() if hasattr(result, "registration") else \
            result.dynamic_partitions_requests or []
        for req in adds:
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        for run in (result.runs if hasattr(result, "runs") else result.run_requests or []):
            self.run(run.job_name, run.partition_key)

    def run_assets(self, assets: list[str], key) -> None:
        """Materialize only ``assets`` for one partition (what a launch from an asset page does)."""
        job = dg.define_asset_job("adhoc", selection=assets)
        defs = dg.Definitions.merge(self.defs, dg.Definitions(jobs=[job]))
        result = defs.resolve_job_def("adhoc").execute_in_process(
            partition_key=key, instance=self.instance, raise_on_error=False)
        assert result.success, failure_text(result)

    def run(self, job: str, key) -> dg.ExecuteInProcessResult:
        result = self.defs.resolve_job_def(job).execute_in_process(
            partition_key=key, instance=self.instance, raise_on_error=False)
        assert result.success, failure_text(result)
        return result


@pytest.fixture
def env(tmp_path, dagster_instance):
    return Env(tmp_path, dagster_instance)


def context(env, sensor: str) -> tuple[dg.SensorDefinition, dg.SensorEvaluationContext]:
    return env.defs.resolve_sensor_def(sensor), dg.build_sensor_context(
        instance=env.instance, definitions=env.defs,
        resources={"project_config": ProjectResource(config_path=str(env.cfg))})


def test_nothing_trains_unasked_sweep_sensor_is_opt_in(env):
    sensors = {s.name: s.default_status for s in env.defs.sensors}
    assert sensors == {"register_sets": dg.DefaultSensorStatus.RUNNING, "sweep": dg.DefaultSensorStatus.STOPPED,
                       "automation": dg.DefaultSensorStatus.RUNNING,
                       "free_dead_run_slots": dg.DefaultSensorStatus.RUNNING}
    # the running registration sensor adds the file's sets as partitions and launches nothing
    sensor, ctx = context(env, "register_sets")
    first = sensor.evaluate_tick(ctx)
    added = {r.partitions_def_name: set(r.partition_keys) for r in first.dynamic_partitions_requests}
    assert added["explicit_hparams"] == {"default", "tuned", "als", "short"}
    assert added["implicit_hparams"] >= {"default", "bpr", "warp", "best"}
    assert not first.run_requests
    env.apply(env.tick())
    # declarative automation on a fresh instance: nothing is missing-triggered, nothing requested
    result = dg.evaluate_automation_conditions(defs=env.defs, instance=env.instance)
    assert result.total_requested == 0


def test_sweep_trains_each_configuration_once_never_twice_never_invalid_keys(env):
    env.write(extra="  same_as_default: {epochs: 12, embedding_size: 8, patience: null}")
    sensor, ctx = context(env, "sweep")
    first = sensor.evaluate_tick(ctx)
    # no split yet: the data run comes first
    assert [(r.job_name, r.partition_key) for r in first.run_requests] == [("data_job", "mine")]
    env.apply(first)
    # a key typed in the UI that does not parse, and one equivalent to `default` in another spelling
    env.instance.add_dynamic_partitions("explicit_hparams", ["embeding_size=8", "patience=none;epochs=12;embedding_size=8"])
    log = _Log()
    plan = sweep_plan(env.project, env.instance)
    wanted = {(r.job_name, str(r.partition_key)) for r in plan.runs}
    assert ("explicit_job", "mine|default") in wanted and ("explicit_job", "mine|short") in wanted
    # each run records the assets it targets (automation then does not refresh them a second time)
    assert all(sorted(k.to_user_string() for k in r.asset_selection) == sorted(
        f"{r.job_name.removesuffix('_job')}_{a}" for a in ("evaluation", "model", "recommendations"))
        for r in plan.runs)
    # one run per configuration: the duplicates of `default` are named, not trained
    assert plan.same_as == {"explicit:mine|same_as_default": "default",
                            "explicit:mine|patience=none;epochs=12;embedding_size=8": "default"}
    assert not any("embeding_size" in str(r.partition_key) for r in plan.runs)
    # the invalid key is reported once, naming the field, never as "no longer in flexmf.yaml"
    cursor = _report_once(plan.registration.invalid, None, log)
    _report_once(plan.registration.invalid, cursor, log)
    [message] = [m for m in log.messages if "embeding_size" in m]
    assert "is invalid and will never be trained" in message and "did you mean 'embedding_size'" in message
    assert not any("no longer in flexmf.yaml" in m for m in log.messages)

    # a partition with a run on its way (here: started by a user a moment ago) is never launched again
    run_requests = [r for r in plan.runs if str(r.partition_key) == "mine|default"]
    env.instance.add_run(dg.DagsterRun(job_name="explicit_job", run_id="queued-default",
                                       status=dg.DagsterRunStatus.STARTED,
                                       tags={"dagster/partition": "mine|default"}))
    again = sweep_plan(env.project, env.instance)
    assert "explicit:mine|default" in again.pending
    assert not [r for r in again.runs if str(r.partition_key) == "mine|default"]
    env.instance.report_run_canceled(env.instance.get_run_by_id("queued-default"))

    # trained: nothing left to do; the equivalents stay untrained
    for req in [*run_requests, *(r for r in plan.runs if str(r.partition_key) != "mine|default")]:
        env.run(req.job_name, req.partition_key)
    done = sweep_plan(env.project, env.instance)
    assert done.runs == [] and set(done.same_as) == set(plan.same_as)


def test_retraining_and_boards_follow_by_declarative_automation(env):
    """The schedule re-checks the archive; an unchanged archive retrains nothing; a changed one
    retrains exactly the sets already trained on it; evaluations, leaderboards and the champion
    follow, evaluated by Dagster's own automation machinery tick by tick."""
    schedule = env.defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "15 4 * * 0"
    sched_ctx = dg.build_schedule_context(instance=env.instance, repository_def=env.defs.get_repository_def(),
                                          resources={"project_config": ProjectResource(config_path=str(env.cfg))})
    assert [(r.job_name, r.partition_key) for r in schedule.evaluate_tick(sched_ctx).run_requests] == [
        ("data_job", "mine")]
    env.apply(env.tick())  # registers the sets
    env.run("data_job", "mine")
    tick = Ticker(env)
    assert tick() == {}  # nothing trained: nothing to follow
    # the user trains one set, the model only (as from the asset page)
    env.run_assets(["explicit_model"], model_partition_key("mine", "default"))
    assert tick() == {"explicit_evaluation": {"mine|default"}, "explicit_recommendations": {"mine|default"}}
    env.run_assets(["explicit_evaluation", "explicit_recommendations"], model_partition_key("mine", "default"))
    # the board follows the new evaluation, and the champion the board, in one run
    assert tick() == {"explicit_leaderboard": {"mine"}, "champion_recommendations": {"mine"}}
    env.run_assets(["explicit_leaderboard", "champion_recommendations"], "mine")
    assert tick() == {}  # everything is fresh

    # the scheduled re-check with an unchanged archive: same data versions, nothing retrains
    split_before = latest_materialization(env.instance, "split", "mine").asset_materialization.tags
    env.run("data_job", "mine")
    archive = latest_materialization(env.instance, "archive", "mine").asset_materialization
    assert archive.metadata["cache_hit"].value is True
    split_after = latest_materialization(env.instance, "split", "mine").asset_materialization.tags
    assert split_after["dagster/data_version"] == split_before["dagster/data_version"]
    assert tick() == {}

    # the archive changes: exactly the trained set retrains (with its evaluation and tables in the same
    # tick); `short`, never trained, stays untrained
    write_ratings(env.csv, seed=2)
    env.run("data_job", "mine")
    assert tick() == {a: {"mine|default"} for a in ("explicit_model", "explicit_evaluation",
                                                     "explicit_recommendations")}


class Ticker:
    """Declarative automation, one daemon tick at a time: what each tick requests."""

    def __init__(self, env):
        self.env, self.cursor = env, None

    def __call__(self) -> dict[str, set[str]]:
        result = dg.evaluate_automation_conditions(defs=self.env.defs, instance=self.env.instance,
                                                   cursor=self.cursor)
        self.cursor = result.cursor
        out: dict[str, set[str]] = {}
        for r in result.results:
            if r.true_subset.size:
                out[r.key.to_user_string()] = {str(k) for k in r.true_subset.expensively_compute_partition_keys()}
        return out


class _Log:
    def __init__(self):
        self.messages: list[str] = []

    def warning(self, message: str) -> None:
        self.messages.append(message)


def test_leaderboard_champion_by_validation_and_lineage(env):
    env.run("data_job", "mine")
    env.instance.add_dynamic_partitions("explicit_hparams", ["default", "short"])
    env.instance.add_dynamic_partitions("implicit_hparams", ["default"])
    for name in ("default", "short"):
        env.run("explicit_job", model_partition_key("mine", name))
    env.run("implicit_job", model_partition_key("mine", "default"))
    env.run("leaderboard_job", "mine")

    board = latest_materialization(env.instance, "explicit_leaderboard", "mine").asset_materialization
    vals = {}
    for name in ("default", "short"):
        ev = latest_materialization(env.instance, "explicit_evaluation", str(model_partition_key("mine", name)))
        vals[name] = ev.asset_materialization.metadata["validation_val_rmse"].value
    best = min(vals, key=vals.get)
    assert board.metadata["champion"].value == f"mine|{best}"
    assert board.metadata["champion_validation"].value == pytest.approx(vals[best])
    assert board.metadata["entries"].value == 2

    champ = latest_materialization(env.instance, "champion_recommendations", "mine").asset_materialization
    assert champ.metadata["explicit_champion"].value == f"mine|{best}"
    store_dir = env.project.storage_dir / "champion_recommendations" / "mine"
    from upath import UPath

    from flexmf_assets.storage import VersionedStore

    table = VersionedStore().read(UPath(store_dir))
    explicit_rows = table.filter(pl.col("track") == "explicit")
    assert explicit_rows["champion_partition"].unique().to_list() == [f"mine|{best}"]
    assert set(table["track"].unique()) == {"explicit", "implicit"}

    # lineage, through the event log: recommendations -> model -> split -> ratings -> archive
    recs = latest_materialization(env.instance, "explicit_recommendations", str(model_partition_key("mine", best)))
    model = latest_materialization(env.instance, "explicit_model", str(model_partition_key("mine", best)))
    split = latest_materialization(env.instance, "split", "mine")
    ratings = latest_materialization(env.instance, "ratings", "mine")
    archive = latest_materialization(env.instance, "archive", "mine")
    # each materialization records the exact upstream event it read (storage id of the event)
    def pointer(record, upstream):
        return int(record.asset_materialization.tags[f"dagster/input_event_pointer/{upstream}"])

    assert pointer(recs, "explicit_model") == model.storage_id
    assert pointer(model, "split") == split.storage_id
    assert pointer(split, "ratings") == ratings.storage_id
    assert pointer(ratings, "archive") == archive.storage_id
    assert model.asset_materialization.metadata["split_data_version"].value == split.asset_materialization.tags["dagster/data_version"]
    meta = recs.asset_materialization.metadata
    assert meta["model_run_id"].value == model.run_id
    assert meta["archive_sha256"].value == archive.asset_materialization.metadata["sha256"].value
    assert meta["archive_url"].value == env.csv.as_uri()
    assert (meta["split_protocol"].value, meta["split_seed"].value) == ("random", 42)
    assert meta["hparams"].value["embedding_size"] == 8 and meta["device"].value == "cpu"
    assert meta["model_code_version"].value == "1"


def test_code_versions_on_every_asset(env):
    graph = env.defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).code_version, key.to_user_string()
