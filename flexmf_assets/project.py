"""The project config file ``flexmf.yaml``: datasets, split, device, hyperparameter sets, schedule.

Loaded by the Dagster layer and the CLI; no Dagster import here. The file is found at
``$FLEXMF_CONFIG`` or ``./flexmf.yaml``; a missing default file means "built-in defaults only".
Local state lives under ``$FLEXMF_DATA_DIR`` or ``data/`` beside the config file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import reprlib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from flexmf_assets.datasets.catalog import DatasetSpec, builtin_catalog, user_dataset
from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import KEY_SEPARATOR, check_key_syntax, format_literal, suggest

CONFIG_ENV = "FLEXMF_CONFIG"
DATA_DIR_ENV = "FLEXMF_DATA_DIR"
CONFIG_FILE = "flexmf.yaml"

TRACKS = ("explicit", "implicit")

MAX_GRID_SETS = 1000  # a grid expanding to more sets is refused before it is expanded
MAX_YAML_NODES = 100_000  # YAML values after alias expansion (an alias bomb is refused)
MAX_YAML_DEPTH = 100  # nesting levels of the YAML document

_TOP_KEYS = (
    "default_dataset", "datasets", "split", "download", "device", "recommendations",
    "explicit_hparams", "implicit_hparams", "explicit_grid", "implicit_grid", "sweep", "schedule",
    "validation", "dataset_partitions",
)


# -- the schema: every scalar field of flexmf.yaml with its type and range ------------------

@dataclass(frozen=True)
class Rule:
    """What a field accepts: ``expected`` in words (for the error) and the test ``ok``."""

    expected: str
    ok: Callable[[Any], bool]
    nullable: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(minimum: int | None = None, *, nullable: bool = False) -> Rule:
    words = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    return Rule(words + (" or null" if nullable else ""),
                lambda v: _is_int(v) and (minimum is None or v >= minimum), nullable)


def _number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, nullable: bool = False) -> Rule:
    if high is None:
        words = "a positive number" if (low, low_open) == (0, True) else "a finite number"
    else:
        words = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v: Any) -> bool:
        return (_is_number(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Rule(words + (" or null" if nullable else ""), ok, nullable)


def _bool() -> Rule:
    return Rule("true or false (a YAML boolean, unquoted)", lambda v: isinstance(v, bool))


def _string(words: str = "a string", check: Callable[[str], bool] = bool) -> Rule:
    return Rule(words, lambda v: isinstance(v, str) and check(v))


def _choice(*values: str) -> Rule:
    return Rule(f"one of {', '.join(values)}", lambda v: isinstance(v, str) and v in values)


def _string_list(words: str) -> Rule:
    return Rule(words, lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v))


_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (low, high, names) per field: minute, hour, day of month, month, day of week
_CRON_FIELDS = ((0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, _MONTHS), (0, 7, _WEEKDAYS))


def _cron_field(text: str, index: int) -> set[int] | None:
    """The values one cron field matches (``index`` 0-4: minute ... weekday), None when invalid."""
    low, high, names = _CRON_FIELDS[index]
    if (index in (2, 4) and text == "?" or index == 2 and text.upper() == "L"
            or index == 4 and re.fullmatch(r"[0-7]#[1-5]|[lL][0-7]", text)):
        return set(range(low, high + 1))  # these stand alone: no list, range or step

    def value(token: str) -> int | None:
        if token.lower() in names:
            return names.index(token.lower()) + (1 if names is _MONTHS else 0)
        return int(token) if token.isascii() and token.isdigit() and low <= int(token) <= high else None

    matched: set[int] = set()
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if slash and not (step.isascii() and step.isdigit() and int(step) > 0):
            return None
        ends = [low, high] if base == "*" else [value(t) for t in base.split("-")]
        if len(ends) > 2 or None in ends:
            return None
        first, last = ends[0], ends[1] if len(ends) == 2 else (high if slash else ends[0])
        span = range(first, last + 1) if first <= last else [*range(first, high + 1), *range(low, last + 1)]
        matched.update(list(span)[:: int(step) if slash else 1])
    return matched


def valid_cron(text: str) -> bool:
    """True for a 5-field cron string (or an ``@daily``-style macro) a Dagster schedule accepts.

    Fields: ``*``, values, ``a-b`` ranges, ``/step``, comma lists, month and weekday names; alone in
    a field, ``?`` and ``L`` (days), ``d#n`` and ``Ld`` (weekday). A date that never comes (the 30th
    of February) is refused. A test keeps this in step with Dagster's own validator (which would
    mean importing Dagster here).
    """
    if text.strip() in _CRON_MACROS:
        return True
    fields = text.split()
    if len(fields) != 5:
        return False
    values = [_cron_field(f, i) for i, f in enumerate(fields)]
    if any(v is None for v in values):
        return False
    return not (values[3] == {2} and values[2] <= {30, 31})


def valid_timezone(name: str) -> bool:
    """True for an IANA time zone name (``UTC``, ``Europe/Paris``), as Dagster schedules take."""
    if name in ("UTC", "utc"):
        return True
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


# section -> field -> rule; "" is the top level. A section's keys are its valid keys. Mappings
# (datasets, hparams sets, grids) are checked by their own code; cross-field rules of `split` and
# the device names by SplitConfig and DeviceSettings, at load too.
SCHEMA: dict[str, dict[str, Rule]] = {
    "": {"default_dataset": _string("a dataset name (a string)")},
    "split": {
        "protocol": _choice("random", "user_holdout", "temporal"),
        "test_fraction": _number(0, 1, low_open=True, high_open=True),
        "validation_fraction": _number(0, 1, high_open=True),
        "holdout_n": _int(1, nullable=True),
        "holdout_fraction": _number(0, 1, low_open=True, high_open=True, nullable=True),
        "cutoff": _int(nullable=True),
        "last_n": _int(1, nullable=True),
        "seed": _int(0),
    },
    "download": {
        "timeout": _number(0, low_open=True),
        "retries": _int(0),
        "allowed_file_roots": _string_list("a list of paths"),
        "max_bytes": _int(1),
    },
    "device": {
        "device": _string("a device name (a string: auto, cpu, cuda, cuda:N or mps)"),
        "threads": _int(1, nullable=True),
        "matmul_precision": _choice("highest", "high", "medium"),
        "allow_fallback": _bool(),
    },
    "recommendations": {"n": _int(1)},
    "validation": {"min_rows": _int(1, nullable=True)},
    "sweep": {"datasets": _string_list("a list of dataset names")},
    "schedule": {
        "cron": _string("a 5-field cron string such as '0 3 * * 1' (minute hour day month weekday)",
                        valid_cron),
        "timezone": _string("an IANA time zone name such as 'UTC' or 'Europe/Paris'", valid_timezone),
        "enabled": _bool(),
    },
}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


def _describe(value: Any) -> str:
    """``the string '/srv/data'``, ``the integer 3``, ``a list ['x']``: short and on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {_short.repr(value)}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short.repr(value)}"
    if isinstance(value, list):
        return f"a list {_short.repr(value)}"
    if isinstance(value, Mapping):
        return f"a mapping {_short.repr(dict(value))}"
    return f"{type(value).__name__} {_short.repr(value)}"


def _check_fields(where: str, data: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> None:
    for key, value in data.items():
        rule = rules.get(key)
        if rule is not None and not ((value is None and rule.nullable) or rule.ok(value)):
            raise ConfigError(f"{where} {prefix}{key}: expected {rule.expected}, got {_describe(value)}")


def _section(where: str, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping ``raw[name]`` with its keys and every field checked against :data:`SCHEMA`."""
    rules = SCHEMA[name]
    data = _mapping(f"{where} {name}", raw.get(name))
    _check_keys(f"{where} {name}", data, tuple(rules))
    _check_fields(where, data, rules, f"{name}.")
    return data


# -- reading the file ----------------------------------------------------------------------

class _Refused(Exception):
    """A YAML document :func:`_read_yaml` will not build (the message says why)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than :data:`MAX_YAML_DEPTH` (scanning deep
    ``[[[...`` is quadratic, composing it recursive) and notes whether the document uses aliases."""

    aliased = False
    depth = 0

    def fetch_flow_collection_start(self, token_class):  # type: ignore[no-untyped-def]
        super().fetch_flow_collection_start(token_class)
        if self.flow_level > MAX_YAML_DEPTH:
            raise _Refused(f"line {self.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self.aliased = True
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"line {self.peek_event().start_mark.line + 1}: nested deeper than "
                               f"{MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Values in the document with every alias expanded, counted without expanding (stops past ``limit``)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > limit:
                return sizes[id(node)]
        elif id(node) not in sizes:
            sizes[id(node)] = 0  # an alias of an enclosing node (a recursive structure) counts 0
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _read_yaml(path: Path) -> Any:
    """Parse ``path`` safely: plain data only (no Python objects), nesting deeper than
    :data:`MAX_YAML_DEPTH` and aliases expanding past :data:`MAX_YAML_NODES` values (an alias
    bomb) refused before anything is built."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if loader.aliased and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise _Refused(f"aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(f"{path}: YAML {exc}; refused") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = " ".join(" ".join(str(p) for p in parts if p).split()) or " ".join(str(exc).split())
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def builtin_sets(track: str) -> dict[str, dict[str, Any]]:
    """The engine's named presets for a track; ``flexmf.yaml`` adds to and overrides them."""
    if track == "explicit":
        from flexmf_assets.flexmf.explicit_config import EXPLICIT_HPARAM_SETS as presets
    elif track == "implicit":
        from flexmf_assets.flexmf.implicit_config import IMPLICIT_HPARAM_SETS as presets
    else:
        raise ConfigError(f"unknown track {track!r}; valid: {', '.join(TRACKS)}")
    return {name: dict(values) for name, values in presets.items()}


def _check_keys(where: str, data: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), list(valid))}; valid keys: {', '.join(valid)}"
            )


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
    return dict(value)


def config_class(track: str):
    """The scorer config class of a track (imported lazily: torch is heavy)."""
    if track == "explicit":
        from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig

        return FlexMFExplicitConfig
    if track == "implicit":
        from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig

        return FlexMFImplicitConfig
    raise ConfigError(f"unknown track {track!r}; valid: {', '.join(TRACKS)}")


def config_fingerprint(track: str, config) -> str:
    """A digest of a resolved scorer configuration: equal configurations train equal models."""
    blob = json.dumps({"track": track, **config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_grid(where: str, grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Expand ``{base: {...}, field: [v1, v2], ...}`` to named sets.

    Names are the varying fields as ``field=value`` pairs joined by ``;`` in file order, so a grid
    set's name is also a valid UI-style override key.
    """
    grid = dict(grid)
    base = _mapping(f"{where}.base", grid.pop("base", None))
    axes: list[tuple[str, list[Any]]] = []
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{name}: expected a non-empty list of values, got {values!r}")
        axes.append((str(name), values))
    if not axes:
        return {}
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_GRID_SETS:
        raise ConfigError(f"{where}: {' x '.join(str(len(v)) for _, v in axes)} values make {count:,} sets, "
                          f"over the limit of {MAX_GRID_SETS:,}; list fewer values or split the grid")
    out: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(values for _, values in axes)):
        params = dict(zip((n for n, _ in axes), combo))
        key = KEY_SEPARATOR.join(f"{n}={format_literal(v)}" for n, v in params.items())
        out[key] = {**base, **params}
    return out


@dataclass(frozen=True)
class ProjectConfig:
    """The parsed ``flexmf.yaml`` (or the built-in defaults when there is no file)."""

    path: Path | None
    data_dir: Path
    datasets: dict[str, DatasetSpec]
    default_dataset: str = "ml-latest-small"
    split: dict[str, Any] = field(default_factory=dict)
    download: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    recommendations_n: int = 20
    hparams: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    swept_datasets: tuple[str, ...] = ("ml-latest-small",)
    schedule: dict[str, Any] = field(default_factory=dict)
    min_rows: int | None = None
    #: names of the file's own ``datasets:`` entries (a built-in name with no fields just selects it)
    user_datasets: tuple[str, ...] = ()
    #: ``dataset_partitions:``, the explicit list of the dataset dimension (empty: derived)
    partition_datasets: tuple[str, ...] = ()

    # -- paths ---------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def dagster_home(self) -> Path:
        return self.data_dir / "dagster_home"

    # -- datasets ------------------------------------------------------------------------
    def dataset(self, name: str) -> DatasetSpec:
        try:
            return self.datasets[name]
        except KeyError:
            raise ConfigError(
                f"dataset {name!r} is not in the catalog{suggest(name, list(self.datasets))}; "
                f"known: {', '.join(self.datasets)}"
            ) from None

    def split_config(self):
        from flexmf_assets.datasets.split import SplitConfig

        return SplitConfig.from_dict(self.split, where=f"{self._where} split")

    def allowed_file_roots(self) -> list[Path] | None:
        roots = self.download.get("allowed_file_roots")
        if roots is None:
            return None  # unset: any local path; an empty list allows none
        base = self.path.parent if self.path else Path.cwd()
        return [(base / r).resolve() for r in roots]

    # -- hyperparameters -----------------------------------------------------------------
    @property
    def _where(self) -> str:
        return str(self.path.name if self.path else "built-in defaults")

    def hparam_sets(self, track: str) -> dict[str, dict[str, Any]]:
        return dict(self.hparams.get(track, {}))

    def resolve_hparams(self, track: str, key: str):
        """The config object for hparams partition ``key``: a named set, else a UI-style override key.

        A key that is neither raises :class:`ConfigError` naming the field at fault and listing the
        valid fields.
        """
        cls = config_class(track)
        sets = self.hparams.get(track, {})
        if key in sets:
            return cls.from_dict(sets[key], where=f"{self._where} {track}_hparams.{key}")
        overrides = cls.parse_overrides(key)
        base = sets.get("default", {})
        return cls.from_dict({**base, **overrides}, where=f"{track} hparams partition {key!r}")

    def canonical_key(self, track: str, key: str) -> str:
        """The one spelling of an override key (fields in declaration order, canonical literals);
        a named set is its own canonical key."""
        if key in self.hparams.get(track, {}):
            return key
        cls = config_class(track)
        return cls.canonical_key(cls.parse_overrides(key))

    def fingerprint(self, track: str, key: str) -> str:
        """A digest of the configuration ``key`` resolves to: equal for keys that train the same model
        (``default`` and ``embedding_size=64;learning_rate=0.01`` when they resolve alike)."""
        return config_fingerprint(track, self.resolve_hparams(track, key))

    def dataset_partition_names(self) -> list[str]:
        """The ``dataset`` partitions of the code location: ``dataset_partitions`` when given, else the
        default dataset, the file's own entries and the swept datasets (never the whole catalog)."""
        if self.partition_datasets:
            return list(self.partition_datasets)
        names = [self.default_dataset, *self.user_datasets, *self.swept_datasets]
        return list(dict.fromkeys(names))


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(CONFIG_ENV) or CONFIG_FILE).expanduser().resolve()


def load_project(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> ProjectConfig:
    """Load and validate ``flexmf.yaml``. Unknown keys suggest the close match."""
    env = os.environ if env is None else env
    explicit_path = path is not None or bool(env.get(CONFIG_ENV))
    cfg_path = Path(path).expanduser().resolve() if path is not None else config_path(env)
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        raw = _mapping(str(cfg_path), _read_yaml(cfg_path))
    elif explicit_path:
        raise ConfigError(f"{CONFIG_ENV}: config file {cfg_path} does not exist")
    else:
        cfg_path = None  # type: ignore[assignment]
    where = cfg_path.name if cfg_path else "built-in defaults"
    _check_keys(where, raw, _TOP_KEYS)
    _check_fields(where, raw, SCHEMA[""])
    split, download, device, recs, validation, sweep, schedule = (
        _section(where, name, raw)
        for name in ("split", "download", "device", "recommendations", "validation", "sweep", "schedule"))

    base_dir = cfg_path.parent if cfg_path else Path.cwd()
    data_dir = Path(env.get(DATA_DIR_ENV) or (base_dir / "data")).expanduser().resolve()

    datasets = builtin_catalog(env)
    user_names = []
    for name, entry in _mapping(f"{where} datasets", raw.get("datasets")).items():
        user_names.append(str(name))
        if not entry and name in datasets:  # `ml-1m:` or `ml-1m: {}` picks the catalog entry by name
            continue
        datasets[str(name)] = user_dataset(str(name), entry, where=where)

    default_dataset = raw.get("default_dataset", "ml-latest-small")
    if default_dataset not in datasets:
        raise ConfigError(f"{where} default_dataset: {default_dataset!r} is not a known dataset"
                          f"{suggest(str(default_dataset), list(datasets))}")
    swept = sweep.get("datasets", [default_dataset])
    unknown = [d for d in swept if d not in datasets]
    if unknown:
        raise ConfigError(f"{where} sweep.datasets: unknown dataset(s) {', '.join(map(repr, unknown))}"
                          f"{suggest(unknown[0], list(datasets))}; known: {', '.join(datasets)}")

    # the rules that tie fields together live with the classes that use them
    from flexmf_assets.datasets.split import SplitConfig
    from flexmf_assets.flexmf.device import DeviceSettings

    SplitConfig.from_dict(split, where=f"{where} split")
    try:
        DeviceSettings(**device)
    except ConfigError as exc:
        raise ConfigError(f"{where} device.{exc}") from None

    hparams: dict[str, dict[str, dict[str, Any]]] = {}
    for track in TRACKS:
        sets = builtin_sets(track)
        for name, entry in _mapping(f"{where} {track}_hparams", raw.get(f"{track}_hparams")).items():
            check_key_syntax(name, what=f"{where} {track}_hparams: set name")
            sets[str(name)] = _mapping(f"{where} {track}_hparams.{name}", entry)
        grid = raw.get(f"{track}_grid")
        if grid is not None:
            for name in (grid_sets := expand_grid(f"{where} {track}_grid", _mapping(f"{where} {track}_grid", grid))):
                check_key_syntax(name, what=f"{where} {track}_grid: set name")
            sets.update(grid_sets)
        hparams[track] = sets

    listed = raw.get("dataset_partitions") or []
    if not isinstance(listed, list) or any(not isinstance(d, str) or d not in datasets for d in listed):
        raise ConfigError(f"{where} dataset_partitions: expected a list of known dataset names, got {listed!r}"
                          f"; known: {', '.join(datasets)}")

    project = ProjectConfig(
        path=cfg_path,
        data_dir=data_dir,
        datasets=datasets,
        default_dataset=str(default_dataset),
        split=split,
        download=download,
        device=device,
        recommendations_n=recs.get("n", 20),
        hparams=hparams,
        swept_datasets=tuple(swept),
        schedule=schedule,
        min_rows=validation.get("min_rows"),
        user_datasets=tuple(user_names),
        partition_datasets=tuple(listed),
    )
    return project


def validate_project(project: ProjectConfig) -> None:
    """Deep validation that needs the engine: every named set builds, the split config builds."""
    project.split_config()
    for track in TRACKS:
        for name in project.hparams[track]:
            project.resolve_hparams(track, name)
