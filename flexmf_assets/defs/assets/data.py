"""Data stage: ``archive`` -> ``ratings`` + ``items`` (with GX checks) -> ``split``, per dataset."""


import functools
import hashlib
import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import polars as pl

from flexmf_assets.datasets.synthetic import synthetic_fingerprint
from flexmf_assets.datasets.validation import DEFAULT_MIN_ROWS
from flexmf_assets.defs.metadata import column_schema, frame_stats, md_table, rating_histogram
from flexmf_assets.defs.records import DATA_VERSION_TAG, latest_materialization
from flexmf_assets.files import jsonable
from flexmf_assets.defs.failures import flexmf_asset, user_errors
from flexmf_assets.defs.resources import ProjectResource
from flexmf_assets.project import ProjectConfig

CODE_VERSIONS = {"archive": "1", "ratings": "1", "split": "1"}


def build_data_assets(dataset_partitions: dg.PartitionsDefinition):
    data_asset = functools.partial(flexmf_asset, partitions_def=dataset_partitions, group_name="data")

    @data_asset(
        kinds={"http", "zip"}, code_version=CODE_VERSIONS["archive"],
        description="The dataset's source archive, downloaded (streaming, retried, sha256-verified) into "
        "the cache; an unchanged archive keeps its data version so nothing downstream goes stale.",
    )
    def archive(context: dg.AssetExecutionContext, project_config: ProjectResource) -> dg.Output[dict]:
        from flexmf_assets.datasets.download import DEFAULT_MAX_BYTES, fetch

        cfg = project_config.load()
        spec = cfg.dataset(context.partition_key)
        if spec.is_synthetic:
            sha = synthetic_fingerprint(spec.preset or spec.name)
            value = {"dataset": spec.name, "format": spec.format, "synthetic": spec.preset, "sha256": sha,
                     "path": None, "url": None, "size": 0}
            return dg.Output(value, data_version=dg.DataVersion(sha), metadata={
                "dataset": spec.name, "format": spec.format, "sha256": sha, "source": "synthetic generator",
            })
        last = [0.0]

        def progress(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= 5.0 or (total and done >= total):
                last[0] = now
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                context.log.info(f"{spec.name}: {done / 2**20:,.1f} MiB{pct} downloaded")

        dl = cfg.download
        info = fetch(
            spec.url, cfg.cache_dir, name=spec.name, sha256=spec.sha256, size=spec.size,
            builtin=spec.builtin, timeout=float(dl.get("timeout", 60)), retries=int(dl.get("retries", 4)),
            allowed_roots=cfg.allowed_file_roots(), progress=progress,
            max_bytes=dl.get("max_bytes") or DEFAULT_MAX_BYTES,
        )
        context.log.info(f"{spec.name}: {'cache hit' if info.cached else 'downloaded'} {info.url} "
                         f"sha256={info.sha256}")
        value = {"dataset": spec.name, "format": spec.format, "path": str(info.path), "url": info.url,
                 "sha256": info.sha256, "size": info.size, "etag": info.etag,
                 "last_modified": info.last_modified}
        return dg.Output(value, data_version=dg.DataVersion(info.sha256), metadata={
            "dataset": spec.name,
            "url": dg.MetadataValue.url(info.url) if info.url.startswith("http") else info.url,
            "bytes": info.size,
            "sha256": info.sha256,
            "etag": info.etag or "",
            "last_modified": info.last_modified or "",
            "cache_hit": info.cached,
            "format": spec.format,
        })

    from flexmf_assets.datasets.validation import CHECK_DESCRIPTIONS, CHECK_NAMES

    check_specs = [
        dg.AssetCheckSpec(name, asset="ratings", blocking=True, description=CHECK_DESCRIPTIONS.get(name))
        for name in CHECK_NAMES
    ]

    @dg.multi_asset(
        partitions_def=dataset_partitions,
        group_name="data",
        check_specs=check_specs,
        outs={
            "ratings": dg.AssetOut(
                kinds={"polars", "parquet"}, code_version=CODE_VERSIONS["ratings"],
                description="Canonical ratings: user_id Int64, item_id Int64, rating Float32, "
                "timestamp Int64 (seconds since epoch).",
            ),
            "items": dg.AssetOut(
                kinds={"polars", "parquet"}, code_version=CODE_VERSIONS["ratings"],
                description="Item metadata (item_id, title, genres) where the archive has it.",
            ),
        },
    )
    @user_errors
    def ratings_and_items(context: dg.AssetExecutionContext, project_config: ProjectResource, archive: dict):
        from flexmf_assets.datasets.parsing import ITEMS_SCHEMA, load_dataset

        cfg = project_config.load()
        spec = cfg.dataset(context.partition_key)
        source = Path(archive["path"]) if archive.get("path") else None
        work = cfg.cache_dir / spec.name / "extracted"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            parsed = load_dataset(spec, source, Path(tmp))  # type: ignore[arg-type]
        ratings = parsed.ratings
        items = parsed.items if parsed.items is not None else pl.DataFrame(schema=ITEMS_SCHEMA)
        stats = frame_stats(ratings)
        yield dg.Output(ratings, output_name="ratings", metadata={
            **stats,
            "dataset": spec.name,
            "archive_sha256": archive["sha256"],
            "archive_url": archive.get("url") or "synthetic",
            "rating_histogram": rating_histogram(ratings),
            "dagster/row_count": ratings.height,
            "dagster/column_schema": column_schema(ratings),
        })
        yield from ratings_check_results(context, cfg, spec, ratings)
        yield dg.Output(items, output_name="items", metadata={
            "rows": items.height, "dataset": spec.name, "dagster/row_count": items.height,
            "preview": md_table(items, 5) if items.height else "no item metadata in this format",
        })

    @data_asset(
        kinds={"polars", "parquet"}, code_version=CODE_VERSIONS["split"],
        description="Train / validation / test frames by the split protocol in flexmf.yaml (seeded). "
        "Validation is carved from train for early stopping.",
    )
    def split(context: dg.AssetExecutionContext, project_config: ProjectResource,
              ratings: pl.DataFrame) -> dg.Output[dict]:
        from flexmf_assets.datasets.split import split_ratings

        cfg = project_config.load()
        split_cfg = cfg.split_config()
        result = split_ratings(ratings, split_cfg)
        summary = result.summary()
        frames = {"train": result.train, "validation": result.validation, "test": result.test}
        # the data version covers the split settings too: a new seed or protocol in flexmf.yaml makes
        # every model trained on the old split stale (Dagster's default would only see the ratings)
        ratings_record = latest_materialization(context.instance, "ratings", context.partition_key)
        ratings_version = ratings_record.asset_materialization.tags.get(DATA_VERSION_TAG, "") if ratings_record else ""
        blob = json.dumps({"ratings": ratings_version, "split": split_cfg.to_dict(),
                           "code": CODE_VERSIONS["split"]}, sort_keys=True, default=str)
        version = hashlib.sha256(blob.encode()).hexdigest()[:24]
        return dg.Output(frames, data_version=dg.DataVersion(version), metadata={
            "protocol": split_cfg.protocol,
            "seed": split_cfg.seed,
            "split_config": dg.MetadataValue.json(split_cfg.to_dict()),
            "train_rows": result.train.height,
            "validation_rows": result.validation.height,
            "test_rows": result.test.height,
            "summary": dg.MetadataValue.json(jsonable(summary)),
        })

    return [archive, ratings_and_items, split]


def ratings_check_results(context, cfg: ProjectConfig, spec, ratings: pl.DataFrame):
    """Run the GX suite and turn each outcome into a blocking asset-check result."""
    from flexmf_assets.datasets.validation import validate_ratings

    min_rows = cfg.min_rows if cfg.min_rows is not None else DEFAULT_MIN_ROWS
    report = validate_ratings(ratings, rating_scale=spec.rating_scale, rating_step=spec.rating_step,
                              min_rows=min_rows)
    for outcome in report.outcomes:
        if not outcome.success:
            context.log.error(f"{spec.name}: GX check {outcome.message}")
        yield dg.AssetCheckResult(
            check_name=outcome.check_name,
            asset_key="ratings",
            passed=outcome.success,
            severity=dg.AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata={
                "unexpected_count": outcome.unexpected_count,
                "unexpected_examples": dg.MetadataValue.json(jsonable(list(outcome.unexpected_examples))),
                "details": dg.MetadataValue.json(jsonable(outcome.details)),
            },
        )

