"""Reliability through Dagster: bad archives, bad rows, bad config, faults and secrets, each seen as
the one-line step failure (or failed check) a user reads, with every earlier materialization intact.

Every dataset here is a tiny MovieLens-style archive or CSV built in ``tmp_path`` and served over
``file://`` or real loopback HTTP; no network, no mocks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from dagster._core.instance.ref import InstanceRef
from upath import UPath

from conftest import LoopbackServer, failure_text
from flexmf_assets.defs.definitions import build_definitions
from flexmf_assets.storage import VersionedStore, current_version
from flexmf_assets.project import load_project

HEADER = "userId,movieId,rating,timestamp"


# --------------------------------------------------------------------------- helpers


def ratings_rows(n_users: int = 30, n_items: int = 25, shift: int = 0) -> list[str]:
    """A dense, valid ml-latest-small style block: every user rates every item (0.5 steps)."""
    return [f"{u},{i},{((u * 7 + i * 3 + shift) % 10 + 1) / 2},{1_100_000_000 + u * 1000 + i}"
            for u in range(1, n_users + 1) for i in range(1, n_items + 1)]


def ml_zip(path: Path, rows: list[str] | None = None, *, ratings: bytes | None = None,
           members: dict[str, bytes] | None = None) -> Path:
    """Write an ml-latest-small style zip (``ml-demo/ratings.csv`` + ``movies.csv``)."""
    if members is None:
        body = ratings if ratings is not None else ("\n".join([HEADER, *(rows or ratings_rows())]) + "\n").encode()
        movies = "movieId,title,genres\n" + "".join(f"{i},Film {i},Drama\n" for i in range(1, 26))
        members = {"ml-demo/ratings.csv": body, "ml-demo/movies.csv": movies.encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    os.replace(tmp, path)  # a new mtime: the file:// source counts as changed
    return path


def make_project(tmp_path: Path, body: str):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(body)
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    return project, build_definitions(project, config_path=str(cfg))


def dataset_yaml(url: str, fmt: str = "ml-latest-small", extra: str = "") -> str:
    return f"""
validation: {{min_rows: 100}}
datasets:
  demo:
    url: "{url}"
    format: {fmt}
{extra}"""


def run(defs: dg.Definitions, job: str, key, instance, **kwargs) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance,
                                                        raise_on_error=False, **kwargs)


def ok(result: dg.ExecuteInProcessResult) -> dg.ExecuteInProcessResult:
    assert result.success, failure_text(result)
    return result


def one_line_failure(result: dg.ExecuteInProcessResult, prefix: str) -> str:
    """The first line of the step failure: it starts with ``prefix`` and is the whole description."""
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    description = failure.step_failure_data.user_failure_data.description
    assert description is not None and "\n" not in description, description
    assert description.startswith(prefix), description
    assert "Traceback" not in description
    return description


def stored(project, asset: str, *partition: str):
    return VersionedStore().read(UPath(project.storage_dir) / asset / Path(*partition))


def stored_version(project, asset: str, *partition: str) -> str:
    return current_version(UPath(project.storage_dir) / asset / Path(*partition)).name


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture
def instance(dagster_instance):
    return dagster_instance


# --------------------------------------------------------------------------- bad archives


def _encoding_zip(path: Path) -> None:
    rows = ratings_rows()
    rows[40] = rows[40] + "\xe9"  # a latin-1 byte in a utf-8 file
    ml_zip(path, ratings=("\n".join([HEADER, *rows]) + "\n").encode("latin-1"))


BAD_ARCHIVES = {
    # name: (writer, failure prefix, text the message must contain)
    "empty zip": (lambda p: ml_zip(p, members={}), "ArchiveError: ", "no ratings.csv found (members: none)"),
    "no ratings member": (lambda p: ml_zip(p, members={"ml-demo/movies.csv": b"movieId,title,genres\n"}),
                          "ArchiveError: ", "no ratings.csv found (members: ml-demo/movies.csv)"),
    "empty file": (lambda p: p.write_bytes(b""), "ArchiveError: ", "not a zip archive"),
    "not a zip": (lambda p: p.write_bytes(b"<html>503 Service Unavailable</html>\n"), "ArchiveError: ",
                  "not a zip archive"),
    "wrong encoding": (_encoding_zip, "ParseError: ",
                       "ml-demo/ratings.csv line 42: bytes b'\\xe9\\n"),
    "traversal member": (lambda p: ml_zip(p, members={"../evil.csv": b"x"}), "ArchiveError: ",
                         "member '../evil.csv' escapes the destination ('..')"),
}


def test_bad_archives_fail_in_one_line_and_keep_previous_outputs(tmp_path, instance):
    source = ml_zip(tmp_path / "www" / "demo.zip")
    project, defs = make_project(tmp_path, dataset_yaml(source.as_uri()))
    ok(run(defs, "data_job", "demo", instance))
    split_before = stored_version(project, "split", "demo")
    ratings_before = stored(project, "ratings", "demo")
    for case, (writer, prefix, needle) in BAD_ARCHIVES.items():
        writer(source)
        os.utime(source, ns=(len(case), len(case)))  # a new mtime even within one clock tick
        message = one_line_failure(run(defs, "data_job", "demo", instance), prefix)
        assert needle in message, (case, message)
        # nothing downstream of the failure was touched: the previous outputs are current and readable
        assert stored_version(project, "split", "demo") == split_before, case
        assert stored(project, "ratings", "demo").equals(ratings_before), case
    assert sum(f.height for f in stored(project, "split", "demo").values()) == 30 * 25


# --------------------------------------------------------------------------- bad rows


def test_bad_rows_fail_blocking_checks_and_keep_previous_split(tmp_path, instance):
    source = ml_zip(tmp_path / "www" / "demo.zip")
    project, defs = make_project(tmp_path, dataset_yaml(source.as_uri()))
    ok(run(defs, "data_job", "demo", instance))
    split_before = stored_version(project, "split", "demo")

    rows = ratings_rows()
    rows[3] = "1,4,NaN,1100001004"            # NaN rating
    rows[5] = "1,6,inf,1100001006"            # infinite rating
    rows[7] = "1,8,7.5,1100001008"            # off the 0.5-5 scale
    rows[9] = "1,10,3.0,99999999999"          # year 5138
    rows[11] = "1,12,3.0,-5"                  # before 1970
    rows.append(rows[20])                     # a duplicated (user, item) pair
    ml_zip(source, rows)
    os.utime(source, ns=(1, 1))
    result = run(defs, "data_job", "demo", instance)
    checks = check_results(result)
    failed = {name for name, data in checks.items() if not data.passed}
    assert failed == {"rating_in_scale", "timestamp_plausible", "unique_user_item"}, checks
    scale = checks["rating_in_scale"].metadata
    assert scale["unexpected_count"].value == 3
    # the logged lines name the offending values
    error_text = " ".join(instance_logs(instance, result.run_id))
    assert "rating_in_scale: FAILED (3 unexpected" in error_text
    assert "timestamp_plausible: FAILED (2 unexpected" in error_text
    assert "unique_user_item: FAILED (" in error_text
    # the blocking checks stopped the split: the previous one is still current
    assert stored_version(project, "split", "demo") == split_before


def instance_logs(instance, run_id: str) -> list[str]:
    return [rec.user_message for rec in instance.all_logs(run_id)]


def test_malformed_row_is_a_one_line_parse_error(tmp_path, instance):
    rows = ratings_rows()
    rows[99] = "7,8,abc,1100007008"
    source = ml_zip(tmp_path / "www" / "demo.zip", rows)
    _, defs = make_project(tmp_path, dataset_yaml(source.as_uri()))
    message = one_line_failure(run(defs, "data_job", "demo", instance), "ParseError: ")
    assert message == "ParseError: ml-demo/ratings.csv line 101: rating 'abc' is not a number"


# --------------------------------------------------------------------------- models: config, device,
# divergence, tampering


def sparse_rows(n_users: int = 60, n_items: int = 40) -> list[str]:
    """About half of the user x item cells rated: enough structure for both tracks, sampled negatives."""
    return [f"{u},{i},{((u * 7 + i * 3) % 10 + 1) / 2},{1_100_000_000 + u * 1000 + i}"
            for u in range(1, n_users + 1) for i in range(1, n_items + 1) if (u * 31 + i * 17) % 7 < 4]


MODEL_CONFIG = """
explicit_hparams:
  default: {{epochs: 3, embedding_size: 8, learning_rate: {lr}, regularization: {reg}}}
implicit_hparams:
  default: {{epochs: 2, embedding_size: 8}}
device: {{device: {device}}}
"""


def model_project(tmp_path: Path, source: Path, *, lr: float = 0.01, reg: float = 0.1, device: str = "cpu"):
    return make_project(tmp_path, dataset_yaml(source.as_uri()) + MODEL_CONFIG.format(lr=lr, reg=reg,
                                                                                      device=device))


def key(hparams: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"dataset": "demo", "hparams": hparams})


def test_model_step_failures_are_one_line_and_keep_the_previous_model(tmp_path, instance):
    source = ml_zip(tmp_path / "www" / "demo.zip", sparse_rows())
    project, defs = model_project(tmp_path, source)
    ok(run(defs, "data_job", "demo", instance))
    instance.add_dynamic_partitions("explicit_hparams", ["default"])
    ok(run(defs, "explicit_job", key("default"), instance))
    model_before = stored_version(project, "explicit_model", "demo", "default")

    # impossible values and wrong types in a UI-style hparams key
    cases = {
        ("explicit", "embedding_size=0"): "FlexMFExplicitConfig.embedding_size: must be >= 1 and <= 4,096, got 0",
        ("explicit", "learning_rate=-0.5"): "FlexMFExplicitConfig.learning_rate: must be > 0 and <= 1,000, got -0.5",
        ("explicit", "epochs=three"): "hparams key 'epochs=three': epochs=three is not an integer",
        ("explicit", "embeding_size=8"): "unknown field 'embeding_size' (did you mean 'embedding_size'?)",
        ("explicit", "nonsense"): "'nonsense' is not of the form field=value; valid FlexMFExplicitConfig fields",
        ("implicit", "loss=warp,negative_strategy=uniform"):
            "loss 'warp' needs negative_strategy 'misranked', got 'uniform'",
    }
    for (track, hparams), needle in cases.items():
        instance.add_dynamic_partitions(f"{track}_hparams", [hparams])
        message = one_line_failure(run(defs, f"{track}_job", key(hparams), instance), "ConfigError: ")
        assert needle in message, message
        assert message.startswith(f"ConfigError: {track} hparams partition {hparams!r}: ") or "hparams key" in message

    # training divergence of the same partition (the set was edited): clear error, old model kept
    _, diverging = model_project(tmp_path, source, lr=500.0, reg=0.0)
    message = one_line_failure(run(diverging, "explicit_job", key("default"), instance), "TrainingError: ")
    assert re.fullmatch(r"TrainingError: training diverged at epoch \d+: .+ "  # the reasons: test_reliability_models
                        r"\(learning_rate=500.0\); lower learning_rate or raise regularization", message)
    assert stored_version(project, "explicit_model", "demo", "default") == model_before

    # device: cuda on a machine without a GPU
    if not torch.cuda.is_available():
        _, cuda = model_project(tmp_path, source, device="cuda")
        message = one_line_failure(run(cuda, "explicit_job", key("default"), instance), "ConfigError: ")
        assert message == ("ConfigError: device: 'cuda' requested but no CUDA device is available "
                           "(torch.cuda.is_available() is False); use device 'cpu' or 'auto', "
                           "or set allow_fallback: true")
        assert stored_version(project, "explicit_model", "demo", "default") == model_before

    # the previous model is still the current one and loads
    model = stored(project, "explicit_model", "demo", "default")
    assert model.config.learning_rate == 0.01 and model.epochs_run == 3


def test_tampered_model_is_rejected_when_loaded(tmp_path, instance):
    source = ml_zip(tmp_path / "www" / "demo.zip", sparse_rows())
    project, defs = model_project(tmp_path, source)
    ok(run(defs, "data_job", "demo", instance))
    instance.add_dynamic_partitions("explicit_hparams", ["default"])
    ok(run(defs, "explicit_job", key("default"), instance))
    version = current_version(UPath(project.storage_dir) / "explicit_model" / "demo" / "default")
    tensors = Path(str(version)) / "model" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF  # flip one byte of a stored weight
    tensors.write_bytes(bytes(data))

    evaluation_only = [dg.AssetKey("explicit_evaluation")]
    result = run(defs, "explicit_job", key("default"), instance, asset_selection=evaluation_only)
    message = one_line_failure(result, f"ConfigError: {tensors}: sha256 ")
    assert message.endswith("does not match metadata.json"
                            f" ({json.loads((tensors.parent / 'metadata.json').read_text())['tensor_sha256'][:12]}...);"
                            " the file is corrupt or was modified"), message


# --------------------------------------------------------------------------- secrets


def test_url_credentials_never_reach_the_event_log_or_disk(tmp_path, instance):
    www = tmp_path / "www"
    ml_zip(www / "demo.zip")
    server = LoopbackServer(www)
    try:
        url = f"http://alice:s3cr3tpw@127.0.0.1:{server.port}/demo.zip"
        project, defs = make_project(tmp_path, dataset_yaml(url))
        good = ok(run(defs, "data_job", "demo", instance))
        (tmp_path / "other").mkdir()
        _, missing = make_project(tmp_path / "other", dataset_yaml(url.replace("demo.zip", "gone.zip")))
        bad = run(missing, "data_job", "demo", instance)
    finally:
        server.close()
    assert one_line_failure(bad, "DownloadError: ").endswith(
        f"HTTP 404 File not found for http://***@127.0.0.1:{server.port}/gone.zip")

    from dagster._serdes import serialize_value

    for result in (good, bad):
        records = instance.all_logs(result.run_id)
        assert records
        dump = "\n".join(serialize_value(r) for r in records)
        assert "s3cr3tpw" not in dump and "alice" not in dump
    archive = instance.fetch_materializations(dg.AssetKey("archive"), limit=1).records[0]
    assert archive.asset_materialization.metadata["url"].value == f"http://***@127.0.0.1:{server.port}/demo.zip"
    # nothing written under the data dir (cache sidecars, stored values) holds the password
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert b"s3cr3tpw" not in path.read_bytes(), path


# --------------------------------------------------------------------------- concurrency


def concurrent_data_job() -> dg.JobDefinition:
    """The data job of ``$FLEXMF_CONFIG``, for :func:`dagster.reconstructable` in child processes."""
    cfg = os.environ["FLEXMF_CONFIG"]
    return build_definitions(load_project(cfg), config_path=cfg).resolve_job_def("data_job")


#: steps fork from one server that has imported the project once (import cost paid per run, not per step)
RUN_CONFIG = {"execution": {"config": {"start_method": {"forkserver": {
    "preload_modules": ["test_reliability_dagster", "great_expectations"]}}}}}

CHILD = """
import sys
import dagster as dg
from test_reliability_dagster import RUN_CONFIG, concurrent_data_job
with dg.DagsterInstance.get() as instance:
    result = dg.execute_job(dg.reconstructable(concurrent_data_job), instance=instance,
                            tags={{"dagster/partition": {key!r}}}, run_config=RUN_CONFIG)
    print("RUN", result.run_id, result.success)
sys.exit(0 if result.success else 1)
"""


def test_two_runs_of_different_partitions_at_once_with_the_multiprocess_executor(tmp_path):
    www = tmp_path / "www"
    ml_zip(www / "a.zip", ratings_rows(30, 25, shift=0))
    ml_zip(www / "b.zip", ratings_rows(20, 25, shift=3))
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(f"""
validation: {{min_rows: 100}}
datasets:
  a: {{url: "{(www / 'a.zip').as_uri()}", format: ml-latest-small}}
  b: {{url: "{(www / 'b.zip').as_uri()}", format: ml-latest-small}}
""")
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))):
        pass  # create the SQLite storages once, as `dagster dev` does before any run
    tests = str(Path(__file__).parent)
    # the step processes the multiprocess executor starts import this module by name
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg), "FLEXMF_DATA_DIR": str(tmp_path / "state"),
           "DAGSTER_HOME": str(home), "PYTHONPATH": path}
    procs = {k: subprocess.Popen([sys.executable, "-c", CHILD.format(key=k)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in ("a", "b")}
    outputs = {k: p.communicate(timeout=240)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, outputs[k][-3000:]
        assert " True" in outputs[k].splitlines()[-1]

    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    for k, users in (("a", 30), ("b", 20)):
        ratings = stored(project, "ratings", k)
        assert (ratings.height, ratings["user_id"].n_unique()) == (users * 25, users)
        split = stored(project, "split", k)
        assert pl.concat(list(split.values())).sort("user_id", "item_id").equals(ratings.sort("user_id", "item_id"))
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as inst:
        runs = inst.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["a", "b"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        executors = {e.message for r in runs for e in inst.all_logs(r.run_id)
                     if e.message and "multiprocess" in e.message.lower()}
        assert executors  # the steps ran in child processes
