"""The docs cannot rot: every fenced code block in docs/*.md and README.md is exercised.

- ```python blocks run (in a temporary working directory; they make their own small synthetic data);
- ```yaml blocks parse; a block whose keys are flexmf.yaml keys is loaded and deep-validated with
  ``load_project`` / ``validate_project``;
- ```bash blocks pass ``bash -n``; a block preceded by ``<!-- docs-test: run -->`` is also run, from the
  repository root;
- a fence without a language is treated as bash (shell commands are the usual unlabelled block);
- ```text blocks are prose (directory trees, output) and are only allowed, not run.
And the configuration reference names every flexmf.yaml key and every field of both scorer configs.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from flexmf_assets.flexmf import FlexMFExplicitConfig, FlexMFImplicitConfig
from flexmf_assets.config_file import _TOP_KEYS
from flexmf_assets.project import load_project, validate_project

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
FENCE = re.compile(r"(?P<marker><!-- docs-test: run -->\s*\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$",
                   re.S | re.M)
#: a fence without a language is checked as bash; `sql` blocks (DuckDB over the latest tables) are run by
#: tests/test_assets_models.py::test_latest_tables_read_by_duckdb against materialized tables
LANGS = ("python", "yaml", "bash", "text", "sql", "")


def blocks(lang: str | None = None) -> list:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("body"))
            if lang is None or m["lang"] == lang:
                out.append(pytest.param(m["lang"], m["body"], bool(m["marker"]),
                                        id=f"{doc.relative_to(REPO)}:{line}"))
    return out


def test_docs_exist_and_have_code():
    names = {d.name for d in DOCS}
    for required in ("quickstart.md", "concepts.md", "configuration.md", "library.md", "operations.md"):
        assert required in names
    assert len(blocks("python")) >= 3 and len(blocks("yaml")) >= 2 and len(blocks("bash")) >= 3


@pytest.mark.parametrize("lang,body,run", blocks())
def test_every_block_has_a_known_language(lang, body, run):
    assert lang in LANGS, f"fenced block without a tested language ({lang!r}); use one of {LANGS}"


@pytest.mark.parametrize("lang,body,run", blocks("python"))
def test_python_block_runs(lang, body, run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(body, "<docs block>", "exec"), namespace)
    if callable(namespace.get("leaderboard")):  # quickstart: reading a leaderboard from an instance
        import dagster as dg

        with dg.DagsterInstance.ephemeral() as instance:
            assert namespace["leaderboard"](instance, "explicit") is None  # nothing materialized yet


@pytest.mark.parametrize("lang,body,run", blocks("yaml"))
def test_yaml_block_parses_and_loads(lang, body, run, tmp_path):
    data = yaml.safe_load(body)
    assert data is not None
    if isinstance(data, dict) and set(data) <= set(_TOP_KEYS):
        path = tmp_path / "flexmf.yaml"
        path.write_text(body)
        project = load_project(path, env={"FLEXMF_DATA_DIR": str(tmp_path / "data")})
        validate_project(project)


@pytest.mark.parametrize("lang,body,run", blocks("bash") + blocks(""))
def test_bash_block_is_valid(lang, body, run):
    check = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    if run:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=REPO, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_configuration_reference_is_complete():
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key in _TOP_KEYS:
        assert f"| `{key}` |" in text, f"flexmf.yaml key {key!r} is not in the reference table"
    for cls in (FlexMFExplicitConfig, FlexMFImplicitConfig):
        section = text.split(f"(`{cls.__name__}`)", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in section, f"{cls.__name__}.{f.name} is not documented"
    for var in ("FLEXMF_CONFIG", "FLEXMF_DATA_DIR", "FLEXMF_MIRROR_URL", "FLEXMF_MIRROR_SHA256SUMS",
                "DAGSTER_HOME"):
        assert f"| `{var}` |" in text


def test_docs_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+?)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
