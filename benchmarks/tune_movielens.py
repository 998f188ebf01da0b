"""Tuning benchmark (issue 17): what an Optuna study over the search spaces of ``flexmf.yaml``-style
``tune:`` entries reaches, side by side with the best named set, on three protocols.

* ``explicit``: ml-latest-small, random 80/20 (seed 42, ``explicit_movielens.split``); trials train on
  the training part minus its last 10% and are judged (and pruned) on that 10%; the best trial's model
  is scored on the test set. Target: test RMSE <= 0.835 within 40 trials and 15 minutes.
* ``implicit``: LensKit's 5 folds (``flexmf_assets.datasets.split.crossfold_users``); trials train inside fold 0's training
  part, judged on a validation split made the same way (``crossfold_users`` of that part, its fold 0);
  the best configuration (at its best epoch) is applied to all 5 folds, NDCG@10 as
  ``implicit_movielens.evaluate``. Target: NDCG@10 >= 0.20.
* ``planted``: dense planted low-rank ratings with a known noise floor (:func:`planted`: 800 users x
  400 items at density 0.12, biases + a rank-4 dot product + N(0, 0.3) noise, as
  ``tests/test_explicit.py``), random 80/20: the share of the gap between the bias baseline and the
  floor (the RMSE of the noise-free ratings on the test set) that the tuned champion closes. Target:
  >= 90%. (``synthetic-100k`` is too sparse for this: every set stays near its baseline.)

The best trial of the explicit and planted studies is refit on the whole training part at its best
epoch (no early stopping), as the named sets are trained, before it is scored on the test set.

Trials run in this process through the library's study code (:mod:`flexmf_assets.tuning`: the
shipped ``flexmf.yaml``'s ``tune:`` entries (space, base, pruning) parsed as the project parses them, the trial keys, the median pruner fed by the epoch callback), with
the study in a throwaway SQLite file, so the figures measure the search, not Dagster's run overhead.

    python benchmarks/tune_movielens.py [--part explicit|implicit|planted|all] [--trials 40] [--timeout 900]
        [--config flexmf.yaml]   # whose tune: entries (default: the shipped one)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import yaml

from common import SHARED_ZIP, load_movielens, random_split
from flexmf_assets.datasets.split import crossfold_users
from explicit_movielens import split as explicit_split
from implicit_movielens import evaluate as implicit_evaluate
from flexmf_assets.evaluation.rating import BiasBaseline, rating_metrics
from flexmf_assets.flexmf import (EXPLICIT_HPARAM_SETS, IMPLICIT_HPARAM_SETS, FlexMFExplicitConfig,
                                  FlexMFExplicitScorer, FlexMFImplicitConfig, FlexMFImplicitScorer)
from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.tuning import TrialReporter, open_study, parse_tune, trial_key

#: the searches are the shipped ``tune:`` section of the repository's flexmf.yaml (spaces, base, pruning)
SHIPPED = Path(__file__).resolve().parents[1] / "flexmf.yaml"


def shipped_tune(track: str, config: Path = SHIPPED) -> dict[str, Any]:
    """``tune.<track>`` of ``config`` (the shipped flexmf.yaml), less what the command line sets."""
    entry = yaml.safe_load(config.read_text())["tune"][track]
    return {k: v for k, v in entry.items() if k not in ("trials", "timeout", "seed")}


def study(track: str, entry: dict[str, Any], cls: type, defaults: dict, trials: int, timeout: float,
          lower: bool, db: Path):
    entry = {**entry, "trials": trials, "timeout": timeout, "seed": 42}
    spec = parse_tune("tune_movielens", {track: entry}, {track: cls}, {track: defaults})[track]
    return spec, open_study(spec, "bench", f"sqlite:///{db}", lower_is_better=lower)


def run(spec, st, cls, fit: Callable[[Any, TrialReporter], tuple[float, Any]], metric: str):
    """Ask/train/tell ``spec.trials`` trials (or until the timeout); returns (best key, best model)."""
    import optuna

    start, best = time.monotonic(), (None, None, None)
    for n in range(spec.trials):
        if time.monotonic() - start > spec.timeout:
            print(f"  time budget spent after {n} trials")
            break
        trial = st.ask(spec.distributions())
        key = trial_key(cls, spec, trial.params)
        config = cls.from_dict({**FIT_DEFAULTS[cls], **cls.parse_overrides(key)})
        reporter = TrialReporter(st, trial.number, metric)
        t0 = time.perf_counter()
        value, model = fit(config, reporter)
        if reporter.pruned_at is not None:
            st.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = f"pruned at epoch {reporter.pruned_at}"
        else:
            st.tell(trial, value)
            state = f"{metric} {value:.4f}"
            if best[0] is None or (value < best[0] if st.direction.name == "MINIMIZE" else value > best[0]):
                best = (value, key, model)
        shown = f"  best {best[0]:.4f}" if best[0] is not None else ""
        print(f"  trial {n + 1}/{spec.trials} {key}: {state} ({time.perf_counter() - t0:.1f} s){shown}", flush=True)
    print(f"  {len(st.trials)} trials in {time.monotonic() - start:.0f} s")
    return best[1], best[2]


FIT_DEFAULTS: dict[type, dict] = {FlexMFExplicitConfig: EXPLICIT_HPARAM_SETS["default"],
                                  FlexMFImplicitConfig: IMPLICIT_HPARAM_SETS["default"]}


def explicit_fit(train, val, device):
    def fit(config, reporter):
        model = FlexMFExplicitScorer(config, device=device).fit(train, val, callback=reporter)
        return min(h["val_rmse"] for h in model.history), model
    return fit


def rmse(model, test) -> float:
    return rating_metrics(test, model.predict_frame(test)).rmse


def refit(cls: type, key: str, epochs: int) -> Any:
    """The config of trial ``key`` trained ``epochs`` epochs without early stopping (on all the data)."""
    return cls.from_dict({**FIT_DEFAULTS[cls], **cls.parse_overrides(key), "epochs": epochs, "patience": None})


def explicit_rows(args, device, db, train_all, train, val, test) -> list[tuple[str, float]]:
    """The explicit study on (train, val), its champion refit on ``train_all``; test RMSE of the bias
    baseline, the named sets (trained on ``train_all``, every epoch) and the champion."""
    spec, st = study("explicit", shipped_tune("explicit", args.config), FlexMFExplicitConfig, EXPLICIT_HPARAM_SETS["default"],
                     args.trials, args.timeout, True, db)
    key, model = run(spec, st, FlexMFExplicitConfig, explicit_fit(train, val, device), "val_rmse")
    rows = [("bias baseline", rmse(BiasBaseline().fit(train_all), test))]
    for name in EXPLICIT_HPARAM_SETS:
        cfg = FlexMFExplicitConfig.from_dict(EXPLICIT_HPARAM_SETS[name])
        rows.append((f"named set {name}", rmse(FlexMFExplicitScorer(cfg, device=device).fit(train_all), test)))
    rows.append((f"tuned, trial's model (90% of training): {key}", rmse(model, test)))
    best = refit(FlexMFExplicitConfig, key, model.best_epoch)
    rows.append((f"tuned, refit on all training at {model.best_epoch} epochs",
                 rmse(FlexMFExplicitScorer(best, device=device).fit(train_all), test)))
    return rows


def explicit_part(args, device, db) -> None:
    train_all, train, val, test = explicit_split(load_movielens(args.zip))
    rows = explicit_rows(args, device, db, train_all, train, val, test)
    print("\nexplicit, ml-latest-small random 80/20 seed 42 (test RMSE; target <= 0.835):")
    for name, value in rows:
        print(f"  {value:.4f}  {name}")


def implicit_part(args, device, db) -> None:
    folds = list(crossfold_users(load_movielens(args.zip)))
    inner_train, inner_val = next(crossfold_users(folds[0][0]))
    spec, st = study("implicit", shipped_tune("implicit", args.config), FlexMFImplicitConfig, IMPLICIT_HPARAM_SETS["default"],
                     args.trials, args.timeout, False, db)

    def fit(config, reporter):
        model = FlexMFImplicitScorer(config, device=device).fit(inner_train, inner_val, callback=reporter)
        return max(h["val_ndcg"] for h in model.history), model

    key, model = run(spec, st, FlexMFImplicitConfig, fit, "val_ndcg")
    tuned = {**IMPLICIT_HPARAM_SETS["default"], **FlexMFImplicitConfig.parse_overrides(key),
             "epochs": model.best_epoch, "patience": None}  # all folds: the tuned trial's best epoch

    def five_folds(raw) -> float:
        scores = []
        for train, test in folds:
            m = FlexMFImplicitScorer(FlexMFImplicitConfig.from_dict(raw), device=device).fit(train)
            scores.append(implicit_evaluate(m.recommend(test["user_id"].unique().sort(), n=10), test)["ndcg@10"])
        return float(np.mean(scores))

    print("\nimplicit, ml-latest-small crossfold_users(5, SampleN(5)) (mean NDCG@10; target >= 0.20):")
    for name in ("best", "als"):  # the best gradient-trained set, and ALS's where the solver exists
        if name in IMPLICIT_HPARAM_SETS:
            print(f"  {five_folds(IMPLICIT_HPARAM_SETS[name]):.4f}  named set {name}", flush=True)
    print(f"  {five_folds(tuned):.4f}  tuned: {key} (epochs {model.best_epoch})")


def planted(seed: int = 0, n_users: int = 800, n_items: int = 400, density: float = 0.12, noise: float = 0.3):
    """Dense planted ratings: 3.5 + user bias + item bias + rank-4 dot product + N(0, noise), and the
    noise-free rating of each (column ``truth``)."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_items)
    p, q = rng.normal(0, 0.6, (n_users, 4)), rng.normal(0, 0.6, (n_items, 4))
    u, i = np.nonzero(rng.random((n_users, n_items)) < density)
    truth = 3.5 + bu[u] + bi[i] + (p[u] * q[i]).sum(1)
    return pl.DataFrame({"user_id": u + 1000, "item_id": i + 5000,
                         "rating": (truth + rng.normal(0, noise, len(u))).astype(np.float32), "truth": truth})


def planted_part(args, device, db) -> None:
    train_all, test = random_split(planted())
    train, val = random_split(train_all, seed=7, test_frac=0.1)
    floor = float(np.sqrt(((test["rating"] - test["truth"]) ** 2).mean()))
    rows = explicit_rows(args, device, db, train_all, train, val, test)
    base = rows[0][1]
    print(f"\nplanted rank-4 800x400 density 0.12 noise 0.3, random 80/20 (test RMSE; baseline {base:.4f}, "
          f"floor {floor:.4f}; gap closed, target >= 90%):")
    for name, value in rows:
        print(f"  {value:.4f}  {100 * (base - value) / (base - floor):5.1f}%  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=SHARED_ZIP)
    ap.add_argument("--config", type=Path, default=SHIPPED, help="the flexmf.yaml whose tune: entries to run")
    ap.add_argument("--part", default="all", choices=["explicit", "implicit", "planted", "all"])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per study")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    device = DeviceSettings("cpu", threads=args.threads)
    parts = {"explicit": explicit_part, "implicit": implicit_part, "planted": planted_part}
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in parts.items():
            if args.part in (name, "all"):
                print(f"== {name}: {args.trials} trials, at most {args.timeout:.0f} s", flush=True)
                part(args, device, Path(tmp) / f"{name}.db")


if __name__ == "__main__":
    main()
