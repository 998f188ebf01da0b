"""Model stage, one factory for both tracks: ``<track>_model`` -> ``<track>_evaluation`` and
``<track>_recommendations``, partitioned by ``dataset x <track>_hparams``.

The asset functions stay thin: resolve the hyperparameter set, call the core library, attach metadata.
What differs between the explicit and implicit tracks lives in a small :class:`Track` adapter.
"""


import os
import platform
import socket
from dataclasses import dataclass
from typing import Any, Callable

import dagster as dg
import polars as pl

from flexmf_assets.defs.metadata import figure_markdown, jsonable, md_table, pyplot
from flexmf_assets.defs.partitions import BY_DATASET, model_partitions, split_key
from flexmf_assets.defs.automation import DATA_VERSION_TAG, SPLIT_VERSION_KEY, latest_materialization, model_key
from flexmf_assets.defs.failures import user_errors
from flexmf_assets.defs.resources import DeviceResource, ProjectResource
from flexmf_assets.project import ProjectConfig

CODE_VERSIONS = {"model": "1", "evaluation": "1", "recommendations": "1"}


def loss_curve_plot(history: list[dict], val_key: str, title: str) -> dg.MarkdownMetadataValue | None:
    """Training loss and validation metric per epoch as an inline PNG in Markdown."""
    if not history:
        return None
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    ax.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    vals = [h.get(val_key) for h in history]
    if any(v is not None for v in vals):
        ax2 = ax.twinx()
        ax2.plot(epochs, vals, "s-", label=val_key, color="tab:orange")
        ax2.set_ylabel(val_key, color="tab:orange")
    ax.set_title(title)
    return figure_markdown(fig, title)


@dataclass(frozen=True)
class Track:
    """What one model track does at each asset."""

    name: str
    scorer_class: Callable[[], type]
    val_key: str  # the validation metric in scorer.history
    evaluate: Callable[[Any, dict, ProjectConfig, Any], tuple[pl.DataFrame, dict[str, Any]]]
    description: str


def _explicit_scorer():
    from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer

    return FlexMFExplicitScorer


def _implicit_scorer():
    from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer

    return FlexMFImplicitScorer


def evaluate_explicit(model, split: dict, cfg: ProjectConfig, config) -> tuple[pl.DataFrame, dict]:
    from flexmf_assets.evaluation.rating import BiasBaseline, per_user_table, rating_metrics

    test = split["test"]
    preds = model.predict_frame(test)
    metrics = rating_metrics(test, preds)
    baseline = BiasBaseline().fit(split["train"])
    base_metrics = rating_metrics(test, baseline.predict_frame(test))
    values = {
        "rmse": metrics.rmse, "mae": metrics.mae,
        "user_rmse": metrics.user_rmse, "user_mae": metrics.user_mae,
        "baseline_rmse": base_metrics.rmse, "baseline_mae": base_metrics.mae,
        "rmse_delta_vs_baseline": metrics.rmse - base_metrics.rmse,
        "test_ratings": test.height,
    }
    return per_user_table(test, preds), values


def evaluate_implicit(model, split: dict, cfg: ProjectConfig, config) -> tuple[pl.DataFrame, dict]:
    from flexmf_assets.evaluation.topn import PopularityBaseline, coverage, mean_popularity, topn_metrics

    train, test = split["train"], split["test"]
    if config.min_rating is not None:
        train = train.filter(pl.col("rating") >= config.min_rating)
        test = test.filter(pl.col("rating") >= config.min_rating)
    ks = (10, 20)
    users = test["user_id"].unique().sort()
    recs = model.recommend(users, n=max(ks))
    result = topn_metrics(recs, test, ks=ks)
    base = PopularityBaseline().fit(train).recommend(users, n=max(ks))
    base_result = topn_metrics(base, test, ks=ks)
    n_items = train["item_id"].n_unique()
    values = dict(result.means)
    values.update({f"baseline_{k}": v for k, v in base_result.means.items()})
    values.update({
        "ndcg@10_delta_vs_baseline": result.means["ndcg@10"] - base_result.means["ndcg@10"],
        "coverage@20": coverage(recs, n_items),
        "mean_popularity@20": mean_popularity(recs, train),
        "test_users": users.len(),
    })
    return result.per_user, values


TRACKS = {
    "explicit": Track("explicit", _explicit_scorer, "val_rmse", evaluate_explicit,
                      "Biased MF trained with MSE (rating prediction)"),
    "implicit": Track("implicit", _implicit_scorer, "val_ndcg", evaluate_implicit,
                      "Implicit MF (logistic / BPR / WARP) for top-N ranking"),
}


def lineage_metadata(instance: dg.DagsterInstance, track: str, dataset: str, hparams: str) -> dict[str, Any]:
    """Where a recommendations table comes from, read from the event log: the model partition and
    its run, hparams, device and code version; the split protocol and seed; the validated ratings'
    data version; the archive's url and sha256."""
    out: dict[str, Any] = {"model_partition": f"{dataset}|{hparams}"}
    model = latest_materialization(instance, f"{track}_model", str(model_key(dataset, hparams)))
    if model is not None and model.asset_materialization is not None:
        meta = model.asset_materialization.metadata
        out.update({
            "model_run_id": model.run_id,
            "model_data_version": model.asset_materialization.tags.get(DATA_VERSION_TAG, ""),
            "model_code_version": CODE_VERSIONS["model"],
            "device": meta["device"].value if "device" in meta else "",
            "hparams": meta["hparams"] if "hparams" in meta else dg.MetadataValue.json({}),
        })
    split = latest_materialization(instance, "split", dataset)
    if split is not None and split.asset_materialization is not None:
        meta = split.asset_materialization.metadata
        out.update({
            "split_protocol": meta["protocol"].value if "protocol" in meta else "",
            "split_seed": meta["seed"].value if "seed" in meta else -1,
            "split_data_version": split.asset_materialization.tags.get(DATA_VERSION_TAG, ""),
        })
    ratings = latest_materialization(instance, "ratings", dataset)
    if ratings is not None and ratings.asset_materialization is not None:
        out["ratings_data_version"] = ratings.asset_materialization.tags.get(DATA_VERSION_TAG, "")
    archive = latest_materialization(instance, "archive", dataset)
    if archive is not None and archive.asset_materialization is not None:
        meta = archive.asset_materialization.metadata
        out["archive_sha256"] = meta["sha256"].value if "sha256" in meta else ""
        url = meta.get("url")
        out["archive_url"] = (url.value if url is not None else None) or "synthetic"
    return out


def build_track_assets(project: ProjectConfig, track_name: str, *, pool: str = "flexmf_training",
                       op_tags: dict[str, str] | None = None) -> list[dg.AssetsDefinition]:
    track = TRACKS[track_name]
    partitions = model_partitions(project, track_name)
    model_key = f"{track_name}_model"
    split_in = {"split": dg.AssetIn("split", partition_mapping=BY_DATASET)}

    @dg.asset(
        name=model_key,
        partitions_def=partitions,
        ins=split_in,
        group_name=track_name,
        kinds={"pytorch"},
        code_version=CODE_VERSIONS["model"],
        pool=pool,
        op_tags=op_tags or None,
        description=f"{track.description}, trained on the dataset's split with the hyperparameter set "
        "named by the partition; early stopping on the validation split restores the best epoch.",
    )
    @user_errors
    def model(context: dg.AssetExecutionContext, project_config: ProjectResource, device: DeviceResource,
              split: dict):
        cfg = project_config.load()
        dataset, hparams = split_key(context)
        config = cfg.resolve_hparams(track_name, hparams)
        context.log.info(f"training {track_name} {dataset}|{hparams}: {config.to_dict()}")
        scorer = track.scorer_class()(config, device=device.settings())

        def log_epoch(rec: dict) -> None:
            context.log.info(f"epoch {rec.get('epoch')}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "epoch"))

        scorer.fit(split["train"], split["validation"], callback=log_epoch)
        history = list(scorer.history)
        best = next((h for h in history if h.get("epoch") == scorer.best_epoch), history[-1] if history else {})
        split_record = latest_materialization(context.instance, "split", dataset)
        metadata = {
            "dataset": dataset,
            "hparams_set": hparams,
            # the sweep sensor retrains when this differs from the dataset's current split version
            SPLIT_VERSION_KEY: split_record.asset_materialization.tags.get(DATA_VERSION_TAG, "")
            if split_record else "",
            "hparams": dg.MetadataValue.json(jsonable(config.to_dict())),
            "device": str(scorer.device),
            # "native": the fused CPU kernels trained it; "torch": the eager torch engine (GPU, fallback)
            "engine": scorer.engine,
            "epochs_run": scorer.epochs_run,
            "best_epoch": scorer.best_epoch,
            f"best_{track.val_key}": best.get(track.val_key),
            "train_seconds": round(scorer.train_seconds, 3),
            "updates_per_second": round(scorer.updates_per_second, 1),
            "train_rows": split["train"].height,
            "users": scorer.n_users,
            "items": scorer.n_items,
            "history": dg.MetadataValue.json(jsonable(history)),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": platform.python_version(),
        }
        plot = loss_curve_plot(history, track.val_key, f"{track_name} {dataset}|{hparams}")
        if plot is not None:
            metadata["loss_curve"] = plot
        return dg.Output(scorer, metadata=metadata)

    @dg.asset(
        name=f"{track_name}_evaluation",
        partitions_def=partitions,
        ins={**split_in, "model": dg.AssetIn(model_key)},
        group_name=track_name,
        kinds={"polars"},
        code_version=CODE_VERSIONS["evaluation"],
        description=f"Test-set metrics of the {track_name} model beside its baseline on the same split; "
        "the stored value is the per-user metrics table.",
    )
    @user_errors
    def evaluation(context: dg.AssetExecutionContext, project_config: ProjectResource, model, split: dict):
        cfg = project_config.load()
        dataset, hparams = split_key(context)
        config = cfg.resolve_hparams(track_name, hparams)
        per_user, values = track.evaluate(model, split, cfg, config)
        best = next((h for h in model.history if h.get("epoch") == model.best_epoch), {})
        metadata: dict[str, Any] = {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}
        metadata.update({
            "dataset": dataset,
            "hparams_set": hparams,
            f"validation_{track.val_key}": best.get(track.val_key),
            "epochs_run": model.epochs_run,
            "best_epoch": model.best_epoch,
            "train_seconds": round(model.train_seconds, 3),
            "per_user": md_table(per_user, 10),
            "dagster/row_count": per_user.height,
        })
        return dg.Output(per_user, metadata=metadata)

    @dg.asset(
        name=f"{track_name}_recommendations",
        partitions_def=partitions,
        ins={"model": dg.AssetIn(model_key)},
        group_name=track_name,
        kinds={"polars", "parquet"},
        code_version=CODE_VERSIONS["recommendations"],
        description="Top-N items per user (items the user rated excluded) with score, rank and the "
        "model partition; stored as Parquet (readable by polars or DuckDB).",
    )
    @user_errors
    def recommendations(context: dg.AssetExecutionContext, project_config: ProjectResource, model):
        cfg = project_config.load()
        dataset, hparams = split_key(context)
        recs = model.recommend(None, n=cfg.recommendations_n)
        recs = recs.with_columns(
            pl.lit(f"{dataset}|{hparams}").alias("model_partition"),
        )
        n_items = model.n_items
        covered = recs["item_id"].n_unique()
        return dg.Output(recs, metadata={
            **lineage_metadata(context.instance, track_name, dataset, hparams),
            "dataset": dataset,
            "hparams_set": hparams,
            "n": cfg.recommendations_n,
            "users": recs["user_id"].n_unique(),
            "rows": recs.height,
            "catalog_coverage": round(covered / n_items, 4) if n_items else 0.0,
            "sample": md_table(recs, 10),
            "dagster/row_count": recs.height,
        })

    return [model, evaluation, recommendations]
