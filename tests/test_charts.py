"""The SVG charts of evaluations and leaderboards: Markdown images the Dagster UI draws in place."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from flexmf_assets.evaluation.charts import MAX_MARKDOWN, Series, bar_chart, line_chart


def svg_root(markdown: str) -> str:
    uri = re.search(r"\(<data:image/svg\+xml,(.*?)>\)", markdown).group(1)
    return re.match(r"<svg[^>]*>", unquote(uri)).group(0)


@pytest.mark.parametrize("markdown", [
    line_chart("curve", list(range(1, 51)), [Series("model", [1 / k for k in range(1, 51)]),
                                             Series("baseline", [0.5 / k for k in range(1, 51)], dashed=True)]),
    bar_chart("test rmse by set", [f"{i}. es={i}" for i in range(1, 30)], [0.85 + i / 1000 for i in range(29)],
              reference=0.87, highlight=0),
])
def test_a_chart_has_a_size_of_its_own_and_fits_the_inline_limit(markdown):
    # with only a viewBox, the UI's metadata cell lays the image out at 0 x 0 (tests/test_browser.py
    # measures it on screen); width and height give it a size
    root = svg_root(markdown)
    width, height = (int(re.search(rf"\b{a}='(\d+)'", root).group(1)) for a in ("width", "height"))
    vb_w, vb_h = (int(v) for v in re.search(r"viewBox='0 0 (\d+) (\d+)'", root).groups())
    assert width >= 300 and height >= 100
    assert width / height == pytest.approx(vb_w / vb_h, rel=0.02)
    assert len(markdown) <= MAX_MARKDOWN < 1000
