"""Child process of ``als_probe.py``: LensKit's ALS scorers on the probe's split files.

Runs inside ``benchmarks/.venvs/lenskit`` (no project imports). Usage: ``python _lenskit_als_runner.py
JOB.json``. The job names the track, the split files, the configuration (``BiasedMFConfig`` for
explicit, ``ImplicitMFConfig`` for implicit) and the thread count; the runner fits once, then writes
the test predictions through ``predict_pipeline`` (explicit: ``user_id, item_id, prediction``, its
bias fallback for unknown users and items) or the top-``n`` lists of the test users through
``topn_pipeline`` (implicit: ``user_id, item_id, rank``) to ``job["output"]`` and the fit time to
``job["result"]``. Quality is computed by the parent with the project's metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    import lenskit
    from lenskit.als import BiasedMFConfig, BiasedMFScorer, ImplicitMFConfig, ImplicitMFScorer
    from lenskit.batch import predict, recommend
    from lenskit.data import ItemListCollection, from_interactions_df
    from lenskit.pipeline import predict_pipeline, topn_pipeline
    from lenskit.training import TrainingOptions

    train = pd.read_parquet(job["train"])
    test = pd.read_parquet(job["test"])
    explicit = job["track"] == "explicit"
    ds = from_interactions_df(train, user_col="user_id", item_col="item_id", rating_col="rating")
    if explicit:
        scorer = BiasedMFScorer(BiasedMFConfig(**job["config"]))
    else:
        scorer = ImplicitMFScorer(ImplicitMFConfig(**job["config"]))
    t0 = time.perf_counter()
    scorer.train(ds, TrainingOptions(rng=42))
    fit_s = time.perf_counter() - t0
    if explicit:
        pipe = predict_pipeline(scorer)
        pipe.train(ds, TrainingOptions(retrain=False, rng=42))
        preds = predict(pipe, ItemListCollection.from_df(test[["user_id", "item_id"]], "user_id"), n_jobs=1)
        out = preds.to_df().rename(columns={"score": "prediction"})[["user_id", "item_id", "prediction"]]
    else:
        pipe = topn_pipeline(scorer, n=job["n"])
        pipe.train(ds, TrainingOptions(retrain=False, rng=42))
        recs = recommend(pipe, sorted(test["user_id"].unique().tolist()), job["n"], n_jobs=1)
        out = recs.to_df()[["user_id", "item_id", "rank"]]
    tmp = f"{job['output']}.tmp"
    out.to_parquet(tmp, index=False)
    os.replace(tmp, job["output"])
    result = {"library": "lenskit", "version": lenskit.__version__, "fit_s": [fit_s],
              "config": scorer.config.model_dump(mode="json"), "timed": "scorer.train(dataset) (Dataset built untimed)"}
    with open(f"{job['result']}.tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(f"{job['result']}.tmp", job["result"])


if __name__ == "__main__":
    main(sys.argv[1])
