"""Model stage, one factory for both tracks: ``<track>_model`` -> ``<track>_evaluation`` and
``<track>_recommendations``, partitioned by ``dataset x <track>_hparams``.

The asset functions stay thin: resolve the hyperparameter set, call the core library, attach metadata.
What differs between the explicit and implicit tracks lives in a small :class:`Track` adapter.
"""


import os
import platform
import socket
from typing import Any

import dagster as dg
import polars as pl

from flexmf_assets.defs.automation import follow_upstream, retrain_on_new_split
from flexmf_assets.defs.records import DATA_VERSION_TAG, SPLIT_VERSION_KEY, latest_materialization, model_partition_key
from flexmf_assets.defs.failures import flexmf_asset
from flexmf_assets.defs.metadata import rounded, table
from flexmf_assets.defs.partitions import BY_DATASET, model_partitions, split_key
from flexmf_assets.defs.resources import DeviceResource, ProjectResource
from flexmf_assets.defs.tuning import trial_reporter
from flexmf_assets.files import jsonable
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import ProjectConfig, config_fingerprint
from flexmf_assets.tracks import track as get_track

CODE_VERSIONS = {"model": "1", "evaluation": "2", "recommendations": "2"}
#: longest storage path a partition may need (version folder and model files included)
MAX_PATH = 4000


def key_grammar(track: str) -> str:
    """How a set is named in a partition key: shown in the model assets' descriptions."""
    fields = ", ".join(get_track(track).config_class.field_names())
    return (
        f"**Partition key** `<dataset>|<set>`. The set is a name from `flexmf.yaml` (`default`, ...) or "
        f"overrides of `default` typed as `field=value` pairs separated by `;`, e.g. "
        f"`embedding_size=32;epochs=5` (ASCII letters, digits and `_ . = ; + -` only; each field once; "
        f"`none` for an empty optional). Fields: {fields}."
    )


def lineage_metadata(instance: dg.DagsterInstance, track: str, dataset: str, hparams: str,
                     prefix: str = "") -> dict[str, Any]:
    """Where a recommendations table comes from, read from the event log: the model partition and
    its training run, hparams, device, data and code version; the split protocol, seed and data
    version; the validated ratings' data version; the archive's url and sha256. ``prefix`` names the
    model's own entries (``explicit_`` on the champions' table, which holds two models)."""
    out: dict[str, Any] = {f"{prefix}model_partition": f"{dataset}|{hparams}"}
    model = latest_materialization(instance, f"{track}_model", str(model_partition_key(dataset, hparams)))
    if model is not None and model.asset_materialization is not None:
        meta = model.asset_materialization.metadata
        out.update({
            f"{prefix}model_run": dg.MetadataValue.dagster_run(model.run_id),
            f"{prefix}model_run_id": model.run_id,
            f"{prefix}model_data_version": model.asset_materialization.tags.get(DATA_VERSION_TAG, ""),
            f"{prefix}model_code_version": CODE_VERSIONS["model"],
            f"{prefix}device": meta["device"].value if "device" in meta else "",
            f"{prefix}hparams": meta["hparams"] if "hparams" in meta else dg.MetadataValue.json({}),
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
        out["archive_data_version"] = archive.asset_materialization.tags.get(DATA_VERSION_TAG, "")
        url = meta.get("url")
        out["archive_url"] = (url.value if url is not None else None) or "synthetic"
    return out


def _check_storage_path(cfg: ProjectConfig, asset: str, dataset: str, hparams: str) -> None:
    """Fail before any work when the partition's storage path would be too long to write."""
    path = cfg.storage_dir / asset / dataset / hparams
    if len(str(path)) + 120 > MAX_PATH:
        raise ConfigError(f"hparams key {hparams[:40]!r}...: the storage path {str(path)[:60]}... would be "
                          f"{len(str(path)) + 120} characters long (at most {MAX_PATH}); use a shorter key "
                          "or FLEXMF_DATA_DIR")


def build_track_assets(project: ProjectConfig, track_name: str, *, pool: str = "flexmf_training",
                       op_tags: dict[str, str] | None = None) -> list[dg.AssetsDefinition]:
    track = get_track(track_name)
    partitions = model_partitions(project, track_name)
    model_name = f"{track_name}_model"
    split_in = {"split": dg.AssetIn("split", partition_mapping=BY_DATASET)}

    @flexmf_asset(
        name=model_name,
        partitions_def=partitions,
        ins=split_in,
        group_name=track_name,
        kinds={"pytorch"},
        code_version=CODE_VERSIONS["model"],
        pool=pool,
        op_tags=op_tags or None,
        automation_condition=retrain_on_new_split(),
        description=f"{track.description}, trained on the dataset's split with the hyperparameter set "
        "named by the partition; early stopping on the validation split restores the best epoch. A trained "
        "partition retrains by itself when its split's data version changes.\n\n" + key_grammar(track_name),
    )
    def model(context: dg.AssetExecutionContext, project_config: ProjectResource, device: DeviceResource,
              split: dict):
        cfg = project_config.load()
        dataset, hparams = split_key(context)
        config = cfg.resolve_hparams(track_name, hparams)
        _check_storage_path(cfg, model_name, dataset, hparams)
        context.log.info(f"training {track_name} {dataset}|{hparams}: {config.to_dict()}")
        scorer = track.scorer_class(config, device=device.settings())
        # a run tagged as an Optuna trial reports every epoch's validation value; the pruner may stop it
        trial = trial_reporter(context, cfg, track_name, dataset)

        def log_epoch(rec: dict) -> bool:
            context.log.info(f"epoch {rec.get('epoch')}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "epoch"))
            if trial is not None and trial(rec):
                context.log.info(f"epoch {rec.get('epoch')}: trial {trial.trial.number + 1} pruned by the median "
                                 "pruner; training stops here (the best epoch is kept)")
                return True
            return False

        scorer.fit(split["train"], split["validation"], callback=log_epoch)
        history = list(scorer.history)
        best = next((h for h in history if h.get("epoch") == scorer.best_epoch), history[-1] if history else {})
        split_record = latest_materialization(context.instance, "split", dataset)
        metadata = {
            "dataset": dataset,
            "hparams_set": hparams,
            # trained, or pruned (an Optuna trial stopped early by the pruner: never champion)
            "state": "pruned" if trial is not None and trial.pruned_at is not None else "trained",
            **({"trial": trial.trial.number + 1} if trial is not None else {}),
            # the configuration this key resolved to: equal for keys that train the same model
            "config_fingerprint": config_fingerprint(track_name, config),
            # retraining compares this with the dataset's current split version
            SPLIT_VERSION_KEY: split_record.asset_materialization.tags.get(DATA_VERSION_TAG, "")
            if split_record else "",
            "hparams": dg.MetadataValue.json(jsonable(config.to_dict())),
            "device": str(scorer.device),
            # "native": the fused CPU kernels trained it; "torch": the eager torch engine (GPU, fallback);
            # "als": alternating least squares (solver: als)
            "engine": scorer.engine,
            "epochs_run": scorer.epochs_run,
            "best_epoch": scorer.best_epoch,
            f"best_{track.val_key}": rounded(best.get(track.val_key)),
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
        if history:
            from flexmf_assets.evaluation.reports import loss_curve

            metadata["loss_curve"] = dg.MetadataValue.md(loss_curve(history, track.val_key))
        return dg.Output(scorer, metadata=metadata)

    @flexmf_asset(
        name=f"{track_name}_evaluation",
        partitions_def=partitions,
        ins={**split_in, "model": dg.AssetIn(model_name)},
        group_name=track_name,
        kinds={"polars"},
        code_version=CODE_VERSIONS["evaluation"],
        automation_condition=follow_upstream("split"),
        description=f"Test-set metrics of the {track_name} model beside its baseline on the same split, with "
        "figures and the training curve; the stored value is the per-user metrics table. Follows its model "
        "by itself.",
    )
    def evaluation(context: dg.AssetExecutionContext, model, split: dict):
        dataset, hparams = split_key(context)
        report = track.report(model, split["train"], split["test"])
        best = next((h for h in model.history if h.get("epoch") == model.best_epoch), {})
        metadata: dict[str, Any] = {k: rounded(v) for k, v in report.metrics.items()}
        trained = latest_materialization(context.instance, model_name, str(model_partition_key(dataset, hparams)))
        state = trained.asset_materialization.metadata.get("state") if trained is not None else None
        metadata.update({
            "dataset": dataset,
            "hparams_set": hparams,
            "state": state.value if state is not None else "trained",
            "config_fingerprint": config_fingerprint(track_name, model.config),
            track.validation_metric: rounded(best.get(track.val_key)),
            "epochs_run": model.epochs_run,
            "best_epoch": model.best_epoch,
            "train_seconds": round(model.train_seconds, 3),
            **{name: dg.MetadataValue.md(markdown) for name, markdown in report.figures.items()},
            "metrics": dg.MetadataValue.json(jsonable({**report.metrics,
                                                        track.validation_metric: best.get(track.val_key)})),
            "curves": dg.MetadataValue.json(jsonable(report.curves)),
            "per_user": table(report.per_user, 10),
            "dagster/row_count": report.per_user.height,
        })
        if model.history:
            from flexmf_assets.evaluation.reports import loss_curve

            metadata["loss_curve"] = dg.MetadataValue.md(loss_curve(model.history, track.val_key))
        return dg.Output(report.per_user, metadata=metadata)

    @flexmf_asset(
        name=f"{track_name}_recommendations",
        partitions_def=partitions,
        ins={"model": dg.AssetIn(model_name), "items": dg.AssetIn("items", partition_mapping=BY_DATASET)},
        group_name=track_name,
        kinds={"polars", "parquet"},
        code_version=CODE_VERSIONS["recommendations"],
        automation_condition=follow_upstream("items"),
        description="Top-N items per user (items the user rated excluded) with score, rank, the item's title "
        "and genres, and the model partition; Parquet, and the newest table of each partition is also at "
        "`<storage>/<asset>/<dataset>/<set>/latest.parquet` for DuckDB or polars. Follows its model by itself.",
    )
    def recommendations(context: dg.AssetExecutionContext, project_config: ProjectResource, model,
                        items: pl.DataFrame):
        cfg = project_config.load()
        dataset, hparams = split_key(context)
        recs = model.recommend(None, n=cfg.recommendations_n)
        recs = with_titles(recs, items).with_columns(pl.lit(f"{dataset}|{hparams}").alias("model_partition"))
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
            "sample": table(recs, 10),
            "dagster/row_count": recs.height,
        })

    return [model, evaluation, recommendations]


def with_titles(recs: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """``recs`` with the item's ``title`` and ``genres`` (null where the dataset has no item metadata)."""
    cols = [c for c in ("title", "genres") if c in items.columns]
    if not cols:
        return recs
    meta = items.select(pl.col("item_id").cast(recs.schema["item_id"], strict=False), *cols).unique("item_id")
    return recs.join(meta, on="item_id", how="left", maintain_order="left")
