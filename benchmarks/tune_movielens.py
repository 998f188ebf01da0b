"""Tuning benchmark (issue 17): what an Optuna study over the search spaces of ``flexmf.yaml``-style
``tune:`` entries reaches, side by side with the best named set, on three protocols.

* ``explicit``: ml-latest-small, random 80/20 (seed 42, ``explicit_movielens.split``); trials train on
  the training part minus its last 10% and are judged (and pruned) on that 10%; the best trial's model
  is scored on the test set. Target: test RMSE <= 0.835 within 40 trials and 15 minutes.
* ``implicit``: LensKit's 5 folds (``flexmf_assets.datasets.split.crossfold_users``); trials train inside fold 0's training
  part, judged on a validation split made the same way (``crossfold_users`` of that part, its fold 0);
  the best configuration (at its best epoch) is applied to all 5 folds, NDCG@10 as
  ``implicit_movielens.evaluate``. Target: NDCG@10 >= 0.20.
* ``planted``: synthetic low-rank data with a known noise floor (``synthetic-100k``): the share of the
  gap between the bias baseline and the floor that the tuned champion closes on the test set. Target:
  >= 90%.

Trials run in this process through the library's study code (:mod:`flexmf_assets.tuning`: the space
parsed as ``flexmf.yaml`` would be, the trial keys, the median pruner fed by the epoch callback), with
the study in a throwaway SQLite file, so the figures measure the search, not Dagster's run overhead.
A ``solver`` choice joins a space only where the config class has that field (the ALS integration).

    python benchmarks/tune_movielens.py [--part explicit|implicit|planted|all] [--trials 40] [--timeout 900]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import SHARED_ZIP, load_movielens, random_split
from flexmf_assets.datasets.split import crossfold_users
from explicit_movielens import split as explicit_split
from implicit_movielens import evaluate as implicit_evaluate
from flexmf_assets.datasets.synthetic import generate, planted_truth
from flexmf_assets.evaluation.rating import BiasBaseline, rating_metrics
from flexmf_assets.flexmf import (EXPLICIT_HPARAM_SETS, IMPLICIT_HPARAM_SETS, FlexMFExplicitConfig,
                                  FlexMFExplicitScorer, FlexMFImplicitConfig, FlexMFImplicitScorer)
from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.tuning import TrialReporter, open_study, parse_tune, trial_key

EXPLICIT_SPACE: dict[str, Any] = {
    "base": {"epochs": 80, "patience": 5},
    "space": {"embedding_size": {"low": 16, "high": 256, "log": True},
              "learning_rate": {"low": 0.002, "high": 0.05, "log": True},
              "regularization": {"low": 0.01, "high": 1.0, "log": True},
              "optimizer": ["sgd", "adam"]},
}
IMPLICIT_SPACE: dict[str, Any] = {
    "base": {"epochs": 40, "patience": 5},
    "space": {"loss": ["logistic", "pairwise"], "negative_strategy": ["uniform", "misranked"],
              "embedding_size": {"low": 16, "high": 128, "log": True},
              "learning_rate": {"low": 0.001, "high": 0.05, "log": True}},
}


def with_solver(entry: dict[str, Any], cls: type) -> dict[str, Any]:
    """The space plus a ``solver`` choice when the config class has that field (ALS integration)."""
    if "solver" not in cls.field_names():
        return entry
    import typing

    hint = typing.get_type_hints(cls)["solver"]
    choices = [a for a in typing.get_args(hint) if isinstance(a, str)]
    return {**entry, "space": {**entry["space"], "solver": choices}} if choices else entry


def study(track: str, entry: dict[str, Any], cls: type, defaults: dict, trials: int, timeout: float,
          lower: bool, db: Path):
    entry = {**with_solver(entry, cls), "trials": trials, "timeout": timeout, "seed": 42,
             "pruning": {"startup_trials": 5, "warmup_epochs": 5}}
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


def explicit_part(args, device, db) -> None:
    train_all, train, val, test = explicit_split(load_movielens(args.zip))
    spec, st = study("explicit", EXPLICIT_SPACE, FlexMFExplicitConfig, EXPLICIT_HPARAM_SETS["default"],
                     args.trials, args.timeout, True, db)
    key, model = run(spec, st, FlexMFExplicitConfig, explicit_fit(train, val, device), "val_rmse")
    rows = [("bias baseline", rmse(BiasBaseline().fit(train_all), test))]
    for name in ("default", "tuned"):  # as explicit_movielens.py fits them (no validation: every epoch)
        cfg = FlexMFExplicitConfig.from_dict(EXPLICIT_HPARAM_SETS[name])
        rows.append((f"named set {name}", rmse(FlexMFExplicitScorer(cfg, device=device).fit(train_all), test)))
    rows.append((f"tuned: {key}", rmse(model, test)))
    print("\nexplicit, ml-latest-small random 80/20 seed 42 (test RMSE; target <= 0.835):")
    for name, value in rows:
        print(f"  {value:.4f}  {name}")


def implicit_part(args, device, db) -> None:
    folds = list(crossfold_users(load_movielens(args.zip)))
    inner_train, inner_val = next(crossfold_users(folds[0][0]))
    spec, st = study("implicit", IMPLICIT_SPACE, FlexMFImplicitConfig, IMPLICIT_HPARAM_SETS["default"],
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
    print(f"  {five_folds(IMPLICIT_HPARAM_SETS['best']):.4f}  named set best")
    print(f"  {five_folds(tuned):.4f}  tuned: {key} (epochs {model.best_epoch})")


def planted_part(args, device, db) -> None:
    data = generate("synthetic-100k").ratings
    truth = planted_truth("synthetic-100k")
    train_all, test = random_split(data)
    train, val = random_split(train_all, seed=7, test_frac=0.1)
    floor = truth.rmse(test)
    base = rmse(BiasBaseline().fit(train_all), test)
    spec, st = study("explicit", EXPLICIT_SPACE, FlexMFExplicitConfig, EXPLICIT_HPARAM_SETS["default"],
                     args.trials, args.timeout, True, db)
    key, model = run(spec, st, FlexMFExplicitConfig, explicit_fit(train, val, device), "val_rmse")
    rows = [(f"named set {n}", rmse(FlexMFExplicitScorer(FlexMFExplicitConfig.from_dict(EXPLICIT_HPARAM_SETS[n]),
                                                          device=device).fit(train_all), test))
            for n in ("default", "tuned")]
    rows.append((f"tuned: {key}", rmse(model, test)))
    print(f"\nplanted synthetic-100k, random 80/20 (test RMSE; baseline {base:.4f}, floor {floor:.4f}; "
          "gap closed, target >= 90%):")
    for name, value in rows:
        print(f"  {value:.4f}  {100 * (base - value) / (base - floor):5.1f}%  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=SHARED_ZIP)
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
