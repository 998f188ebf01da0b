"""Browser tests: headless Chromium (Debian's ``chromium``, driven by Playwright) clicks through the Dagster UI.

- The asset graph, an evaluation with its figures drawn in place, and a leaderboard render.
- A new user's path end to end: the "Add a partition" dialog refuses a ``,`` key and takes a multi-field
  ``;`` key, the run launched from the dialog trains with those values, and the leaderboard lists the new
  set without anyone launching it (declarative automation in the daemon).
- A tune launched from the tune job's Launchpad: its report draws both figures and lists every trial.
- A fresh ``flexmf dev`` trains nothing by itself; turning the ``sweep`` sensor on in the UI does.

Screenshots go to ``tmp_path``; with ``FLEXMF_UPDATE_SCREENSHOTS=1`` they replace ``docs/screenshots/*.png``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
import yaml

from _webserver import DATASET, MODEL_KEY, REPO, Deployment, deployment, deployment_env, free_port

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "docs" / "screenshots"
GROUPS = ("data", "explicit", "implicit", "leaderboard")
#: names short enough that the zoomed-to-fit graph shows them whole (longer ones are elided there)
GRAPH_ASSETS = ("archive", "ratings", "items", "split", "explicit_model", "implicit_model")

#: what a user types in the "Add a partition" dialog: overrides of the `default` set (epochs 3, size 16)
TYPED_KEY = "embedding_size=8;epochs=2"
#: the same key in the grammar of earlier versions: the dialog refuses ','
COMMA_KEY = "embedding_size=8,epochs=2"
UI_TIMEOUT = 90_000  # ms: a page's first load on a busy 2-core machine
#: seconds for the daemon's automation to evaluate, score and rank a new set after its training run
LEADERBOARD_DEADLINE = 600.0
QUIET_SECONDS = 90.0  # how long a fresh `flexmf dev` must stay idle
SWEEP_DEADLINE = 240.0  # seconds for the sweep sensor to request a run once turned on


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
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


# -- helpers --------------------------------------------------------------------------------------
def save(page, name: str, tmp_path: Path, *, publish: bool = True) -> Path:
    """Screenshot to ``tmp_path``; ``publish``: also the docs' copy under FLEXMF_UPDATE_SCREENSHOTS=1."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if publish and os.environ.get("FLEXMF_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        tmp = SCREENSHOTS / f".{name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, SCREENSHOTS / name)
    return path


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 5.0,
             explain: Callable[[], str] = lambda: "") -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{explain()}")
        time.sleep(interval)


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


def open_partition(page, dep: Deployment, asset: str, partition: str, label: str) -> None:
    """The asset's Partitions tab for ``partition``, scrolled to the metadata entry ``label``."""
    page.goto(f"{dep.url}/assets/{asset}?view=partitions&partition={quote(partition)}",
              wait_until="domcontentloaded")
    entry = page.get_by_text(label, exact=True).first
    entry.wait_for(state="visible", timeout=UI_TIMEOUT)
    page.wait_for_load_state("networkidle")
    entry.scroll_into_view_if_needed()


def drawn_figure(page, alt: str) -> dict:
    """The on-screen box of the Markdown image ``alt`` once the browser has decoded it; a figure that is
    hidden behind "[Show Markdown]", broken, or laid out at zero size fails here."""
    img = page.locator(f'img[alt="{alt}"]').first
    img.wait_for(state="attached", timeout=30_000)
    assert img.get_attribute("src").startswith("data:image/svg+xml,"), alt
    img.scroll_into_view_if_needed()
    natural = img.evaluate("e => e.complete ? [e.naturalWidth, e.naturalHeight] : [0, 0]")
    assert natural[0] > 0 and natural[1] > 0, f"figure {alt!r} did not decode: {natural}"
    box = img.bounding_box()
    assert box and box["width"] >= 200 and box["height"] >= 60, f"figure {alt!r} is laid out at {box}"
    return box


def metadata_entries(entries: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries:
        for field in ("floatValue", "intValue", "text", "jsonString", "mdStr"):
            if field in e:
                out[e["label"]] = e[field]
        if "table" in e:
            out[e["label"]] = [json.loads(r) for r in e["table"]["records"]]
    return out


MATERIALIZATIONS = """
query($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    assetMaterializations(partitions: $partitions) { runId partition timestamp metadataEntries {
      label
      ... on FloatMetadataEntry { floatValue }
      ... on IntMetadataEntry { intValue }
      ... on TextMetadataEntry { text }
      ... on JsonMetadataEntry { jsonString }
      ... on MarkdownMetadataEntry { mdStr }
      ... on TableMetadataEntry { table { records } }
    } }
  } }
}"""

RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run {
    runId status jobName assetSelection { path } tags { key value } } } }"""

RUNS = """{ runsOrError { ... on Runs { results {
    runId status jobName assetSelection { path } tags { key value } } } } }"""

AUTOMATION = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
    sensors { name sensorState { status } } schedules { name scheduleState { status } } } } } }"""


def materializations(dep: Deployment, asset: str, partition: str) -> list[dict]:
    """Newest first, each with its metadata as a dict."""
    node = dep.graphql(MATERIALIZATIONS, {"key": {"path": [asset]}, "partitions": [partition]})["assetNodeOrError"]
    events = [{**m, "metadata": metadata_entries(m["metadataEntries"])} for m in node["assetMaterializations"]]
    return sorted(events, key=lambda m: float(m["timestamp"]), reverse=True)


def run_info(dep: Deployment, run_id: str) -> dict:
    run = dep.graphql(RUN, {"id": run_id})["runOrError"]
    run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
    run["assets"] = ["/".join(a["path"]) for a in run["assetSelection"] or []]
    return run


def all_runs(dep: Deployment) -> list[dict]:
    runs = dep.graphql(RUNS)["runsOrError"]["results"]
    for run in runs:
        run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
        run["assets"] = ["/".join(a["path"]) for a in run["assetSelection"] or []]
    return runs


def automation_states(dep: Deployment) -> tuple[dict[str, str], dict[str, str]]:
    [repo] = dep.graphql(AUTOMATION)["repositoriesOrError"]["nodes"]
    return ({s["name"]: s["sensorState"]["status"] for s in repo["sensors"]},
            {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]})


def describe_runs(dep: Deployment) -> str:
    return "\n".join(f"{r['runId'][:8]} {r['status']} {r['tags'].get('dagster/partition')} {r['assets']} "
                     f"{r['tags'].get('dagster/sensor_name', 'launched by hand')}" for r in all_runs(dep))


# -- the session deployment ------------------------------------------------------------------------
def test_evaluation_page_draws_its_figures(dep, page, tmp_path):
    open_partition(page, dep, "explicit_evaluation", MODEL_KEY, "predicted_vs_actual")
    text = page.inner_text("body")
    for label in ("rmse", "mae", "baseline_rmse", "predicted_vs_actual", "error_by_activity", "loss_curve"):
        assert label in text
    # the figures are drawn in place (Markdown under the UI's 1,000-character limit), not behind a link
    assert page.get_by_text("[Show Markdown]").count() == 0
    predicted = drawn_figure(page, "mean prediction per actual rating")
    drawn_figure(page, "RMSE by the user's training ratings")
    # the screenshot shows both figures of the evaluation
    page.mouse.wheel(0, predicted["y"] - 250)
    page.wait_for_timeout(500)
    save(page, "evaluation.png", tmp_path)
    drawn_figure(page, "training curve")


def test_a_key_typed_in_the_dialog_trains_and_reaches_the_leaderboard(dep, page, tmp_path):
    from playwright.sync_api import expect

    partition = f"{DATASET}|{TYPED_KEY}"
    page.goto(f"{dep.url}/assets/explicit_model", wait_until="domcontentloaded")
    materialize = page.get_by_role("button", name="Materialize…")
    expect(materialize).to_be_enabled(timeout=UI_TIMEOUT)
    # the asset's description, beside the button, states the key grammar
    expect(page.get_by_text(re.compile(r"separated by\s*;")).first).to_be_visible()

    materialize.click()
    launch = page.get_by_role("dialog").filter(has_text="Launch runs to materialize explicit_model")
    expect(launch).to_be_visible(timeout=UI_TIMEOUT)
    launch.get_by_text("Add a partition", exact=True).click()
    add = page.get_by_role("dialog").filter(has_text="Add a partition for explicit_hparams")
    name = add.get_by_placeholder("name")
    save_button = add.get_by_role("button", name="Save")
    # the grammar of earlier versions: the dialog refuses ',' (why keys now use ';')
    name.press_sequentially(COMMA_KEY)
    expect(name).to_have_value(COMMA_KEY)
    expect(save_button).to_be_disabled()
    save(page, "add-partition-comma.png", tmp_path, publish=False)
    name.fill("")
    name.press_sequentially(TYPED_KEY)
    expect(name).to_have_value(TYPED_KEY)
    expect(save_button).to_be_enabled()
    save(page, "add-partition.png", tmp_path)
    save_button.click()
    expect(add).to_be_hidden(timeout=30_000)
    node = dep.graphql("""{ assetNodeOrError(assetKey: {path: ["explicit_model"]}) { ... on AssetNode {
        partitionKeysByDimension { name partitionKeys } } } }""")["assetNodeOrError"]
    dims = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
    assert TYPED_KEY in dims["hparams"] and COMMA_KEY not in dims["hparams"]

    # pick the dataset and the new key, one partition: one run
    selectors = launch.get_by_text("Select a partition or create one")
    expect(selectors).to_have_count(2)
    selectors.first.click()
    page.locator("label").filter(has_text=DATASET).first.click()
    page.keyboard.press("Escape")
    expect(selectors).to_have_count(1)
    selectors.click()
    page.get_by_placeholder("Filter partitions").fill(TYPED_KEY)
    page.locator("label").filter(has_text=TYPED_KEY).first.click()
    page.keyboard.press("Escape")
    expect(selectors).to_have_count(0)
    launch_button = launch.get_by_role("button", name="Launch 1 run")
    expect(launch_button).to_be_enabled()
    save(page, "launch-partition.png", tmp_path, publish=False)
    launch_button.click()
    expect(launch).to_be_hidden(timeout=UI_TIMEOUT)
    expect(page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))).to_be_visible(timeout=UI_TIMEOUT)

    def launched() -> list[dict]:
        return [r for r in all_runs(dep) if r["tags"].get("dagster/partition") == partition]

    [run] = wait_for("the run launched from the dialog", launched, 60, interval=2)
    run_id = run["runId"]
    status = dep.wait_run(run_id)
    assert status == "SUCCESS", f"{status}\n{dep.run_failure(run_id)}"
    page.goto(f"{dep.url}/runs/{run_id}", wait_until="domcontentloaded")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=UI_TIMEOUT)
    run = run_info(dep, run_id)
    assert run["tags"]["dagster/partition"] == partition
    assert run["assets"] == ["explicit_model"]
    assert "dagster/sensor_name" not in run["tags"]  # launched by the user, from the dialog

    # the run trained with the typed values (overrides of `default`: epochs 3, embedding_size 16)
    [model] = materializations(dep, "explicit_model", partition)
    assert model["runId"] == run_id
    hparams = json.loads(model["metadata"]["hparams"])
    assert (hparams["embedding_size"], hparams["epochs"]) == (8, 2)
    assert 1 <= model["metadata"]["epochs_run"] <= 2
    assert model["metadata"]["hparams_set"] == TYPED_KEY

    # nobody launches anything more: the daemon's automation evaluates the model and ranks it
    def board_with_key():
        for event in materializations(dep, "explicit_leaderboard", DATASET):
            rows = event["metadata"].get("table") or []
            if any(r.get("hparams") == TYPED_KEY for r in rows):
                return event
        return None

    board = wait_for(f"explicit_leaderboard listing {TYPED_KEY!r}", board_with_key, LEADERBOARD_DEADLINE,
                     explain=lambda: describe_runs(dep) + "\n" + dep.log_tail(20))
    [evaluation] = materializations(dep, "explicit_evaluation", partition)[:1]
    for event in (evaluation, board):
        tags = run_info(dep, event["runId"])["tags"]
        assert tags.get("dagster/from_automation_condition") == "true", tags
    row = next(r for r in board["metadata"]["table"] if r["hparams"] == TYPED_KEY)
    assert row["epochs_run"] == model["metadata"]["epochs_run"]
    assert 0.5 < row["rmse"] < 2.0
    assert {r["hparams"] for r in board["metadata"]["table"]} >= {"default", TYPED_KEY}

    # and the UI shows it: the leaderboard's table lists the new set, the chart is drawn in place
    open_partition(page, dep, "explicit_leaderboard", DATASET, "table")
    expect(page.get_by_text(TYPED_KEY, exact=True).first).to_be_visible(timeout=UI_TIMEOUT)
    drawn_figure(page, "test rmse by set")
    page.get_by_text("table", exact=True).first.scroll_into_view_if_needed()
    page.mouse.wheel(0, -60)
    page.wait_for_timeout(500)
    save(page, "leaderboard.png", tmp_path)


#: the tune job's config as a user types it in the Launchpad (one flow-style line: no auto-indent)
TUNE_CONFIG = f"ops: {{tune: {{config: {{track: explicit, dataset: {DATASET}, trials: 3}}}}}}"


def test_a_tune_launched_from_the_launchpad_reports_its_trials(dep, page, tmp_path):
    """The test deployment's tune.explicit (3 trials, 2 epochs): launched from the tune job's Launchpad,
    its report draws both figures in place and lists every trial; the leaderboard has a state column."""
    import importlib.util

    from playwright.sync_api import expect

    page.goto(f"{dep.url}/locations/flexmf_assets/jobs/tune_job", wait_until="domcontentloaded")
    page.get_by_role("tab", name="Launchpad").click()
    editor = page.locator(".CodeMirror").first
    editor.wait_for(state="visible", timeout=UI_TIMEOUT)
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(TUNE_CONFIG)
    expect(editor).to_contain_text(TUNE_CONFIG)
    launch = page.get_by_role("button", name="Launch Run")
    expect(launch).to_be_enabled(timeout=UI_TIMEOUT)
    launch.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=UI_TIMEOUT)
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    assert run_info(dep, run_id)["jobName"] == "tune_job"
    status = dep.wait_run(run_id)
    assert status == "SUCCESS", f"{status}\n{dep.run_failure(run_id)}"

    # the report: 3 trained trials, each an hparams partition of the study's keys
    [report] = materializations(dep, "explicit_tuning_report", DATASET)[:1]
    rows = report["metadata"]["table"]
    keys = [r["key"] for r in rows]
    assert len(rows) == 3 and {r["state"] for r in rows} == {"trained"}, rows
    assert all(k.startswith("embedding_size=") and "epochs=2" in k.split(";") for k in keys), keys
    assert report["metadata"]["best_key"] in keys

    open_partition(page, dep, "explicit_tuning_report", DATASET, "history")
    assert page.get_by_text("[Show Markdown]").count() == 0  # drawn in place, not behind a link
    history = drawn_figure(page, "optimisation history (val_rmse)")
    evaluator = "fANOVA" if importlib.util.find_spec("sklearn") else "PED-ANOVA"
    drawn_figure(page, f"parameter importances ({evaluator})")
    for key in keys:
        expect(page.get_by_text(key, exact=True).first).to_be_visible()
    page.mouse.wheel(0, history["y"] - 250)
    page.wait_for_timeout(500)
    save(page, "tuning-report.png", tmp_path)

    # the trials are ranked on the leaderboard (refreshed by the tune job) with their state
    [board] = materializations(dep, "explicit_leaderboard", DATASET)[:1]
    states = {r["hparams"]: r["state"] for r in board["metadata"]["table"]}
    assert all(states.get(k) == "trained" for k in keys), states
    open_partition(page, dep, "explicit_leaderboard", DATASET, "table")
    expect(page.get_by_role("columnheader", name="state").first).to_be_visible()


def test_asset_graph_renders(dep, page, tmp_path):
    # after the tests above: the graph shows what they materialized
    page.goto(f"{dep.url}/asset-groups", wait_until="domcontentloaded")
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for(state="visible", timeout=UI_TIMEOUT)
    # hide the asset tree beside the graph (the toggle right of "Jump to…") so the graph gets the room
    jump = page.get_by_placeholder("Jump to…").bounding_box()
    page.mouse.click(jump["x"] + jump["width"] + 22, jump["y"] + jump["height"] / 2)
    expand_all_groups(page)
    for name in GRAPH_ASSETS:
        page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=30_000)
    page.wait_for_load_state("networkidle")
    # the graph fits itself to the view when it loads, not when a group opens: load it again (the
    # open groups and the hidden tree are remembered) so the whole expanded graph is in the picture
    page.reload(wait_until="domcontentloaded")
    for name in GRAPH_ASSETS:
        page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=UI_TIMEOUT)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # the graph animates its layout after the nodes appear
    text = page.inner_text("body")
    for name in (*GROUPS, *GRAPH_ASSETS):
        assert name in text
    save(page, "asset-graph.png", tmp_path)


# -- a fresh `flexmf dev` ----------------------------------------------------------------------------
def shipped_config(mirror_url: str, sha256: str) -> dict:
    """The shipped flexmf.yaml (named sets, a grid, a swept dataset, the schedule on) with its swept
    dataset served on loopback."""
    cfg = yaml.safe_load((REPO / "flexmf.yaml").read_text())
    assert cfg["sweep"]["datasets"] and cfg["schedule"].get("enabled", True)
    assert cfg.get("explicit_grid") and len(cfg["explicit_hparams"]) > 1
    cfg["datasets"] = {name: {"url": mirror_url, "sha256": sha256, "format": "ml-latest-small"}
                       for name in cfg["sweep"]["datasets"]}
    return cfg


@pytest.fixture
def fresh(tmp_path, movielens_server):
    """``flexmf dev`` (webserver + daemon) on a new DAGSTER_HOME with the shipped configuration."""
    root = tmp_path / "fresh"
    home = root / "dagster_home"
    (root / "logs").mkdir(parents=True)
    cfg_path = root / "flexmf.yaml"
    cfg_path.write_text(yaml.safe_dump(shipped_config(movielens_server.url("ml-latest-small.zip"),
                                                      movielens_server.archive.sha256)))
    env = deployment_env(root, home, cfg_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's `dagster`
    port = free_port()
    out = open(root / "logs" / "flexmf-dev.log", "wb")  # noqa: SIM115 - closed by Deployment.stop
    proc = subprocess.Popen([sys.executable, "-m", "flexmf_assets.cli", "dev", "--port", str(port)],
                            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    d = Deployment(root=root, port=port, env=env, archive=movielens_server.archive, procs=[proc], logs=[out])
    try:
        d.wait_ready()
        yield d
    finally:
        terminate_runs(d)
        d.stop()  # each process group: webserver, daemon, code servers and run workers


def terminate_runs(dep: Deployment, timeout: float = 60.0) -> None:
    """Best effort: ask every unfinished run to stop and give it ``timeout`` seconds to end."""
    done = ("SUCCESS", "FAILURE", "CANCELED")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pending = [r for r in all_runs(dep) if r["status"] not in done]
            if not pending:
                return
            for run in pending:
                dep.graphql("mutation($id: String!) { terminateRun(runId: $id) { __typename } }",
                            {"id": run["runId"]})
            time.sleep(3)
    except Exception:  # noqa: BLE001 - the processes are stopped right after in any case
        pass


def test_fresh_flexmf_dev_trains_nothing_until_the_sweep_sensor_is_turned_on(fresh, page, tmp_path):
    from playwright.sync_api import expect

    from flexmf_assets.project import TRACKS, load_project

    project = load_project(str(fresh.env["FLEXMF_CONFIG"]))
    expected = {track: set(project.hparam_sets(track)) for track in TRACKS}
    assert len(expected["explicit"]) > 2  # named sets and the grid

    def registered() -> dict[str, set[str]]:
        found = {}
        for track in TRACKS:
            node = fresh.graphql("""query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) {
                ... on AssetNode { partitionKeysByDimension { name partitionKeys } } } }""",
                                 {"k": {"path": [f"{track}_model"]}})["assetNodeOrError"]
            dims = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
            found[track] = set(dims["hparams"])
        return found

    quiet_until = time.monotonic() + QUIET_SECONDS
    while time.monotonic() < quiet_until:  # 90 s of a running daemon: not one run
        assert all_runs(fresh) == [], describe_runs(fresh)
        time.sleep(5)
    assert all_runs(fresh) == [], describe_runs(fresh)
    # ... while the register_sets sensor made every set of the file a partition the UI lists
    wait_for("the sets of flexmf.yaml as partitions", lambda: registered() == expected, 120,
             explain=lambda: f"registered {registered()}, expected {expected}\n{fresh.log_tail()}")
    assert all_runs(fresh) == [], describe_runs(fresh)
    sensors, schedules = automation_states(fresh)
    assert sensors == {"register_sets": "RUNNING", "sweep": "STOPPED", "automation": "RUNNING",
                       "free_dead_run_slots": "RUNNING"}
    assert schedules == {"retrain_schedule": "RUNNING"}

    # the opt-in: one toggle on the Automation page
    page.goto(f"{fresh.url}/automation", wait_until="domcontentloaded")
    # each row: a selection box, the sensor's link, its on/off switch (last)
    row = page.locator("div[data-index]").filter(has=page.locator('a[href$="/sensors/sweep"]'))
    expect(row).to_have_count(1, timeout=UI_TIMEOUT)
    # the row's details and switch replace a loading skeleton
    expect(row.get_by_text("Standard sensor")).to_be_visible(timeout=UI_TIMEOUT)
    expect(row.get_by_role("checkbox")).to_have_count(2)
    switch, toggle = row.get_by_role("checkbox").last, row.locator("label").last
    expect(switch).not_to_be_checked(timeout=UI_TIMEOUT)
    save(page, "automation.png", tmp_path)
    toggle.click()
    expect(switch).to_be_checked(timeout=UI_TIMEOUT)
    wait_for("the sweep sensor started", lambda: automation_states(fresh)[0]["sweep"] == "RUNNING", 60,
             interval=1)

    runs = wait_for("a run requested by the sweep sensor", lambda: all_runs(fresh), SWEEP_DEADLINE,
                    explain=fresh.log_tail)
    toggle.click()  # off again: this test needs one request, not the whole sweep
    expect(switch).not_to_be_checked(timeout=UI_TIMEOUT)
    assert all(r["tags"].get("dagster/sensor_name") == "sweep" for r in runs), describe_runs(fresh)
    # nothing was trained on the dataset yet: the first request prepares its split
    assert {(r["jobName"], r["tags"].get("dagster/partition")) for r in runs} == {
        ("data_job", d) for d in project.swept_datasets}
