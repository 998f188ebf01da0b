"""Synthetic datasets: sizes, determinism, planted structure."""

from __future__ import annotations

import csv
import io
import re
import zipfile

import numpy as np
import polars as pl
import pytest

from flexmf_assets.datasets.catalog import builtin_catalog
from flexmf_assets.datasets.parsing import ITEMS_SCHEMA, RATINGS_SCHEMA, load_dataset
from flexmf_assets.datasets.synthetic import (
    GENRES,
    SYNTHETIC_DATASETS,
    SyntheticConfig,
    generate,
    planted_truth,
    synthetic_fingerprint,
    write_movielens_archive,
)
from flexmf_assets.errors import ConfigError


@pytest.fixture(scope="module")
def small():
    return generate("synthetic-100k")


def test_synthetic_100k_shape_and_schema(small):
    r = small.ratings
    assert dict(r.schema) == RATINGS_SCHEMA
    assert r.height == 100_000
    assert r["user_id"].n_unique() == 610
    assert 8_500 <= r["item_id"].n_unique() <= 9_742
    assert r["user_id"].min() == 1 and r["user_id"].max() == 610
    assert r.select(_pairs=pl.struct("user_id", "item_id").n_unique())["_pairs"][0] == r.height
    assert r.null_count().sum_horizontal()[0] == 0
    per_user = r.group_by("user_id").len()["len"]
    assert per_user.min() >= 20
    assert per_user.max() <= int(0.4 * 9_742)
    assert dict(small.items.schema) == ITEMS_SCHEMA and small.items.height == 9_742
    assert small.items["title"][0] == "Item 1"


def test_ratings_on_scale_and_step(small):
    ratings = small.ratings["rating"].to_numpy()
    assert ratings.min() >= 0.5 and ratings.max() <= 5.0
    assert np.all(np.isclose(ratings * 2, np.round(ratings * 2)))
    assert 3.2 < ratings.mean() < 4.0


def test_timestamps_between_2000_and_2020(small):
    ts = small.ratings["timestamp"]
    assert ts.min() >= 946_684_800 and ts.max() < 1_609_459_200


def test_power_law_popularity(small):
    counts = np.sort(small.ratings.group_by("item_id").len()["len"].to_numpy())[::-1]
    top_share = counts[: len(counts) // 100].sum() / counts.sum()
    assert top_share > 0.08  # top 1% of items carry far more than 1% of the ratings
    users = np.sort(small.ratings.group_by("user_id").len()["len"].to_numpy())
    assert users[-1] > 5 * np.median(users)  # heavy users far above the median


def test_deterministic_and_seed_sensitive(small):
    again = generate("synthetic-100k")
    assert again.ratings.equals(small.ratings)
    other = generate("synthetic-100k", seed=7)
    assert not other.ratings.equals(small.ratings)
    assert other.ratings.height == 100_000


def test_planted_truth_explains_ratings(small):
    truth = planted_truth("synthetic-100k")
    floor = truth.rmse(small.ratings)
    assert abs(floor - truth.noise_rmse()) < 0.05
    # a bias-free guess is much worse than the truth
    r = small.ratings["rating"].to_numpy()
    assert np.sqrt(np.mean((r - r.mean()) ** 2)) > floor + 0.2
    # other seed, other truth
    assert not np.allclose(planted_truth("synthetic-100k", seed=7).user_bias, truth.user_bias)


def test_selection_prefers_high_true_scores():
    cfg = SyntheticConfig(n_users=200, n_items=2_000, n_ratings=20_000, seed=3)
    picky = generate(cfg).ratings["rating"].mean()
    plain = generate(SyntheticConfig(**{**cfg.to_dict(), "selection_strength": 0.0})).ratings["rating"].mean()
    assert picky > plain + 0.1


def test_preset_sizes_match_promise():
    expect = {"synthetic-100k": (100_000, 610, 9_742), "synthetic-1m": (1_000_000, 6_040, 3_706),
              "synthetic-10m": (10_000_000, 69_878, 10_677), "synthetic-25m": (25_000_000, 162_541, 59_047)}
    for name, (n, users, items) in expect.items():
        cfg = SYNTHETIC_DATASETS[name]
        assert (cfg.n_ratings, cfg.n_users, cfg.n_items) == (n, users, items)
        assert cfg.n_users * cfg.min_user_ratings <= cfg.n_ratings <= cfg.n_users * cfg.user_cap


def test_medium_config_reaches_exact_size():
    cfg = SyntheticConfig(n_users=1_000, n_items=800, n_ratings=150_000, seed=1)  # dense: up to 320/user
    r = generate(cfg).ratings
    assert r.height == 150_000
    assert r.group_by("user_id").len()["len"].max() <= 320


def test_bad_configs():
    with pytest.raises(ConfigError, match="n_ratings"):
        SyntheticConfig(n_users=100, n_items=50, n_ratings=1_000)  # 100 users * 20 items cap
    with pytest.raises(ConfigError, match="noise_sd"):
        SyntheticConfig(n_users=10, n_items=500, n_ratings=1_000, noise_sd=-1)
    with pytest.raises(ConfigError, match="synthetic-100k"):
        generate("synthetic-100")


# -- write_movielens_archive: the ml-latest-small layout --------------------------------------------------

TINY = SyntheticConfig(n_users=60, n_items=400, n_ratings=3_000, seed=5)
MEMBERS = ["movies.csv", "ratings.csv", "tags.csv", "README.txt", "links.csv"]  # GroupLens' order


def _csv(zf: zipfile.ZipFile, name: str) -> list[dict[str, str]]:
    with zf.open(name) as fh:
        return list(csv.DictReader(io.TextIOWrapper(fh, "utf-8", newline="")))


def test_movielens_archive_has_the_ml_latest_small_layout(tmp_path):
    path = write_movielens_archive(tmp_path / "sub" / "ml-demo.zip", TINY)
    assert path == tmp_path / "sub" / "ml-demo.zip"
    assert [p.name for p in path.parent.iterdir()] == ["ml-demo.zip"]  # no temporary file left behind
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["ml-demo/"] + [f"ml-demo/{m}" for m in MEMBERS]
        raw = zf.read("ml-demo/ratings.csv")
        assert raw.startswith(b"userId,movieId,rating,timestamp\r\n") and raw.count(b"\r\n") == 3_001
        assert zf.read("ml-demo/movies.csv").startswith(b"movieId,title,genres\r\n")
        movies = _csv(zf, "ml-demo/movies.csv")
        tags = _csv(zf, "ml-demo/tags.csv")
        links = _csv(zf, "ml-demo/links.csv")
        readme = zf.read("ml-demo/README.txt").decode()
    assert [int(m["movieId"]) for m in movies] == list(range(1, 401))
    assert all(re.fullmatch(r"Movie \d+(, The)? \(\d{4}\)", m["title"]) for m in movies)
    assert movies[9]["title"].startswith("Movie 10, The (")  # a comma: quoted in the file, as in MovieLens
    genres = [m["genres"] for m in movies]
    assert all(g == "(no genres listed)" or set(g.split("|")) <= set(GENRES) for g in genres)
    assert all(g.split("|") == sorted(g.split("|")) for g in genres)
    assert len({g for g in genres if "|" in g}) > 20  # multi-genre movies, many combinations
    assert list(tags[0]) == ["userId", "movieId", "tag", "timestamp"] and len(tags) == 3_000 // 27
    assert [list(links[0]), links[0]["imdbId"]] == [["movieId", "imdbId", "tmdbId"], "0110001"]
    assert len(links) == 400
    assert "SYNTHETIC" in readme and "3000 ratings" in readme and "seed=5" in readme

    # the built-in ml-latest-small format reads exactly generate()'s ratings, and every movie
    data = load_dataset(builtin_catalog(env={})["ml-latest-small"], path, tmp_path / "work")
    assert data.ratings.equals(generate(TINY).ratings)
    assert data.items["title"].to_list() == [m["title"] for m in movies]
    rated = set(zip(data.ratings["user_id"].to_list(), data.ratings["item_id"].to_list()))
    assert {(int(t["userId"]), int(t["movieId"])) for t in tags} <= rated  # tags on rated movies


def test_movielens_archive_is_reproducible_and_replaced_atomically(tmp_path):
    a = write_movielens_archive(tmp_path / "a.zip", TINY)
    b = write_movielens_archive(tmp_path / "b.zip", TINY, folder="a")
    assert a.read_bytes() == b.read_bytes()  # same config and folder: same bytes
    assert a.stat().st_mode & 0o777 == 0o644
    before = a.read_bytes()
    write_movielens_archive(a, TINY, seed=6)  # replaces the file
    assert a.read_bytes() != before
    with zipfile.ZipFile(a) as zf:
        assert zf.testzip() is None and zf.namelist()[0] == "a/"
    # a bad preset fails before anything is written: the existing archive is untouched
    now = a.read_bytes()
    with pytest.raises(ConfigError, match="synthetic preset 'nope' is unknown"):
        write_movielens_archive(a, "nope")
    assert a.read_bytes() == now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "b.zip"]


def test_preset_archive_is_what_tests_conftest_serves(tmp_path):
    """tests/conftest.py serves this archive without the shared MovieLens file and asserts these numbers."""
    from conftest import SYNTHETIC

    from flexmf_assets.datasets.validation import validate_ratings

    path = write_movielens_archive(tmp_path / "ml-latest-small.zip", SYNTHETIC)
    data = load_dataset(builtin_catalog(env={})["ml-latest-small"], path, tmp_path / "work")
    r = data.ratings
    assert (r.height, r["user_id"].n_unique(), data.items.height) == (100_000, 610, 9_742)
    assert sorted(r["rating"].unique().to_list()) == [x / 2 for x in range(1, 11)]  # 0.5..5 by 0.5
    assert r.group_by("user_id").len()["len"].min() >= 20
    report = validate_ratings(r)
    assert report.success, report.summary()


def test_synthetic_fingerprint_is_stable():
    """The archive asset's data version of a synthetic dataset: unchanged since it moved out of defs/."""
    assert {preset: synthetic_fingerprint(preset) for preset in SYNTHETIC_DATASETS} == {
        "synthetic-100k": "81482009e19e77505ec37121c4113bc2c33f68070e793297490514e33425812d",
        "synthetic-1m": "d891b7d876daf689b597812d6a815b9e3bc771c6f6c0a80b2eb137378cd1ee5d",
        "synthetic-10m": "60a7271718a479187b144ed8ac5ba09c0d93ef1046e38be092e6400758a6388b",
        "synthetic-25m": "0c37b42f3338744bd066a5ebe373c04c6a870e9f03c28e491eaccbdc63cc7ec8",
    }
    with pytest.raises(ConfigError, match=r"synthetic preset 'synthetic-1k' is unknown"):
        synthetic_fingerprint("synthetic-1k")
