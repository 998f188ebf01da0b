"""Typed, validated configuration of the explicit FlexMF model (LensKit-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import ConfigBase, RegMethod, Solver

Optimizer = Literal["sgd", "adam"]
#: explicit ALS biases: solved with the factors, or LensKit's damped means computed once
BiasMode = Literal["learned", "damped"]
#: the fields only one solver reads (a field of the other solver must keep its default)
SOLVER_FIELDS = {
    "sgd": ("batch_size", "learning_rate", "reg_method", "optimizer", "lr_decay"),
    "als": ("damping", "reg_exponent", "bias_regularization"),
}


@dataclass(frozen=True)
class FlexMFExplicitConfig(ConfigBase):
    """Biased matrix factorization trained on squared error.

    solver: ``"sgd"`` (minibatch gradients: ``optimizer``, ``batch_size``, ``learning_rate``,
        ``reg_method``, ``lr_decay``) or ``"als"`` (biased alternating least squares as LensKit's
        ``BiasedMFScorer``: ``epochs`` iterations of ridge solves per user then per item row, the
        penalty ``regularization * n ** reg_exponent`` of a row with ``n`` ratings; ``bias``,
        ``damping``, ``bias_regularization``). A field of the other solver set to anything but
        its default is refused.
    embedding_size: number of latent factors k.
    batch_size: ratings per minibatch (shuffled per epoch).
    learning_rate: step size (per rating for ``sgd``, scaled by ``1/sqrt(c)`` for a row with ``c``
        ratings in the batch; Adam's step for ``adam``).
    epochs: maximum number of passes over the training ratings.
    regularization: strength of the penalty chosen by ``reg_method``.
    reg_method: ``"L2"`` puts ``regularization/2 * ||row||^2`` for every rating's user and item rows
        in the loss (sparse: only the batch's rows are touched), ``"AdamW"`` applies decoupled weight
        decay ``row -= learning_rate * regularization * row`` to the rows touched in a batch;
        ``None`` disables regularization. With plain ``sgd`` the two coincide (decoupled weight decay
        equals L2 for SGD), so the difference matters only for ``adam``.
    optimizer: ``"sgd"`` (hand-derived updates, fastest; a row's summed step in a batch is divided
        by the square root of its rating count there, so large batches do not diverge) or
        ``"adam"`` (a sparse, lazy Adam written by hand: moments of a row are updated only when the
        row is in the batch, like torch's SparseAdam).
    lr_decay: the learning rate is multiplied by this after every epoch (1.0 = constant).
    seed: seeds initialisation and shuffling (same seed and device -> identical model).
    patience: early stopping: stop after this many epochs without a better validation RMSE;
        ``None`` trains all epochs. With validation data the best epoch's parameters are kept.
    init_scale: embeddings start as N(0, init_scale); biases start at 0.
    bias: learn user and item biases (the global mean is always used). Biases share
        ``regularization`` with the embeddings. With ``als``: ``"learned"`` (or ``true``: solved with
        the factors, starting from the damped means) or ``"damped"`` (LensKit's damped means,
        computed once); ``false`` is refused (ALS always fits biases).
    clamp: clip predictions to the training rating range.
    damping (als): the damping of the bias means, ``b_i = sum(r - mu) / (n_i + damping)`` (LensKit's).
    reg_exponent (als): a row's ridge penalty is ``regularization * n ** reg_exponent`` (LensKit: 1).
    bias_regularization (als, learned biases): the biases' penalty factor; ``None``: ``regularization``.
    """

    embedding_size: int = 64
    batch_size: int = 1024
    learning_rate: float = 0.01
    epochs: int = 40
    regularization: float = 0.1
    reg_method: RegMethod | None = "L2"
    optimizer: Optimizer = "sgd"
    lr_decay: float = 1.0
    seed: int = 42
    patience: int | None = None
    init_scale: float = 0.1
    bias: bool | BiasMode = True
    clamp: bool = True
    solver: Solver = "sgd"
    damping: float = 5.0
    reg_exponent: float = 1.0
    bias_regularization: float | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        self._check_common()
        self._check_solver(SOLVER_FIELDS)
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"{name}.optimizer: {self.optimizer!r} is not one of 'sgd', 'adam'")
        if self.solver == "sgd" and not isinstance(self.bias, bool):
            raise ConfigError(f"{name}.bias: {self.bias!r} applies only to solver 'als'; solver 'sgd' takes "
                              "true or false")
        if self.solver == "als" and self.bias not in (True, "learned", "damped"):
            raise ConfigError(f"{name}.bias: solver 'als' always fits biases: 'learned' (or true) or 'damped', "
                              f"got {self.bias!r}")

    @property
    def has_bias(self) -> bool:
        """Whether the model has user and item biases (a ``bias`` mode of ALS counts)."""
        return self.bias is not False


#: Named hyperparameter sets (flexmf.yaml's ``explicit_hparams`` adds to and overrides them);
#: ``default`` is the class defaults. Their measured quality and speed: docs/benchmarks.md
#: ("Explicit hyperparameter sets"), made by benchmarks/explicit_movielens.py.
EXPLICIT_HPARAM_SETS: dict[str, dict[str, object]] = {
    "default": {
        "embedding_size": 64,
        "batch_size": 1024,
        "learning_rate": 0.01,
        "epochs": 40,
        "regularization": 0.1,
        "reg_method": "L2",
        "optimizer": "sgd",
    },
    "tuned": {
        "embedding_size": 128,
        "batch_size": 1024,
        "learning_rate": 0.01,
        "epochs": 100,
        "regularization": 0.1,
        "reg_method": "L2",
        "optimizer": "sgd",
    },
    # biased alternating least squares (how it was chosen: docs/benchmarks.md "Alternating least squares")
    "als": {"solver": "als", "embedding_size": 100, "epochs": 10, "regularization": 1.2, "reg_exponent": 0.5,
            "bias": "learned"},
}
