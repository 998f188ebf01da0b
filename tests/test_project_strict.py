"""flexmf.yaml strictness (issue 14, items 3, 14, 16): every field's type and range checked at load
with one line naming the field, hostile YAML (alias bombs, deep nesting) and huge grids refused
before they cost anything."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flexmf_assets.datasets.download import fetch
from flexmf_assets.errors import ConfigError, DownloadError
from flexmf_assets.config_file import SCHEMA, valid_cron
from flexmf_assets.project import MAX_GRID_SETS, expand_grid, load_project

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "flexmf.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(ConfigError) as info:
        load_project(write(tmp_path, text), env={"FLEXMF_DATA_DIR": str(tmp_path / "data")})
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# (flexmf.yaml text, fragment of the one-line error). Each was accepted (and misread), or failed
# with a raw TypeError / ValueError / Dagster error, or with a wrong message, before the strict schema.
BAD_CONFIGS = [
    # item 3: a string of roots was split into characters, so "/" became an allowed root
    ('download: {allowed_file_roots: "/srv/data"}',
     "flexmf.yaml download.allowed_file_roots: expected a list of paths, got the string '/srv/data'"),
    ("download: {allowed_file_roots: [1]}", "download.allowed_file_roots: expected a list of paths, got a list [1]"),
    ('download: {timeout: "abc"}', "download.timeout: expected a positive number, got the string 'abc'"),
    ("download: {timeout: 0}", "download.timeout: expected a positive number, got the integer 0"),
    ("download: {timeout: .inf}", "download.timeout: expected a positive number, got the number inf"),
    ("download: {timeout: null}", "download.timeout: expected a positive number, got null"),
    ("download: {retries: -1}", "download.retries: expected an integer >= 0, got the integer -1"),
    ("download: {retries: true}", "download.retries: expected an integer >= 0, got the boolean true"),
    ("download: {retries: 2.5}", "download.retries: expected an integer >= 0, got the number 2.5"),
    ("download: {max_bytes: 0}", "download.max_bytes: expected a positive integer (bytes) or null, got the integer 0"),
    # item 3: quoted "false" / "no" were read as true
    ('device: {allow_fallback: "false"}',
     "device.allow_fallback: expected true or false (a YAML boolean, unquoted), got the string 'false'"),
    ('schedule: {enabled: "no"}', "schedule.enabled: expected true or false (a YAML boolean, unquoted), got the string 'no'"),
    ('device: {threads: "two"}', "device.threads: expected a positive integer or null, got the string 'two'"),
    ("device: {threads: 0}", "device.threads: expected a positive integer or null, got the integer 0"),
    ("device: {matmul_precision: low}", "device.matmul_precision: expected one of highest, high, medium, got the string 'low'"),
    ("device: {device: 1}", "device.device: expected a device name (a string: auto, cpu, cuda, cuda:N or mps), got the integer 1"),
    ("device: {device: gpu}", "flexmf.yaml device.device: 'gpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    # item 16: bad cron / time zone were raw Dagster errors at definitions load
    ('schedule: {cron: "every monday"}', "schedule.cron: expected a 5-field cron string such as '0 3 * * 1' (minute hour day month weekday), got the string 'every monday'"),
    ('schedule: {cron: "0 3 * * 8"}', "schedule.cron: expected a 5-field cron string"),
    ('schedule: {cron: "0 0 30 2 *"}', "schedule.cron: expected a 5-field cron string"),
    ('schedule: {cron: ["0 3 * * 1"]}', "schedule.cron: expected a 5-field cron string such as '0 3 * * 1' (minute hour day month weekday), got a list ['0 3 * * 1']"),
    ("schedule: {timezone: Mars/Olympus}", "schedule.timezone: expected an IANA time zone name such as 'UTC' or 'Europe/Paris', got the string 'Mars/Olympus'"),
    ("schedule: {timezone: ../../etc/passwd}", "schedule.timezone: expected an IANA time zone name"),
    ("default_dataset: [x]", "flexmf.yaml default_dataset: expected a dataset name (a string), got a list ['x']"),
    ("default_dataset: null", "default_dataset: expected a dataset name (a string), got null"),
    # item 16: a string said "unknown dataset(s) []"
    ("sweep: {datasets: ml-latest-small}", "sweep.datasets: expected a list of dataset names, got the string 'ml-latest-small'"),
    ("sweep: {datasets: [ml-latest-smal]}", "sweep.datasets: unknown dataset(s) 'ml-latest-smal' (did you mean 'ml-latest-small'?)"),
    ("split: {test_fraction: 1.5}", "split.test_fraction: expected a number in (0, 1), got the number 1.5"),
    ('split: {validation_fraction: "0.1"}', "split.validation_fraction: expected a number in [0, 1), got the string '0.1'"),
    ("split: {seed: -1}", "split.seed: expected an integer >= 0, got the integer -1"),
    ("split: {seed: 4.2}", "split.seed: expected an integer >= 0, got the number 4.2"),
    ("split: {protocol: RANDOM}", "split.protocol: expected one of random, user_holdout, temporal, got the string 'RANDOM'"),
    ("split: {cutoff: 2020-01-01}", "split.cutoff: expected an integer or null, got date datetime.date(2020, 1, 1)"),
    ("split: {seeed: 1}", "flexmf.yaml split: unknown key 'seeed' (did you mean 'seed'?)"),
    # cross-field rules of the split now run at load, not when the split asset runs
    ("split: {protocol: temporal}", "flexmf.yaml split: SplitConfig.cutoff: the temporal protocol needs exactly one of cutoff"),
    ('recommendations: {n: "20"}', "recommendations.n: expected a positive integer, got the string '20'"),
    ("validation: {min_rows: true}", "validation.min_rows: expected a positive integer or null, got the boolean true"),
    ('download: "fast"', "flexmf.yaml download: expected a mapping, got the string 'fast'"),
    ("datasets: [a, b]", "flexmf.yaml datasets: expected a mapping, got a list ['a', 'b']"),
]


@pytest.mark.parametrize("text, fragment", BAD_CONFIGS, ids=[t for t, _ in BAD_CONFIGS])
def test_every_field_is_type_checked_in_one_line(tmp_path, text, fragment):
    assert fragment in load_error(tmp_path, text + "\n")


def test_good_values_of_every_kind_load(tmp_path):
    text = """
default_dataset: ml-100k
split: {protocol: temporal, cutoff: 880000000, validation_fraction: 0.0, seed: 0}
download: {timeout: 2.5, retries: 0, allowed_file_roots: [".", "/srv/data"], max_bytes: 10000000000}
device: {device: "cuda:1", threads: null, matmul_precision: medium, allow_fallback: false}
recommendations: {n: 5}
validation: {min_rows: null}
sweep: {datasets: [ml-100k, ml-1m]}
schedule: {cron: "30 4 1-7 * mon", timezone: Europe/Paris, enabled: false}
"""
    project = load_project(write(tmp_path, text), env={})
    assert project.device["allow_fallback"] is False and project.schedule["enabled"] is False
    assert project.device["device"] == "cuda:1" and project.download["max_bytes"] == 10**10
    assert project.split_config().cutoff == 880000000
    assert project.allowed_file_roots() == [tmp_path.resolve(), Path("/srv/data")]
    assert project.swept_datasets == ("ml-100k", "ml-1m") and project.recommendations_n == 5
    assert project.min_rows is None


def test_a_string_of_roots_no_longer_opens_the_filesystem_and_an_empty_list_allows_none(tmp_path):
    """A string was split into characters: "/" became a root and any file:// URL was read."""
    secret = tmp_path / "elsewhere" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("password,hunter2\n")
    assert "allowed_file_roots" in load_error(tmp_path, 'download: {allowed_file_roots: "/srv/data"}\n')
    # an empty list means no local path at all (it used to mean "any")
    project = load_project(write(tmp_path, "download: {allowed_file_roots: []}\n"), env={})
    assert project.allowed_file_roots() == []
    with pytest.raises(DownloadError, match="outside the allowed roots") as info:
        fetch(secret.as_uri(), tmp_path / "cache", name="x", allowed_roots=project.allowed_file_roots())
    assert "hunter2" not in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.csv"))


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``description: &a8 [&a7 [...], *a7, *a7, ...]``: ``width ** levels`` strings once expanded."""
    node = "&a0 [" + ", ".join(["lol"] * width) + "]"
    for level in range(1, levels):
        node = f"&a{level} [{node}, " + ", ".join([f"*a{level - 1}"] * (width - 1)) + "]"
    return f"datasets:\n  x:\n    url: http://127.0.0.1:1/x.zip\n    format: ml-1m\n    description: {node}\n"


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases (387M strings). The old loader built the shared structure, then
    ``str(description)`` expanded it: loading hung past 60 s and filled memory. Now refused at once."""
    message = load_error(tmp_path, alias_bomb())
    assert message == f"{tmp_path / 'flexmf.yaml'}: YAML aliases expand to more than 100,000 values (an alias bomb?); refused"


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path):
    text = """
explicit_hparams:
  small: &small {embedding_size: 16, epochs: 5}
  again: *small
  longer: {<<: *small, epochs: 9}
"""
    sets = load_project(write(tmp_path, text), env={}).hparam_sets("explicit")
    assert sets["again"] == {"embedding_size": 16, "epochs": 5}
    assert sets["longer"] == {"embedding_size": 16, "epochs": 9}


@pytest.mark.parametrize("content, fragment", [
    # deep "[[[": the old scanner is quadratic (0.5 s at 500 levels, 9 s at 5,000, then a raw
    # RecursionError); 50,000 levels would take about 15 minutes. Now refused at level 101.
    ("split: " + "[" * 50000 + "]" * 50000 + "\n", "flexmf.yaml: YAML line 1: nested deeper than 100 levels; refused"),
    ("".join(" " * i + "a:\n" for i in range(200)), "flexmf.yaml: YAML line 100: nested deeper than 100 levels; refused"),
    (b"default_dataset: caf\xe9\n", "flexmf.yaml: cannot read the config file ('utf-8' codec can't decode"),  # was UnicodeDecodeError
    ("a: 1\n---\nb: 2\n", "not valid YAML (expected a single document in the stream but found another document)"),
    ("x: !!python/object/apply:os.system [echo hi]\n", "not valid YAML (could not determine a constructor"),
])
def test_unreadable_or_hostile_files_are_one_line(tmp_path, content, fragment):
    assert fragment in load_error(tmp_path, content)


def test_config_path_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "conf").mkdir()
    with pytest.raises(ConfigError, match=r"conf: cannot read the config file \(.*Is a directory"):
        load_project(tmp_path / "conf", env={})


def test_huge_grid_is_refused_before_expanding(tmp_path):
    """5 axes x 20 values (3.2M sets): the old code expanded every set and hung. The product is now
    computed first and refused."""
    axes = ["embedding_size", "learning_rate", "epochs", "regularization", "batch_size"]
    text = "explicit_grid:\n" + "".join(f"  {a}: [{', '.join(str(i + 1) for i in range(20))}]\n" for a in axes)
    message = load_error(tmp_path, text)
    assert message == ("flexmf.yaml explicit_grid: 20 x 20 x 20 x 20 x 20 values make 3,200,000 sets, "
                       f"over the limit of {MAX_GRID_SETS:,}; list fewer values or split the grid")
    with pytest.raises(ConfigError, match="10 x 101 values make 1,010 sets"):
        expand_grid("g", {"embedding_size": list(range(1, 11)), "epochs": list(range(1, 102))})
    # the limit itself is allowed
    assert len(expand_grid("g", {"embedding_size": list(range(1, 11)), "epochs": list(range(1, 101))})) == 1000


def test_shipped_and_documented_configs_pass_the_schema():
    from flexmf_assets.project import validate_project

    validate_project(load_project(REPO / "flexmf.yaml", env={}))


def test_schema_matches_the_classes_that_use_it():
    from flexmf_assets.datasets.split import SplitConfig
    from flexmf_assets.flexmf.device import DeviceSettings

    assert set(SCHEMA["split"]) == set(SplitConfig.field_names())
    assert set(SCHEMA["device"]) == set(DeviceSettings.__dataclass_fields__)


def test_every_schema_field_is_in_the_configuration_reference():
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text.split("## Types and limits", 1)[1].split("\n## ", 1)[0]
    for section, rules in SCHEMA.items():
        for key, rule in rules.items():
            name = f"{section}.{key}" if section else key
            row = next((line for line in table.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{name} is missing from docs/configuration.md 'Types and limits'"
            assert rule.expected in row, f"{name}: the row does not say {rule.expected!r}"


# cron strings in every syntax Dagster knows, and mistakes; valid_cron must agree with Dagster
CRONS = [
    "0 3 * * 1", "@daily", "@hourly", "@weekly", "@monthly", "@yearly", "@annually", "@midnight",
    "*/15 * * * *", "0 0 1 1 *", "0 3 * * mon", "0 3 * * MON-FRI", "0 3 * jan *", "0 3 * * 7", "0 3 * * 5-1",
    "0 0 29 2 *", "0 0 L * *", "0 0 * * 5#2", "0 0 * * L5", "0 0 ? * *", "0,15,30 * * * *", "5/10 * * * *",
    "1-5/2 * * * *", "0 3 * * 1,3-5", "*/60 * * * *", "0\t3 * * 1",
    "@reboot", "0 3 * * 8", "60 3 * * *", "0 24 * * *", "0 0 0 * *", "0 0 32 * *", "0 0 * 13 *",
    "*/0 * * * *", "0 0 30 2 *", "0 0 31 feb *", "0 3 * *", "0 3 * * * *", "every monday", "", "0 3 * * SUNDAY",
    "H * * * *", "-1 * * * *", "0 3 * * ,1", "0 3 * * 1--2", "*/5-10 * * * *", "0 0 * * 1L", "0 0 15W * *",
    "0 0 ?/2 * *", "0 0 *,? * *", "0 0 * * L3,mon", "0 0 30/100 2 *",
]


@pytest.mark.parametrize("cron", CRONS)
def test_cron_check_agrees_with_dagster(cron):
    from dagster._utils.schedules import is_valid_cron_string

    assert valid_cron(cron) is is_valid_cron_string(cron)


def test_cron_check_never_accepts_what_dagster_refuses():
    """Random strings from cron's alphabet. valid_cron may be stricter (it refuses `L` inside lists
    and ranges, `0` in day/month ranges, non-ASCII digits) but never lets a schedule fail to load."""
    from dagster._utils.schedules import is_valid_cron_string

    atoms = ["*", "?", "L", "l", "0", "1", "2", "5", "7", "8", "12", "13", "23", "24", "29", "30", "31", "32",
             "59", "60", "jan", "feb", "FEB", "mon", "sun", "L3", "5#2", "5#6", "W", "1W"]
    rng = random.Random(14)

    def item() -> str:
        text = rng.choice(atoms)
        if rng.random() < 0.3:
            text += "-" + rng.choice(atoms)
        if rng.random() < 0.3:
            text += "/" + rng.choice(["0", "1", "2", "15", "60", "x", ""])
        return text

    accepted = 0
    for _ in range(5000):  # each field: a good one ("0 3 1 * mon") or a random list of items
        cron = " ".join(good if rng.random() < 0.6 else ",".join(item() for _ in range(rng.choice([1, 1, 2])))
                        for good in ("0", "3", "1", "*", "mon"))
        if valid_cron(cron):
            accepted += 1
            assert is_valid_cron_string(cron), cron
    assert accepted > 100  # the sample exercises the accepting paths too
