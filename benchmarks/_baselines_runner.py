"""Child process of ``compare_lenskit.py`` for what users pick instead: Surprise and ``implicit``.

Runs inside ``benchmarks/.venvs/baselines`` (scikit-surprise, implicit 0.7, pandas, pyarrow; no
project imports). Usage: ``python _baselines_runner.py JOB.json``. The job names the model, the
split files, the configuration and how many fits to time; the runner fits ``fits`` times in this
one process (the first is the fresh-process fit, the next the steady state), then writes the test
predictions (explicit: ``user_id, item_id, prediction``) or top-``n`` lists of the test users
(implicit: ``user_id, item_id, rank``) to ``job["output"]`` and its timings to ``job["result"]``.
Quality is computed by the parent with the project's metrics, identically for every library.

Models: ``surprise-svd`` (``surprise.SVD(**config)``), ``implicit-als``
(``implicit.als.AlternatingLeastSquares``), ``implicit-bpr``
(``implicit.bpr.BayesianPersonalizedRanking``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _write_parquet(frame: pd.DataFrame, path: str) -> None:
    tmp = f"{path}.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def run_surprise(job: dict[str, Any], train: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    import surprise

    cfg = dict(job["config"])
    cfg.setdefault("random_state", 42)
    times = []
    algo = None
    for _ in range(job["fits"]):
        t0 = time.perf_counter()
        reader = surprise.Reader(rating_scale=(float(train["rating"].min()), float(train["rating"].max())))
        data = surprise.Dataset.load_from_df(train[["user_id", "item_id", "rating"]], reader)
        trainset = data.build_full_trainset()
        algo = surprise.SVD(**cfg).fit(trainset)
        times.append(time.perf_counter() - t0)
    assert algo is not None
    preds = [algo.predict(u, i).est for u, i in zip(test["user_id"].tolist(), test["item_id"].tolist())]
    out = pd.DataFrame({"user_id": test["user_id"], "item_id": test["item_id"], "prediction": np.asarray(preds, dtype=np.float32)})
    _write_parquet(out, job["output"])
    return {
        "library": "surprise",
        "version": surprise.__version__,
        "fit_s": times,
        "n_train": len(train),
        "epochs": algo.n_epochs,
        "config": cfg,
        "timed": "Dataset.load_from_df + build_full_trainset + SVD.fit",
    }


def run_implicit(job: dict[str, Any], train: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    import implicit
    from scipy.sparse import csr_matrix

    pairs = train[["user_id", "item_id"]].drop_duplicates()
    user_ids, u = np.unique(pairs["user_id"].to_numpy(), return_inverse=True)
    item_ids, i = np.unique(pairs["item_id"].to_numpy(), return_inverse=True)
    matrix = csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(len(user_ids), len(item_ids)))
    cfg = dict(job["config"])
    cfg.setdefault("random_state", 42)
    cfg.setdefault("num_threads", job["threads"])
    if job["model"] == "implicit-als":
        from implicit.als import AlternatingLeastSquares as Model
    else:
        from implicit.bpr import BayesianPersonalizedRanking as Model
    times = []
    model = None
    for _ in range(job["fits"]):
        t0 = time.perf_counter()
        model = Model(**cfg)
        model.fit(matrix, show_progress=False)
        times.append(time.perf_counter() - t0)
    assert model is not None

    t0 = time.perf_counter()
    test_users = np.unique(test["user_id"].to_numpy())
    rows = np.searchsorted(user_ids, test_users)
    known = (rows < len(user_ids)) & (user_ids[np.minimum(rows, len(user_ids) - 1)] == test_users)
    rows, test_users = rows[known], test_users[known]
    ids, _scores = model.recommend(rows, matrix[rows], N=job["n"], filter_already_liked_items=True)
    rec_s = time.perf_counter() - t0
    n = ids.shape[1]
    valid = ids >= 0
    out = pd.DataFrame({
        "user_id": np.repeat(test_users, n)[valid.ravel()],
        "item_id": item_ids[np.clip(ids, 0, None)].ravel()[valid.ravel()],
        "rank": np.tile(np.arange(1, n + 1), len(test_users))[valid.ravel()],
    })
    _write_parquet(out, job["output"])
    return {
        "library": "implicit",
        "version": implicit.__version__,
        "fit_s": times,
        "n_train": int(matrix.nnz),
        "epochs": int(getattr(model, "iterations", 0)),
        "recommend_s": rec_s,
        "config": {k: v for k, v in cfg.items()},
        "timed": "model construction + fit (CSR matrix built once, untimed)",
    }


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    train = pd.read_parquet(job["train"])
    test = pd.read_parquet(job["test"])
    if job["model"] == "surprise-svd":
        result = run_surprise(job, train, test)
    elif job["model"] in ("implicit-als", "implicit-bpr"):
        result = run_implicit(job, train, test)
    else:
        raise SystemExit(f"{job_path}: unknown model {job['model']!r} for the baselines runner")
    _write_json(result, job["result"])


if __name__ == "__main__":
    main(sys.argv[1])
