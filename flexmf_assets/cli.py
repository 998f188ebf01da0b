"""``flexmf``: register hyperparameter partitions, materialize the graph, start the UI.

    flexmf register                      # add flexmf.yaml's hparams sets as dynamic partitions
    flexmf materialize                   # data + explicit/implicit `default` for the default dataset
    flexmf materialize --dataset ml-1m --explicit tuned --implicit bpr warp
    flexmf sweep                         # every set of flexmf.yaml on the swept datasets + leaderboards
    flexmf tune --track explicit --trials 40   # an Optuna study; a second call resumes it to 40
    flexmf leaderboard                   # print them
    flexmf dev                           # dagster dev on 127.0.0.1 with the project's DAGSTER_HOME

Runs are recorded in the instance at ``$DAGSTER_HOME`` (default ``data/dagster_home``), so the UI shows
them. ``materialize`` and ``sweep`` print one line per run and a summary; Dagster's event stream goes to
``data/logs/flexmf-<command>-<time>.log`` (and to the terminal with ``--verbose``). A bad configuration
prints one line and exits with status 2; a failed run prints one line naming the run and the log file,
the other runs go on, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from flexmf_assets.cli_report import Session, one_line, print_report, show
from flexmf_assets.errors import ConfigError, FlexMFError
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

#: written into DAGSTER_HOME by `flexmf dev`: the code location under the name workspace.yaml gives it
WORKSPACE_FILE = "flexmf-workspace.yaml"
WORKSPACE_YAML = """\
# Written by `flexmf dev` (rewritten on every start): the project's code location, named as in the
# repository's workspace.yaml.
load_from:
  - python_module:
      module_name: flexmf_assets.defs.definitions
      attribute: defs
      location_name: flexmf_assets
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


def ensure_pools(instance, say=None) -> None:
    """Give the ``gpu`` pool one slot unless the operator already set a limit: two trainings never
    share one GPU. Give back the slots of runs that are over or whose process is gone (killed), and
    say so (``say``: a command session's note; by default the terminal)."""
    from flexmf_assets.defs.slots import free_dead_run_slots

    for run_id in free_dead_run_slots(instance):
        text = f"gave back the pool slots of run {run_id} (finished, or its process is gone)"
        if say is None:
            print(f"flexmf: {text}")
        else:
            say(text)
    storage = instance.event_log_storage
    configured = storage.get_concurrency_keys()
    for pool, limit in POOL_LIMITS.items():
        if pool not in configured:
            storage.set_concurrency_slots(pool, limit)


def register(project: ProjectConfig, instance=None, say=None) -> dict[str, list[str]]:
    """Add every named hparams set of the file as a dynamic partition (what the ``register_sets``
    sensor does); returns the new names per track. A set that does not build is never registered:
    the first one raises its one-line :class:`ConfigError`."""
    import dagster as dg

    from flexmf_assets.defs.automation import registration

    instance = instance or dg.DagsterInstance.get()
    ensure_pools(instance, say)
    found = registration(project, instance)
    bad = [f"{what}: {why}" for what, why in found.invalid.items() if " set " in what]
    if bad:
        raise ConfigError(bad[0])
    for request in found.requests():
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return found.new


def _epochs(project: ProjectConfig, track: str, name: str) -> int | None:
    try:
        return project.resolve_hparams(track, name).epochs
    except FlexMFError:
        return None


def materialize(project: ProjectConfig, dataset: str, sets: dict[str, list[str]], session: Session, *,
                instance=None) -> bool:
    """The data run, one run per set (a failed set does not stop the others), then the leaderboards;
    one line per run and the summary on ``session``. True when every run succeeded."""
    import dagster as dg

    from flexmf_assets.defs.definitions import build_definitions
    from flexmf_assets.defs.partitions import DATASET_DIM, HPARAMS_DIM

    instance = instance or dg.DagsterInstance.get()
    project.dataset(dataset)
    ensure_pools(instance, session.note)
    for track, names in sets.items():
        for name in names:
            project.resolve_hparams(track, name)
            if name not in instance.get_dynamic_partitions(f"{track}_hparams"):
                instance.add_dynamic_partitions(f"{track}_hparams", [name])
    defs = build_definitions(project)
    trainings = [(track, name) for track, names in sets.items() for name in names]
    session.total = 1 + len(trainings) + (1 if trainings else 0)
    if session.run(defs, instance, "data_job", dataset).ok:
        for track, name in trainings:
            key = dg.MultiPartitionKey({DATASET_DIM: dataset, HPARAMS_DIM: name})
            session.run(defs, instance, f"{track}_job", key, epochs=_epochs(project, track, name))
        if trainings:
            session.run(defs, instance, "leaderboard_job", dataset)
    elif trainings:
        session.note(f"skipped {len(trainings) + 1} run(s): they need the data of {dataset}")
    print_report(session, instance, _io_manager(defs))
    return session.ok and len(session.outcomes) == session.total


def _io_manager(defs):
    """The project's storage layer as the jobs use it (for the paths of the tables)."""
    return defs.resources["io_manager"].create_io_manager(None)


def sweep(project: ProjectConfig, session: Session, *, instance=None) -> bool:
    """What the ``sweep`` sensor and the daemon do, in this process: register every set of
    flexmf.yaml, train every missing or stale partition of the swept datasets, then rank them.

    One partition's failure (a set that diverges, a key Dagster refuses, a dataset that does not
    download) is reported and the others go on; the leaderboards of every dataset with a split are
    refreshed. True when every run succeeded."""
    import dagster as dg

    from flexmf_assets.defs.automation import sweep_plan
    from flexmf_assets.defs.records import latest_materialization
    from flexmf_assets.defs.definitions import build_definitions
    from flexmf_assets.defs.partitions import HPARAMS_DIM

    instance = instance or dg.DagsterInstance.get()
    ensure_pools(instance, session.note)
    defs = build_definitions(project)
    datasets = list(project.swept_datasets)
    tried: set[str] = set()
    reported: set[str] = set()
    ok = True
    session.total = len(datasets)  # the leaderboards; each tick adds its runs
    while True:
        try:
            plan = sweep_plan(project, instance)
            for req in plan.registration.requests():
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        except Exception as exc:  # noqa: BLE001 - the runs so far still get their boards and summary
            session.failed("sweep: planning the next runs", exc)
            ok = False
            break
        for what, why in plan.registration.invalid.items():
            if what not in reported:
                reported.add(what)
                session.note(f"{what} is invalid and will never be trained: {why}")
        for what, key in plan.same_as.items():
            if what not in reported:
                reported.add(what)
                session.note(f"{what} resolves to the same configuration as {key!r}: trained once")
        todo = [r for r in plan.runs if r.run_key not in tried]
        if not todo:
            break
        session.total += len(todo)
        for req in todo:
            tried.add(req.run_key)
            key = req.partition_key
            track = req.job_name.removesuffix("_job")
            epochs = _epochs(project, track, key.keys_by_dimension[HPARAMS_DIM]) \
                if isinstance(key, dg.MultiPartitionKey) and track in TRACKS else None
            session.run(defs, instance, req.job_name, key, epochs=epochs)
    for dataset in datasets:
        if latest_materialization(instance, "split", dataset) is None:
            session.total -= 1
            session.note(f"no leaderboards for {dataset}: its data did not materialize")
            ok = False
            continue
        session.run(defs, instance, "leaderboard_job", dataset)
    print_report(session, instance, _io_manager(defs))
    return ok and session.ok


def tune(project: ProjectConfig, track: str, dataset: str, trials: int | None, session: Session, *,
         instance=None, timeout: float | None = None) -> bool:
    """An Optuna study of ``track`` on ``dataset`` up to ``trials`` trials (the study's total; default
    ``tune.<track>.trials``), each trial a run of the track's job in this process, one line per trial;
    then the leaderboards and the tuning report. True when the study reached its total."""
    import dagster as dg

    from flexmf_assets.defs.definitions import build_definitions
    from flexmf_assets.defs.records import latest_materialization
    from flexmf_assets.defs.tuning import open_track_study, outcome_text, result_of, tune_in_process
    from flexmf_assets.tuning import finished_count
    from flexmf_assets.tracks import track as get_track

    instance = instance or dg.DagsterInstance.get()
    spec = project.tune_spec(track)
    project.dataset(dataset)
    total = trials or spec.trials
    ensure_pools(instance, session.note)
    defs = build_definitions(project)
    session.total = max(0, total - finished_count(open_track_study(project, instance, track, dataset))) + 2
    if latest_materialization(instance, "split", dataset) is None:
        session.total += 1
        if not session.run(defs, instance, "data_job", dataset).ok:
            session.note(f"no tune: the data of {dataset} did not materialize")
            return False
    epochs = {**project.hparam_sets(track).get("default", {}), **spec.base}.get("epochs")

    def run_job(job, partition, tags, text, describe):
        outcome = session.run(defs, instance, job, partition, epochs=epochs, tags=tags, text=text,
                              describe=lambda o: describe(result_of(track, o.assets, o.run_id, o.ok)))
        return result_of(track, outcome.assets, outcome.run_id, outcome.ok, outcome.error)

    outcome = tune_in_process(project, instance, track, dataset, total, run_job, say=session.note,
                              timeout=timeout)
    session.echo(f"flexmf: {outcome_text(outcome, get_track(track).val_key)}")
    session.run(defs, instance, "leaderboard_job", dataset)
    session.run(defs, instance, "tuning_report_job", dataset, text=f"tuning report {track} {dataset}",
                selection=[dg.AssetKey(f"{track}_tuning_report")],
                describe=lambda o: f"{o.assets.get(f'{track}_tuning_report', {}).get('trials', 0)} trials")
    print_report(session, instance, _io_manager(defs))
    return outcome.done >= total and session.ok


def print_leaderboards(project: ProjectConfig, dataset: str) -> bool:
    """Print the materialized leaderboards of ``dataset`` (from the project's storage)."""
    import polars as pl
    from upath import UPath

    from flexmf_assets.storage import VersionedStore

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


def _write_workspace(home: str) -> str:
    """The workspace file ``flexmf dev`` loads: the code location by module (so it works outside the
    repo root) under the same name as the repo's workspace.yaml (``dagster dev -m`` would name it
    after the module, and has no option to rename it)."""
    path = os.path.join(home, WORKSPACE_FILE)
    current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if current != WORKSPACE_YAML:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(WORKSPACE_YAML)
        os.replace(tmp, path)
    return path


def _dagster_executable() -> str:
    """The ``dagster`` of this environment (also when its bin folder is not on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "dagster")
    return beside if os.path.exists(beside) else "dagster"


def main(argv: Sequence[str] | None = None) -> int:
    # -v/--verbose is global: before the command (flexmf -v sweep) or after it (flexmf sweep -v)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show Dagster's event stream, warnings and tracebacks on the terminal too")
    parser = argparse.ArgumentParser(prog="flexmf", description=__doc__.split("\n\n")[0], parents=[verbose])
    parser.add_argument("--config", help="path of flexmf.yaml (default: $FLEXMF_CONFIG or ./flexmf.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("register", parents=[verbose],
                   help="register flexmf.yaml's hyperparameter sets as partitions")
    mat = sub.add_parser("materialize", parents=[verbose],
                         help="materialize data and model partitions in the instance")
    mat.add_argument("--dataset", help="dataset partition (default: flexmf.yaml default_dataset)")
    for name in TRACKS:
        mat.add_argument(f"--{name}", nargs="*", default=None, metavar="SET",
                         help=f"{name} hparams sets (default: default; none to skip)")
    mat.add_argument("--data-only", action="store_true", help="only the data assets")
    sub.add_parser("sweep", parents=[verbose],
                   help="train every registered/declared set on the swept datasets, then "
                   "rank them (what the sweep sensor does, without the daemon)")
    tun = sub.add_parser("tune", parents=[verbose],
                         help="an Optuna study (flexmf.yaml tune:), each trial an hparams partition trained by "
                         "a run; a second call resumes the study to its total")
    tun.add_argument("--track", default=next(iter(TRACKS)), choices=list(TRACKS))
    tun.add_argument("--dataset", help="dataset partition (default: flexmf.yaml default_dataset)")
    tun.add_argument("--trials", type=int, help="the study's total number of trials (default: tune.<track>.trials)")
    tun.add_argument("--timeout", type=float, help="seconds after which no new trial starts "
                     "(default: tune.<track>.timeout)")
    board = sub.add_parser("leaderboard", parents=[verbose], help="print the leaderboards of a dataset")
    board.add_argument("--dataset", help="dataset partition (default: flexmf.yaml default_dataset)")
    dev = sub.add_parser("dev", parents=[verbose], help="start `dagster dev` (webserver + daemon) on 127.0.0.1")
    dev.add_argument("--port", default="3000")
    dev.add_argument("--host", default="127.0.0.1",
                     help="bind address; 0.0.0.0 exposes the UI to the network (see docs/operations.md)")
    args = parser.parse_args(argv)
    verbose_on = getattr(args, "verbose", False)
    session: Session | None = None
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
        if args.command == "tune":
            if args.trials is not None and args.trials < 1:
                raise ConfigError(f"--trials: expected a positive integer, got {args.trials}")
            dataset = args.dataset or project.default_dataset
            project.tune_spec(args.track)
            session = Session(project.data_dir / "logs", "tune", verbose=verbose_on)
            with session:
                session.echo(f"flexmf: tune {args.track} on {dataset}; Dagster's events go to {show(session.log_path)}")
                ok = tune(project, args.track, dataset, args.trials, session, timeout=args.timeout)
            return 0 if ok else 1
        if args.command in ("materialize", "sweep"):
            session = Session(project.data_dir / "logs", args.command, verbose=verbose_on)
            with session:
                if args.command == "sweep":
                    session.echo(f"flexmf: sweep of {', '.join(project.swept_datasets)}; Dagster's events go to "
                                 f"{show(session.log_path)}")
                    ok = sweep(project, session)
                else:
                    dataset = args.dataset or project.default_dataset
                    chosen = {name: getattr(args, name) for name in TRACKS}
                    sets = {name: ["default"] if names is None else names for name, names in chosen.items()}
                    if args.data_only:
                        sets = {}
                    session.echo(f"flexmf: materialize {dataset}; Dagster's events go to {show(session.log_path)}")
                    register(project, say=session.note)
                    ok = materialize(project, dataset, sets, session)
            return 0 if ok else 1
        if args.command == "leaderboard":
            return 0 if print_leaderboards(project, args.dataset or project.default_dataset) else 1
        if args.command == "dev":
            print(f"flexmf: DAGSTER_HOME={home}", flush=True)
            # the UI lists the file's sets at once (the register_sets sensor would within 30 s)
            added = sum(len(names) for names in register(project).values())
            print(f"flexmf: {added} new hyperparameter set(s) registered; nothing trains until you launch "
                  "one (or turn the sweep sensor on)", flush=True)
            if project.path is not None:  # the webserver and daemon processes read the same file
                os.environ["FLEXMF_CONFIG"] = str(project.path)
            workspace = _write_workspace(home)
            # a loaded machine can take over a minute to start a run in the code server; at Dagster's
            # default of 60 s the daemon fails the run while its process starts anyway
            os.environ.setdefault("DAGSTER_GRPC_TIMEOUT_SECONDS", "300")
            os.execv(_dagster_executable(), ["dagster", "dev", "-w", workspace, "-h", args.host, "-p", args.port])
    except FlexMFError as exc:
        print(f"flexmf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"; the log is {show(session.log_path)}" if session else ""
        print(f"flexmf: interrupted{where}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a broken environment: one line; the traceback in the log
        if verbose_on:
            traceback.print_exc()
        where = f"; traceback in {show(session.log_path)}" if session else " (--verbose shows the traceback)"
        print(f"flexmf: error: {one_line(exc)}{where}", file=sys.stderr)
        return 1
    return 0


def register_main() -> int:
    """``flexmf-register``: same as ``flexmf register``."""
    return main([*sys.argv[1:], "register"])


if __name__ == "__main__":
    sys.exit(main())
