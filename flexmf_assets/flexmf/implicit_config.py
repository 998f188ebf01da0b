"""Typed, validated configuration of the implicit FlexMF model (LensKit-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import ConfigBase, RegMethod, Solver
from flexmf_assets.flexmf.losses import LOSSES
from flexmf_assets.flexmf.sampling import SAMPLERS

#: what a loss preset (the ``preset`` field) fills in (fields the caller sets explicitly win)
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "bpr": {"loss": "pairwise", "negative_strategy": "uniform"},
    "warp": {"loss": "warp", "negative_strategy": "misranked", "misranked_candidates": 64},
}
_BASE = {"loss": "logistic", "negative_strategy": "uniform", "negative_count": 1, "misranked_candidates": 20}
Confidence = Literal["linear", "log"]
#: the fields only one solver reads (a field of the other solver must keep its default)
SOLVER_FIELDS = {
    "sgd": ("batch_size", "learning_rate", "reg_method", "loss", "negative_strategy", "negative_count",
            "misranked_candidates", "positive_weight", "user_bias", "item_bias", "preset"),
    "als": ("weight", "confidence", "epsilon", "cg_steps", "exact"),
}
#: values of sgd fields that change nothing under als either: what the sgd defaults fill in, no biases
_ALS_NEUTRAL = {**{field: (value,) for field, value in _BASE.items()}, "user_bias": (False,), "item_bias": (False,)}


@dataclass(frozen=True)
class FlexMFImplicitConfig(ConfigBase):
    """Matrix factorization on implicit feedback (interactions), trained with sampled negatives or by
    weighted alternating least squares.

    solver: ``"sgd"`` (minibatch Adam(W) on a loss with sampled negatives: the fields from
        ``batch_size`` to ``preset`` below) or ``"als"`` (weighted ALS as LensKit's ``ImplicitMFScorer``
        and ``implicit``: every unobserved pair a 0 of confidence 1, an observed one a 1 of
        confidence ``1 + weight * r`` (``r = 1``); ``epochs`` iterations of a user then an item
        half-step; ridge ``regularization``; no biases). A field of the other solver set to anything
        but its default is refused.
    embedding_size: number of latent factors k.
    batch_size: positive interactions per minibatch (shuffled per epoch).
    learning_rate: Adam's step size.
    epochs: maximum number of passes over the training interactions.
    regularization: strength of the penalty chosen by ``reg_method``.
    reg_method: ``"AdamW"`` decoupled weight decay on all parameters (as LensKit's implicit model),
        ``"L2"`` ``regularization * ||row||^2`` of the batch's rows added to the loss, ``None`` none.
    seed: seeds initialisation, shuffling and sampling (same seed and device -> identical model).
    patience: early stopping on validation NDCG@``eval_k``: stop after this many epochs without
        improvement; ``None`` trains all epochs. With validation data the best epoch's parameters
        are kept.
    init_scale: embeddings start as N(0, init_scale); biases start at 0.
    loss: ``"logistic"`` (BCE on positives and sampled negatives, Johnson 2014), ``"pairwise"``
        (BPR, Rendle 2009) or ``"warp"`` (Weston 2011; needs the ``misranked`` strategy).
        Default from ``preset``, else ``"logistic"``.
    negative_strategy: ``"uniform"``, ``"popular"`` (proportional to training popularity) or
        ``"misranked"`` (hard negatives scored by the current model). Default from ``preset``,
        else ``"uniform"``.
    negative_count: negatives per positive (default 1).
    misranked_candidates: candidates scored per negative by the misranked sampler (default 20;
        64 with preset warp).
    positive_weight: weight of the positive term in the logistic loss.
    user_bias: learn a user bias; default ``True`` for logistic loss and ``False`` otherwise (it
        cancels in pairwise and WARP losses).
    item_bias: learn an item bias.
    preset: ``"bpr"`` (pairwise, uniform) or ``"warp"`` (warp, misranked, 64 candidates); fills the
        fields above that are not given explicitly.
    min_rating: ratings >= this count as interactions; ``None`` keeps every rating.
    eval_k: cutoff of the validation NDCG used for early stopping.
    weight (als): confidence ``1 + weight * r`` of an observed pair (LensKit's ``weight``; ``implicit``'s
        ``alpha`` is ``weight + 1`` on binary data).
    confidence (als): ``"linear"`` as above, or ``"log"``: ``1 + weight * log(1 + r / epsilon)``.
    epsilon (als): the scale of the log confidence.
    cg_steps (als): conjugate-gradient steps per row and half-step, warm-started from the row.
    exact (als): solve each row exactly by Cholesky instead (cost k^3 per row: for small k).
    """

    embedding_size: int = 64
    batch_size: int = 4096
    learning_rate: float = 0.005
    epochs: int = 20
    regularization: float = 0.05
    reg_method: RegMethod | None = "AdamW"
    seed: int = 42
    patience: int | None = None
    init_scale: float = 0.1
    loss: str | None = None
    negative_strategy: str | None = None
    negative_count: int | None = None
    misranked_candidates: int | None = None
    positive_weight: float = 1.0
    user_bias: bool | None = None
    item_bias: bool = True
    preset: str | None = None
    min_rating: float | None = None
    eval_k: int = 10
    solver: Solver = "sgd"
    weight: float = 40.0
    confidence: Confidence = "linear"
    epsilon: float = 1.0
    cg_steps: int = 3
    exact: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.solver == "als":  # no loss, sampler or biases to fill in
            self._check_common()
            self._check_solver(SOLVER_FIELDS, _ALS_NEUTRAL)
            if self.confidence not in ("linear", "log"):
                raise ConfigError(f"{name}.confidence: {self.confidence!r} is not one of 'linear', 'log'")
            return

        def choice(field: str, valid: Any) -> None:
            value = getattr(self, field)
            if value not in valid:
                raise ConfigError(f"{name}.{field}: {value!r} is not one of {', '.join(map(repr, valid))}")

        if self.preset is not None:
            choice("preset", LOSS_PRESETS)
        fill = {**_BASE, **LOSS_PRESETS.get(self.preset or "", {})}
        for field, value in fill.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        if self.user_bias is None:
            object.__setattr__(self, "user_bias", self.loss == "logistic")

        self._check_common()
        self._check_solver(SOLVER_FIELDS)
        choice("loss", LOSSES)
        choice("negative_strategy", SAMPLERS)
        if LOSSES[self.loss].rank_weighted and not SAMPLERS[self.negative_strategy].needs_model:
            raise ConfigError(
                f"{name}.negative_strategy: loss {self.loss!r} needs negative_strategy 'misranked', "
                f"got {self.negative_strategy!r}"
            )
        if LOSSES[self.loss].rank_weighted and self.negative_count != 1:
            raise ConfigError(
                f"{name}.negative_count: loss {self.loss!r} takes one violating negative per positive, "
                f"got {self.negative_count}"
            )


#: Named hyperparameter sets (flexmf.yaml's ``implicit_hparams`` adds to and overrides them).
#: Their measured quality: docs/metrics.md (current table) and docs/benchmarks.md ("Named
#: hyperparameter sets": how they were chosen), made by benchmarks/implicit_movielens.py.
IMPLICIT_HPARAM_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "bpr": {"preset": "bpr", "embedding_size": 64, "epochs": 40, "learning_rate": 0.005},
    "warp": {"preset": "warp", "embedding_size": 32, "epochs": 30},
    "best": {"loss": "pairwise", "negative_strategy": "misranked", "embedding_size": 32, "epochs": 30},
    # weighted alternating least squares (benchmarks/als_probe.py implicit --set als)
    "als": {"solver": "als", "embedding_size": 256, "epochs": 15, "regularization": 10.0, "weight": 1.0,
            "cg_steps": 3},
}
