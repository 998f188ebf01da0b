"""Leaderboards (every materialized hparams partition of a dataset side by side, champion picked by
the validation metric) and the champions' recommendations."""

from dataclasses import dataclass

import dagster as dg
import polars as pl

from flexmf_assets.defs.automation import latest_materialization, model_key
from flexmf_assets.defs.failures import user_errors
from flexmf_assets.defs.metadata import figure_markdown, md_table, pyplot
from flexmf_assets.defs.partitions import BY_DATASET, HPARAMS_PARTITIONS
from flexmf_assets.errors import DataValidationError

CODE_VERSIONS = {"leaderboard": "1", "champion": "1"}


@dataclass(frozen=True)
class Board:
    track: str
    validation_key: str  # evaluation metadata key of the validation metric
    lower_is_better: bool
    test_metrics: tuple[str, ...]


BOARDS = {
    "explicit": Board("explicit", "validation_val_rmse", True,
                      ("rmse", "mae", "baseline_rmse", "rmse_delta_vs_baseline", "user_rmse")),
    "implicit": Board("implicit", "validation_val_ndcg", False,
                      ("ndcg@10", "recall@10", "precision@10", "hit@10", "mrr@10", "map@10", "ndcg@20",
                       "recall@20", "baseline_ndcg@10", "ndcg@10_delta_vs_baseline", "coverage@20")),
}


def _value(meta, key):
    entry = meta.get(key)
    return None if entry is None else entry.value


def leaderboard_frame(instance: dg.DagsterInstance, board: Board, dataset: str) -> pl.DataFrame:
    """One row per materialized evaluation of ``dataset``, best validation score first."""
    rows = []
    for name in instance.get_dynamic_partitions(HPARAMS_PARTITIONS[board.track].name):
        record = latest_materialization(instance, f"{board.track}_evaluation", str(model_key(dataset, name)))
        if record is None or record.asset_materialization is None:
            continue
        meta = record.asset_materialization.metadata
        row = {"hparams": name, "partition": f"{dataset}|{name}",
               "validation": _value(meta, board.validation_key)}
        row.update({m: _value(meta, m) for m in board.test_metrics})
        row.update({"epochs_run": _value(meta, "epochs_run"), "best_epoch": _value(meta, "best_epoch"),
                    "train_seconds": _value(meta, "train_seconds"), "run_id": record.run_id})
        rows.append(row)
    if not rows:  # an empty board (this track was not trained on the dataset) is not an error
        return pl.DataFrame(schema={"hparams": pl.String, "partition": pl.String, "validation": pl.Float64,
                                    "champion": pl.Boolean, "position": pl.Int64})
    frame = pl.DataFrame(rows, infer_schema_length=None)
    # rows without a validation score (no validation split) rank last; ties by name
    frame = frame.sort(["validation", "hparams"], descending=[not board.lower_is_better, False],
                       nulls_last=True)
    champion = frame["partition"][0] if frame["validation"][0] is not None else None
    return frame.with_columns(
        (pl.col("partition") == champion).alias("champion"),
        pl.int_range(1, frame.height + 1).alias("position"),
    )


def leaderboard_plot(frame: pl.DataFrame, board: Board, dataset: str) -> dg.MarkdownMetadataValue:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * frame.height + 1.5), dpi=90)
    names = frame["hparams"].to_list()[::-1]
    vals = [v if v is not None else 0.0 for v in frame["validation"].to_list()[::-1]]
    colors = ["tab:orange" if c else "tab:blue" for c in frame["champion"].to_list()[::-1]]
    ax.barh(names, vals, color=colors)
    metric = board.validation_key.removeprefix("validation_")
    ax.set_xlabel(f"validation {metric} ({'lower' if board.lower_is_better else 'higher'} is better)")
    title = f"{board.track} leaderboard, {dataset}"
    ax.set_title(title)
    return figure_markdown(fig, title)


def build_leaderboard_assets(dataset_partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    assets = []
    for board in BOARDS.values():
        assets.append(_leaderboard_asset(board, dataset_partitions))

    @dg.asset(
        name="champion_recommendations",
        partitions_def=dataset_partitions,
        ins={f"{t}_leaderboard": dg.AssetIn(f"{t}_leaderboard") for t in BOARDS},
        deps=[dg.AssetDep(f"{t}_recommendations", partition_mapping=BY_DATASET) for t in BOARDS],
        required_resource_keys={"io_manager"},
        group_name="leaderboard",
        kinds={"polars", "parquet"},
        code_version=CODE_VERSIONS["champion"],
        description="The recommendations of each track's champion (best validation score), with the "
        "champion's partition key in every row.",
    )
    @user_errors
    def champion_recommendations(context: dg.AssetExecutionContext, explicit_leaderboard: pl.DataFrame,
                                 implicit_leaderboard: pl.DataFrame):
        dataset = context.partition_key
        boards = {"explicit_leaderboard": explicit_leaderboard, "implicit_leaderboard": implicit_leaderboard}
        tables, champions = [], {}
        for name, frame in boards.items():
            track = name.removesuffix("_leaderboard")
            winners = frame.filter(pl.col("champion"))
            if winners.is_empty():
                context.log.warning(f"{track}: no champion (no validation scores) for {dataset}")
                continue
            hparams = winners["hparams"][0]
            recs = context.resources.io_manager.read_partition(f"{track}_recommendations", dataset, hparams)
            champions[track] = f"{dataset}|{hparams}"
            tables.append(recs.with_columns(pl.lit(track).alias("track"),
                                            pl.lit(f"{dataset}|{hparams}").alias("champion_partition")))
        if not tables:
            raise DataValidationError(f"no champion for dataset {dataset!r}: no leaderboard has a trained set "
                                      "with a validation score")
        out = pl.concat(tables, how="diagonal_relaxed")
        return dg.Output(out, metadata={
            **{f"{t}_champion": key for t, key in champions.items()},
            "rows": out.height,
            "sample": md_table(out, 10),
            "dagster/row_count": out.height,
        })

    return [*assets, champion_recommendations]


def _leaderboard_asset(board: Board, dataset_partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{board.track}_leaderboard",
        partitions_def=dataset_partitions,
        deps=[dg.AssetDep(f"{board.track}_evaluation", partition_mapping=BY_DATASET)],
        group_name="leaderboard",
        kinds={"polars"},
        code_version=CODE_VERSIONS["leaderboard"],
        description=f"Every materialized {board.track} hparams partition of the dataset side by side; the "
        f"champion is the best validation score ({board.validation_key.removeprefix('validation_')}), "
        "never the test metric.",
    )
    @user_errors
    def leaderboard(context: dg.AssetExecutionContext):
        dataset = context.partition_key
        frame = leaderboard_frame(context.instance, board, dataset)
        if frame.is_empty():
            context.log.warning(f"no {board.track}_evaluation is materialized for {dataset}: the board is "
                                f"empty until a {board.track} hparams partition is trained")
        champion = frame.filter(pl.col("champion"))
        metadata = {
            "champion": champion["partition"][0] if champion.height else "none",
            "entries": frame.height,
            "table": md_table(frame.drop("run_id", strict=False), 50),
            "dagster/row_count": frame.height,
        }
        if not frame.is_empty():
            metadata["plot"] = leaderboard_plot(frame, board, dataset)
        if champion.height:
            metadata["champion_validation"] = float(champion["validation"][0])
        return dg.Output(frame, metadata=metadata)

    return leaderboard
