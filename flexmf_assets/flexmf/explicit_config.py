"""Typed, validated configuration of the explicit FlexMF model (LensKit-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import ConfigBase, RegMethod

Optimizer = Literal["sgd", "adam"]


@dataclass(frozen=True)
class FlexMFExplicitConfig(ConfigBase):
    """Biased matrix factorization trained on squared error.

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
        ``regularization`` with the embeddings.
    clamp: clip predictions to the training rating range.
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
    bias: bool = True
    clamp: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        self._check_common()
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"{name}.optimizer: {self.optimizer!r} is not one of 'sgd', 'adam'")


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
}
