"""Browser smoke test: headless Chromium (Debian's ``chromium``, driven by Playwright) opens the Dagster UI.

The asset graph and the explicit evaluation asset page must render the asset names. Screenshots go to
``tmp_path``; with ``FLEXMF_UPDATE_SCREENSHOTS=1`` they replace ``docs/screenshots/*.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from _webserver import MODEL_KEY, REPO, deployment

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "docs" / "screenshots"
GROUPS = ("data", "explicit", "implicit", "leaderboard")
#: names short enough that the zoomed-to-fit graph shows them whole (longer ones are elided there)
GRAPH_ASSETS = ("archive", "ratings", "items", "split", "explicit_model", "implicit_model")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def dep(request, tmp_path_factory, movielens_server, browser):
    d = deployment(request, tmp_path_factory, movielens_server)
    d.materialize()
    return d


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
    pg = context.new_page()
    yield pg
    context.close()


def save(page, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("FLEXMF_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        tmp = SCREENSHOTS / f".{name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, SCREENSHOTS / name)
    return path


def expand_all_groups(page) -> None:
    """Open the graph's settings menu (an icon button at the right edge) and pick "Expand all groups"."""
    for button in page.locator("button").all():
        box = button.bounding_box()
        if not box or box["x"] < page.viewport_size["width"] - 80 or box["y"] < 200:
            continue
        button.click()
        item = page.get_by_role("menuitem").filter(has_text="Expand all groups")
        try:
            item.first.wait_for(state="visible", timeout=1_000)
        except Exception:  # not this button's menu
            page.keyboard.press("Escape")
            continue
        item.first.click()
        page.keyboard.press("Escape")
        return
    raise AssertionError("the asset graph's 'Expand all groups' menu item was not found")


def test_asset_graph_renders(dep, page, tmp_path):
    page.goto(f"{dep.url}/asset-groups", wait_until="domcontentloaded")
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for(state="visible", timeout=60_000)
    # hide the asset tree beside the graph (the toggle right of "Jump to…") so the graph gets the room
    jump = page.get_by_placeholder("Jump to…").bounding_box()
    page.mouse.click(jump["x"] + jump["width"] + 22, jump["y"] + jump["height"] / 2)
    expand_all_groups(page)
    for name in GRAPH_ASSETS:
        page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=30_000)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # the graph animates its layout after the nodes appear
    text = page.inner_text("body")
    for name in (*GROUPS, *GRAPH_ASSETS):
        assert name in text
    save(page, "asset-graph.png", tmp_path)


def test_evaluation_page_renders(dep, page, tmp_path):
    url = f"{dep.url}/assets/explicit_evaluation?view=partitions&partition={quote(MODEL_KEY)}"
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("explicit_evaluation").first.wait_for(state="visible", timeout=60_000)
    page.get_by_text("baseline_rmse").first.wait_for(state="visible", timeout=60_000)
    page.wait_for_load_state("networkidle")
    text = page.inner_text("body")
    assert "explicit_evaluation" in text
    for label in ("rmse", "mae", "baseline_rmse"):
        assert label in text
    save(page, "evaluation.png", tmp_path)
