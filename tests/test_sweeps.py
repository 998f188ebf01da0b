"""Sweeps, retraining and lineage with Dagster's own test helpers (issue 5)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.defs.automation import latest_materialization, model_key, sweep_requests
from flexmf_assets.defs.definitions import build_definitions
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.project import load_project

from conftest import failure_text

BASE = """
default_dataset: mine
validation: {{min_rows: 100}}
datasets:
  mine:
    url: {url}
    format: csv
    columns: {{user_id: user_id, item_id: item_id, rating: rating, timestamp: timestamp}}
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

    def tick(self) -> dg.SensorResult:
        return sweep_requests(self.project, self.instance)

    def apply(self, result: dg.SensorResult) -> None:
        """What the daemon does with a sensor result: add partitions, then run the requests."""
        for req in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        for run in result.run_requests or []:
            self.run(run.job_name, run.partition_key)

    def run(self, job: str, key) -> dg.ExecuteInProcessResult:
        result = self.defs.resolve_job_def(job).execute_in_process(
            partition_key=key, instance=self.instance, raise_on_error=False)
        assert result.success, failure_text(result)
        return result


@pytest.fixture
def env(tmp_path, dagster_instance):
    return Env(tmp_path, dagster_instance)


def test_sensor_registers_new_names_trains_them_and_reports_removed(env):
    # through Dagster's own sensor machinery first
    sensor = env.defs.resolve_sensor_def("sweep")
    context = dg.build_sensor_context(instance=env.instance, definitions=env.defs,
                                      resources={"project_config": ProjectResource(config_path=str(env.cfg))})
    first = sensor.evaluate_tick(context)
    added = {r.partitions_def_name: set(r.partition_keys) for r in first.dynamic_partitions_requests}
    assert added["explicit_hparams"] == {"default", "tuned", "short"}
    assert added["implicit_hparams"] >= {"default", "bpr", "warp", "best"}
    # no split yet: the data run comes first
    assert [(r.job_name, r.partition_key) for r in first.run_requests] == [("data_job", "mine")]

    env.apply(env.tick())
    second = env.tick()
    assert not second.dynamic_partitions_requests
    wanted = {(r.job_name, str(r.partition_key)) for r in second.run_requests}
    assert ("explicit_job", "mine|default") in wanted and ("implicit_job", "mine|bpr") in wanted
    n_partitions = len(env.instance.get_dynamic_partitions("explicit_hparams")) + len(
        env.instance.get_dynamic_partitions("implicit_hparams"))
    assert len(wanted) == n_partitions  # every registered partition of the swept dataset

    # a new name in the file: exactly that one is added
    env.write(extra="  extra_set: {epochs: 2, embedding_size: 4}")
    third = env.tick()
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in third.dynamic_partitions_requests] == [
        ("explicit_hparams", ["extra_set"])]
    env.instance.add_dynamic_partitions("explicit_hparams", ["extra_set"])

    # removed from the file: reported, never deleted
    env.write(extra="")
    env.instance.add_dynamic_partitions("explicit_hparams", [])
    result = sweep_requests(env.project, env.instance, log=_Log())
    assert "extra_set" in env.instance.get_dynamic_partitions("explicit_hparams")
    assert not any(isinstance(r, dg.DeleteDynamicPartitionsRequest) for r in result.dynamic_partitions_requests or [])
    assert any("'extra_set' is no longer in flexmf.yaml" in m for m in _Log.messages)


class _Log:
    messages: list[str] = []

    def warning(self, message: str) -> None:
        _Log.messages.append(message)


def test_schedule_rechecks_and_unchanged_archive_retrains_nothing(env):
    schedule = env.defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "15 4 * * 0"
    context = dg.build_schedule_context(instance=env.instance, repository_def=env.defs.get_repository_def(),
                                        resources={"project_config": ProjectResource(config_path=str(env.cfg))})
    requests = schedule.evaluate_tick(context).run_requests
    assert [(r.job_name, r.partition_key) for r in requests] == [("data_job", "mine")]

    env.instance.add_dynamic_partitions("explicit_hparams", ["default"])
    env.run("data_job", "mine")
    env.apply(env.tick())  # trains mine|default (explicit) and the implicit sets it registers
    assert env.tick().run_requests == []  # everything current

    # second scheduled run, archive unchanged: same data versions, nothing to retrain
    split_before = latest_materialization(env.instance, "split", "mine").asset_materialization.tags
    for r in schedule.evaluate_tick(context).run_requests:
        env.run(r.job_name, r.partition_key)
    archive = latest_materialization(env.instance, "archive", "mine").asset_materialization
    assert archive.metadata["cache_hit"].value is True
    split_after = latest_materialization(env.instance, "split", "mine").asset_materialization.tags
    assert split_after["dagster/data_version"] == split_before["dagster/data_version"]
    assert env.tick().run_requests == []

    # the archive changes: new data version, every registered partition is retrained
    write_ratings(env.csv, seed=2)
    env.run("data_job", "mine")
    retrain = {str(r.partition_key) for r in env.tick().run_requests}
    registered = set(env.instance.get_dynamic_partitions("explicit_hparams")) | set(
        env.instance.get_dynamic_partitions("implicit_hparams"))
    assert {k.split("|")[1] for k in retrain} == registered


def test_leaderboard_champion_by_validation_and_lineage(env):
    env.run("data_job", "mine")
    env.instance.add_dynamic_partitions("explicit_hparams", ["default", "short"])
    env.instance.add_dynamic_partitions("implicit_hparams", ["default"])
    for name in ("default", "short"):
        env.run("explicit_job", model_key("mine", name))
    env.run("implicit_job", model_key("mine", "default"))
    env.run("leaderboard_job", "mine")

    board = latest_materialization(env.instance, "explicit_leaderboard", "mine").asset_materialization
    vals = {}
    for name in ("default", "short"):
        ev = latest_materialization(env.instance, "explicit_evaluation", str(model_key("mine", name)))
        vals[name] = ev.asset_materialization.metadata["validation_val_rmse"].value
    best = min(vals, key=vals.get)
    assert board.metadata["champion"].value == f"mine|{best}"
    assert board.metadata["champion_validation"].value == pytest.approx(vals[best])
    assert board.metadata["entries"].value == 2

    champ = latest_materialization(env.instance, "champion_recommendations", "mine").asset_materialization
    assert champ.metadata["explicit_champion"].value == f"mine|{best}"
    store_dir = env.project.storage_dir / "champion_recommendations" / "mine"
    from upath import UPath

    from flexmf_assets.defs.io_managers import VersionedStore

    table = VersionedStore().read(UPath(store_dir))
    explicit_rows = table.filter(pl.col("track") == "explicit")
    assert explicit_rows["champion_partition"].unique().to_list() == [f"mine|{best}"]
    assert set(table["track"].unique()) == {"explicit", "implicit"}

    # lineage, through the event log: recommendations -> model -> split -> ratings -> archive
    recs = latest_materialization(env.instance, "explicit_recommendations", str(model_key("mine", best)))
    model = latest_materialization(env.instance, "explicit_model", str(model_key("mine", best)))
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
