"""Hyperparameter search with Optuna, whose trials are ordinary hparams partitions.

The ``tune:`` section of ``flexmf.yaml`` (one entry per track) is parsed here into a :class:`TuneSpec`
(checked at load, one-line errors naming the field); a trial's parameters become a partition key in
the UI grammar (:func:`trial_key`); :func:`run_study` asks, trains (a callback: the Dagster layer runs
the track's job for the key) and tells, resuming a killed study without repeating or losing a trial.
The per-epoch validation values reach the study through :class:`TrialReporter`, which also says when
the median pruner stops a trial.

The study lives in an Optuna RDB storage beside the instance (:func:`storage_url`). No Dagster import.

Resuming: a trial left RUNNING by a process that is gone (same host, pid dead; recorded in the trial's
user attributes) is trained again under its own number and key, then told, so the study never holds a
duplicate or a stale RUNNING trial. A RUNNING trial of a live process (another ``flexmf tune`` on the
same study) is left alone and counts toward the total.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import socket
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flexmf_assets.config_file import _bool, _check_fields, _check_keys, _choice, _describe, _int, _mapping, _number
from flexmf_assets.errors import ConfigError
from flexmf_assets.files import process_alive_since
from flexmf_assets.flexmf.config_base import MAX_KEY_LENGTH, check_key_syntax, check_known, format_literal

#: the fields of one track's ``tune:`` entry
TUNE_FIELDS = ("trials", "sampler", "seed", "timeout", "pruning", "base", "space", "study")
TUNE_RULES = {
    "trials": _int(1),
    "sampler": _choice("tpe", "random"),
    "seed": _int(0, nullable=True),
    "timeout": _number(0, low_open=True, nullable=True),
}
PRUNING_RULES = {"startup_trials": _int(0), "warmup_epochs": _int(0)}
RANGE_KEYS = ("low", "high", "log", "int")
#: floats of a trial are rounded to this many significant digits (readable, short keys)
DIGITS = 4
#: a tune stops after this many failed trials in a row (a space whose corner cannot train)
MAX_FAILED_IN_A_ROW = 3
#: run tags that make a track-job run a trial of a study
STUDY_TAG, TRIAL_TAG = "flexmf/study", "flexmf/trial"
STUDY_DB = "optuna.db"


@dataclass(frozen=True)
class Param:
    """One searched field: a range (``low``..``high``, ``log``, ``int``) or a list of ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    is_int: bool = False
    choices: tuple[Any, ...] = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution(list(self.choices))
        if self.is_int:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class TuneSpec:
    """A track's ``tune:`` entry."""

    track: str
    space: tuple[Param, ...]
    base: dict[str, Any] = field(default_factory=dict)
    trials: int = 20
    sampler: str = "tpe"
    seed: int | None = None
    timeout: float | None = None
    pruning: bool = True
    startup_trials: int = 5
    warmup_epochs: int = 5
    study: str | None = None

    def distributions(self) -> dict[str, Any]:
        return {p.name: p.distribution() for p in self.space}

    def fingerprint(self) -> str:
        """A digest of the search (space and fixed fields): a study is resumed only with the same one."""
        blob = json.dumps({"base": self.base, "space": [p.__dict__ for p in self.space]}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def study_name(self, dataset: str) -> str:
        return ".".join(filter(None, (self.track, dataset, self.study)))


# -- the `tune:` section ------------------------------------------------------------------------
def _field_kind(cls: type, name: str) -> type | None:
    """int or float for a numeric config field (optional or not); None for anything else."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if bool in args:
        return None
    return int if int in args else float if float in args else None


def _parse_param(where: str, name: str, raw: Any, cls: type, check: Callable[[str, Any], None]) -> Param:
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{where}: expected a non-empty list of choices, got an empty list")
        for value in raw:
            check(where, value)
        return Param(name, choices=tuple(raw))
    data = _mapping(where, raw)
    _check_keys(where, data, RANGE_KEYS)
    kind = _field_kind(cls, name)
    if kind is None:
        raise ConfigError(f"{where}: {cls.__name__}.{name} is not numeric; give a list of choices instead of "
                          f"a range, got {_describe(raw)}")
    for key in ("low", "high"):
        if key not in data:
            raise ConfigError(f"{where}: a range needs low and high; {key} is missing")
    _check_fields(where, data, {"low": _number(), "high": _number(), "log": _bool(), "int": _bool()})
    low, high, log = data["low"], data["high"], bool(data.get("log", False))
    is_int = bool(data.get("int", kind is int))
    if kind is int and not is_int:
        raise ConfigError(f"{where}: {cls.__name__}.{name} is an integer field; int: false is not possible")
    if is_int and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: an int range needs whole low and high, got {low!r} and {high!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be below high, got low {low!r}, high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low!r}")
    for value in (low, high):
        check(where, int(value) if kind is int else float(value))
    return Param(name, low=low, high=high, log=log, is_int=is_int)


def parse_tune(where: str, raw: Any, config_classes: Mapping[str, type],
               defaults: Mapping[str, Mapping[str, Any]]) -> dict[str, TuneSpec]:
    """The ``tune:`` section: ``{track: TuneSpec}``. Every field is checked, every choice and range end
    is built into the track's config class (with the track's ``default`` set and ``base``), so a space
    that cannot train fails here, in one line naming the field."""
    out: dict[str, TuneSpec] = {}
    section = _mapping(f"{where} tune", raw)
    _check_keys(f"{where} tune", section, tuple(config_classes))
    for track, entry in section.items():
        here = f"{where} tune.{track}"
        data = _mapping(here, entry)
        _check_keys(here, data, TUNE_FIELDS)
        _check_fields(where, data, TUNE_RULES, prefix=f"tune.{track}.")
        cls = config_classes[track]
        valid = cls.field_names()
        base = _mapping(f"{here}.base", data.get("base"))
        field = {"what": f"{cls.__name__} field", "listed": "fields"}
        check_known(base, valid, prefix=f"{here}.base: ", **field)
        start = {**defaults.get(track, {}), **base}

        def check(at: str, value: Any, name: str = "") -> None:
            try:
                cls.from_dict({**start, name: value})
            except ConfigError as exc:  # a rule tying fields together is checked on the combinations
                if f"{cls.__name__}.{name}:" in str(exc):
                    raise ConfigError(f"{at}: {value!r} does not build: {exc}") from None

        space_raw = _mapping(f"{here}.space", data.get("space"))
        if not space_raw:
            raise ConfigError(f"{here}.space: expected a mapping of fields to search (at least one), got "
                              f"{_describe(data.get('space'))}")
        params = []
        for name, spec in space_raw.items():
            at = f"{here}.space.{name}"
            check_known([name], valid, prefix=f"{at}: ", **field)
            if name in base:
                raise ConfigError(f"{at}: {name!r} is both searched and fixed in base; keep one")
            params.append(_parse_param(at, str(name), spec, cls, lambda a, v, n=name: check(a, v, n)))
        _check_combinations(here, cls, start, params)
        pruning = data.get("pruning", True)
        if isinstance(pruning, bool):
            prune = {}
        else:
            prune = _mapping(f"{here}.pruning", pruning)
            _check_keys(f"{here}.pruning", prune, tuple(PRUNING_RULES))
            _check_fields(where, prune, PRUNING_RULES, prefix=f"tune.{track}.pruning.")
        study = data.get("study")
        if study is not None:
            check_key_syntax(study, what=f"{here}.study")
        spec = TuneSpec(track=str(track), space=tuple(params), base=base, trials=data.get("trials", 20),
                        sampler=data.get("sampler", "tpe"), seed=data.get("seed"), timeout=data.get("timeout"),
                        pruning=pruning is not False, startup_trials=prune.get("startup_trials", 5),
                        warmup_epochs=prune.get("warmup_epochs", 5), study=study)
        longest = trial_key(cls, spec, {p.name: _longest(p) for p in spec.space})
        if len(longest) > MAX_KEY_LENGTH:
            raise ConfigError(f"{here}: a trial's key can be {len(longest)} characters long (at most "
                              f"{MAX_KEY_LENGTH}); search fewer fields or fix fewer in base")
        out[str(track)] = spec
    return out


def _check_combinations(where: str, cls: type, start: Mapping[str, Any], params: list[Param]) -> None:
    """Every combination of the choices (ranges at both ends) builds: a rule between fields (``loss:
    warp`` needs ``negative_strategy: misranked``) fails here, not in the middle of a study."""
    axes = [[(p.name, c) for c in p.choices] if p.choices else [(p.name, p.low), (p.name, p.high)]
            for p in params]
    if math.prod(len(a) for a in axes) > 4096:
        return
    for combo in itertools.product(*axes):
        values = {name: int(v) if p.is_int else v for p, (name, v) in zip(params, combo)}
        try:
            cls.from_dict({**start, **values})
        except ConfigError as exc:
            shown = ";".join(f"{k}={format_literal(v)}" for k, v in values.items())
            raise ConfigError(f"{where}.space: the combination {shown} does not build: {exc}") from None


def _longest(param: Param) -> Any:
    if param.choices:
        return max(param.choices, key=lambda c: len(format_literal(c)))
    return param.high if param.is_int else -1.234e-05  # the longest 4-digit float literal


# -- keys ------------------------------------------------------------------------------------------
def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{DIGITS}g}")
    return value


def trial_key(cls: type, spec: TuneSpec, params: Mapping[str, Any]) -> str:
    """The partition key of a trial: ``base`` and the (rounded) parameters in the UI grammar, fields in
    declaration order (``embedding_size=48;learning_rate=0.01234;regularization=0.05``)."""
    return cls.canonical_key({**spec.base, **{k: _round(v) for k, v in params.items()}})


# -- the study -------------------------------------------------------------------------------------
def storage_url(dagster_home: str | os.PathLike, postgres_url: str | None = None) -> str:
    """Where studies live: the Postgres of the instance (schema ``optuna``: Dagster's and Optuna's
    ``alembic_version`` tables would collide in one schema), else ``<DAGSTER_HOME>/optuna.db``."""
    if postgres_url:
        sep = "&" if "?" in postgres_url else "?"
        return f"{postgres_url}{sep}options=-csearch_path%3Doptuna"
    return f"sqlite:///{os.path.join(os.fspath(dagster_home), STUDY_DB)}"


def _storage(url: str):
    import optuna

    if url.startswith("postgres"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url.split("?")[0])
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE SCHEMA IF NOT EXISTS optuna"))
        engine.dispose()
    import sqlalchemy.exc

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            # processes opening a new database at once all create its schema: the losers' CREATE
            # TABLE ("already exists") or version row (UNIQUE constraint) fails; it is there now
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(spec: TuneSpec, dataset: str, url: str, *, lower_is_better: bool, create: bool = True):
    """The study of ``spec`` on ``dataset`` (created when missing and ``create``). Its search must be
    the one it was made with (else a one-line :class:`ConfigError`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = spec.study_name(dataset)
    storage = _storage(url)
    known = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name not in known and not create:
        raise ConfigError(f"no study {name!r} yet: run `flexmf tune --track {spec.track} --dataset {dataset}`")
    done = known[name].n_trials if name in known else 0
    seed = None if spec.seed is None else spec.seed + done  # a resumed study draws new points
    sampler = (optuna.samplers.RandomSampler(seed=seed) if spec.sampler == "random"
               else optuna.samplers.TPESampler(seed=seed))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs)
              if spec.pruning else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction="minimize" if lower_is_better else "maximize", load_if_exists=True)
    made_with = study.user_attrs.get("search")
    if made_with is None:
        study.set_user_attr("search", spec.fingerprint())
        study.set_user_attr("track", spec.track)
        study.set_user_attr("dataset", dataset)
    elif made_with != spec.fingerprint():
        raise ConfigError(f"tune.{spec.track}: study {name!r} was made with another search space or base; "
                          "give the new search its own name (tune.<track>.study) to start a fresh study")
    return study


def _state_names():
    from optuna.trial import TrialState

    return {TrialState.COMPLETE: "trained", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
            TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def is_stale(trial) -> bool:
    """A RUNNING trial whose process (recorded host and pid) is gone; a trial of another host is never
    judged (it may be alive)."""
    attrs = trial.user_attrs
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return False
    return not process_alive_since(int(attrs["pid"]), float(attrs.get("started", 0.0)))


@dataclass
class TrialResult:
    """What training a trial gave: ``trained`` (a validation ``value``), ``pruned`` or ``failed``."""

    state: str
    value: float | None = None
    run_id: str | None = None
    error: str | None = None


@dataclass
class StudyOutcome:
    name: str
    total: int
    done: int
    best_number: int | None
    best_key: str | None
    best_value: float | None
    pruned: int
    failed: int
    stopped: str | None = None  # why the loop ended early (timeout, failures)


def trials_table(study) -> list[dict[str, Any]]:
    """One row per trial: number, key, state, value, duration and the run that trained it."""
    names = _state_names()
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "key": t.user_attrs.get("key"), "state": names.get(t.state, str(t.state)),
                     "value": t.value, "epochs": len(t.intermediate_values) or None, "seconds": seconds,
                     "run_id": t.user_attrs.get("run_id"), "duplicate_of": t.user_attrs.get("duplicate_of")})
    return rows


def best_trial(study):
    """The best COMPLETE trial (pruned trials are never best), or None."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: t.value)


def finished_count(study) -> int:
    """Trials that count toward a study's total: trained (COMPLETE) or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(study, spec: TuneSpec, cls: type, total: int,
              train: Callable[[int, str, str, Callable[[TrialResult], str]], TrialResult], *,
              check: Callable[[str], Any], say: Callable[[str], None], metric: str,
              timeout: float | None = None) -> StudyOutcome:
    """Train trials until the study holds ``total`` finished (trained or pruned) ones.

    ``train(number, key, label, describe)`` trains the partition ``key`` as trial ``number`` and returns
    its :class:`TrialResult` (``describe(result)`` is the progress text of the trial: its value and the
    best so far); ``check(key)`` resolves the key (raising :class:`ConfigError`); ``say`` prints a note.
    Stale trials of dead processes are trained first, under their own number and key.
    """
    from optuna.trial import Trial, TrialState

    timeout = spec.timeout if timeout is None else timeout
    started = time.monotonic()
    failed_in_a_row = failed = 0
    stopped = None

    def counts() -> tuple[int, list]:
        return finished_count(study), study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def describe(number: int, result: TrialResult) -> str:
        best = best_trial(study)
        best_value, best_number = (best.value, best.number + 1) if best else (None, None)
        if result.state == "trained" and result.value is not None and (
                best_value is None or (result.value < best_value if study.direction.name == "MINIMIZE"
                                       else result.value > best_value)):
            best_value, best_number = result.value, number + 1
        text = {"trained": f"{metric} {result.value:.4f}" if result.value is not None else "trained",
                "pruned": "pruned", "failed": f"FAILED ({result.error})"}[result.state]
        return text + (f"  best {best_value:.4f} (trial {best_number})" if best_value is not None else "")

    finished, running = counts()
    resume = [t for t in running if is_stale(t)]
    if resume:
        say(f"resuming {len(resume)} trial(s) left running by a process that is gone: "
            + ", ".join(f"{t.number} ({t.user_attrs.get('key')})" for t in resume))
    while True:
        finished, running = counts()
        alive = [t for t in running if not is_stale(t)]
        if not resume and finished + len(alive) >= total:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            stopped = f"the time budget of {timeout:g} s is spent"
            break
        if resume:
            frozen = resume.pop(0)
            trial = Trial(study, frozen._trial_id)
            key = frozen.user_attrs["key"]
        else:
            trial = study.ask(spec.distributions())
            key = trial_key(cls, spec, trial.params)
        for name, value in (("key", key), ("host", socket.gethostname()), ("pid", os.getpid()),
                            ("started", time.time())):
            trial.set_user_attr(name, value)
        label = f"trial {trial.number + 1}/{max(total, trial.number + 1)}"
        twin = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                     if t.user_attrs.get("key") == key), None)
        if twin is not None:  # the sampler drew a set already trained: its result, not a second run
            trial.set_user_attr("duplicate_of", twin.number)
            study.tell(trial, twin.value if twin.state == TrialState.COMPLETE else None, state=twin.state)
            say(f"{label} {key}: same key as trial {twin.number + 1}, not trained twice")
            continue
        try:
            check(key)
            result = train(trial.number, key, label, lambda r, n=trial.number: describe(n, r))
        except ConfigError as exc:
            result = TrialResult("failed", error=str(exc))
            say(f"{label} {key}: FAILED ({exc})")
        if result.run_id:
            trial.set_user_attr("run_id", result.run_id)
        if result.state == "trained" and result.value is not None and math.isfinite(result.value):
            study.tell(trial, result.value)
            failed_in_a_row = 0
        elif result.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            failed_in_a_row = 0
        else:
            study.tell(trial, state=TrialState.FAIL)
            failed += 1
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                stopped = f"{failed_in_a_row} trials failed in a row"
                break
    best = best_trial(study)
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    return StudyOutcome(study.study_name, total, finished_count(study), best.number if best else None,
                        best.user_attrs.get("key") if best else None, best.value if best else None,
                        pruned, failed, stopped)


class TrialReporter:
    """The epoch callback of a trial's training: reports the validation value of every epoch to the
    study and returns True (stop training) when the pruner prunes the trial."""

    def __init__(self, study, number: int, metric: str):
        from optuna.trial import Trial, TrialState

        frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if frozen is None or frozen.state != TrialState.RUNNING:
            state = "missing" if frozen is None else _state_names().get(frozen.state, str(frozen.state))
            raise ConfigError(f"trial {number} of study {study.study_name!r} is {state}, not running")
        self.trial = Trial(study, frozen._trial_id)
        self.metric = metric
        self.pruned_at: int | None = None

    def __call__(self, record: Mapping[str, Any]) -> bool:
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        epoch = int(record["epoch"])
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False
