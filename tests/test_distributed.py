"""The `distributed` profile through real services on 127.0.0.1 (issue 9).

Needs the stack of ``.ci/services.sh start`` (Postgres, Redis, moto's S3 server, a loopback mirror of
ml-latest-small, two dagster-celery workers); skipped with the reason when it is not running.
Runs are launched the way a deployment launches them: a separate process per run that loads the code
location from its module with ``FLEXMF_PROFILE=distributed`` and orchestrates the Celery executor.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

STACK = Path(os.environ.get("FLEXMF_STACK_DIR", "/tmp/flexmf-stack"))
ENV_FILE = STACK / "env.sh"
DATASET = "ml-latest-small"
SETS = ("k8-e2", "k16-e2", "k8-e3", "k16-e3")

needs_stack = pytest.mark.skipif(
    not ENV_FILE.exists(), reason=f"distributed stack not running (no {ENV_FILE}); start it with .ci/services.sh start")

# one run, orchestrated in its own process: what `dagster job launch` / the run worker does
DRIVER = r"""
import json, sys
import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository
import flexmf_assets.defs.definitions as code

job, key = sys.argv[1], sys.argv[2]
pdef = code.defs.resolve_job_def(job).partitions_def
pkey = dg.MultiPartitionKey(dict(zip(("dataset", "hparams"), key.split("|")))) if "|" in key else key
recon = ReconstructableRepository.for_module("flexmf_assets.defs.definitions", "defs").get_reconstructable_job(job)
with dg.DagsterInstance.get() as instance:
    result = dg.execute_job(recon, instance, tags=pdef.get_tags_for_partition_key(pkey), raise_on_error=False)
    print(json.dumps({"run_id": result.run_id, "success": result.success}))
"""


def _read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            for item in line[len("export "):].split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def stack():
    env = _read_env(ENV_FILE)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("explicit_hparams", [*SETS, "slow"])
    yield env, instance
    instance.dispose()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _launch(env: dict[str, str], job: str, key: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, job, key], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"run process exited {proc.returncode} without a result:\n{err[-3000:]}"
    return {**json.loads(lines[-1]), "stderr": err[-4000:]}


def _run(env, job: str, key: str) -> dict:
    return _finish(_launch(env, job, key))


def _s3(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["FLEXMF_S3_ENDPOINT"])


def _keys(env, prefix: str) -> list[str]:
    pages = _s3(env).get_paginator("list_objects_v2").paginate(Bucket=env["FLEXMF_S3_BUCKET"], Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _partition_dir(env, *parts: str):
    from upath import UPath

    base = UPath(env["FLEXMF_STORAGE_URL"], endpoint_url=env["FLEXMF_S3_ENDPOINT"])
    for part in parts:
        base = base / part
    return base


def _celery_workers(instance, run_id: str) -> dict[str, str]:
    """step key -> the Celery worker that ran it (the engine event dagster-celery's task reports)."""
    import dagster as dg

    out = {}
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
        event = record.event_log_entry.dagster_event
        meta = event.engine_event_data.metadata if event and event.engine_event_data else {}
        if "Celery worker" in meta:
            out[event.step_key] = meta["Celery worker"].value
    return out


def _latest(instance, asset: str, key: str):
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1).records
    assert records, f"no materialization of {asset} {key}"
    return records[0]


@pytest.mark.slow
@needs_stack
def test_backfill_four_partitions_on_two_workers_postgres_and_s3(stack):
    import psycopg2

    from flexmf_assets.storage import VersionedStore, current_version, read_manifest

    env, instance = stack
    data = _run(env, "data_job", DATASET)
    assert data["success"], f"data_job run {data['run_id']} failed"

    # the backfill: one run per hparams partition, all in flight at once, steps on the Celery workers
    procs = [_launch(env, "explicit_job", f"{DATASET}|{name}") for name in SETS]
    with ThreadPoolExecutor(len(procs)) as pool:
        results = list(pool.map(_finish, procs))
    failed = [r for r in results if not r["success"]]
    assert not failed, f"run {failed[0]['run_id']} failed:\n{failed[0]['stderr']}"

    # every step went through a worker, and both workers took steps
    workers: dict[str, str] = {}
    for run in [data, *results]:
        per_step = _celery_workers(instance, run["run_id"])
        assert per_step, f"run {run['run_id']}: no step ran on a Celery worker"
        workers.update({f"{run['run_id']}:{k}": v for k, v in per_step.items()})
    names = set(workers.values())
    assert len(names) == 2 and all(n.startswith(("flexmf-w1@", "flexmf-w2@")) for n in names), names

    # run history is in Postgres
    run_ids = {r["run_id"] for r in [data, *results]}
    conn = psycopg2.connect(host=env["DAGSTER_PG_HOST"], port=int(env["DAGSTER_PG_PORT"]),
                            dbname=env["DAGSTER_PG_DB"], user=env["DAGSTER_PG_USERNAME"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (list(run_ids),))
            assert dict(cur.fetchall()) == {rid: "SUCCESS" for rid in run_ids}
            cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                        "AND run_id = ANY(%s)", (list(run_ids),))
            # archive, ratings, items, split + model, evaluation, recommendations per set
            assert cur.fetchone()[0] >= 4 + 3 * len(SETS)
    finally:
        conn.close()

    # outputs are in the object store: per partition a CURRENT pointer at a complete version
    keys = _keys(env, "assets/")
    for asset in ("explicit_model", "explicit_evaluation", "explicit_recommendations"):
        for name in SETS:
            pointer = f"assets/{asset}/{DATASET}/{name}/CURRENT"
            assert pointer in keys, f"{pointer} missing; bucket has {len(keys)} objects"
            version = current_version(_partition_dir(env, asset, DATASET, name))
            manifest = read_manifest(version)
            prefix = f"assets/{asset}/{DATASET}/{name}/{version.name}/"
            for file in manifest["files"]:
                assert any(k.startswith(prefix + file) for k in keys), (prefix, file)
    for asset in ("archive", "ratings", "split"):
        assert f"assets/{asset}/{DATASET}/CURRENT" in keys

    # the stored artefacts read back from S3: the model scores, the recommendations table agrees
    store = VersionedStore()
    model = store.read(_partition_dir(env, "explicit_model", DATASET, SETS[0]))
    recs = store.read(_partition_dir(env, "explicit_recommendations", DATASET, SETS[0]))
    assert recs.height > 0 and model.n_users > 0
    model_meta = _latest(instance, "explicit_model", f"{DATASET}|{SETS[0]}").asset_materialization.metadata
    assert model_meta["storage_version"].value.startswith(f"{env['FLEXMF_STORAGE_URL']}/explicit_model/")

    # lineage as in the local profile: every materialization points at the exact upstream event it read
    def pointer(record, upstream: str) -> int:
        return int(record.asset_materialization.tags[f"dagster/input_event_pointer/{upstream}"])

    archive = _latest(instance, "archive", DATASET)
    ratings = _latest(instance, "ratings", DATASET)
    split = _latest(instance, "split", DATASET)
    assert pointer(ratings, "archive") == archive.storage_id
    assert pointer(split, "ratings") == ratings.storage_id
    served = Path(env["FLEXMF_STACK_DIR"]) / "www" / "ml-latest-small.zip"  # the mirror's file
    assert archive.asset_materialization.metadata["sha256"].value == hashlib.sha256(served.read_bytes()).hexdigest()
    for name in SETS:
        key = f"{DATASET}|{name}"
        model_rec = _latest(instance, "explicit_model", key)
        recs_rec = _latest(instance, "explicit_recommendations", key)
        assert pointer(model_rec, "split") == split.storage_id
        # the exact model partition and run, as the project records it (the same keys as locally)
        recs_meta = recs_rec.asset_materialization.metadata
        assert recs_meta["model_run_id"].value == model_rec.run_id == recs_rec.run_id
        # Dagster's own pointer names the upstream asset's latest materialization when the step read
        # it, of ANY partition: with concurrent partitions it may be a sibling's (seen here)
        model_ids = {r.storage_id for r in instance.fetch_materializations(
            dg_key("explicit_model"), limit=100).records}
        assert pointer(recs_rec, "explicit_model") in model_ids
        assert model_rec.asset_materialization.metadata["hparams_set"].value == name


@pytest.mark.slow
@needs_stack
def test_worker_killed_mid_step_fails_the_run_and_leaves_no_partial_object(stack):
    import dagster as dg
    from celery import Celery

    from flexmf_assets.storage import current_version

    env, instance = stack
    if not list(_keys(env, f"assets/split/{DATASET}/CURRENT")):
        assert _run(env, "data_job", DATASET)["success"]
    key = f"{DATASET}|slow"
    proc = _launch(env, "explicit_job", key)
    try:
        # wait until a worker is inside the training step, then SIGKILL the process running it
        app = Celery(broker=env["FLEXMF_CELERY_BROKER"], backend=env["FLEXMF_CELERY_BACKEND"])
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": key}), limit=1)
            if runs:
                logs = instance.all_logs(runs[0].run_id)
                started = any(e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_START
                              and e.dagster_event.step_key == "explicit_model" for e in logs)
                epochs = any(e.user_message.startswith("epoch ") for e in logs if not e.dagster_event)
                if started and epochs:
                    active = app.control.inspect(timeout=1).active() or {}
                    busy = [t["worker_pid"] for tasks in active.values() for t in tasks]
                    victim = busy[0] if len(busy) == 1 else None
            time.sleep(0.5)
        assert victim is not None, "the slow training step never started on a worker"
        os.kill(victim, signal.SIGKILL)
        result = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not result["success"]
    run = instance.get_run_by_id(result["run_id"])
    assert run.status == dg.DagsterRunStatus.FAILURE
    text = "\n".join(e.message for e in instance.all_logs(result["run_id"]))
    assert "explicit_model finished without success or failure event" in text, text[-2000:]
    assert "WorkerLostError" in result["stderr"], result["stderr"][-2000:]  # the orchestrator's report
    # nothing committed: no CURRENT for the killed partition, downstream never ran
    assert current_version(_partition_dir(env, "explicit_model", DATASET, "slow")) is None
    assert not _keys(env, f"assets/explicit_evaluation/{DATASET}/slow/")
    # the worker replaced its pool process and takes work again
    def replies() -> int:
        fresh = Celery(broker=env["FLEXMF_CELERY_BROKER"], backend=env["FLEXMF_CELERY_BACKEND"])
        return len(fresh.control.ping(timeout=1.0))

    deadline = time.monotonic() + 60
    while replies() < 2 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert replies() == 2


@pytest.mark.slow
@needs_stack
def test_s3_write_interrupted_before_the_pointer_keeps_the_previous_version(stack):
    import polars as pl

    from flexmf_assets.storage import VersionedStore, current_version

    env, _ = stack
    part = _partition_dir(env, "atomicity_probe", f"p{time.time_ns()}")
    store = VersionedStore(retain_seconds=0)
    first = pl.DataFrame({"x": [1, 2, 3]})
    version, _ = store.write(part, first)
    from test_io_manager import CrashingStore

    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashingStore(retain_seconds=0).write(part, pl.DataFrame({"x": [9]}))
    # the orphan version is in the bucket, but the pointer and readers still see the first one
    prefix = part.path.split("/", 1)[1] + "/"  # object keys: the path without the bucket
    versions = {k[len(prefix):].split("/")[0] for k in _keys(env, prefix) if "/v-" in k}
    assert len(versions) == 2
    assert current_version(part).name == version.name
    assert store.read(part).equals(first)
    # a later commit supersedes it; pruning (grace 0) removes the older versions
    store.write(part, pl.DataFrame({"x": [4]}))
    assert store.read(part)["x"].to_list() == [4]
    remaining = {k[len(prefix):].split("/")[0] for k in _keys(env, prefix) if "/v-" in k}
    assert len(remaining) == 1


# -- profile selection (no services needed) ---------------------------------------------------------
def test_profile_settings_and_errors_name_the_variable(tmp_path):
    pytest.importorskip("dagster_celery")
    from flexmf_assets.defs.profiles import select_profile
    from flexmf_assets.errors import ConfigError
    from flexmf_assets.project import load_project

    (tmp_path / "flexmf.yaml").write_text("{}\n")
    project = load_project(tmp_path / "flexmf.yaml", env={"FLEXMF_DATA_DIR": str(tmp_path)})
    assert select_profile(project, env={}).name == "local"
    env = {"FLEXMF_PROFILE": "distributed", "FLEXMF_STORAGE_URL": "s3://bucket/flexmf/",
           "FLEXMF_S3_ENDPOINT": "http://127.0.0.1:9000", "FLEXMF_CELERY_BROKER": "redis://10.0.0.5:6379/0"}
    profile = select_profile(project, env=env)
    assert (profile.name, profile.storage_base) == ("distributed", "s3://bucket/flexmf")
    assert profile.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert profile.executor.name == "flexmf_celery" and profile.training_tags == {}
    for bad, needle in ((dict(env, FLEXMF_STORAGE_URL=""), "FLEXMF_STORAGE_URL is not set"),
                        (dict(env, FLEXMF_STORAGE_URL=str(tmp_path)), "FLEXMF_STORAGE_URL"),
                        (dict(env, FLEXMF_S3_ENDPOINT="127.0.0.1:9000"), "FLEXMF_S3_ENDPOINT"),
                        (dict(env, FLEXMF_CELERY_BROKER="localhost"), "FLEXMF_CELERY_BROKER"),
                        (dict(env, FLEXMF_PROFILE="cluster"), "FLEXMF_PROFILE: 'cluster'")):
        with pytest.raises(ConfigError, match=needle):
            select_profile(project, env=bad)


def test_cuda_training_steps_carry_celery_queue_and_k8s_gpu_request(tmp_path, monkeypatch):
    pytest.importorskip("dagster_celery")
    from flexmf_assets.defs.definitions import build_definitions
    from flexmf_assets.project import load_project

    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text("device: {device: cuda}\n")
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path)})
    monkeypatch.setenv("FLEXMF_PROFILE", "distributed")
    monkeypatch.setenv("FLEXMF_STORAGE_URL", "s3://bucket/flexmf")
    defs = build_definitions(project, config_path=str(cfg))
    graph = defs.resolve_asset_graph()
    for track in ("explicit", "implicit"):
        tags = graph.assets_def_for_key(dg_key(f"{track}_model")).op.tags
        assert tags["dagster-celery/queue"] == "gpu"
        limits = json.loads(tags["dagster-k8s/config"])["container_config"]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}
    evaluation = graph.assets_def_for_key(dg_key("explicit_evaluation")).op.tags
    assert "dagster-celery/queue" not in evaluation  # scoring stays on the default queue


def dg_key(name: str):
    import dagster as dg

    return dg.AssetKey(name)
