"""``flexmf``: register hyperparameter partitions, materialize the graph, start the UI.

    flexmf register                      # add flexmf.yaml's hparams sets as dynamic partitions
    flexmf materialize                   # data + explicit/implicit `default` for the default dataset
    flexmf materialize --dataset ml-1m --explicit tuned --implicit bpr warp
    flexmf sweep                         # every set of flexmf.yaml on the swept datasets + leaderboards
    flexmf leaderboard                   # print them
    flexmf dev                           # dagster dev on 127.0.0.1 with the project's DAGSTER_HOME

Runs are recorded in the instance at ``$DAGSTER_HOME`` (default ``data/dagster_home``), so the UI shows
them. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flexmf_assets.errors import FlexMFError
from flexmf_assets.project import TRACKS, ProjectConfig, load_project


#: written to a new DAGSTER_HOME (never over an existing file): run queue and concurrency pools
DAGSTER_YAML = """\
# Written by `flexmf` for a new DAGSTER_HOME; edit freely (docs/operations.md).
concurrency:
  runs:
    max_concurrent_runs: 4   # backfills launch up to 4 partition runs at once
  pools:
    granularity: op
    default_limit: 2         # training steps of unconfigured pools (flexmf_training) at once
run_monitoring:
  enabled: true              # the daemon fails runs that never start or hang while canceling
  start_timeout_seconds: 180
  poll_interval_seconds: 15
  free_slots_after_run_end_seconds: 15   # a failed or killed run's pool slots come back
telemetry:
  enabled: false
nux:
  enabled: false             # no first-visit dialog in the UI
"""

#: concurrency pool limits set on a new instance (``dagster instance concurrency set`` changes them)
POOL_LIMITS = {"gpu": 1}


def _ensure_home(project: ProjectConfig) -> str:
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(project.dagster_home)
        os.environ["DAGSTER_HOME"] = home
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    if not os.path.exists(config):
        with open(config, "w", encoding="utf-8") as fh:
            fh.write(DAGSTER_YAML)
    return home


def ensure_pools(instance) -> None:
    """Give the ``gpu`` pool one slot unless the operator already set a limit: two trainings never
    share one GPU. Give back the slots of runs that are over or whose process is gone (killed)."""
    from flexmf_assets.defs.slots import free_dead_run_slots

    for run_id in free_dead_run_slots(instance):
        print(f"flexmf: gave back the pool slots of run {run_id} (finished, or its process is gone)")
    storage = instance.event_log_storage
    configured = storage.get_concurrency_keys()
    for pool, limit in POOL_LIMITS.items():
        if pool not in configured:
            storage.set_concurrency_slots(pool, limit)


def register(project: ProjectConfig, instance=None) -> dict[str, list[str]]:
    """Add every named hparams set of the file as a dynamic partition; returns the new names per track."""
    import dagster as dg

    from flexmf_assets.defs.partitions import HPARAMS_PARTITIONS

    instance = instance or dg.DagsterInstance.get()
    ensure_pools(instance)
    added: dict[str, list[str]] = {}
    for track in TRACKS:
        pdef = HPARAMS_PARTITIONS[track]
        existing = set(instance.get_dynamic_partitions(pdef.name))
        new = [name for name in project.hparam_sets(track) if name not in existing]
        for name in new:
            project.resolve_hparams(track, name)  # a set that does not build is never registered
        if new:
            instance.add_dynamic_partitions(pdef.name, new)
        added[track] = new
    return added


def materialize(project: ProjectConfig, dataset: str, sets: dict[str, list[str]], *, instance=None) -> bool:
    import dagster as dg

    from flexmf_assets.defs.definitions import build_definitions

    instance = instance or dg.DagsterInstance.get()
    project.dataset(dataset)
    for track, names in sets.items():
        for name in names:
            project.resolve_hparams(track, name)
            if name not in instance.get_dynamic_partitions(f"{track}_hparams"):
                instance.add_dynamic_partitions(f"{track}_hparams", [name])
    defs = build_definitions(project)
    jobs = [("data_job", dataset)] + [
        (f"{track}_job", dg.MultiPartitionKey({"dataset": dataset, "hparams": name}))
        for track, names in sets.items() for name in names
    ]
    if any(sets.values()):
        jobs.append(("leaderboard_job", dataset))
    return all(run_job(defs, instance, job_name, key) for job_name, key in jobs)


def run_job(defs, instance, job_name: str, key) -> bool:
    print(f"flexmf: {job_name} {key} ...", flush=True)
    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=instance, partition_key=key, raise_on_error=False)
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        data = failure.step_failure_data if failure is not None else None
        msg = (data.user_failure_data.description if data and data.user_failure_data else None) or (
            data.error.message.strip().splitlines()[-1] if data and data.error else "see the run in the UI")
        print(f"flexmf: error: {job_name} {key} failed (run {result.run_id}): {msg}", file=sys.stderr)
        return False
    print(f"flexmf: {job_name} {key} succeeded (run {result.run_id})", flush=True)
    return True


def sweep(project: ProjectConfig, *, instance=None) -> bool:
    """What the ``sweep`` sensor and the daemon do, in this process: register every set of
    flexmf.yaml, train every missing or stale partition of the swept datasets, then rank them."""
    import dagster as dg

    from flexmf_assets.defs.automation import sweep_plan
    from flexmf_assets.defs.definitions import build_definitions

    instance = instance or dg.DagsterInstance.get()
    ensure_pools(instance)
    defs = build_definitions(project)
    tried: set[str] = set()
    ok = True
    while True:
        plan = sweep_plan(project, instance)
        for req in plan.registration.requests():
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        todo = [r for r in plan.runs if r.run_key not in tried]
        if not todo:
            break
        for req in todo:
            tried.add(req.run_key)
            ok &= run_job(defs, instance, req.job_name, req.partition_key)
    for dataset in project.swept_datasets:
        ok &= run_job(defs, instance, "leaderboard_job", dataset)
    return ok


def print_leaderboards(project: ProjectConfig, dataset: str) -> bool:
    """Print the materialized leaderboards of ``dataset`` (from the project's storage)."""
    import polars as pl
    from upath import UPath

    from flexmf_assets.defs.io_managers import VersionedStore

    found = False
    for track in TRACKS:
        try:
            frame = VersionedStore().read(UPath(project.storage_dir) / f"{track}_leaderboard" / dataset)
        except FileNotFoundError:
            print(f"flexmf: no {track}_leaderboard for {dataset} yet (flexmf sweep, or materialize it in the UI)")
            continue
        found = True
        cols = [c for c in frame.columns if c not in ("run_id", "partition")]
        with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200, float_precision=4,
                       tbl_hide_dataframe_shape=True):
            print(f"{track} leaderboard, {dataset} (champion by validation score):")
            print(frame.select(cols))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexmf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="path of flexmf.yaml (default: $FLEXMF_CONFIG or ./flexmf.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("register", help="register flexmf.yaml's hyperparameter sets as partitions")
    mat = sub.add_parser("materialize", help="materialize data and model partitions in the instance")
    mat.add_argument("--dataset", help="dataset partition (default: flexmf.yaml default_dataset)")
    mat.add_argument("--explicit", nargs="*", default=None, metavar="SET",
                     help="explicit hparams sets (default: default; none to skip)")
    mat.add_argument("--implicit", nargs="*", default=None, metavar="SET",
                     help="implicit hparams sets (default: default; none to skip)")
    mat.add_argument("--data-only", action="store_true", help="only the data assets")
    sub.add_parser("sweep", help="train every registered/declared set on the swept datasets, then "
                   "rank them (what the sweep sensor does, without the daemon)")
    board = sub.add_parser("leaderboard", help="print the leaderboards of a dataset")
    board.add_argument("--dataset", help="dataset partition (default: flexmf.yaml default_dataset)")
    dev = sub.add_parser("dev", help="start `dagster dev` (webserver + daemon) on 127.0.0.1")
    dev.add_argument("--port", default="3000")
    dev.add_argument("--host", default="127.0.0.1",
                     help="bind address; 0.0.0.0 exposes the UI to the network (see docs/operations.md)")
    args = parser.parse_args(argv)
    try:
        project = load_project(args.config)
        if args.config:
            os.environ["FLEXMF_CONFIG"] = os.path.abspath(args.config)
        home = _ensure_home(project)
        if args.command == "register":
            added = register(project)
            for track, names in added.items():
                print(f"flexmf: {track}_hparams: {len(names)} new partition(s)"
                      + (f": {', '.join(names)}" if names else ""))
            return 0
        if args.command == "materialize":
            sets = {"explicit": ["default"] if args.explicit is None else args.explicit,
                    "implicit": ["default"] if args.implicit is None else args.implicit}
            if args.data_only:
                sets = {}
            register(project)
            ok = materialize(project, args.dataset or project.default_dataset, sets)
            return 0 if ok else 1
        if args.command == "leaderboard":
            return 0 if print_leaderboards(project, args.dataset or project.default_dataset) else 1
        if args.command == "sweep":
            return 0 if sweep(project) else 1
        if args.command == "dev":
            print(f"flexmf: DAGSTER_HOME={home}", flush=True)
            if project.path is not None:  # the webserver and daemon processes read the same file
                os.environ["FLEXMF_CONFIG"] = str(project.path)
            os.execvp("dagster", ["dagster", "dev", "-m", "flexmf_assets.defs.definitions",
                                  "-h", args.host, "-p", args.port])
    except FlexMFError as exc:
        print(f"flexmf: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register_main() -> int:
    """``flexmf-register``: same as ``flexmf register``."""
    return main([*sys.argv[1:], "register"])


if __name__ == "__main__":
    sys.exit(main())
