"""Tuning (issue 17): an Optuna study whose trials are ordinary hparams partitions trained by real
Dagster runs, its study in a real SQLite storage beside the instance; resume after SIGKILL, pruning,
the tune job and the tuning report, and a search space checked at load."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from flexmf_assets.cli import tune
from flexmf_assets.cli_report import Session
from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.defs.assets.leaderboard import leaderboard_frame
from flexmf_assets.defs.definitions import build_definitions
from flexmf_assets.defs.records import latest_materialization, model_partition_key
from flexmf_assets.defs.tuning import open_track_study, study_storage
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import load_project
from flexmf_assets.tracks import TRACKS
from flexmf_assets.tuning import STUDY_TAG, TRIAL_TAG, open_study
from conftest import MINE_CSV

CONFIG = MINE_CSV + """\
explicit_hparams:
  default: {{epochs: 6, embedding_size: 4, patience: null}}
tune:
  explicit:
    trials: 5
    seed: 3
    pruning: {{startup_trials: 2, warmup_epochs: 1}}
    space:
      learning_rate: {{low: 0.01, high: 0.05, log: true}}
      embedding_size: {{low: 2, high: 6}}
"""


def write_project(tmp_path: Path, config: str = CONFIG) -> Path:
    csv = tmp_path / "ratings.csv"
    generate(SyntheticConfig(n_users=120, n_items=150, n_ratings=6000, seed=1)).ratings.write_csv(csv)
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(config.format(url=csv.as_uri()))
    return cfg


def study_trials(instance: dg.DagsterInstance, project, dataset: str = "mine"):
    return open_track_study(project, instance, "explicit", dataset, create=False).get_trials(deepcopy=False)


def successful_model_runs(instance: dg.DagsterInstance, key: str) -> int:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("explicit_model"),
                              asset_partitions=[str(model_partition_key("mine", key))]), limit=100).records
    return len({r.run_id for r in records if instance.get_run_by_id(r.run_id).status == dg.DagsterRunStatus.SUCCESS})


# -- the search space, checked at load ----------------------------------------------------------
SPACE = "tune:\n  {track}:\n{body}"


@pytest.mark.parametrize("track,body,message", [
    ("explicit", "    space:\n      learnin_rate: {low: 0.001, high: 0.1}\n",
     "tune.explicit.space.learnin_rate: unknown FlexMFExplicitConfig field 'learnin_rate' (did you mean "
     "'learning_rate'?)"),
    ("explicit", "    space:\n      learning_rate: {low: 0, high: 0.1, log: true}\n",
     "tune.explicit.space.learning_rate: a log range needs low > 0, got 0"),
    ("explicit", "    space:\n      learning_rate: {low: 0.1, high: 0.01}\n",
     "tune.explicit.space.learning_rate: low must be below high, got low 0.1, high 0.01"),
    ("explicit", "    space:\n      epochs: {low: 1, high: 100000}\n",
     "tune.explicit.space.epochs: 100000 does not build: FlexMFExplicitConfig.epochs: must be >= 1 and <= 10,000"),
    ("explicit", "    space:\n      reg_method: {low: 1, high: 2}\n",
     "tune.explicit.space.reg_method: FlexMFExplicitConfig.reg_method is not numeric; give a list of choices"),
    ("implicit", "    space:\n      loss: [logistic, hinge]\n",
     "tune.implicit.space.loss: 'hinge' does not build: FlexMFImplicitConfig.loss: 'hinge' is not one of"),
    ("explicit", "    trials: 0\n    space:\n      learning_rate: {low: 0.001, high: 0.1}\n",
     "tune.explicit.trials: expected a positive integer, got the integer 0"),
    ("explicit", "    sampler: cmaes\n    space:\n      learning_rate: {low: 0.001, high: 0.1}\n",
     "tune.explicit.sampler: expected one of tpe, random, got the string 'cmaes'"),
    ("explicit", "    trials: 3\n", "tune.explicit.space: expected a mapping of fields to search"),
    ("explicit", "    pruning: {warmup: 3}\n    space:\n      learning_rate: {low: 0.001, high: 0.1}\n",
     "tune.explicit.pruning: unknown key 'warmup' (did you mean 'warmup_epochs'?)"),
    ("explicit", "    base: {epochs: 5}\n    space:\n      epochs: {low: 1, high: 10}\n",
     "tune.explicit.space.epochs: 'epochs' is both searched and fixed in base"),
    ("explicitt", "    space: {}\n", "tune: unknown key 'explicitt' (did you mean 'explicit'?)"),
    # one solver per study: a space mixing ALS with the gradient solver's fields does not build
    ("explicit", "    space:\n      solver: [sgd, als]\n      learning_rate: {low: 0.001, high: 0.1}\n",
     "tune.explicit.space: the combination solver=als;learning_rate=0.001 does not build: "
     "FlexMFExplicitConfig.learning_rate: applies only to solver 'sgd'"),
    ("implicit", "    base: {solver: als}\n    space:\n      loss: [logistic, pairwise]\n",
     "FlexMFImplicitConfig.loss: applies only to solver 'sgd'"),
])
def test_invalid_search_space_fails_at_load_with_one_line(tmp_path, track, body, message):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(SPACE.format(track=track, body=body))
    with pytest.raises(ConfigError) as err:
        load_project(cfg, env={})
    text = str(err.value)
    assert "\n" not in text and text.startswith("flexmf.yaml ") and message in text, text


def test_choices_follow_the_config_class_fields(tmp_path):
    """Choices are checked against the track's config class, whatever its fields (a `solver` field
    is searchable where the class has one)."""
    cfg = tmp_path / "flexmf.yaml"
    fields = TRACKS["implicit"].config_class.field_names()
    cfg.write_text(SPACE.format(track="implicit", body="    space:\n      loss: [logistic, pairwise]\n"
                                "      negative_strategy: [uniform, misranked]\n"
                                "      embedding_size: {low: 8, high: 128, log: true}\n"))
    spec = load_project(cfg, env={}).tune["implicit"]
    dists = spec.distributions()
    assert list(dists) == ["loss", "negative_strategy", "embedding_size"]
    assert dists["embedding_size"].log and type(dists["embedding_size"]).__name__ == "IntDistribution"
    cfg.write_text(SPACE.format(track="implicit", body="    space:\n      loss: [logistic, warp]\n"
                                "      negative_strategy: [uniform, misranked]\n"))
    with pytest.raises(ConfigError, match=r"tune.implicit.space: the combination loss=warp;"
                       r"negative_strategy=uniform does not build: .*needs negative_strategy 'misranked'"):
        load_project(cfg, env={})
    if "solver" not in fields:
        cfg.write_text(SPACE.format(track="implicit", body="    space:\n      solver: [als]\n"))
        with pytest.raises(ConfigError, match="tune.implicit.space.solver: unknown FlexMFImplicitConfig field"):
            load_project(cfg, env={})


def test_a_study_resumes_only_with_its_own_search(tmp_path):
    cfg = write_project(tmp_path)
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = project.tune["explicit"]
    open_study(spec, "mine", url, lower_is_better=True)
    cfg.write_text(cfg.read_text().replace("high: 0.05", "high: 0.07"))
    changed = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")}).tune["explicit"]
    with pytest.raises(ConfigError, match="study 'explicit.mine' was made with another search space"):
        open_study(changed, "mine", url, lower_is_better=True)


# -- a study through real Dagster runs ------------------------------------------------------------
def flexmf_tune(cwd: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexmf_assets.cli", "tune", "--track", "explicit", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_killed_tune_resumes_to_exactly_n_trials_without_duplicates(tmp_path):
    cfg = write_project(tmp_path)
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg), "GX_ANALYTICS_ENABLED": "False"}
    for name in ("DAGSTER_HOME", "FLEXMF_DATA_DIR"):
        env.pop(name, None)
    project = load_project(cfg, env={})
    home = tmp_path / "data" / "dagster_home"
    proc = flexmf_tune(tmp_path, env, "--trials", "5")
    try:
        deadline = time.monotonic() + 600
        killed_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not (home / "optuna.db").exists():
                continue
            try:
                trials = open_study(project.tune["explicit"], "mine", f"sqlite:///{home / 'optuna.db'}",
                                    lower_is_better=True, create=False).get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001 - the study is being created
                continue
            done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
            running = [t for t in trials if t.state.name == "RUNNING" and "key" in t.user_attrs]
            if len(done) >= 2 and running:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = (len(done), running[0].number, running[0].user_attrs["key"])
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed_at is not None, proc.stdout.read()
    done_before, stale_number, stale_key = killed_at
    assert done_before < 5

    again = flexmf_tune(tmp_path, env, "--trials", "5")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert f"resuming 1 trial(s) left running by a process that is gone: {stale_number} ({stale_key})" in out
    assert "study explicit.mine: 5 of 5 trials" in out
    trial_lines = [line for line in out.splitlines() if " trial " in line and "/5 " in line and " done in " in line]
    assert len(trial_lines) == 5 - done_before, out  # only what was missing

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    trials = study_trials(instance, project)
    assert len(trials) == 5 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    keys = [t.user_attrs["key"] for t in trials]
    assert len(set(keys)) == 5, keys
    assert next(t for t in trials if t.number == stale_number).user_attrs["key"] == stale_key
    for key in keys:  # each trial's partition trained by exactly one successful run, tagged with its trial
        assert successful_model_runs(instance, key) == 1, key
    assert set(instance.get_dynamic_partitions("explicit_hparams")) >= set(keys)
    tagged = instance.get_runs(dg.RunsFilter(tags={STUDY_TAG: "explicit.mine"}))
    assert {r.tags[TRIAL_TAG] for r in tagged if r.status == dg.DagsterRunStatus.SUCCESS} == {str(n) for n in range(5)}
    # a second call with the same total trains nothing
    third = flexmf_tune(tmp_path, env, "--trials", "5")
    out3, _ = third.communicate(timeout=600)
    assert third.returncode == 0 and not re.search(r"\] trial \d+/5 ", out3), out3
    assert "study explicit.mine: 5 of 5 trials" in out3
    assert len(study_trials(instance, project)) == 5


@pytest.mark.slow
def test_hopeless_trial_is_pruned_not_failed_and_never_champion(tmp_path, dagster_instance):
    cfg = write_project(tmp_path)
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    with Session(tmp_path / "logs", "tune", out=open(os.devnull, "w"), err=open(os.devnull, "w")) as session:
        assert tune(project, "explicit", "mine", 3, session, instance=dagster_instance)
    study = open_track_study(project, dagster_instance, "explicit", "mine", create=False)
    # a planted trial far outside the space: it barely moves from the initial ratings
    study.enqueue_trial({"learning_rate": 1e-6, "embedding_size": 4}, skip_if_exists=False)
    with Session(tmp_path / "logs", "tune", out=open(os.devnull, "w"), err=open(os.devnull, "w")) as session:
        assert tune(project, "explicit", "mine", 4, session, instance=dagster_instance)
        assert session.ok  # a pruned trial is a successful run, never a failure
    trials = study_trials(dagster_instance, project)
    hopeless = next(t for t in trials if t.number == 3)
    key = "embedding_size=4;learning_rate=1e-06"
    assert hopeless.user_attrs["key"] == key and hopeless.state.name == "PRUNED"
    model = latest_materialization(dagster_instance, "explicit_model", str(model_partition_key("mine", key)))
    meta = model.asset_materialization.metadata
    assert meta["state"].value == "pruned" and meta["trial"].value == 4
    assert meta["epochs_run"].value < 6  # training stopped early
    assert dagster_instance.get_run_by_id(model.run_id).status == dg.DagsterRunStatus.SUCCESS
    board = leaderboard_frame(dagster_instance, TRACKS["explicit"], "mine")
    row = board.filter(board["hparams"] == key).row(0, named=True)
    assert row["state"] == "pruned" and not row["champion"]
    assert board.filter(board["champion"]).row(0, named=True)["state"] == "trained"
    assert board["state"].to_list()[-1] == "pruned"  # pruned trials rank after the trained sets
    report = latest_materialization(dagster_instance, "explicit_tuning_report", "mine").asset_materialization
    assert report.metadata["trials"].value == 4 and report.metadata["trials_pruned"].value >= 1
    for figure in ("history", "importances"):
        text = report.metadata[figure].value
        assert text.startswith("![") and len(text) < 1000, text


@pytest.mark.slow
def test_tune_job_launched_with_config_runs_trials_and_the_report(tmp_path, dagster_instance):
    cfg = write_project(tmp_path)
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    defs = build_definitions(project, config_path=str(cfg))
    result = defs.resolve_job_def("tune_job").execute_in_process(
        instance=dagster_instance, raise_on_error=False,
        run_config={"ops": {"tune": {"config": {"track": "explicit", "dataset": "mine", "trials": 2}}}})
    assert result.success
    logs = [e.message for e in dagster_instance.all_logs(result.run_id) if e.user_message]
    assert any("trial 1/2 " in m and "val_rmse" in m for m in logs), logs
    assert any(m.startswith("study explicit.mine: 2 of 2 trials") for m in logs), logs
    runs = dagster_instance.get_runs(dg.RunsFilter(tags={STUDY_TAG: "explicit.mine"}))
    assert sorted(r.tags[TRIAL_TAG] for r in runs) == ["0", "1"]
    assert all(r.job_name == "explicit_job" and r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    report = latest_materialization(dagster_instance, "explicit_tuning_report", "mine").asset_materialization
    assert report.metadata["trials"].value == 2
    assert report.metadata["best_partition"].value.startswith("mine|embedding_size=")
    assert study_storage(dagster_instance) == f"sqlite:///{dagster_instance.root_directory}/optuna.db"
    board = latest_materialization(dagster_instance, "explicit_leaderboard", "mine").asset_materialization
    assert board.metadata["entries"].value == 2


def _open_storage(url: str) -> None:
    from flexmf_assets.tuning import _storage

    _storage(url)


def test_processes_opening_a_new_study_database_at_once_all_succeed(tmp_path):
    """`flexmf tune` and a tune_job (or a second tune) starting together both create the schema of a new
    database; the losers of that race open it once it is there instead of failing."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'optuna-{attempt}.db'}"
        procs = [ctx.Process(target=_open_storage, args=(url,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
