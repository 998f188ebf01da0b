"""The track registry (flexmf_assets/tracks.py): every entry's parts resolve and agree with each other."""

from __future__ import annotations

import pytest

from flexmf_assets.datasets.split import SplitConfig, split_ratings
from flexmf_assets.datasets.synthetic import SyntheticConfig, generate
from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import ConfigBase
from flexmf_assets.flexmf.scorer import FlexMFScorer
from flexmf_assets.tracks import TRACK_NAMES, TRACKS, track


@pytest.mark.parametrize("name", TRACK_NAMES)
def test_every_part_of_a_track_resolves(name):
    entry = TRACKS[name]
    assert entry.name == name and track(name) is entry
    assert issubclass(entry.config_class, ConfigBase)
    assert issubclass(entry.scorer_class, FlexMFScorer)
    sets = entry.named_sets()
    assert "default" in sets
    for set_name, values in sets.items():  # every named set builds a valid configuration
        assert isinstance(entry.config_class.from_dict(values, where=f"{name} {set_name}"), entry.config_class)
    sets["default"]["epochs"] = -1  # a copy: the engine's sets are not changed by a caller
    assert entry.named_sets()["default"].get("epochs") != -1
    assert entry.validation_metric == f"validation_{entry.val_key}"


@pytest.mark.parametrize("name", TRACK_NAMES)
def test_a_tracks_report_has_its_headline_baseline_and_board_columns(name):
    entry = TRACKS[name]
    data = generate(SyntheticConfig(n_users=120, n_items=200, n_ratings=6_000, seed=5)).ratings
    parts = split_ratings(data, SplitConfig(protocol="random", test_fraction=0.2, validation_fraction=0.1, seed=1))
    model = entry.scorer_class(entry.config_class.from_dict({"epochs": 2, "embedding_size": 8}))
    model.fit(parts.train, parts.validation)
    assert entry.val_key in model.history[-1]
    report = entry.report(model, parts.train, parts.test)
    assert {entry.headline, f"baseline_{entry.headline}", *entry.board_columns} <= set(report.metrics)


def test_an_unknown_track_is_one_line_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^unknown track 'explict'; valid: explicit, implicit$"):
        track("explict")
