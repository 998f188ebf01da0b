"""The data stage end to end through Dagster: real loopback HTTP, real GX checks, versioned storage."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from flexmf_assets.datasets.synthetic import synthetic_fingerprint
from flexmf_assets.defs.definitions import build_definitions
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import load_project

from conftest import failure_text


def make_project(tmp_path: Path, body: str):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(body)
    project = load_project(cfg, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    return project, build_definitions(project, config_path=str(cfg))


def run(defs: dg.Definitions, job: str, key, instance) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance, raise_on_error=False)


def latest_record(instance, asset: str, partition: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def latest(instance, asset: str, partition: str) -> dg.AssetMaterialization | None:
    record = latest_record(instance, asset, partition)
    return record.asset_materialization if record else None


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture
def instance(dagster_instance):
    return dagster_instance


def test_movielens_through_loopback_http(tmp_path, movielens_server, instance):
    archive = movielens_server.archive  # ml-latest-small: 100,836 ratings, 610 users, 9,724 movies rated
    project, defs = make_project(tmp_path, f"""
datasets:
  small:
    url: {movielens_server.url('ml-latest-small.zip')}
    sha256: {archive.sha256}
    format: ml-latest-small
""")
    result = run(defs, "data_job", "small", instance)
    assert result.success
    checks = check_results(result)
    assert checks and all(checks.values()), checks

    ratings = latest(instance, "ratings", "small")
    meta = ratings.metadata
    assert (meta["rows"].value, meta["users"].value, meta["items"].value) == (
        archive.ratings, archive.users, archive.rated_items)
    assert meta["archive_sha256"].value == archive.sha256
    event = latest(instance, "archive", "small")
    assert event.metadata["sha256"].value == archive.sha256
    assert event.tags["dagster/data_version"] == archive.sha256
    assert event.metadata["cache_hit"].value is False

    split = latest(instance, "split", "small").metadata
    total = split["train_rows"].value + split["validation_rows"].value + split["test_rows"].value
    assert total == archive.ratings
    assert abs(split["test_rows"].value - 0.2 * archive.ratings) <= 1

    # the stored split is real Parquet, readable without Dagster
    from flexmf_assets.storage import VersionedStore
    from upath import UPath

    frames = VersionedStore().read(UPath(project.storage_dir) / "split" / "small")
    assert frames["test"].height == split["test_rows"].value
    assert frames["train"].schema["rating"] == pl.Float32

    # second run: the cached archive is reused, and the data version does not change
    ratings_version = ratings.tags["dagster/data_version"]
    again = run(defs, "data_job", "small", instance)
    assert again.success
    archive2 = latest(instance, "archive", "small")
    assert archive2.metadata["cache_hit"].value is True
    assert archive2.tags["dagster/data_version"] == archive.sha256
    assert latest(instance, "ratings", "small").tags["dagster/data_version"] == ratings_version


def test_checksum_mismatch_fails_and_keeps_previous_outputs(tmp_path, movielens_server, instance):
    body = """
datasets:
  small:
    url: {url}
    sha256: "{sha}"
    format: ml-latest-small
"""
    url = movielens_server.url("ml-latest-small.zip")
    sha = movielens_server.archive.sha256
    project, defs = make_project(tmp_path, body.format(url=url, sha=sha))
    assert run(defs, "data_job", "small", instance).success
    before = latest_record(instance, "split", "small")

    wrong = "0" * 64
    _, bad_defs = make_project(tmp_path, body.format(url=url, sha=wrong))
    # the cached file no longer matches the declared sha: a fresh download is verified and rejected
    result = run(bad_defs, "data_job", "small", instance)
    assert not result.success
    text = failure_text(result)
    assert text.splitlines()[0].startswith("ChecksumError: ")
    assert wrong in text.splitlines()[0] and sha in text.splitlines()[0]
    # nothing downstream ran, the previous materialization is intact and readable
    assert latest_record(instance, "split", "small").storage_id == before.storage_id
    from flexmf_assets.storage import VersionedStore
    from upath import UPath

    frames = VersionedStore().read(UPath(project.storage_dir) / "split" / "small")
    assert sum(f.height for f in frames.values()) == movielens_server.archive.ratings


def _csv_zipless(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "www" / "ratings.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text("uid,iid,stars,ts\n" + "\n".join(rows) + "\n")
    return path


def test_failed_gx_check_blocks_downstream(tmp_path, instance):
    rows = [f"{u},{i},{(u + i) % 5 + 1},{1_000_000_000 + u * 100 + i}" for u in range(1, 40) for i in range(1, 40)]
    rows[7] = "1,8,7,1000000107"  # off the 1-5 scale
    path = _csv_zipless(tmp_path, rows)
    _, defs = make_project(tmp_path, f"""
validation: {{min_rows: 100}}
datasets:
  mine:
    url: {path.as_uri()}
    format: csv
    columns: {{user_id: uid, item_id: iid, rating: stars, timestamp: ts}}
    rating_scale: [1, 5]
    rating_step: 1
""")
    result = run(defs, "data_job", "mine", instance)
    checks = check_results(result)
    assert checks["rating_in_scale"] is False
    assert all(v for k, v in checks.items() if k != "rating_in_scale")
    assert latest(instance, "ratings", "mine") is not None
    assert latest(instance, "split", "mine") is None  # blocked


def test_synthetic_dataset_needs_no_network(tmp_path, instance):
    _, defs = make_project(tmp_path, "default_dataset: synthetic-100k\n")
    result = run(defs, "data_job", "synthetic-100k", instance)
    assert result.success
    meta = latest(instance, "ratings", "synthetic-100k").metadata
    assert 80_000 <= meta["rows"].value <= 120_000
    first = latest(instance, "archive", "synthetic-100k").tags["dagster/data_version"]
    assert first == synthetic_fingerprint("synthetic-100k")  # the library's fingerprint of the preset
    assert run(defs, "data_job", "synthetic-100k", instance).success
    assert latest(instance, "archive", "synthetic-100k").tags["dagster/data_version"] == first


def test_definitions_validate(tmp_path):
    _, defs = make_project(tmp_path, "{}\n")
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"archive", "ratings", "items", "split", "explicit_model", "explicit_evaluation",
            "explicit_recommendations", "implicit_model", "implicit_evaluation",
            "implicit_recommendations"} <= keys


def test_dataset_dimension_lists_the_configured_datasets_not_the_catalog(tmp_path):
    """The UI's partition lists and plots are about the user's data: the default dataset, the file's
    entries and the swept datasets, or an explicit list; a catalog entry joins by name."""
    def names(text: str) -> list[str]:
        _, defs = make_project(tmp_path, text)
        return defs.resolve_assets_def("split").partitions_def.get_partition_keys()

    assert names("{}\n") == ["ml-latest-small"]
    assert names("default_dataset: ml-100k\ndatasets: {ml-1m: }\nsweep: {datasets: [synthetic-1m]}\n") == [
        "ml-100k", "ml-1m", "synthetic-1m"]
    assert names("dataset_partitions: [ml-25m, synthetic-100k]\n") == ["ml-25m", "synthetic-100k"]
    with pytest.raises(ConfigError, match=r"dataset_partitions: expected a list of known dataset names"):
        names("dataset_partitions: [ml-2m]\n")


def test_download_max_bytes_reaches_the_archive_step(tmp_path, instance):
    rows = [f"{u},{i},{(u + i) % 5 + 1},{1_000_000_000 + u * 100 + i}" for u in range(1, 40) for i in range(1, 40)]
    path = _csv_zipless(tmp_path, rows)
    size = path.stat().st_size
    body = """
validation: {{min_rows: 100}}
download: {{max_bytes: {cap}}}
datasets:
  mine:
    url: {url}
    format: csv
    columns: {{user_id: uid, item_id: iid, rating: stars, timestamp: ts}}
    rating_scale: [1, 5]
    rating_step: 1
"""
    project, defs = make_project(tmp_path, body.format(cap=size - 1, url=path.as_uri()))
    result = run(defs, "data_job", "mine", instance)
    assert not result.success
    first = failure_text(result).splitlines()[0]
    assert first == (f"DownloadError: mine: {path.as_uri()} is {size} bytes; the download size cap "
                     f"(download.max_bytes) is {size - 1} bytes; nothing was kept (raise "
                     f"download.max_bytes if the file really is that large)")
    assert not (project.cache_dir / "mine").exists() and latest(instance, "ratings", "mine") is None
    _, defs = make_project(tmp_path, body.format(cap=size, url=path.as_uri()))
    assert run(defs, "data_job", "mine", instance).success
