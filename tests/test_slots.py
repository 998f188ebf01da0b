"""Killed runs give their concurrency-pool slots back without a person (issue 14, item 19).

Real processes throughout: a ``flexmf materialize`` killed mid-training, and a run worker launched by a
real ``dagster-daemon`` killed mid-training; in both cases a rerun of the same partition completes. The
``flexmf_training`` pool is given one slot (as ``dagster instance concurrency set flexmf_training 1``
would), so one dead run holding it blocks every later training, as two did with the default limit of 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.defs.slots import free_dead_run_slots

from _webserver import Deployment, free_port
from conftest import MINE_CSV

POOL = "flexmf_training"
CONFIG = MINE_CSV + """\
explicit_hparams:
  long: {{epochs: 150, embedding_size: 16, patience: null}}
implicit_hparams:
  default: {{epochs: 2, embedding_size: 8}}
sweep: {{datasets: [mine]}}
schedule: {{enabled: false}}
"""
RERUN_DEADLINE = 600.0  # seconds for the rerun to finish (it trains the same 150 epochs; loaded CI)


class Project:
    """A project on a synthetic CSV in ``root``, with its own DAGSTER_HOME and storage."""

    def __init__(self, root: Path):
        self.root = root
        csv = root / "ratings.csv"
        generate(SyntheticConfig(n_users=1500, n_items=1000, n_ratings=150_000, seed=3)).ratings.write_csv(csv)
        self.config = root / "flexmf.yaml"
        self.config.write_text(CONFIG.format(url=csv.as_uri()))
        self.home = root / "dagster_home"
        self.home.mkdir()
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "FLEXMF_CONFIG": str(self.config),
                    "FLEXMF_DATA_DIR": str(root / "state"), "GX_ANALYTICS_ENABLED": "False",
                    "TQDM_DISABLE": "1", "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
                    # a loaded 2-core machine can take over the default 60 s to start a run worker
                    "DAGSTER_GRPC_TIMEOUT_SECONDS": "300"}

    def flexmf(self, *args: str, **kwargs):
        return subprocess.run([sys.executable, "-m", "flexmf_assets.cli", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, **kwargs)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


def claimed(instance: dg.DagsterInstance) -> set[str]:
    """Run ids holding a slot of the training pool."""
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info(POOL).claimed_slots}


def wait_mid_training(instance: dg.DagsterInstance, job: str, timeout: float = 900.0) -> str:
    """The id of the ``job`` run once its model step has logged a trained epoch (and not finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in instance.get_runs(dg.RunsFilter(job_name=job)):
            logs = instance.all_logs(run.run_id)
            epochs = [e for e in logs if e.step_key == "explicit_model" and e.user_message.startswith("epoch ")]
            done = [e for e in logs if e.step_key == "explicit_model" and e.is_dagster_event
                    and e.dagster_event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)]
            if epochs and not done:
                return run.run_id
            assert not done, f"run {run.run_id} finished training before it could be killed"
        time.sleep(0.2)
    raise AssertionError(f"no {job} run reached training in {timeout:.0f} s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_tree(pid: int) -> None:
    """kill -9 a process and everything it started (its step processes), as the OOM killer or a
    stopped container would."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_killed_flexmf_run_gives_its_slot_back_to_the_next_flexmf_command(tmp_path):
    proj = Project(tmp_path)
    assert proj.flexmf("register", timeout=300).returncode == 0
    instance = proj.instance()
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    first = subprocess.Popen([sys.executable, "-m", "flexmf_assets.cli", "materialize", "--explicit", "long",
                              "--implicit"], cwd=tmp_path, env=proj.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        run_id = wait_mid_training(instance, "explicit_job")
    finally:
        kill_tree(first.pid)
        first.wait(30)
    # the defect: the dead in-process run stays STARTED and keeps the pool's only slot
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    assert claimed(instance) == {run_id}

    started = time.monotonic()
    rerun = proj.flexmf("materialize", "--explicit", "long", "--implicit", timeout=RERUN_DEADLINE)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"flexmf: gave back the pool slots of run {run_id}" in rerun.stdout
    assert "explicit mine|long ... done" in rerun.stdout, rerun.stdout
    killed = instance.get_run_by_id(run_id)
    assert killed.status == dg.DagsterRunStatus.FAILURE
    assert not claimed(instance)
    failure = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)[-1]
    assert f"(pid {first.pid}) is gone" in failure.message
    print(f"rerun finished in {time.monotonic() - started:.0f} s")


def test_the_written_instance_monitors_runs_and_frees_the_slots_of_ended_runs(tmp_path):
    from flexmf_assets.cli import DAGSTER_YAML

    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_monitoring_enabled and "MONITORING" in instance.get_required_daemon_types()
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 15
        assert instance.run_monitoring_start_timeout_seconds == 180


def test_a_failed_run_s_slot_is_freed_and_a_live_run_keeps_its_slot(dagster_instance):
    instance = dagster_instance
    instance.event_log_storage.set_concurrency_slots(POOL, 1)

    @dg.op(pool=POOL)
    def train(context):
        # inside the step, holding the slot: nothing to free, and the run is left alone
        assert claimed(context.instance) == {context.run_id}
        assert free_dead_run_slots(context.instance) == []
        assert claimed(context.instance) == {context.run_id}

    @dg.job
    def one_training():
        train()

    # a run that failed while its step held the slot (what a killed run worker leaves behind)
    failed = instance.create_run_for_job(one_training)
    assert instance.event_log_storage.claim_concurrency_slot(POOL, failed.run_id, "train").is_claimed
    instance.report_run_failed(failed, "killed")
    assert claimed(instance) == {failed.run_id}
    assert free_dead_run_slots(instance) == [failed.run_id]
    assert not claimed(instance)

    result = one_training.execute_in_process(instance=instance)
    assert result.success
    assert not claimed(instance)  # given back by the run itself at the end of the step


@pytest.mark.slow
def test_killed_run_worker_gives_its_slot_back_and_a_rerun_completes(tmp_path):
    proj = Project(tmp_path)
    dep = Deployment(root=tmp_path, port=free_port(), env=proj.env, archive=None)
    key, dims = "mine|long", {"dataset": "mine", "hparams": "long"}
    try:
        dep.start()  # `flexmf register` (the project's dagster.yaml), then dagster-webserver + dagster-daemon
        instance = proj.instance()
        instance.event_log_storage.set_concurrency_slots(POOL, 1)
        data = dep.launch("data_job", "mine")
        assert dep.wait_run(data) == "SUCCESS", dep.run_failure(data)

        first = dep.launch("explicit_job", key, dims)
        assert wait_mid_training(instance, "explicit_job") == first
        starts = [e for e in instance.all_logs(first, of_type=DagsterEventType.ENGINE_EVENT)
                  if e.message.startswith("Started process for run")]
        worker = int(starts[0].dagster_event.engine_event_data.metadata["pid"].value)
        assert worker not in (p.pid for p in dep.procs)
        kill_tree(worker)  # the run worker and its step processes
        assert claimed(instance) == {first}  # the dead run holds the pool's only slot

        second = dep.launch("explicit_job", key, dims)
        deadline = time.monotonic() + RERUN_DEADLINE
        client = dep.client()
        while (status := client.get_run_status(second)) not in (
                dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            assert time.monotonic() < deadline, (
                f"rerun {second} still {status.value} after {RERUN_DEADLINE:.0f} s; pool {POOL}: "
                f"{instance.event_log_storage.get_concurrency_info(POOL)}\n{dep.log_tail()}")
            time.sleep(1.0)
        assert status == dg.DagsterRunStatus.SUCCESS, dep.run_failure(second)
        assert instance.get_run_by_id(first).status == dg.DagsterRunStatus.FAILURE
        assert not claimed(instance)
    finally:
        dep.stop()
