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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from flexmf_assets.config_file import _TOP_KEYS, SCHEMA, _check_fields, _check_keys, _mapping, _read_yaml, _section
from flexmf_assets.datasets.catalog import DatasetSpec, builtin_catalog, user_dataset
from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import KEY_SEPARATOR, check_key_syntax, format_literal, suggest
from flexmf_assets.tracks import TRACK_NAMES as TRACKS
from flexmf_assets.tracks import track as get_track

CONFIG_ENV = "FLEXMF_CONFIG"
DATA_DIR_ENV = "FLEXMF_DATA_DIR"
CONFIG_FILE = "flexmf.yaml"

MAX_GRID_SETS = 1000  # a grid expanding to more sets is refused before it is expanded


def builtin_sets(track: str) -> dict[str, dict[str, Any]]:
    """The engine's named sets for a track; ``flexmf.yaml`` adds to and overrides them."""
    return get_track(track).named_sets()


def config_class(track: str):
    """The scorer config class of a track (imported lazily: torch is heavy)."""
    return get_track(track).config_class


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
    #: ``tune:``, the search of each track that has one (:class:`flexmf_assets.tuning.TuneSpec`)
    tune: dict[str, Any] = field(default_factory=dict)

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

    def tune_spec(self, track: str):
        """The ``tune:`` entry of ``track`` (a one-line :class:`ConfigError` when there is none)."""
        get_track(track)
        if track not in self.tune:
            raise ConfigError(f"{self._where}: no tune.{track} section; add a search space for {track} "
                              "(docs/configuration.md#tune-hyperparameter-search)")
        return self.tune[track]

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

    from flexmf_assets.tuning import parse_tune

    tune = parse_tune(where, raw.get("tune"), {t: config_class(t) for t in TRACKS},
                      {t: hparams[t].get("default", {}) for t in TRACKS})
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
        tune=tune,
    )
    return project


def validate_project(project: ProjectConfig) -> None:
    """Deep validation that needs the engine: every named set builds, the split config builds."""
    project.split_config()
    for track in TRACKS:
        for name in project.hparams[track]:
            project.resolve_hparams(track, name)
