"""Reading the instance: the latest materialization of an asset partition, the data version it
recorded, and the key of a model partition. Shared by the assets, the sensors and the CLI."""

import dagster as dg

from flexmf_assets.defs.partitions import DATASET_DIM, HPARAMS_DIM

#: model metadata key holding the data version of the split it was trained on
SPLIT_VERSION_KEY = "split_data_version"
DATA_VERSION_TAG = "dagster/data_version"


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str):
    """The newest materialization record of ``asset``'s ``partition``, or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def model_partition_key(dataset: str, hparams: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({DATASET_DIM: dataset, HPARAMS_DIM: hparams})
