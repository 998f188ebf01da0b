"""flexmf.yaml loading: datasets, mirror, typos, hparams sets, grids, override keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexmf_assets.datasets.catalog import GROUPLENS_BASE_URL
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import expand_grid, load_project

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flexmf.yaml"
    path.write_text(text)
    return path


def test_repo_config_loads_and_every_set_builds():
    from flexmf_assets.project import validate_project

    project = load_project(REPO / "flexmf.yaml", env={})
    assert project.default_dataset == "ml-latest-small"
    assert {"default", "bpr", "warp"} <= set(project.hparam_sets("implicit"))
    assert "default" in project.hparam_sets("explicit")
    assert project.datasets["ml-latest-small"].url == GROUPLENS_BASE_URL + "ml-latest-small.zip"
    validate_project(project)


def test_missing_default_file_means_builtin_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = load_project(env={})
    assert project.path is None
    assert "ml-1m" in project.datasets and "synthetic-1m" in project.datasets
    assert project.data_dir == (tmp_path / "data").resolve()


def test_env_config_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="FLEXMF_CONFIG.*does not exist"):
        load_project(env={"FLEXMF_CONFIG": str(tmp_path / "nope.yaml")})


def test_data_dir_env(tmp_path):
    path = write(tmp_path, "default_dataset: ml-100k\n")
    project = load_project(path, env={"FLEXMF_DATA_DIR": str(tmp_path / "state")})
    assert project.data_dir == (tmp_path / "state").resolve()
    assert project.cache_dir == project.data_dir / "cache"


def test_mirror_env_and_sums(tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("e2c21c85a055577ec52cf9076494a166108a15fca12261f140387d20decfffb5  ml-latest-small.zip\n")
    env = {"FLEXMF_MIRROR_URL": "http://127.0.0.1:9/ml/", "FLEXMF_MIRROR_SHA256SUMS": str(sums)}
    project = load_project(write(tmp_path, "{}\n"), env=env)
    small = project.dataset("ml-latest-small")
    assert small.url == "http://127.0.0.1:9/ml/ml-latest-small.zip"
    assert small.sha256.startswith("e2c21c85") and small.size is None and small.builtin
    # entries the sums file does not list keep the catalog checksum
    assert project.dataset("ml-1m").sha256.startswith("a6898adb")
    assert project.dataset("ml-1m").url == "http://127.0.0.1:9/ml/ml-1m.zip"


def test_user_datasets(tmp_path):
    text = """
datasets:
  mine:
    url: http://127.0.0.1:1/r.csv
    format: csv
    columns: {user_id: u, item_id: i, rating: r}
    rating_scale: [1, 10]
    rating_step: 1
  mirror-small:
    url: file:///tmp/ml-latest-small.zip
    format: ml-latest-small
"""
    project = load_project(write(tmp_path, text), env={})
    mine = project.dataset("mine")
    assert mine.format == "csv" and mine.columns == {"user_id": "u", "item_id": "i", "rating": "r"}
    assert mine.rating_scale == (1.0, 10.0) and not mine.builtin
    assert project.dataset("mirror-small").rating_step == 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("default_dataset: ml-latest-small\nsplt: {}\n", r"unknown key 'splt' \(did you mean 'split'\?\)"),
        ("default_dataset: ml-lates-small\n", r"default_dataset: 'ml-lates-small' is not a known dataset \(did you mean 'ml-latest-small'"),
        ("datasets:\n  x: {url: ftp://h/x.zip, format: ml-1m}\n", r"datasets.x.url: must be an http://, https:// or file:// URL"),
        ("datasets:\n  x: {url: http://h/x.zip, format: ml-1mm}\n", r"datasets.x.format: 'ml-1mm' is not one of .*did you mean 'ml-1m'"),
        ("datasets:\n  x: {url: http://h/x.zip, format: ml-1m, sha256: abc}\n", r"datasets.x.sha256: expected 64 hex digits"),
        ("datasets:\n  x: {url: http://h/x.csv, format: csv}\n", r"datasets.x.columns: format 'csv' needs a column mapping"),
        ("datasets:\n  x: {url: http://h/x.zip, format: ml-1m, sha265: a}\n", r"unknown key 'sha265' \(did you mean 'sha256'\?\)"),
        ("recommendations: {n: 0}\n", r"recommendations.n: expected a positive integer"),
        ("sweep: {datasets: [nope]}\n", r"sweep.datasets: unknown dataset"),
        ("device: {devise: cpu}\n", r"unknown key 'devise' \(did you mean 'device'\?\)"),
        ("split: [1, 2\n", r"line \d+: not valid YAML"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_project(write(tmp_path, text), env={})
    assert "\n" not in str(info.value)


def test_unknown_dataset_name_suggests(tmp_path):
    project = load_project(write(tmp_path, "{}\n"), env={})
    with pytest.raises(ConfigError, match=r"dataset 'ml-10k' is not in the catalog \(did you mean 'ml-100k'"):
        project.dataset("ml-10k")


def test_grid_expands_to_named_sets_that_parse_as_keys():
    sets = expand_grid("g", {"base": {"epochs": 5}, "embedding_size": [32, 64, 128], "learning_rate": [0.01, 0.03]})
    assert len(sets) == 6
    assert sets["embedding_size=64;learning_rate=0.03"] == {"epochs": 5, "embedding_size": 64, "learning_rate": 0.03}
    with pytest.raises(ConfigError, match="g.embedding_size: expected a non-empty list"):
        expand_grid("g", {"embedding_size": 32})


def test_hparams_resolution_named_set_override_key_and_errors(tmp_path):
    text = """
explicit_hparams:
  default: {epochs: 7}
  big: {embedding_size: 128}
explicit_grid:
  embedding_size: [16, 32]
"""
    project = load_project(write(tmp_path, text), env={})
    assert project.resolve_hparams("explicit", "big").embedding_size == 128
    grid = project.resolve_hparams("explicit", "embedding_size=16")
    assert grid.embedding_size == 16
    # UI-style key: overrides of the default set
    ui = project.resolve_hparams("explicit", "embedding_size=24;learning_rate=0.02")
    assert (ui.embedding_size, ui.learning_rate, ui.epochs) == (24, 0.02, 7)
    with pytest.raises(ConfigError, match=r"unknown field 'embeding_size' \(did you mean 'embedding_size'\?\); valid .*learning_rate"):
        project.resolve_hparams("explicit", "embeding_size=3")
    with pytest.raises(ConfigError, match=r"'nonsense' is not of the form field=value; valid"):
        project.resolve_hparams("explicit", "nonsense")
    with pytest.raises(ConfigError, match=r"embedding_size"):
        project.resolve_hparams("explicit", "embedding_size=-4")
