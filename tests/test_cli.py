"""The `flexmf` command: register, materialize and sweep into a real instance with a terminal a person
can read (a line per run, a summary, the event stream in a log file), one-line errors, `flexmf dev`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import requests
from dagster._core.instance.ref import InstanceRef

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate

from _webserver import free_port
from conftest import MINE_CSV

REPO = Path(__file__).resolve().parents[1]

CONFIG = MINE_CSV + """\
sweep: {{datasets: [mine]}}
schedule: {{enabled: false}}
explicit_hparams:
  default: {{epochs: 3, embedding_size: 8}}
{explicit}
implicit_hparams:
  default: {{epochs: 1, embedding_size: 8}}
{implicit}
"""

#: the built-in sets, shrunk so a sweep stays quick
SMALL_BUILTINS = {
    "explicit": "  tuned: {epochs: 2, embedding_size: 4}\n  als: {solver: als, epochs: 2, embedding_size: 4}",
    "implicit": "\n".join(f"  {name}: {{preset: {name}, epochs: 1, embedding_size: 4}}" for name in ("bpr", "warp"))
    + "\n  best: {loss: pairwise, epochs: 1, embedding_size: 4}\n  als: {solver: als, epochs: 1, embedding_size: 4}",
}


def flexmf(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexmf_assets.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def project_env(tmp_path: Path, http_server, http_root: Path, *, explicit: str = "", implicit: str = "") -> dict:
    generate(SyntheticConfig(n_users=120, n_items=150, n_ratings=6000, seed=1)).ratings.write_csv(
        http_root / "ratings.csv")
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(CONFIG.format(url=http_server.url("ratings.csv"), explicit=explicit, implicit=implicit))
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg), "GX_ANALYTICS_ENABLED": "False"}
    for name in ("DAGSTER_HOME", "FLEXMF_DATA_DIR", "TQDM_DISABLE"):
        env.pop(name, None)  # defaults under data/ beside flexmf.yaml; progress bars not disabled for us
    return env


def open_instance(tmp_path: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "data" / "dagster_home")))


def latest_meta(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    assert records, f"no {asset} {partition}"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def summary_row(stdout: str, track: str, key: str) -> list[str]:
    """The summary table's cells for one trained set: metric, validation, test, baseline, train, mark."""
    for line in stdout.splitlines():
        cells = line.split()
        if cells[:2] == [track, key] and len(cells) >= 7:
            return cells[2:]
    raise AssertionError(f"no summary row for {track} {key} in:\n{stdout}")


def log_file(stdout: str, cwd: Path) -> Path:
    match = re.search(r"Dagster's events go to (\S+\.log)", stdout)
    assert match, stdout
    return cwd / match[1]


@pytest.mark.slow
def test_materialize_prints_a_line_per_run_and_a_summary(tmp_path, http_server, http_root):
    env = project_env(tmp_path, http_server, http_root)
    out = flexmf("register", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "explicit_hparams: 3 new partition(s): default, tuned, als" in out.stdout
    home = tmp_path / "data" / "dagster_home"
    assert (home / "dagster.yaml").exists()  # DAGSTER_HOME defaults under data/ beside flexmf.yaml
    again = flexmf("register", env=env, cwd=tmp_path)
    assert "explicit_hparams: 0 new partition(s)" in again.stdout

    out = flexmf("materialize", "--implicit", env=env, cwd=tmp_path)  # explicit default only
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # a person reads it: no event stream, no warnings, a line per run, a summary
    assert len(lines) <= 20, out.stdout
    assert out.stderr == ""
    assert "DEBUG" not in out.stdout and "Warning" not in out.stdout
    assert re.search(r"^\[1/3\] data mine \.\.\. done in [\d.]+ s", out.stdout, re.M), out.stdout
    assert re.search(r"^\[2/3\] explicit mine\|default \.\.\. done in [\d.]+ s  RMSE [\d.]+ \(baseline [\d.]+\)$",
                     out.stdout, re.M), out.stdout
    assert re.search(r"^\[3/3\] leaderboards mine \.\.\. done in", out.stdout, re.M), out.stdout

    with open_instance(tmp_path) as instance:
        evaluation = latest_meta(instance, "explicit_evaluation", "mine|default")
        recs = latest_meta(instance, "explicit_recommendations", "mine|default")
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
        # the leaderboards run too: the explicit one names its champion, the untrained implicit one is empty
        assert latest_meta(instance, "explicit_leaderboard", "mine")["champion"] == "mine|default"
        assert latest_meta(instance, "implicit_leaderboard", "mine")["entries"] == 0
        assert latest_meta(instance, "champion_recommendations", "mine")["explicit_champion"] == "mine|default"
    # the summary row: the numbers of the evaluation's metadata, the champion marked
    metric, validation, test, baseline, train, *mark = summary_row(out.stdout, "explicit", "mine|default")
    assert (metric, validation, test, baseline) == (
        "RMSE", f"{evaluation['validation_val_rmse']:.4f}", f"{evaluation['rmse']:.4f}",
        f"{evaluation['baseline_rmse']:.4f}")
    assert train == f"{evaluation['train_seconds']:.1f}" and mark == ["s", "*", "champion"]
    assert f"RMSE {evaluation['rmse']:.4f} (baseline {evaluation['baseline_rmse']:.4f})" in out.stdout
    # where the tables are: a path polars reads, the newest table
    path = re.search(r"^  explicit_recommendations\s+(\S+\.parquet)$", out.stdout, re.M)
    assert path, out.stdout
    assert pl.read_parquet(tmp_path / path[1]).height == recs["rows"]
    for asset in ("champion_recommendations", "explicit_leaderboard", "implicit_leaderboard"):
        assert re.search(rf"^  {asset}\s+data/storage/{asset}/mine/\S+$", out.stdout, re.M), out.stdout
    assert "duckdb -c" in out.stdout
    assert "flexmf dev" in out.stdout and "http://127.0.0.1:3000/assets/explicit_evaluation?partition=mine%7Cdefault" \
        in out.stdout
    # Dagster's event stream is in the log file
    log = log_file(out.stdout, tmp_path).read_text()
    assert " - DEBUG - " in log and "STEP_SUCCESS" in log and "RUN_START" in log
    assert "explicit_model - epoch 3: " in log

    board_out = flexmf("leaderboard", env=env, cwd=tmp_path)
    assert board_out.returncode == 0 and "explicit leaderboard, mine" in board_out.stdout

    # --verbose (a global flag): the event stream on the terminal as well
    loud = flexmf("--verbose", "materialize", "--data-only", env=env, cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert " - DEBUG - " in loud.stderr and "RUN_START" in loud.stderr and "STEP_SUCCESS" in loud.stderr
    assert re.search(r"^\[1/1\] data mine \.\.\. done in", loud.stdout, re.M), loud.stdout
    assert " - DEBUG - " in log_file(loud.stdout, tmp_path).read_text()


@pytest.mark.slow
def test_sweep_survives_failing_partitions(tmp_path, http_server, http_root):
    # a set that parses and fails in training
    diverge = "  diverge: {epochs: 2, embedding_size: 8, learning_rate: 500.0, regularization: 0.0}"
    env = project_env(tmp_path, http_server, http_root, explicit=SMALL_BUILTINS["explicit"] + "\n" + diverge,
                      implicit=SMALL_BUILTINS["implicit"])
    assert flexmf("register", env=env, cwd=tmp_path).returncode == 0
    with open_instance(tmp_path) as instance:  # a key Dagster cannot materialize, added behind the CLI's back
        instance.add_dynamic_partitions("explicit_hparams", ["a|b"])

    out = flexmf("sweep", env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    log = log_file(out.stdout, tmp_path)
    # each failure: a line on the run's progress, one line on stderr naming the run and the log file
    assert re.search(r"^\[\d+/\d+\] explicit mine\|diverge \.\.\. FAILED after", out.stdout, re.M), out.stdout
    errors = out.stderr.splitlines()
    assert errors and all(e.startswith("flexmf: error: ") and e.endswith(f"details in {log.relative_to(tmp_path)}")
                          for e in errors), out.stderr
    assert any(re.match(r"flexmf: error: explicit_job mine\|diverge failed \(run [0-9a-f-]+\): "
                        r"TrainingError: training diverged at epoch \d+", e) for e in errors), out.stderr
    assert re.search(r"^explicit\s+mine\|diverge\s+FAILED: TrainingError: training diverged", out.stdout, re.M)
    # the other partitions trained, after the failures too
    trained = {("explicit", "default"), ("explicit", "tuned"), ("explicit", "als"), ("implicit", "default"),
               ("implicit", "bpr"), ("implicit", "warp"), ("implicit", "best"), ("implicit", "als")}
    with open_instance(tmp_path) as instance:
        for track, name in trained:
            meta = latest_meta(instance, f"{track}_evaluation", f"mine|{name}")
            metric, validation, test, baseline, *_ = summary_row(out.stdout, track, f"mine|{name}")
            key = "rmse" if track == "explicit" else "ndcg@10"
            assert (metric, test, baseline) == ("RMSE" if track == "explicit" else "NDCG@10",
                                                f"{meta[key]:.4f}", f"{meta['baseline_' + key]:.4f}")
        assert instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("explicit_model"), asset_partitions=["mine|diverge"]),
            limit=1).records == []
        # the leaderboards were refreshed with what trained; the summary marks their champions
        board = latest_meta(instance, "explicit_leaderboard", "mine")
        assert board["entries"] == 3 and board["champion"] in ("mine|default", "mine|tuned", "mine|als")
        implicit_champion = latest_meta(instance, "implicit_leaderboard", "mine")["champion"]
    assert summary_row(out.stdout, "explicit", board["champion"])[-1] == "champion"
    assert summary_row(out.stdout, "implicit", implicit_champion)[-1] == "champion"
    assert re.search(r"^\[\d+/\d+\] leaderboards mine \.\.\. done in", out.stdout, re.M), out.stdout
    # the key Dagster refuses is reported in one line too, and the sweep went on
    assert "mine|a|b" not in out.stdout or re.search(r"^explicit\s+mine\|a\|b\s+FAILED: ", out.stdout, re.M)
    assert "explicit_model - epoch 2: " in log.read_text()


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text("explicit_hparms: {}\n")
    out = flexmf("register", env={**os.environ, "FLEXMF_CONFIG": str(cfg)}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unknown key 'explicit_hparms' (did you mean 'explicit_hparams'?)" in out.stderr

    cfg.write_text("{}\n")
    out = flexmf("materialize", "--dataset", "ml-lates-small", env={**os.environ, "FLEXMF_CONFIG": str(cfg),
                                                                     "DAGSTER_HOME": str(tmp_path / "h")}, cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'ml-latest-small'" in out.stderr
    assert out.stderr.strip().count("\n") == 0

    # not a configuration error (here a broken instance file): one line, the traceback in the log, exit 1
    home = tmp_path / "data" / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("run_storage: [\n")
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg)}
    env.pop("DAGSTER_HOME", None)
    env.pop("FLEXMF_DATA_DIR", None)
    out = flexmf("materialize", env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stdout + out.stderr
    match = re.match(r"flexmf: error: ParserError: while parsing a flow node .*dagster\.yaml.*; traceback in "
                     r"(data/logs/flexmf-materialize-\S+\.log)$", out.stderr.strip())
    assert match, out.stderr
    assert "Traceback (most recent call last)" in (tmp_path / match[1]).read_text()


@pytest.mark.slow
def test_dev_serves_one_code_location_named_flexmf_assets(tmp_path):
    """`flexmf dev` outside the repo root: the code location has workspace.yaml's name."""
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text("default_dataset: synthetic-100k\nschedule: {enabled: false}\n")
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg), "DAGSTER_HOME": str(tmp_path / "home"),
           "GX_ANALYTICS_ENABLED": "False", "DAGSTER_DISABLE_TELEMETRY": "1"}
    port = free_port()
    with open(tmp_path / "dev.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flexmf_assets.cli", "dev", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    query = ("{ workspaceOrError { __typename ... on Workspace { locationEntries { name "
             "locationOrLoadError { __typename } } } } }")
    entries = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10).json()
                entries = body["data"]["workspaceOrError"]["locationEntries"]
                if entries and all(e["locationOrLoadError"] for e in entries):
                    break
            except (requests.RequestException, KeyError, TypeError, ValueError):
                pass
            time.sleep(1.0)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    assert entries, (tmp_path / "dev.log").read_text()[-3000:]
    assert [e["name"] for e in entries] == ["flexmf_assets"]
    assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", \
        (tmp_path / "dev.log").read_text()[-3000:]


def test_table_paths_name_latest_parquet_when_the_store_writes_it(tmp_path, monkeypatch):
    """The summary prints ``latest.parquet`` where it exists beside the versions, else the current
    version's table, else the partition folder; relative to the working directory."""
    from upath import UPath

    from flexmf_assets.cli_report import table_path
    from flexmf_assets.defs.io_managers import FlexMFIOManager
    from flexmf_assets.storage import VersionedStore

    monkeypatch.chdir(tmp_path)
    io = FlexMFIOManager(base_dir=str(tmp_path / "storage")).create_io_manager(None)
    folder = "storage/explicit_recommendations/mine/default"
    assert table_path(io, "explicit_recommendations", "mine", "default") == f"{folder}/"
    version, _ = VersionedStore().write(UPath(tmp_path / folder), pl.DataFrame({"item_id": [1, 2]}))
    assert table_path(io, "explicit_recommendations", "mine", "default") in (
        f"{folder}/latest.parquet", f"{folder}/{version.name}/data.parquet")
    pl.DataFrame({"item_id": [1, 2]}).write_parquet(tmp_path / folder / "latest.parquet")
    assert table_path(io, "explicit_recommendations", "mine", "default") == f"{folder}/latest.parquet"
