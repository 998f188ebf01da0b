"""Explicit FlexMF on MovieLens ml-latest-small: accuracy and throughput.

Protocol (state it beside every figure):
  * data: ``ratings.csv`` of ml-latest-small (100,836 ratings), read with polars from the zip;
  * split: random 80/20 of ratings, ``numpy.random.default_rng(42).permutation``: the first 20% of
    the permuted rows are the test set, the rest is training;
  * validation (only with ``--patience``/presets that early-stop): the last 10% of the training part
    of the same permutation is held out for early stopping; the test set is never seen in training;
  * metrics: global RMSE and MAE on the test set (cold-start users/items get bias-only predictions),
    the damped bias baseline (``BiasBaseline``) on the same split beside them;
  * throughput: updates/s = epochs run x training ratings / training wall time (whole ``fit``);
    with ``--repeat N`` the best of N fits in this process (a shared machine only ever slows a fit).
  * ``--set lenskit`` is LensKit FlexMF's explicit configuration (k=64, batch 8192, lr 0.01,
    10 epochs, L2 0.1, sparse Adam); add ``optimizer=sgd`` for our SGD at that configuration.

Usage: ``python benchmarks/explicit_movielens.py [--zip PATH] [--set default|tuned|lenskit] [--repeat N]``
plus ``field=value`` overrides, e.g. ``embedding_size=128 epochs=60``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from common import load_movielens as load_ratings
from flexmf_assets.evaluation.rating import BiasBaseline, rating_metrics
from flexmf_assets.flexmf.explicit_config import EXPLICIT_HPARAM_SETS, FlexMFExplicitConfig
from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer

#: LensKit 2026.4.0 FlexMF explicit defaults, mapped onto ours (as benchmarks/compare_lenskit.py does)
LENSKIT = {"embedding_size": 64, "batch_size": 8192, "learning_rate": 0.01, "epochs": 10,
           "regularization": 0.1, "reg_method": "L2", "optimizer": "adam", "init_scale": 0.1}
from common import SHARED_ZIP as DEFAULT_ZIP  # noqa: E402


def split(ratings: pl.DataFrame, seed: int = 42, test_frac: float = 0.2, val_frac: float = 0.1):
    perm = np.random.default_rng(seed).permutation(ratings.height)
    n_test = int(round(test_frac * ratings.height))
    test = ratings[perm[:n_test]]
    rest = perm[n_test:]
    n_val = int(round(val_frac * len(rest)))
    return ratings[rest], ratings[rest[: len(rest) - n_val]], ratings[rest[len(rest) - n_val :]], test


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    ap.add_argument("--set", default="default", choices=sorted({*EXPLICIT_HPARAM_SETS, "lenskit"}))
    ap.add_argument("--repeat", type=int, default=1, help="fits to time (throughput of the fastest)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("overrides", nargs="*", help="field=value overrides of the preset")
    args = ap.parse_args(argv)

    raw = dict(LENSKIT if args.set == "lenskit" else EXPLICIT_HPARAM_SETS[args.set])
    if args.overrides:
        raw.update(FlexMFExplicitConfig.parse_overrides(",".join(args.overrides)))
    cfg = FlexMFExplicitConfig.from_dict(raw)
    ratings = load_ratings(args.zip)
    train_all, train, val, test = split(ratings)
    use_val = cfg.patience is not None
    fit_train = train if use_val else train_all

    model, best_s = None, float("inf")
    for _ in range(args.repeat):
        model = FlexMFExplicitScorer(cfg, device=DeviceSettings(args.device, threads=args.threads)).fit(fit_train, val if use_val else None)
        best_s = min(best_s, model.train_seconds)
    assert model is not None
    t0 = time.perf_counter()
    metrics = rating_metrics(test, model.predict_frame(test))
    pred_s = time.perf_counter() - t0
    base = BiasBaseline().fit(fit_train)
    bm = rating_metrics(test, base.predict_frame(test))

    print(f"ml-latest-small, random 80/20 split seed 42: train {fit_train.height}, "
          f"validation {val.height if use_val else 0}, test {test.height}")
    print(f"set={args.set} config={cfg.to_dict()}")
    print(f"device={model.device} hot-loop threads={args.threads or 1} epochs_run={model.epochs_run} best_epoch={model.best_epoch}")
    print(f"FlexMF explicit  test RMSE {metrics.rmse:.4f}  MAE {metrics.mae:.4f}  "
          f"(per-user RMSE {metrics.user_rmse:.4f})")
    print(f"bias baseline    test RMSE {bm.rmse:.4f}  MAE {bm.mae:.4f}")
    ups = model.epochs_run * fit_train.height / best_s
    print(f"training wall time {best_s:.2f} s (best of {args.repeat}), {ups / 1e6:.2f}M updates/s; "
          f"predict+metrics {pred_s * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
