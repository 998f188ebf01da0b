"""The `flexmf` command: register, materialize into a real instance, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
from dagster._core.instance.ref import InstanceRef

REPO = Path(__file__).resolve().parents[1]


def flexmf(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexmf_assets.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_register_then_materialize_into_the_instance(tmp_path):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text("""
default_dataset: synthetic-100k
explicit_hparams:
  default: {epochs: 3, embedding_size: 8}
implicit_hparams:
  default: {epochs: 1, embedding_size: 8}
""")
    env = {**os.environ, "FLEXMF_CONFIG": str(cfg)}
    env.pop("DAGSTER_HOME", None)
    out = flexmf("register", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "explicit_hparams: 2 new partition(s): default, tuned" in out.stdout
    home = tmp_path / "data" / "dagster_home"
    assert (home / "dagster.yaml").exists()  # DAGSTER_HOME defaults under data/ beside flexmf.yaml
    again = flexmf("register", env=env, cwd=tmp_path)
    assert "explicit_hparams: 0 new partition(s)" in again.stdout

    out = flexmf("materialize", "--implicit", env=env, cwd=tmp_path)  # explicit default only
    assert out.returncode == 0, out.stderr[-3000:]
    assert "explicit_job synthetic-100k|default succeeded" in out.stdout
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        records = instance.fetch_materializations(dg.AssetKey("explicit_evaluation"), limit=5).records
        assert [r.partition_key for r in records] == ["synthetic-100k|default"]
        assert records[0].asset_materialization.metadata["rmse"].value > 0
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
        # the leaderboards run too: the explicit one names its champion, the untrained implicit one is empty
        def board(asset):
            return instance.fetch_materializations(dg.AssetKey(asset), limit=1).records[0].asset_materialization
        assert board("explicit_leaderboard").metadata["champion"].value == "synthetic-100k|default"
        assert board("implicit_leaderboard").metadata["entries"].value == 0
        assert board("champion_recommendations").metadata["explicit_champion"].value == "synthetic-100k|default"
    assert "leaderboard_job synthetic-100k succeeded" in out.stdout
    board_out = flexmf("leaderboard", env=env, cwd=tmp_path)
    assert board_out.returncode == 0 and "explicit leaderboard, synthetic-100k" in board_out.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text("explicit_hparms: {}\n")
    out = flexmf("register", env={**os.environ, "FLEXMF_CONFIG": str(cfg)}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unknown key 'explicit_hparms' (did you mean 'explicit_hparams'?)" in out.stderr

    cfg.write_text("{}\n")
    out = flexmf("materialize", "--dataset", "ml-lates-small", env={**os.environ, "FLEXMF_CONFIG": str(cfg),
                                                                     "DAGSTER_HOME": str(tmp_path / "h")}, cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'ml-latest-small'" in out.stderr
