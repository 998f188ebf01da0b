"""What ``flexmf materialize`` and ``flexmf sweep`` show a person: one line per run, a summary table,
where the tables are and how to open the UI. Everything else goes to a log file.

Dagster's event stream (every DEBUG event and step log of the in-process runs), Python warnings and
anything a library prints go to ``<data_dir>/logs/flexmf-<command>-<time>.log``; ``--verbose`` shows
them on the terminal as well.

Why a Dagster logger: ``execute_in_process`` runs a job in this process and returns only when it is
done, and the job's default console logger writes every event to stderr as it happens. Giving the job
our own logger (``JobDefinition.with_logger_defs``) replaces that console logger, and Dagster hands
each event to it live, with its step and event type. The one logger both writes the log file and feeds
the progress display: the training step's ``epoch N:`` lines, and the step that is running. (A handler
on a Python logger would need the instance's ``managed_python_loggers`` setting and would still leave
the console logger printing.)

This module imports no Dagster at import time: warnings raised while Dagster imports belong in the log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO
from urllib.parse import quote

from flexmf_assets.tracks import TRACKS

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
#: the newest table of an asset partition, written beside its version folders
LATEST = "latest.parquet"
UI_URL = "http://127.0.0.1:3000"
TRACK_JOBS = {f"{name}_job": name for name in TRACKS}
#: the test metric of each track's evaluation and its baseline (evaluation metadata keys)
TEST_METRIC = {name: (t.headline.upper(), t.headline, f"baseline_{t.headline}") for name, t in TRACKS.items()}
_EPOCH = re.compile(r"epoch (\d+):")
#: what the open run line says while a step runs (by the end of its step key)
STEP_WORDS = {"archive": "fetching the archive", "ratings_and_items": "parsing and validating",
              "split": "splitting", "_model": "training", "_evaluation": "evaluating",
              "_recommendations": "writing recommendations", "_leaderboard": "ranking"}


@dataclass
class Outcome:
    """One run of one job for one partition, as the terminal reports it."""

    job: str
    key: str
    label: str
    ok: bool
    seconds: float
    run_id: str | None = None
    error: str | None = None
    #: asset name -> metadata values of its materialization in this run
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def track(self) -> str | None:
        return TRACK_JOBS.get(self.job)

    @property
    def dataset(self) -> str:
        return self.key.partition("|")[0]


def label(job: str, key: str) -> str:
    return {"data_job": f"data {key}", "leaderboard_job": f"leaderboards {key}"}.get(
        job, f"{TRACK_JOBS.get(job, job)} {key}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and its whole message, whitespace collapsed."""
    text = " ".join(str(exc).split()).rstrip(".") or "no message"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def failure_message(result) -> str:
    """The user-facing line of a failed run: the step failure's description, else its error's last line."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data is not None and data.user_failure_data.description:
                return last_line(data.user_failure_data.description)
            if data.error is not None:
                return last_line(data.error.message)
    for event in result.all_events:  # a run that failed outside a step (e.g. a resource)
        if event.is_failure and event.message:
            return last_line(event.message)
    return "see the run in the UI"


class _Progress(logging.Handler):
    """Feeds the open run line: the step that started, the training epoch."""

    def __init__(self, session: "Session"):
        super().__init__(logging.DEBUG)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        match = _EPOCH.match(str(meta.get("orig_message") or ""))
        if match:
            total = self.session.epochs
            self.session.status(f"training, epoch {match[1]}" + (f"/{total}" if total else ""))
            return
        event = meta.get("dagster_event")
        if event is not None and event.event_type_value == "STEP_START":
            step = str(event.step_key)
            self.session.status(next((word for end, word in STEP_WORDS.items() if step.endswith(end)), step))


class Session:
    """The terminal and the log file of one command (a context manager)."""

    def __init__(self, logs_dir: Path, command: str, *, verbose: bool = False,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.verbose = verbose
        self.tty = not verbose and self.out.isatty()
        self.log_path = _new_log(Path(logs_dir), command)
        self.stream = open(self.log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in __exit__
        formatter = logging.Formatter(LOG_FORMAT)
        self._handlers = [logging.StreamHandler(self.stream)]
        if verbose:
            self._handlers.append(logging.StreamHandler(self.err))
        for handler in self._handlers:
            handler.setFormatter(formatter)
        #: the Dagster event stream: a private logger (no parent), so only these handlers see it
        self.events = logging.Logger("dagster", logging.DEBUG)
        for handler in [*self._handlers, _Progress(self)]:
            self.events.addHandler(handler)
        #: what this command itself says (run lines, errors, tracebacks): the log file only
        self._own = logging.Logger("flexmf", logging.DEBUG)
        self._own.addHandler(self._handlers[0])
        self.outcomes: list[Outcome] = []
        self.total = 0
        self.epochs: int | None = None
        self._line: str | None = None
        self._notes: set[str] = set()
        self._stack = contextlib.ExitStack()

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        root = logging.getLogger()
        for handler in self._handlers:  # library warnings and errors: the log (and --verbose: the terminal)
            root.addHandler(handler)
            self._stack.callback(root.removeHandler, handler)
        logging.captureWarnings(True)
        self._stack.callback(logging.captureWarnings, False)
        if not self.verbose:  # progress bars and stray prints of libraries
            self._stack.enter_context(contextlib.redirect_stdout(self.stream))
            self._stack.enter_context(contextlib.redirect_stderr(self.stream))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_line("interrupted" if exc_type is KeyboardInterrupt else "stopped")
        if exc is not None:
            self.log_text("".join(traceback.format_exception(exc_type, exc, tb)))
        self._stack.close()
        self.stream.close()

    def logger_def(self):
        import dagster as dg

        return dg.LoggerDefinition(lambda _context: self.events,
                                   description="flexmf: the event stream to the log file and progress display")

    # -- terminal -----------------------------------------------------------------------------
    def echo(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)
        self.log_text(text)

    def error(self, text: str) -> None:
        print(f"flexmf: error: {text}", file=self.err, flush=True)
        self.log_text(f"error: {text}")

    def note(self, text: str) -> None:
        """A warning of the command itself (printed once per command)."""
        if text not in self._notes:
            self._notes.add(text)
            self.echo(f"flexmf: {text}")

    def log_text(self, text: str) -> None:
        if text.strip() and not self.stream.closed:
            self._own.info(text)

    def status(self, text: str) -> None:
        """Rewrite the open run line (terminals only: a pipe gets one line per run)."""
        if self.tty and self._line is not None:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.out.write("\r\x1b[K" + f"{self._line} ... {text}"[:width])
            self.out.flush()

    def _open_line(self, text: str) -> None:
        self._line = text
        if self.verbose:
            print(f"{text} ...", file=self.out, flush=True)
        else:
            self.out.write(f"{text} ...")
            self.out.flush()

    def _close_line(self, text: str) -> None:
        if self._line is None:
            return
        if self.tty:
            self.out.write(f"\r\x1b[K{self._line} ... {text}\n")
        elif self.verbose:
            self.out.write(f"{self._line} ... {text}\n")
        else:
            self.out.write(f" {text}\n")
        self.out.flush()
        self.log_text(f"{self._line} ... {text}")
        self._line = None

    # -- runs ----------------------------------------------------------------------------------
    def run(self, defs, instance, job_name: str, key, *, epochs: int | None = None,
            tags: dict[str, str] | None = None, text: str | None = None,
            describe: Callable[[Outcome], str] | None = None, selection: list | None = None) -> Outcome:
        """Execute one job for one partition in this process; never raises for a failed run (the
        outcome says what happened, stderr gets one line naming the run and the log file). ``text``
        replaces the run's label, ``describe`` the result text of its line (a tune's trial lines);
        ``selection`` (asset keys) narrows the job."""
        key = str(key)
        index = len(self.outcomes) + 1
        self.total = max(self.total, index)
        self.epochs = epochs
        text = text or label(job_name, key)
        self._open_line(f"[{index}/{self.total}] {text}")
        start = time.monotonic()
        outcome = Outcome(job_name, key, text, ok=False, seconds=0.0)
        try:
            job = defs.resolve_job_def(job_name).with_logger_defs({"flexmf": self.logger_def()})
            # a logger runs only when the run config names it; then Dagster's console logger does not.
            # The run records the assets it targets, so a running daemon's automation does not take
            # this run's model update for a new one and refresh its evaluation a second time.
            result = job.execute_in_process(run_config={"loggers": {"flexmf": {}}}, instance=instance,
                                            partition_key=key, raise_on_error=False, tags=tags,
                                            asset_selection=selection or list(job.asset_layer.selected_asset_keys))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # e.g. a partition key Dagster refuses before the run starts
            self.log_text(traceback.format_exc())
            if self.verbose:
                traceback.print_exc(file=self.err)
            outcome.error = one_line(exc)
        else:
            outcome.run_id = result.run_id
            outcome.ok = result.success
            for event in result.get_asset_materialization_events():
                mat = event.step_materialization_data.materialization
                outcome.assets[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
            if not result.success:
                outcome.error = failure_message(result)
        outcome.seconds = time.monotonic() - start
        self.outcomes.append(outcome)
        if outcome.ok:
            result_text = describe(outcome) if describe else _result_text(outcome)
            self._close_line("  ".join(filter(None, [f"done in {outcome.seconds:.1f} s", result_text])))
        else:
            self._close_line(f"FAILED after {outcome.seconds:.1f} s")
            run = f" (run {outcome.run_id})" if outcome.run_id else ""
            self.error(f"{job_name} {key} failed{run}: {outcome.error}; details in {show(self.log_path)}")
        return outcome

    def failed(self, what: str, exc: BaseException) -> None:
        """An unexpected exception outside a run: one line, the traceback in the log (and with --verbose)."""
        self._close_line("stopped")
        self.log_text("".join(traceback.format_exception(exc)))
        if self.verbose:
            traceback.print_exception(exc, file=self.err)
        self.error(f"{what} failed: {one_line(exc)}; details in {show(self.log_path)}")

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


def _new_log(logs_dir: Path, command: str) -> Path:
    logs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"flexmf-{command}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in range(1000):
        path = logs_dir / (f"{stem}.log" if n == 0 else f"{stem}-{n}.log")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{logs_dir}: too many log files named {stem}*")


def _result_text(outcome: Outcome) -> str:
    if outcome.track:
        name, key, base = TEST_METRIC[outcome.track]
        meta = outcome.assets.get(f"{outcome.track}_evaluation", {})
        return f"{name} {_fmt(meta.get(key))} (baseline {_fmt(meta.get(base))})"
    if outcome.job == "data_job":
        split = outcome.assets.get("split", {})
        if "train_rows" in split:
            return (f"train/validation/test {split['train_rows']}/{split.get('validation_rows', '?')}/"
                    f"{split.get('test_rows', '?')} ratings")
    if outcome.job == "leaderboard_job":
        champs = [f"{t} {_champion(outcome, t) or 'none'}" for t in TEST_METRIC]
        return "champions: " + ", ".join(champs)
    return ""


def _champion(outcome: Outcome, track: str) -> str | None:
    """The hparams name of ``track``'s champion on the leaderboard this run wrote (None: no champion)."""
    value = outcome.assets.get(f"{track}_leaderboard", {}).get("champion")
    if not isinstance(value, str) or "|" not in value:
        return None
    return value.partition("|")[2]


def show(path) -> str:
    """A path as a person types it: relative to the working directory when under it."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return text


# -- the summary ----------------------------------------------------------------------------------
def summary_rows(session: Session, instance) -> list[list[str]]:
    """One row per trained set (failed ones marked), the champions marked; a champion trained by an
    earlier command gets its own row, read from the instance."""
    from flexmf_assets.defs.records import latest_materialization

    champions: dict[tuple[str, str], str] = {}
    for outcome in session.outcomes:
        if outcome.job == "leaderboard_job" and outcome.ok:
            for track in TEST_METRIC:
                name = _champion(outcome, track)
                if name is not None:
                    champions[(track, outcome.key)] = name

    def row(track: str, dataset: str, hparams: str, meta: dict[str, Any], train: str) -> list[str]:
        name, key, base = TEST_METRIC[track]
        mark = "* champion" if champions.get((track, dataset)) == hparams else \
            "pruned" if meta.get("state") == "pruned" else ""
        return [track, f"{dataset}|{hparams}", name, _fmt(meta.get(TRACKS[track].validation_metric)),
                _fmt(meta.get(key)), _fmt(meta.get(base)), train, mark]

    rows: list[list[str]] = []
    shown: set[tuple[str, str]] = set()
    for outcome in session.outcomes:
        if outcome.ok and outcome.track:
            meta = outcome.assets.get(f"{outcome.track}_evaluation", {})
            seconds = meta.get("train_seconds")
            dataset, _, hparams = outcome.key.partition("|")
            rows.append(row(outcome.track, dataset, hparams, meta,
                            f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "-"))
            shown.add((outcome.track, outcome.key))
        elif not outcome.ok:
            what = outcome.track or outcome.job.removesuffix("_job")
            rows.append([what, outcome.key, "FAILED", outcome.error or ""])
    for (track, dataset), hparams in champions.items():
        key = f"{dataset}|{hparams}"
        if (track, key) in shown:
            continue
        record = latest_materialization(instance, f"{track}_evaluation", key)
        meta = {k: v.value for k, v in record.asset_materialization.metadata.items()} if record else {}
        rows.append(row(track, dataset, hparams, meta, "earlier"))
    return rows


def render_table(rows: list[list[str]], width: int) -> list[str]:
    header = ["track", "set", "metric", "validation", "test", "baseline", "train", ""]
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in [header, *full]) for i in range(len(header))]
    for r in rows:  # failed rows: track, set, FAILED, message
        widths[0] = max(widths[0], len(r[0]))
        widths[1] = max(widths[1], len(r[1]))
    lines = []
    for r in [header, *rows] if full else rows:
        if len(r) == len(header):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        else:
            lead = f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  FAILED: "
            lines.append(lead + r[3][: max(40, width - len(lead))])
    return lines


def table_path(io_manager, asset: str, *partition: str) -> str:
    """The newest table of an asset partition: ``latest.parquet`` when it exists, else the current
    version's ``data.parquet``, else the partition folder."""
    from flexmf_assets.storage import current_version

    folder = io_manager._base_path / asset
    for part in partition:
        folder = io_manager.make_safe_partition_path(folder, part)
    if (folder / LATEST).exists():
        return show(folder / LATEST)
    version = current_version(folder)
    if version is not None and (version / "data.parquet").exists():
        return show(version / "data.parquet")
    return show(folder) + "/"


def _tables(session: Session, io_manager) -> list[tuple[str, str]]:
    """(asset, path) of the tables this command wrote: the trained sets' recommendations (a glob when
    a track trained several sets of a dataset), the champions' recommendations and the leaderboards;
    the validated ratings when only the data ran."""
    trained = [o for o in session.outcomes if o.ok and o.track]
    boards = {o.key for o in session.outcomes if o.ok and o.job == "leaderboard_job"}
    data = [o.key for o in session.outcomes if o.ok and o.job == "data_job"]
    tables: list[tuple[str, str]] = []
    for dataset in dict.fromkeys([*(o.dataset for o in trained), *boards, *data]):
        if dataset not in boards and not any(o.dataset == dataset for o in trained):
            tables.append(("ratings", table_path(io_manager, "ratings", dataset)))  # the data alone
        for track in TEST_METRIC:
            asset = f"{track}_recommendations"
            names = [o.key.partition("|")[2] for o in trained if o.track == track and o.dataset == dataset]
            paths = [table_path(io_manager, asset, dataset, name) for name in names]
            if len(paths) == 1:
                tables.append((asset, paths[0]))
            elif paths:
                folder = show(io_manager._base_path / asset / dataset)
                glob = all(p.endswith(f"/{LATEST}") for p in paths)
                tables.append((asset, f"{folder}/*/{LATEST}" if glob else f"{folder}/"))
        if dataset in boards:
            for asset in ("champion_recommendations", *(f"{t}_leaderboard" for t in TRACKS)):
                tables.append((asset, table_path(io_manager, asset, dataset)))
    return tables


def print_report(session: Session, instance, io_manager) -> None:
    """The summary table, where the tables are, how to open the UI."""
    rows = summary_rows(session, instance)
    if rows:
        session.echo()
        for line in render_table(rows, shutil.get_terminal_size((120, 24)).columns):
            session.echo(line)
    done = [o for o in session.outcomes if o.ok]
    if not done:
        return
    session.echo()
    tables = _tables(session, io_manager)
    if tables:
        session.echo("Tables (Parquet, the newest version of each partition):")
        pad = max(len(name) for name, _ in tables)
        for name, path in tables:
            session.echo(f"  {name.ljust(pad)}  {path}")
        files = [path for name, path in tables if path.endswith(".parquet") and "*" not in path]
        pick = next((path for name, path in tables if name == "champion_recommendations" and path in files),
                    files[0] if files else None)
        if pick:
            session.echo(f"  read one: duckdb -c \"FROM '{pick}' LIMIT 10\" (polars: pl.read_parquet(path))")
    target = next((o for o in done if o.track), done[0])
    asset = {"data_job": "split", "leaderboard_job": f"{next(iter(TRACKS))}_leaderboard"}.get(
        target.job, f"{target.track}_evaluation")
    session.echo(f"UI: run `flexmf dev`, then open {UI_URL}/assets/{asset}?partition={quote(target.key, safe='')}")
