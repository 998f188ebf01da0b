"""Partitions: a static ``dataset`` dimension and one dynamic hyperparameter-set dimension per track.

A model partition key reads ``"<dataset>|<hparams>"`` (Dagster sorts dimensions by name).
"""

from __future__ import annotations

import warnings

import dagster as dg

from flexmf_assets.project import ProjectConfig
from flexmf_assets.tracks import TRACK_NAMES

DATASET_DIM = "dataset"
HPARAMS_DIM = "hparams"

#: one dynamic hyperparameter-set dimension per registered track: ``<track>_hparams``
HPARAMS_PARTITIONS = {name: dg.DynamicPartitionsDefinition(name=f"{name}_hparams") for name in TRACK_NAMES}


def dataset_partitions(project: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(project.dataset_partition_names())


def model_partitions(project: ProjectConfig, track: str) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {DATASET_DIM: dataset_partitions(project), HPARAMS_DIM: HPARAMS_PARTITIONS[track]}
    )


#: model assets read the dataset's split through the ``dataset`` dimension (and leaderboards read
#: every model partition of their dataset the same way)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # stable in practice since Dagster 1.4
    BY_DATASET = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=DATASET_DIM)


def split_key(context: dg.AssetExecutionContext) -> tuple[str, str]:
    """(dataset, hparams) of a model-partitioned run."""
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
    else:
        dims = dict(zip((DATASET_DIM, HPARAMS_DIM), str(key).split("|", 1)))
    return dims[DATASET_DIM], dims[HPARAMS_DIM]
