"""The track registry: everything that differs between explicit (rating prediction) and implicit
(top-N ranking) models, declared once. ``project.py``, ``cli.py`` and the Dagster layer read it; adding
a third track is one entry here plus its library code (config class, scorer, evaluation report).

No Dagster import here; torch and the evaluation code are imported only when a track's parts are used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from flexmf_assets.errors import ConfigError


@dataclass(frozen=True)
class Track:
    """One kind of model and how it is judged.

    name: the track's name; its hyperparameter partitions are ``<name>_hparams``, its assets
        ``<name>_model``, ``<name>_evaluation``, ``<name>_recommendations``, ``<name>_leaderboard``.
    description: one line, shown in the UI.
    val_key: the validation metric in the scorer's history (early stopping and the champion).
    lower_is_better: the direction of ``val_key`` and of ``headline``.
    headline: the test metric the UI, the terminal and the leaderboard chart lead with; the evaluation
        reports it and ``baseline_<headline>`` beside it.
    board_columns: the evaluation's metrics a leaderboard shows, in order.
    """

    name: str
    description: str
    val_key: str
    lower_is_better: bool
    headline: str
    board_columns: tuple[str, ...]
    #: ``"module:attribute"`` of the config class, the scorer class, the named sets (a dict of dicts)
    #: and the report function ``(model, train, test) -> Report``: imported when first used
    config_ref: str
    scorer_ref: str
    sets_ref: str
    report_ref: str

    @property
    def config_class(self) -> type:
        return _load(self.config_ref)

    @property
    def scorer_class(self) -> type:
        return _load(self.scorer_ref)

    def named_sets(self) -> dict[str, dict[str, Any]]:
        """The engine's named sets (a copy): ``flexmf.yaml`` adds to and overrides them."""
        return {name: dict(values) for name, values in _load(self.sets_ref).items()}

    def report(self, model, train, test):
        """The evaluation of a fitted ``model`` on ``test`` (an :class:`evaluation.reports.Report`)."""
        return _load(self.report_ref)(model, train, test)

    @property
    def validation_metric(self) -> str:
        """The evaluation's metadata entry of the validation metric."""
        return f"validation_{self.val_key}"


def _load(ref: str) -> Any:
    """``"package.module:name"`` -> that attribute (imported on first use)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


TRACKS: dict[str, Track] = {
    "explicit": Track(
        name="explicit",
        description="Biased MF trained with MSE (rating prediction)",
        val_key="val_rmse", lower_is_better=True, headline="rmse",
        board_columns=("rmse", "mae", "baseline_rmse", "rmse_delta_vs_baseline", "user_rmse"),
        config_ref="flexmf_assets.flexmf:FlexMFExplicitConfig",
        scorer_ref="flexmf_assets.flexmf:FlexMFExplicitScorer",
        sets_ref="flexmf_assets.flexmf:EXPLICIT_HPARAM_SETS",
        report_ref="flexmf_assets.evaluation.reports:explicit_report",
    ),
    "implicit": Track(
        name="implicit",
        description="Implicit MF (logistic / BPR / WARP) for top-N ranking",
        val_key="val_ndcg", lower_is_better=False, headline="ndcg@10",
        board_columns=("ndcg@10", "recall@10", "precision@10", "hit@10", "mrr@10", "map@10", "ndcg@20",
                       "recall@20", "baseline_ndcg@10", "ndcg@10_delta_vs_baseline", "coverage@20"),
        config_ref="flexmf_assets.flexmf:FlexMFImplicitConfig",
        scorer_ref="flexmf_assets.flexmf:FlexMFImplicitScorer",
        sets_ref="flexmf_assets.flexmf:IMPLICIT_HPARAM_SETS",
        report_ref="flexmf_assets.evaluation.reports:implicit_report",
    ),
}

#: the track names, in registry order
TRACK_NAMES: tuple[str, ...] = tuple(TRACKS)


def track(name: str) -> Track:
    """The registered track ``name``; an unknown name is a one-line :class:`ConfigError`."""
    try:
        return TRACKS[name]
    except KeyError:
        raise ConfigError(f"unknown track {name!r}; valid: {', '.join(TRACKS)}") from None
