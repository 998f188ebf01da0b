"""Dataset entries of flexmf.yaml (issue 14, items 8, 15, 16): one naming rule, strict field types,
finite ordered rating scales, complete column mappings; each refusal is one ConfigError line."""

from __future__ import annotations

import pytest

from flexmf_assets.datasets.catalog import (
    ARCHIVE_FORMATS,
    ARCHIVE_LAYOUTS,
    PLAIN_FORMATS,
    SYNTHETIC_FORMAT,
    USER_FORMATS,
    builtin_catalog,
    check_dataset_name,
    user_dataset,
)
from flexmf_assets.errors import ConfigError
from flexmf_assets.project import load_project

CSV = {"url": "file:///srv/r.csv", "format": "csv", "columns": {"user_id": "u", "item_id": "i", "rating": "r"}}
ZIP = {"url": "https://example.org/ml.zip", "format": "ml-latest-small"}


def _refused(call) -> str:
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.isprintable()
    return message


NAME_RULE = ("use 1 to 64 characters among letters, digits, '.', '_' and '-', starting with a letter or "
             "digit, without '..'")


@pytest.mark.parametrize("name", ["a/b", "..", "a|b", "a,b", "a;b", "a b", "", ".hidden", "-x", "a..b",
                                  "x" * 65, "ü", "a\\b", "a\nb", "a:b"])
def test_invalid_dataset_names_are_refused_when_the_entry_is_built(name):
    message = _refused(lambda: user_dataset(name, CSV))
    assert message == f"flexmf.yaml datasets: invalid dataset name {name!r}: {NAME_RULE}"


@pytest.mark.parametrize("name", ["mine", "ml-1m", "My_Data.v2", "100k", "x" * 64])
def test_valid_dataset_names(name):
    assert user_dataset(name, CSV).name == name


def test_every_builtin_name_follows_the_rule():
    for name in builtin_catalog(env={}):
        assert check_dataset_name(name) == name


@pytest.mark.parametrize("key", ["a/b", "..", "a|b", "a,b"])
def test_bad_names_are_refused_when_the_file_loads(tmp_path, key):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(f'datasets:\n  "{key}": {{url: "file:///srv/r.csv", format: ml-latest-small}}\n')
    assert _refused(lambda: load_project(cfg, env={})) == \
        f"flexmf.yaml datasets: invalid dataset name {key!r}: {NAME_RULE}"


# field: (entry overrides, expected message after "flexmf.yaml datasets.mine.")
BAD_FIELDS = {
    "has_header string": ({"has_header": "false"},
                          "has_header: expected a boolean (true or false, unquoted), got str 'false'"),
    "has_header int": ({"has_header": 0}, "has_header: expected a boolean (true or false, unquoted), got int 0"),
    "has_header null": ({"has_header": None},
                        "has_header: expected a boolean (true or false, unquoted), got null None"),
    "scale infinite": ({"rating_scale": [float("-inf"), float("inf")]},
                       "rating_scale: expected [low, high], two finite numbers with low < high, got [-inf, inf]"),
    "scale nan": ({"rating_scale": [float("nan"), 5]},
                  "rating_scale: expected [low, high], two finite numbers with low < high, got [nan, 5]"),
    "scale reversed": ({"rating_scale": [5, 1]},
                       "rating_scale: expected [low, high], two finite numbers with low < high, got [5, 1]"),
    "scale boolean": ({"rating_scale": [True, 5]},
                      "rating_scale: expected [low, high], two finite numbers with low < high, got [True, 5]"),
    "scale string": ({"rating_scale": "1,5"},
                     "rating_scale: expected [low, high], two finite numbers with low < high, got '1,5'"),
    "step nan": ({"rating_step": float("nan")}, "rating_step: expected a finite positive number or null, got nan"),
    "step inf": ({"rating_step": float("inf")}, "rating_step: expected a finite positive number or null, got inf"),
    "step string": ({"rating_step": "0.5"}, "rating_step: expected a finite positive number or null, got '0.5'"),
    "step boolean": ({"rating_step": True}, "rating_step: expected a finite positive number or null, got True"),
    "separator int": ({"separator": 9},
                      "separator: expected a non-empty string without quotes or line breaks, got int 9"),
    "separator newline": ({"separator": "\n"},
                          "separator: expected a non-empty string without quotes or line breaks, got str '\\n'"),
    "separator empty": ({"separator": ""},
                        "separator: expected a non-empty string without quotes or line breaks, got str ''"),
    "format list": ({"format": ["csv"]}, None),
    "description int": ({"description": 42}, "description: expected a string, got int 42"),
    "columns list": ({"columns": ["u", "i", "r"]}, None),
    "columns empty": ({"columns": {}}, "columns: missing required columns 'user_id', 'item_id', 'rating' "
                                       "(user_id, item_id and rating are required, timestamp is optional)"),
    "columns incomplete": ({"columns": {"item_id": "i"}},
                           "columns: missing required columns 'user_id', 'rating' (user_id, item_id and rating "
                           "are required, timestamp is optional)"),
    "column not a string": ({"columns": {"user_id": 1, "item_id": "i", "rating": "r"}},
                            "columns.user_id: expected the name of a column of the file (a non-empty string), "
                            "got int 1"),
    "column empty": ({"columns": {"user_id": "", "item_id": "i", "rating": "r"}},
                     "columns.user_id: expected the name of a column of the file (a non-empty string), got str ''"),
    "column twice": ({"columns": {"user_id": "u", "item_id": "u", "rating": "r"}},
                     "columns: column 'u' is mapped to more than one canonical column"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_dataset_fields_have_strict_types(case):
    overrides, expected = BAD_FIELDS[case]
    message = _refused(lambda: user_dataset("mine", {**CSV, **overrides}))
    if expected is None:  # the message lists the valid choices
        field = next(iter(overrides))
        assert message.startswith(f"flexmf.yaml datasets.mine.{field}: "), message
    else:
        assert message == f"flexmf.yaml datasets.mine.{expected}"


def test_yaml_spellings_are_refused_at_load(tmp_path):
    cfg = tmp_path / "flexmf.yaml"
    for entry, expected in [
        ('has_header: "false"', "has_header: expected a boolean (true or false, unquoted), got str 'false'"),
        ("has_header: no", None),  # a YAML 1.1 boolean: accepted (False)
        ("rating_scale: [-.inf, .inf]", "rating_scale: expected [low, high], two finite numbers with low < high, "
                                        "got [-inf, inf]"),
        ("rating_scale: [.nan, 5]", "rating_scale: expected [low, high], two finite numbers with low < high, "
                                    "got [nan, 5]"),
        ("rating_step: .nan", "rating_step: expected a finite positive number or null, got nan"),
    ]:
        cfg.write_text("datasets:\n  mine:\n    url: file:///srv/r.csv\n    format: csv\n"
                       f"    columns: {{user_id: u, item_id: i, rating: r}}\n    {entry}\n")
        if expected is None:
            assert load_project(cfg, env={}).dataset("mine").has_header is False
        else:
            assert _refused(lambda: load_project(cfg, env={})) == f"flexmf.yaml datasets.mine.{expected}"


def test_valid_entries_keep_their_values():
    spec = user_dataset("mine", {**CSV, "separator": "::", "has_header": False, "rating_scale": [1, 10],
                                 "rating_step": 1, "description": None,
                                 "columns": {"user_id": "u", "item_id": "i", "rating": "r", "timestamp": "t"}})
    assert (spec.separator, spec.has_header, spec.rating_scale, spec.rating_step, spec.description) == \
        ("::", False, (1.0, 10.0), 1.0, "")
    assert spec.columns == {"user_id": "u", "item_id": "i", "rating": "r", "timestamp": "t"}
    archive = user_dataset("ml-copy", ZIP)
    assert archive.rating_scale == (0.5, 5.0) and archive.rating_step == 0.5 and archive.columns is None


def test_formats_and_layouts_are_named_for_what_they_hold():
    """Layouts are keyed by layout name, formats by what an entry writes; a spec finds its layout."""
    catalog = builtin_catalog(env={})
    assert not set(ARCHIVE_LAYOUTS) & set(catalog)  # a layout name is not a dataset name
    assert all(any(layout is known for known in ARCHIVE_LAYOUTS.values()) for layout in ARCHIVE_FORMATS.values())
    assert {id(layout) for layout in ARCHIVE_FORMATS.values()} == {id(layout) for layout in ARCHIVE_LAYOUTS.values()}
    assert ARCHIVE_FORMATS["ml-100k"].ratings_file == "u.data" and ARCHIVE_FORMATS["ml-1m"].encoding == "latin-1"
    assert ARCHIVE_FORMATS["ml-10m"].encoding == "utf-8" and ARCHIVE_FORMATS["ml-32m"].ratings_file == "ratings.csv"
    assert USER_FORMATS == (*ARCHIVE_FORMATS, *PLAIN_FORMATS) and SYNTHETIC_FORMAT not in USER_FORMATS
    for spec in catalog.values():
        if spec.is_synthetic:
            assert spec.format == SYNTHETIC_FORMAT and spec.layout is None
        else:  # a built-in MovieLens entry's format is its own name
            assert spec.layout is ARCHIVE_FORMATS[spec.name]
            assert (spec.rating_scale, spec.rating_step) == (spec.layout.rating_scale, spec.layout.rating_step)
    assert user_dataset("mine", CSV).layout is None
    assert user_dataset("ml-copy", {**ZIP, "format": "ml-1m"}).layout is ARCHIVE_FORMATS["ml-1m"]
    assert _refused(lambda: user_dataset("mine", {**CSV, "format": "zip"})) == (
        "flexmf.yaml datasets.mine.format: 'zip' is not one of ml-latest-small, ml-latest, ml-100k, ml-1m, "
        "ml-10m, ml-20m, ml-25m, ml-32m, csv, parquet")
    assert _refused(lambda: user_dataset("mine", {**CSV, "format": SYNTHETIC_FORMAT})).startswith(
        "flexmf.yaml datasets.mine.format: 'synthetic' is not one of ")
