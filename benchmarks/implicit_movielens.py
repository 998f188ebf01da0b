"""Implicit FlexMF on ml-latest-small with LensKit's protocol: crossfold_users(5 folds, SampleN(5)).

Users are shuffled (seed 42) into 5 folds; each test user of a fold holds out 5 random ratings and
the training data is every other rating. All items not in a user's training data are ranked;
metrics at 10, macro-averaged over test users. Prints NDCG@10 (both discounts), Recall@10 and wall
time per hyperparameter set, beside the popularity baseline.

    python benchmarks/implicit_movielens.py [--zip PATH] [--folds 1|5] [--sets default,bpr,warp,best]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl

from common import load_movielens as load_ratings
from flexmf_assets.datasets.split import crossfold_users
from flexmf_assets.evaluation.topn import PopularityBaseline, topn_metrics
from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer
from flexmf_assets.flexmf.implicit_config import IMPLICIT_HPARAM_SETS

from common import SHARED_ZIP as DEFAULT_ZIP  # noqa: E402


def evaluate(recs: pl.DataFrame, test: pl.DataFrame) -> dict[str, float]:
    log2 = topn_metrics(recs, test, ks=(10,), discount="log2").means
    lk = topn_metrics(recs, test, ks=(10,), discount="lenskit").means
    return {"ndcg@10": log2["ndcg@10"], "ndcg@10_lenskit": lk["ndcg@10"], "recall@10": log2["recall@10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    ap.add_argument("--folds", type=int, default=1, help="how many of the 5 folds to run")
    ap.add_argument("--sets", default=",".join(IMPLICIT_HPARAM_SETS))
    ap.add_argument("--set", action="append", default=[], metavar="NAME:k=v,k=v",
                    help="an extra ad-hoc set, e.g. 'k32:embedding_size=32'")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = ap.parse_args()

    device = DeviceSettings(device=args.device, threads=args.threads)
    ratings = load_ratings(args.zip)
    sets = {name: IMPLICIT_HPARAM_SETS[name] for name in args.sets.split(",") if name}
    for spec in args.set:
        name, _, over = spec.partition(":")
        sets[name] = FlexMFImplicitScorer(None).config.parse_overrides(over)
    splits = list(crossfold_users(ratings))[: args.folds]
    rows = []
    for name in ["popularity", *sets]:
        scores, seconds, ups = [], 0.0, []
        for train, test in splits:
            t0 = time.perf_counter()
            if name == "popularity":
                model = PopularityBaseline().fit(train)
            else:
                model = FlexMFImplicitScorer(sets[name], device=device).fit(train)
                ups.append(model.updates_per_second)
            recs = model.recommend(test["user_id"].unique().sort(), n=10)
            seconds += time.perf_counter() - t0
            scores.append(evaluate(recs, test))
        mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        rows.append({"set": name, **mean, "seconds": seconds / len(splits),
                     "updates/s": float(np.mean(ups)) if ups else float("nan")})
        r = rows[-1]
        print(f"{name:>12}  ndcg@10 {r['ndcg@10']:.4f}  ndcg@10(lenskit) {r['ndcg@10_lenskit']:.4f}  "
              f"recall@10 {r['recall@10']:.4f}  {r['seconds']:.1f} s/fold  {r['updates/s']:,.0f} upd/s",
              flush=True)
    print(f"\nprotocol: ml-latest-small, crossfold_users(5, SampleN(5)) seed 42, folds run: {len(splits)}")
    for name, s in sets.items():
        print(f"{name}: {FlexMFImplicitScorer(s).config.to_dict()}")


if __name__ == "__main__":
    main()
