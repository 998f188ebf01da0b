"""A real Dagster deployment for end-to-end tests: ``dagster-webserver`` + ``dagster-daemon`` on 127.0.0.1.

One deployment per test session (shared by the e2e and browser tests through :func:`deployment`):
a temporary DAGSTER_HOME, a test ``flexmf.yaml`` whose ``ml-latest-small`` entry points at the session's
MovieLens archive served over loopback HTTP (``movielens_server`` in conftest: the shared file, or its
synthetic stand-in; the sha256 is the served file's), and fast hyperparameter sets. The processes are stopped at the end of
the session (also when a test fails), each by its own process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
DATASET = "ml-latest-small"
HPARAMS = "default"
MODEL_KEY = f"{DATASET}|{HPARAMS}"  # Dagster sorts dimensions by name: dataset|hparams

CONFIG = """\
default_dataset: {dataset}
datasets:
  {dataset}:            # replaces the built-in entry: the session's archive on loopback
    url: {url}
    sha256: {sha}
    format: ml-latest-small
sweep: {{datasets: [{dataset}]}}
schedule: {{enabled: false}}
explicit_hparams:
  default: {{epochs: 3, embedding_size: 16}}
implicit_hparams:
  default: {{epochs: 2, embedding_size: 16}}
recommendations: {{n: 10}}
"""

#: steps fork from a server that has already imported the code location and torch (the default,
#: spawn, re-imports them for every step: about 10 s each on 2 cores)
RUN_CONFIG = {"execution": {"config": {"start_method": {"forkserver": {
    "preload_modules": ["flexmf_assets.defs.definitions", "torch", "great_expectations"]}}}}}

STARTUP_TIMEOUT = 180.0  # seconds for the webserver to load the code location
RUN_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


@dataclass
class Deployment:
    """The running webserver and daemon, and what was launched through them."""

    root: Path
    port: int
    env: dict[str, str]
    archive: Any  # conftest.MovieLensArchive: the archive the dataset entry downloads
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)  # open log files of the processes
    runs: dict[str, str] = field(default_factory=dict)  # job name -> run id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- processes -------------------------------------------------------------------------
    def start(self) -> None:
        """Register the hparams partitions (as a user would: this writes the project's dagster.yaml and
        creates the SQLite storage before two processes race to create it), then start the webserver
        and the daemon (the queued run coordinator: the daemon launches what the API queues)."""
        self.register()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        commands = {
            "webserver": [_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                          "-w", str(REPO / "workspace.yaml")],
            "daemon": [_bin("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        }
        for name, cmd in commands.items():
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
            self.logs.append(out)
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        self.wait_ready()

    def register(self) -> str:
        """``flexmf register``: flexmf.yaml's hyperparameter sets become dynamic partitions."""
        proc = subprocess.run([sys.executable, "-m", "flexmf_assets.cli", "register"], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"flexmf register failed: {proc.stderr[-2000:]}")
        return proc.stdout

    def log_tail(self, n: int = 40) -> str:
        parts = []
        for path in sorted((self.root / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}\n{self.log_tail()}")
            try:
                data = self.graphql("{ repositoriesOrError { __typename ... on RepositoryConnection "
                                    "{ nodes { name jobs { name } } } } }")
                nodes = data["repositoriesOrError"].get("nodes") or []
                if any(j["name"] == "explicit_job" for n in nodes for j in n["jobs"]):
                    return
            except (requests.RequestException, RuntimeError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"webserver not ready after {STARTUP_TIMEOUT:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for proc in self.procs:  # what they left behind in their group (a code server that ignored SIGTERM)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for out in self.logs:
            out.close()

    # -- GraphQL -----------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /graphql; raises RuntimeError on GraphQL errors."""
        resp = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}},
                             timeout=60)
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port)

    def launch(self, job: str, partition: str, dims: dict[str, str] | None = None) -> str:
        """Launch ``job`` for ``partition`` through the API (as the UI's launchpad does: the run names the
        job's assets, so declarative automation sees them as executed together); returns the run id."""
        tags = {"dagster/partition": partition}
        for dim, key in (dims or {}).items():
            tags[f"dagster/partition/{dim}"] = key
        return self.client().submit_job_execution(job, tags=tags, run_config=RUN_CONFIG,
                                                  asset_selection=self.job_assets(job))

    def job_assets(self, job: str) -> list[list[str]]:
        nodes = self.graphql("{ assetNodes { assetKey { path } jobNames } }")["assetNodes"]
        return [n["assetKey"]["path"] for n in nodes if job in n["jobNames"]]

    def wait_run(self, run_id: str) -> str:
        from dagster import DagsterRunStatus

        client = self.client()
        deadline = time.monotonic() + RUN_TIMEOUT
        done = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
        while time.monotonic() < deadline:
            status = client.get_run_status(run_id)
            if status in done:
                return status.value
            time.sleep(1.0)
        raise RuntimeError(f"run {run_id} did not finish in {RUN_TIMEOUT:.0f} s\n{self.log_tail()}")

    def materialize(self) -> dict[str, str]:
        """Once per deployment: run the data job for the dataset and
        the explicit job for ``dataset|default`` through the webserver. Returns job -> run id."""
        if self.runs:
            return self.runs
        for job, partition, dims in (
            ("data_job", DATASET, None),
            ("explicit_job", MODEL_KEY, {"dataset": DATASET, "hparams": HPARAMS}),
        ):
            run_id = self.launch(job, partition, dims)
            self.runs[job] = run_id
            status = self.wait_run(run_id)
            if status != "SUCCESS":
                raise RuntimeError(f"{job} {partition} run {run_id}: {status}\n{self.run_failure(run_id)}")
        return self.runs

    def run_failure(self, run_id: str) -> str:
        data = self.graphql(
            """query($id: ID!) { runOrError(runId: $id) { ... on Run { eventConnection { events {
                 __typename ... on ExecutionStepFailureEvent { stepKey error { message } } } } } } }""",
            {"id": run_id})
        events = data["runOrError"].get("eventConnection", {}).get("events", [])
        return "\n".join(f"{e['stepKey']}: {e['error']['message']}" for e in events if e.get("stepKey"))


def deployment_env(root: Path, home: Path, cfg: Path) -> dict[str, str]:
    """The environment of a test deployment's processes: its own DAGSTER_HOME, flexmf.yaml and data dir."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "FLEXMF_CONFIG": str(cfg),
        "FLEXMF_DATA_DIR": str(root / "state"),
        "GX_ANALYTICS_ENABLED": "False",
        "TQDM_DISABLE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        # on a loaded 2-core machine the code server may take over a minute to start a run; at the
        # default 60 s the daemon marks the run failed while its process starts anyway
        "DAGSTER_GRPC_TIMEOUT_SECONDS": os.environ.get("DAGSTER_GRPC_TIMEOUT_SECONDS", "300"),
    }
    env.pop("FLEXMF_MIRROR_URL", None)
    env.pop("FLEXMF_MIRROR_SHA256SUMS", None)
    return env


def start_deployment(root: Path, mirror_url: str, archive) -> Deployment:
    """Write the test flexmf.yaml under ``root`` (the dataset at ``mirror_url``, ``archive``'s sha256)
    and start webserver + daemon against it."""
    root.mkdir(parents=True, exist_ok=True)
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    cfg = root / "flexmf.yaml"
    cfg.write_text(CONFIG.format(dataset=DATASET, url=mirror_url, sha=archive.sha256))
    env = deployment_env(root, home, cfg)
    # the UI's one-time "join the community" dialog counts as seen (what its Skip button records)
    (home / ".nux").mkdir(exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    dep = Deployment(root=root, port=free_port(), env=env, archive=archive)
    try:
        dep.start()
    except BaseException:
        dep.stop()
        raise
    return dep


_KEY = pytest.StashKey[Deployment]()


def deployment(request: pytest.FixtureRequest, tmp_path_factory, movielens_server) -> Deployment:
    """The session's deployment (started on first use, stopped at session end, also after failures)."""
    config = request.config
    if _KEY in config.stash:
        return config.stash[_KEY]
    dep = start_deployment(tmp_path_factory.mktemp("dagster_e2e"), movielens_server.url("ml-latest-small.zip"),
                           movielens_server.archive)
    config.stash[_KEY] = dep
    config.add_cleanup(dep.stop)
    return dep
