"""Reliability of the core library: memory exhaustion, degenerate datasets, cold users, model files
that carry code. Dagster-level cases live in test_reliability_dagster.py."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flexmf_assets.datasets.split import SplitConfig, split_ratings
from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.files import sha256_file
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer

#: a child process whose address space is capped, so that an oversized allocation fails for real
#: (as under a container memory limit) instead of relying on the machine's overcommit policy
LIMITED = """
import resource, sys
import polars as pl
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from flexmf_assets.errors import TrainingError
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer
rows = [(u, i, float((u + i) % 5 + 1)) for u in range(300) for i in range(8) if (u + i) % 3]
df = pl.DataFrame(rows, schema=["user_id", "item_id", "rating"], orient="row")
try:
    {call}
except TrainingError as exc:
    print("TrainingError:", exc)
    sys.exit(3)
print("no error")
"""


def run_limited(call: str) -> str:
    proc = subprocess.run([sys.executable, "-c", LIMITED.format(call=call)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_huge_batch_runs_out_of_memory_and_names_batch_size():
    # 1600 positives x 1000 negatives x 4096 factors = 26 GB for one batch's negative embeddings
    line = run_limited("FlexMFImplicitScorer(device='cpu', embedding_size=4096, batch_size=1600, "
                       "negative_count=1000, epochs=1).fit(df)")
    assert line.startswith("TrainingError: out of memory during training with batch_size=1600; "
                           "lower batch_size ("), line
    assert "\n" not in line


def test_huge_embedding_size_runs_out_of_memory_and_names_it():
    # the largest embedding_size a config accepts (4096) on 400,000 users: a 6.5 GB user table
    many = "pl.DataFrame({'user_id': range(400_000), 'item_id': [0] * 400_000, 'rating': [3.0] * 400_000})"
    line = run_limited(f"FlexMFExplicitScorer(device='cpu', embedding_size=4096, epochs=1).fit({many})")
    assert line.startswith("TrainingError: out of memory during model allocation with "
                           "embedding_size=4096 (400000 users, 1 items); lower embedding_size ("), line


# --------------------------------------------------------------------------- degenerate datasets


def frame(rows: list[tuple[int, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32},
                        orient="row")


def test_one_user_dataset_trains_and_scores():
    one_user = frame([(7, i, float(i % 5 + 1)) for i in range(1, 41)])
    model = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=30, learning_rate=0.05,
                                 regularization=0.0).fit(one_user)
    pred = model.predict([7, 7, 8], [4, 5, 4])  # item 4 is rated 5.0, item 5 is rated 1.0
    assert np.isfinite(pred).all()
    assert pred[0] - pred[1] > 2.0  # the item biases are learned from one user's ratings
    recs = model.recommend([7], n=5)
    assert recs.height == 0  # every item was rated by the only user: nothing left to recommend
    imp = FlexMFImplicitScorer(device="cpu", embedding_size=4, epochs=2).fit(one_user)
    assert imp.recommend([7], n=5).height == 0


def test_one_item_dataset():
    one_item = frame([(u, 3, float(u % 5 + 1)) for u in range(1, 41)])
    model = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=5).fit(one_item)
    assert model.n_items == 1 and np.isfinite(model.predict([1, 99], [3, 3])).all()
    with pytest.raises(DataValidationError, match="train: needs at least 2 distinct items to sample negatives"):
        FlexMFImplicitScorer(device="cpu", epochs=1).fit(one_item)


def test_split_of_a_single_rating_names_the_empty_part():
    with pytest.raises(DataValidationError, match=r"split protocol 'random' leaves 1 training and 0 test "
                                                  r"ratings out of 1; it needs both non-empty"):
        split_ratings(frame([(1, 1, 3.0)]).with_columns(pl.lit(1, pl.Int64).alias("timestamp")))


def test_user_left_without_training_data_is_cold_start_not_a_crash():
    # user 99 rated only recently: the temporal cutoff puts all their ratings in test
    rows = [(u, i, float((u + i) % 5 + 1), 1_000 + u * 10 + i) for u in range(1, 31) for i in range(1, 11)]
    rows += [(99, i, 4.0, 10_000 + i) for i in range(1, 4)]
    ratings = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32,
                                         "timestamp": pl.Int64}, orient="row")
    result = split_ratings(ratings, SplitConfig(protocol="temporal", cutoff=2_000, validation_fraction=0.0))
    assert 99 not in result.train["user_id"].to_list()
    summary = result.summary()
    assert summary["test_cold_users"] == 1 and summary["leakage"] == 0
    model = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=5).fit(result.train)
    preds = model.predict_frame(result.test.filter(pl.col("user_id") == 99))
    bias_only = model.predict([12345] * 3, [1, 2, 3])  # any unknown user: global mean + item bias
    assert np.allclose(preds["prediction"].to_numpy(), bias_only)
    imp = FlexMFImplicitScorer(device="cpu", embedding_size=4, epochs=2).fit(result.train)
    cold = imp.recommend([99], n=3)
    assert cold.height == 3  # an unknown user still gets (popularity / item-bias) recommendations


# --------------------------------------------------------------------------- model files with code


class _Payload:
    """Unpickling this creates ``marker``: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_model_file_carrying_a_pickle_is_rejected_without_running_it(tmp_path):
    model = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=2).fit(
        frame([(u, i, float((u + i) % 5 + 1)) for u in range(1, 11) for i in range(1, 11)]))
    path = model.save(tmp_path / "model")
    marker = tmp_path / "pwned"
    tensors = path / "tensors.safetensors"
    tensors.write_bytes(pickle.dumps({"user_table": _Payload(marker)}))
    with pytest.raises(ConfigError, match="sha256 .* does not match metadata.json"):
        FlexMFExplicitScorer.load(path)
    # an attacker who also rewrites the checksum still cannot get the pickle executed
    meta = json.loads((path / "metadata.json").read_text())
    meta["tensor_sha256"] = sha256_file(tensors)
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="tensors.safetensors: unreadable tensor file"):
        FlexMFExplicitScorer.load(path)
    assert not marker.exists()
    pickle.loads(tensors.read_bytes())  # the payload is live: unpickling it would have run it
    assert marker.exists()


def test_model_metadata_cannot_name_another_class(tmp_path):
    from upath import UPath

    from flexmf_assets.storage import VersionedStore, current_version

    store = VersionedStore()
    model = FlexMFExplicitScorer(device="cpu", embedding_size=4, epochs=1).fit(
        frame([(u, i, 3.0) for u in range(1, 6) for i in range(1, 6)]))
    part = UPath(tmp_path) / "explicit_model" / "p"
    store.write(part, model)
    manifest_path = Path(str(current_version(part))) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["class"] = "os.system"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=textwrap.dedent(r"unknown model class 'os.system'")):
        store.read(part)
