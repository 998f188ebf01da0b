"""Child process of ``compare_lenskit.py`` that runs LensKit (2026.4.0) FlexMF in its own venv.

Runs inside ``benchmarks/.venvs/lenskit`` (Python 3.13; no project imports). Three modes:

``python _lenskit_runner.py describe OUT.json``
    LensKit's FlexMF config defaults (explicit, implicit, and the implicit presets) as JSON, so
    the parent maps the same settings onto our engine.
``python _lenskit_runner.py split RATINGS.parquet OUTDIR FOLDS``
    LensKit's own ``crossfold_users(data, 5, SampleN(5, rng=42), rng=42)``; writes
    ``implicit-foldN-train.parquet`` / ``-test.parquet`` for the first FOLDS folds.
``python _lenskit_runner.py JOB.json``
    ``fits`` trainings of the configured scorer in this one process (the first includes
    ``torch.compile``): FlexMF, or LensKit's ALS (``model`` ``biasedmf``: ``BiasedMFScorer``,
    ``implicitmf``: ``ImplicitMFScorer``), then test predictions through ``predict_pipeline`` (explicit, BiasScorer
    fallback for unknown users/items) or top-``n`` lists through ``topn_pipeline`` (implicit;
    LensKit's default candidate selector: every item not in the user's training data). Timed:
    ``scorer.train(dataset)``; building the ``Dataset`` is timed separately.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd


def _write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def _write_parquet(frame: pd.DataFrame, path: str) -> None:
    tmp = f"{path}.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def describe(out: str) -> None:
    import lenskit
    from lenskit.flexmf import FlexMFExplicitConfig, FlexMFImplicitConfig
    from lenskit.flexmf._implicit import MAX_TRIES, PRESETS, WARP_CAND_BATCH_SIZE

    _write_json(
        {
            "version": lenskit.__version__,
            "explicit": FlexMFExplicitConfig().model_dump(),
            "implicit": FlexMFImplicitConfig().model_dump(),
            "implicit_presets": PRESETS,
            "warp": {"max_tries": MAX_TRIES, "candidate_batch": WARP_CAND_BATCH_SIZE},
        },
        out,
    )


def split(ratings_path: str, outdir: str, folds: int) -> None:
    from lenskit.data import from_interactions_df
    from lenskit.splitting import SampleN, crossfold_users

    ratings = pd.read_parquet(ratings_path)
    ds = from_interactions_df(ratings, user_col="user_id", item_col="item_id", rating_col="rating")
    for n, tt in enumerate(crossfold_users(ds, 5, SampleN(5, rng=42), rng=42)):
        if n >= folds:
            break
        train = tt.train.interaction_matrix(format="pandas", field="rating", original_ids=True)
        test = tt.test_df
        _write_parquet(train[["user_id", "item_id", "rating"]], f"{outdir}/implicit-fold{n}-train.parquet")
        _write_parquet(test[["user_id", "item_id", "rating"]], f"{outdir}/implicit-fold{n}-test.parquet")


def run(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    import lenskit
    from lenskit.batch import predict, recommend
    from lenskit.data import ItemListCollection, from_interactions_df
    from lenskit.flexmf import (
        FlexMFExplicitConfig,
        FlexMFExplicitScorer,
        FlexMFImplicitConfig,
        FlexMFImplicitScorer,
    )
    from lenskit.pipeline import predict_pipeline, topn_pipeline
    from lenskit.training import TrainingOptions

    train = pd.read_parquet(job["train"])
    test = pd.read_parquet(job["test"])
    explicit = job["track"] == "explicit"
    t0 = time.perf_counter()
    ds = from_interactions_df(train, user_col="user_id", item_col="item_id", rating_col="rating")
    dataset_s = time.perf_counter() - t0

    times = []
    scorer = None
    # the model: FlexMF (explicit / implicit by track), or LensKit's ALS scorers
    if job.get("model") in ("biasedmf", "implicitmf"):
        from lenskit.als import BiasedMFConfig, BiasedMFScorer, ImplicitMFConfig, ImplicitMFScorer

        cfg_cls, scorer_cls = (BiasedMFConfig, BiasedMFScorer) if explicit else (ImplicitMFConfig, ImplicitMFScorer)
    else:
        cfg_cls, scorer_cls = ((FlexMFExplicitConfig, FlexMFExplicitScorer) if explicit
                               else (FlexMFImplicitConfig, FlexMFImplicitScorer))
    for _ in range(job["fits"]):
        scorer = scorer_cls(cfg_cls(**job["config"]))
        t0 = time.perf_counter()
        scorer.train(ds, TrainingOptions(rng=42))
        times.append(time.perf_counter() - t0)
    assert scorer is not None

    t0 = time.perf_counter()
    if explicit:
        pipe = predict_pipeline(scorer)
        pipe.train(ds, TrainingOptions(retrain=False, rng=42))
        preds = predict(pipe, ItemListCollection.from_df(test[["user_id", "item_id"]], "user_id"), n_jobs=1)
        out = preds.to_df().rename(columns={"score": "prediction"})[["user_id", "item_id", "prediction"]]
    else:
        pipe = topn_pipeline(scorer, n=job["n"])
        pipe.train(ds, TrainingOptions(retrain=False, rng=42))
        users = sorted(test["user_id"].unique().tolist())
        recs = recommend(pipe, users, job["n"], n_jobs=1)
        out = recs.to_df()[["user_id", "item_id", "rank"]]
    score_s = time.perf_counter() - t0
    _write_parquet(out, job["output"])
    _write_json(
        {
            "library": "lenskit",
            "version": lenskit.__version__,
            "torch": torch.__version__,
            "fit_s": times,
            "dataset_s": dataset_s,
            "recommend_s": score_s,
            "n_train": int(ds.interaction_count),
            "epochs": cfg_cls(**job["config"]).epochs,
            "config": cfg_cls(**job["config"]).model_dump(),
            "timed": "scorer.train(dataset) (Dataset built once, untimed; includes torch.compile on the first fit)",
        },
        job["result"],
    )


if __name__ == "__main__":
    if sys.argv[1] == "describe":
        describe(sys.argv[2])
    elif sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        run(sys.argv[1])
