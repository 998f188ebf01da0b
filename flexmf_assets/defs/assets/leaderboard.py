"""Leaderboards (every materialized hparams partition of a dataset side by side, champion picked by
the validation metric) and the champions' recommendations. Both refresh themselves (declarative
automation) after any evaluation of their dataset materializes."""


import dagster as dg
import polars as pl

from flexmf_assets.defs.assets.models import lineage_metadata
from flexmf_assets.defs.automation import follow_any_partition, follow_upstream
from flexmf_assets.defs.records import latest_materialization, model_partition_key
from flexmf_assets.defs.failures import flexmf_asset
from flexmf_assets.defs.metadata import rounded, table
from flexmf_assets.defs.partitions import BY_DATASET, HPARAMS_PARTITIONS
from flexmf_assets.files import jsonable
from flexmf_assets.errors import DataValidationError
from flexmf_assets.evaluation.charts import bar_chart
from flexmf_assets.tracks import TRACKS, Track

CODE_VERSIONS = {"leaderboard": "2", "champion": "2"}


def _value(meta, key):
    entry = meta.get(key)
    return None if entry is None else entry.value


def _raw(meta, key):
    """The unrounded value (from the ``metrics`` JSON entry) when the evaluation recorded one."""
    raw = meta.get("metrics")
    if raw is not None and isinstance(raw.value, dict) and raw.value.get(key) is not None:
        return raw.value[key]
    return _value(meta, key)


def leaderboard_frame(instance: dg.DagsterInstance, board: Track, dataset: str) -> pl.DataFrame:
    """One row per materialized evaluation of ``dataset``, best validation score first.

    Keys that resolve to the same configuration (``config_fingerprint``) train the same model: every
    such row but one (the first registered) names that one in ``same_as`` and ranks after it, so the
    champion is never a duplicate."""
    rows = []
    for name in instance.get_dynamic_partitions(HPARAMS_PARTITIONS[board.name].name):
        record = latest_materialization(instance, f"{board.name}_evaluation", str(model_partition_key(dataset, name)))
        if record is None or record.asset_materialization is None:
            continue
        meta = record.asset_materialization.metadata
        row = {"hparams": name, "partition": f"{dataset}|{name}", "state": _value(meta, "state") or "trained",
               "validation": _raw(meta, board.validation_metric)}
        row.update({m: _raw(meta, m) for m in board.board_columns})
        row.update({"epochs_run": _value(meta, "epochs_run"), "best_epoch": _value(meta, "best_epoch"),
                    "train_seconds": _value(meta, "train_seconds"),
                    "fingerprint": _value(meta, "config_fingerprint"), "run_id": record.run_id})
        rows.append(row)
    if not rows:  # an empty board (this track was not trained on the dataset) is not an error
        return pl.DataFrame(schema={"hparams": pl.String, "partition": pl.String, "state": pl.String,
                                    "validation": pl.Float64,
                                    "same_as": pl.String, "champion": pl.Boolean, "position": pl.Int64})
    first: dict[str, str] = {}
    for row in rows:  # registration order: the first key of a configuration is the one others point at
        fp = row["fingerprint"]
        row["same_as"] = first.setdefault(fp, row["hparams"]) if fp else None
        if row["same_as"] == row["hparams"]:
            row["same_as"] = None
    frame = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        pl.col("validation").cast(pl.Float64), pl.col("same_as").cast(pl.String))
    # pruned trials after the trained sets; rows without a validation score (no validation split) rank
    # last; duplicates after their original. The champion is the first trained, scored original.
    pruned = pl.col("state") == "pruned"
    frame = frame.sort([pruned, "validation", pl.col("same_as").is_not_null(), "hparams"],
                       descending=[False, not board.lower_is_better, False, False], nulls_last=True)
    top = frame.filter(~pruned & pl.col("validation").is_not_null() & pl.col("same_as").is_null()).head(1)
    champion = top["partition"][0] if top.height else None
    return frame.with_columns(
        (pl.col("partition") == champion).fill_null(False).alias("champion"),
        pl.int_range(1, frame.height + 1).alias("position"),
    )


def leaderboard_chart(frame: pl.DataFrame, board: Track) -> str:
    """The test metric of every set in board order, zoomed to the data, the baseline drawn, the champion
    highlighted."""
    base = frame[f"baseline_{board.headline}"].drop_nulls()
    labels = [f"{p}. {short_key(k)}" for p, k in zip(frame["position"], frame["hparams"])]
    champion = frame["champion"].to_list()
    return bar_chart(f"test {board.headline} by set", labels, frame[board.headline].to_list(),
                     reference=float(base[0]) if base.len() else None,
                     highlight=champion.index(True) if True in champion else None)


def short_key(key: str) -> str:
    """``embedding_size=32;learning_rate=0.005`` -> ``es=32 lr=0.005`` (chart labels)."""
    if "=" not in key:
        return key
    parts = []
    for part in key.replace(",", ";").split(";"):
        name, _, value = part.partition("=")
        parts.append("".join(w[:1] for w in name.split("_")) + "=" + value)
    return " ".join(parts)


def build_leaderboard_assets(dataset_partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    assets = [_leaderboard_asset(board, dataset_partitions) for board in TRACKS.values()]
    recommendations = [f"{t}_recommendations" for t in TRACKS]

    @flexmf_asset(
        name="champion_recommendations",
        partitions_def=dataset_partitions,
        deps=[*(f"{t}_leaderboard" for t in TRACKS),
              *(dg.AssetDep(name, partition_mapping=BY_DATASET) for name in recommendations)],
        required_resource_keys={"io_manager"},
        group_name="leaderboard",
        kinds={"polars", "parquet"},
        code_version=CODE_VERSIONS["champion"],
        # one board may never have been made (a track not trained on this dataset)
        automation_condition=follow_upstream(*recommendations, require_all=False),
        description="The recommendations of each track's champion (best validation score), with the "
        "champion's partition in every row and its provenance (training run, model, split, ratings and "
        "archive versions) in the metadata. Follows the leaderboards by itself.",
    )
    def champion_recommendations(context: dg.AssetExecutionContext):
        dataset = context.partition_key
        io = context.resources.io_manager
        tables, provenance = [], {}
        for track in TRACKS:
            try:
                frame = io.read_partition(f"{track}_leaderboard", dataset)
            except FileNotFoundError:
                context.log.warning(f"{track}: no leaderboard for {dataset} yet")
                continue
            winners = frame.filter(pl.col("champion"))
            if winners.is_empty():
                context.log.warning(f"{track}: no champion (no validation scores) for {dataset}")
                continue
            hparams = winners["hparams"][0]
            recs = io.read_partition(f"{track}_recommendations", dataset, hparams)
            provenance[f"{track}_champion"] = f"{dataset}|{hparams}"
            provenance[f"{track}_champion_validation"] = rounded(winners["validation"][0])
            provenance.update(lineage_metadata(context.instance, track, dataset, hparams, prefix=f"{track}_"))
            tables.append(recs.with_columns(pl.lit(track).alias("track"),
                                            pl.lit(f"{dataset}|{hparams}").alias("champion_partition")))
        if not tables:
            raise DataValidationError(f"no champion for dataset {dataset!r}: no leaderboard has a trained set "
                                      "with a validation score")
        out = pl.concat(tables, how="diagonal_relaxed")
        return dg.Output(out, metadata={
            **provenance,
            "rows": out.height,
            "sample": table(out, 10),
            "dagster/row_count": out.height,
        })

    return [*assets, champion_recommendations]


def _leaderboard_asset(board: Track, dataset_partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    metric = board.val_key

    @flexmf_asset(
        name=f"{board.name}_leaderboard",
        partitions_def=dataset_partitions,
        deps=[dg.AssetDep(f"{board.name}_evaluation", partition_mapping=BY_DATASET)],
        group_name="leaderboard",
        kinds={"polars"},
        code_version=CODE_VERSIONS["leaderboard"],
        automation_condition=follow_any_partition(),
        description=f"Every materialized {board.name} hparams partition of the dataset side by side; the "
        f"champion is the best validation score ({metric}), never the test metric. Keys that resolve to the "
        "same configuration are marked `same_as`. Refreshes itself after any evaluation of the dataset.",
    )
    def leaderboard(context: dg.AssetExecutionContext):
        dataset = context.partition_key
        frame = leaderboard_frame(context.instance, board, dataset)
        if frame.is_empty():
            context.log.warning(f"no {board.name}_evaluation is materialized for {dataset}: the board is "
                                f"empty until a {board.name} hparams partition is trained")
        champion = frame.filter(pl.col("champion"))
        shown = [c for c in ("position", "hparams", "state", "validation", *board.board_columns, "same_as", "champion",
                             "epochs_run", "best_epoch", "train_seconds") if c in frame.columns]
        metadata = {
            "champion": champion["partition"][0] if champion.height else "none",
            "entries": frame.height,
            "table": table(frame.select(shown), 50),
            "dagster/row_count": frame.height,
        }
        if not frame.is_empty():
            metadata["chart"] = dg.MetadataValue.md(leaderboard_chart(frame, board))
            metadata["raw"] = dg.MetadataValue.json(jsonable(frame.drop("fingerprint", strict=False).to_dicts()))
        if champion.height:
            metadata["champion_validation"] = rounded(float(champion["validation"][0]))
            metadata[f"champion_{board.headline}"] = rounded(champion[board.headline][0])
        return dg.Output(frame, metadata=metadata)

    return leaderboard
