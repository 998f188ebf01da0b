"""The project config file ``flexmf.yaml``: datasets, split, device, hyperparameter sets, schedule.

Loaded by the Dagster layer and the CLI; no Dagster import here. The file is found at
``$FLEXMF_CONFIG`` or ``./flexmf.yaml``; a missing default file means "built-in defaults only".
Local state lives under ``$FLEXMF_DATA_DIR`` or ``data/`` beside the config file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from flexmf_assets.datasets.catalog import DatasetSpec, builtin_catalog, user_dataset
from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf._config import KEY_SEPARATOR, check_key_syntax, format_literal, suggest

CONFIG_ENV = "FLEXMF_CONFIG"
DATA_DIR_ENV = "FLEXMF_DATA_DIR"
CONFIG_FILE = "flexmf.yaml"

TRACKS = ("explicit", "implicit")

_TOP_KEYS = (
    "default_dataset", "datasets", "split", "download", "device", "recommendations",
    "explicit_hparams", "implicit_hparams", "explicit_grid", "implicit_grid", "sweep", "schedule",
    "validation", "dataset_partitions",
)
_DOWNLOAD_KEYS = ("timeout", "retries", "allowed_file_roots", "max_bytes")
_DEVICE_KEYS = ("device", "threads", "matmul_precision", "allow_fallback")
_RECS_KEYS = ("n",)
_SWEEP_KEYS = ("datasets",)
_SCHEDULE_KEYS = ("cron", "enabled", "timezone")
_VALIDATION_KEYS = ("min_rows",)

def builtin_sets(track: str) -> dict[str, dict[str, Any]]:
    """The engine's named presets for a track; ``flexmf.yaml`` adds to and overrides them."""
    if track == "explicit":
        from flexmf_assets.flexmf.config import EXPLICIT_PRESETS as presets
    elif track == "implicit":
        from flexmf_assets.flexmf.implicit_config import IMPLICIT_PRESETS as presets
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
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def config_class(track: str):
    """The scorer config class of a track (imported lazily: torch is heavy)."""
    if track == "explicit":
        from flexmf_assets.flexmf.config import FlexMFExplicitConfig

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
        if not roots:
            return None
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
        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{cfg_path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        raw = _mapping(str(cfg_path), loaded)
    elif explicit_path:
        raise ConfigError(f"{CONFIG_ENV}: config file {cfg_path} does not exist")
    else:
        cfg_path = None  # type: ignore[assignment]
    where = cfg_path.name if cfg_path else "built-in defaults"
    _check_keys(where, raw, _TOP_KEYS)

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

    download = _mapping(f"{where} download", raw.get("download"))
    _check_keys(f"{where} download", download, _DOWNLOAD_KEYS)
    max_bytes = download.get("max_bytes")
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise ConfigError(f"{where} download.max_bytes: expected a positive integer (bytes), got {max_bytes!r}")
    device = _mapping(f"{where} device", raw.get("device"))
    _check_keys(f"{where} device", device, _DEVICE_KEYS)
    recs = _mapping(f"{where} recommendations", raw.get("recommendations"))
    _check_keys(f"{where} recommendations", recs, _RECS_KEYS)
    n = recs.get("n", 20)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where} recommendations.n: expected a positive integer, got {n!r}")
    validation = _mapping(f"{where} validation", raw.get("validation"))
    _check_keys(f"{where} validation", validation, _VALIDATION_KEYS)
    min_rows = validation.get("min_rows")
    if min_rows is not None and (not isinstance(min_rows, int) or min_rows < 1):
        raise ConfigError(f"{where} validation.min_rows: expected a positive integer, got {min_rows!r}")

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

    sweep = _mapping(f"{where} sweep", raw.get("sweep"))
    _check_keys(f"{where} sweep", sweep, _SWEEP_KEYS)
    swept = sweep.get("datasets", [default_dataset])
    if not isinstance(swept, list) or any(d not in datasets for d in swept):
        bad = [d for d in (swept if isinstance(swept, list) else [swept]) if d not in datasets]
        raise ConfigError(f"{where} sweep.datasets: unknown dataset(s) {bad!r}; known: {', '.join(datasets)}")
    schedule = _mapping(f"{where} schedule", raw.get("schedule"))
    _check_keys(f"{where} schedule", schedule, _SCHEDULE_KEYS)
    listed = raw.get("dataset_partitions") or []
    if not isinstance(listed, list) or any(not isinstance(d, str) or d not in datasets for d in listed):
        raise ConfigError(f"{where} dataset_partitions: expected a list of known dataset names, got {listed!r}"
                          f"; known: {', '.join(datasets)}")

    project = ProjectConfig(
        path=cfg_path,
        data_dir=data_dir,
        datasets=datasets,
        default_dataset=str(default_dataset),
        split=_mapping(f"{where} split", raw.get("split")),
        download=download,
        device=device,
        recommendations_n=n,
        hparams=hparams,
        swept_datasets=tuple(swept),
        schedule=schedule,
        min_rows=min_rows,
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
