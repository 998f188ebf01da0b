"""The hyperparameter-key grammar (issue 13) and what a careless or hostile key gets (issue 14, items 9-13).

A key is what a user types in Dagster's "Add a partition" dialog: ``field=value`` pairs separated by
``;``. Every refused key is refused with one line naming the field or character at fault, before any work.
"""

from __future__ import annotations

import pytest

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import MAX_KEY_LENGTH
from flexmf_assets.project import load_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "flexmf.yaml"
    path.write_text("""
explicit_hparams:
  default: {embedding_size: 64, epochs: 40, learning_rate: 0.01}
explicit_grid:
  base: {epochs: 40}
  embedding_size: [32, 64]
  learning_rate: [0.01]
implicit_hparams:
  default: {epochs: 20}
""")
    return load_project(path, env={})


@pytest.mark.parametrize("key, expected", [
    ("embedding_size=32;epochs=5", {"embedding_size": 32, "epochs": 5, "learning_rate": 0.01}),
    ("embedding_size=32,epochs=5", {"embedding_size": 32, "epochs": 5}),  # written by earlier versions
    ("learning_rate=1e-3", {"learning_rate": 0.001}),
    ("reg_method=none;bias=false", {"reg_method": None, "bias": False}),
    ("patience=3;clamp=true", {"patience": 3, "clamp": True}),
])
def test_keys_parse_as_overrides_of_default(project, key, expected):
    config = project.resolve_hparams("explicit", key).to_dict()
    assert {k: config[k] for k in expected} == expected


def test_implicit_keys_use_the_same_grammar(project):
    config = project.resolve_hparams("implicit", "loss=pairwise;negative_strategy=misranked;epochs=3")
    assert (config.loss, config.negative_strategy, config.epochs) == ("pairwise", "misranked", 3)


@pytest.mark.parametrize("key, message", [
    # item 9: a key is a folder name; checked before any work
    ("embedding_size=8;" + "x" * 440, rf"is 457 characters long; at most {MAX_KEY_LENGTH} are allowed"),
    # item 10: duplicate fields
    ("embedding_size=8;embedding_size=16", r"field 'embedding_size' is given twice"),
    # item 11: '|' is Dagster's multi-partition separator
    ("epochs=3|x", r"character '\|' at position 9 is not allowed"),
    # item 12: one spelling per configuration: ASCII only, no whitespace
    ("embedding_size=\uff18", r"character U\+FF18 '８' at position 16 is not allowed"),
    ("seed=\u0664\u0662", r"character U\+0664 '٤' at position 6 is not allowed"),
    ("epochs=5\n", r"character U\+000A '\\n' at position 9 is not allowed"),
    ("epochs=5; seed=1", r"character U\+0020 ' ' at position 10 is not allowed"),
    ("epochs=05", r"epochs=05 is not an integer \(plain digits, no leading zeros\)"),
    ("epochs=5;;seed=1", r"has an empty field"),
    ("epochs=5;seed=1,", r"must not start with .* end with ';', ','"),
    ("epochs=5;seed=1,bias=true", r"mixes ';' and ','"),
    ("..", r"contain '\.\.'"),
    ("../etc", r"character '/' at position 3"),
    ("bias=yes", r"bias=yes is not true or false"),
    ("learning_rate=nan", r"learning_rate=nan is not a finite number"),
    ("learning_rate=inf", r"learning_rate=inf is not a finite number"),
    # item 13: upper bounds for every numeric field, one line
    ("epochs=1000000000", r"epochs: must be >= 1 and <= 10,000, got 1000000000"),
    ("seed=99999999999999999999999", r"seed: must be >= 0 and <= 4,294,967,295"),
    ("embedding_size=100000", r"embedding_size: must be >= 1 and <= 4,096"),
    ("batch_size=999999999", r"batch_size: must be >= 1 and <= 16,777,216"),
    ("learning_rate=1e9", r"learning_rate: must be > 0 and <= 1,000"),
    ("regularization=1e12", r"regularization: must be >= 0 and <= 1,000,000"),
    ("patience=99999", r"patience: must be >= 1 and <= 10,000"),
    # the field at fault is named, with the valid ones
    ("embeding_size=3", r"unknown field 'embeding_size' \(did you mean 'embedding_size'\?\); valid .*learning_rate"),
    ("nonsense", r"'nonsense' is not of the form field=value"),
])
def test_bad_keys_are_refused_in_one_line(project, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        project.resolve_hparams("explicit", key)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, message", [
    ("negative_count=100000", r"negative_count: must be >= 1 and <= 1,000"),
    ("misranked_candidates=0", r"misranked_candidates: must be >= 1 and <= 10,000"),
    ("eval_k=5000", r"eval_k: must be >= 1 and <= 1,000"),
    ("positive_weight=0", r"positive_weight: must be > 0"),
    ("min_rating=nan", r"min_rating=nan is not a finite number"),
    ("loss=hinge", r"loss: 'hinge' is not one of 'logistic', 'pairwise', 'warp'"),
])
def test_bad_implicit_keys_are_refused_in_one_line(project, key, message):
    with pytest.raises(ConfigError, match=message):
        project.resolve_hparams("implicit", key)


def test_canonical_spelling_and_equivalent_keys(project):
    assert project.canonical_key("explicit", "learning_rate=1e-2;embedding_size=32") == \
        "embedding_size=32;learning_rate=0.01"
    assert project.canonical_key("explicit", "embedding_size=32,learning_rate=0.01") == \
        "embedding_size=32;learning_rate=0.01"
    assert project.canonical_key("explicit", "default") == "default"
    # `default` and the grid's `embedding_size=64;learning_rate=0.01` train the same model ...
    assert project.fingerprint("explicit", "default") == \
        project.fingerprint("explicit", "embedding_size=64;learning_rate=0.01")
    # ... and so does any spelling of the same overrides; other values differ
    assert project.fingerprint("explicit", "learning_rate=0.01;embedding_size=32") == \
        project.fingerprint("explicit", "embedding_size=32;learning_rate=1e-2")
    assert project.fingerprint("explicit", "embedding_size=32") != project.fingerprint("explicit", "default")
    assert project.fingerprint("explicit", "default") != project.fingerprint("implicit", "default")


@pytest.mark.parametrize("text, message", [
    ("explicit_hparams:\n  'a|b': {epochs: 3}\n", r"explicit_hparams: set name 'a\|b': character '\|'"),
    ("explicit_hparams:\n  'my set': {epochs: 3}\n", r"set name 'my set': character U\+0020"),
    ("explicit_grid:\n  learning_rate: [0.01, .nan]\n", r"set name 'learning_rate=nan'|learning_rate"),
    ("explicit_hparams:\n  fast: {epochs: 2, bias: 'false'}\n", r"fast: FlexMFExplicitConfig.bias: expected true or false, got 'false'"),
    ("explicit_hparams:\n  fast: {epochs: '2'}\n", r"fast: FlexMFExplicitConfig.epochs: expected an integer, got '2'"),
])
def test_set_names_and_values_in_the_file_follow_the_same_rules(tmp_path, text, message):
    from flexmf_assets.project import validate_project

    path = tmp_path / "flexmf.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        validate_project(load_project(path, env={}))


def test_grid_names_use_the_new_separator_and_parse_back(project):
    names = [n for n in project.hparam_sets("explicit") if "=" in n]
    assert names == ["embedding_size=32;learning_rate=0.01", "embedding_size=64;learning_rate=0.01"]
    for name in names:  # a grid name read as an override key gives the same configuration
        overrides = project.resolve_hparams("explicit", name).to_dict()
        cls = type(project.resolve_hparams("explicit", name))
        assert cls.from_dict({**project.hparam_sets("explicit")["default"],
                              **cls.parse_overrides(name)}).to_dict() == overrides
