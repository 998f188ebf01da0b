"""Quality and speed probe of the ALS solvers (flexmf/als.py) on ml-latest-small; prints figures.

    python benchmarks/als_probe.py explicit [--set NAME:k=v,k=v ...] [--threads N] [--engine auto|native|torch]
    python benchmarks/als_probe.py implicit [--set NAME:k=v,...] [--folds 5]
    python benchmarks/als_probe.py search [--threads N]

The solvers alone (no scorer core), for tuning and profiling; the comparison with LensKit's ALS
scorers and ``implicit``'s ALS on the same split files is ``compare_lenskit.py --models
als-explicit,als-implicit``. Protocols (state them beside every figure):
  * explicit: ml-latest-small, random 80/20 split seed 42 (``common.random_split``); test RMSE over
    every test rating: ``mu + b_u + b_i + p_u . q_i``, bias-only for users or items unseen in
    training, clamped to the training rating range (as our scorer predicts) and unclamped;
  * implicit: the library's ``crossfold_users(5 folds, 5 held-out ratings per test user, seed 42)``,
    unique (user, item) pairs with value 1; top 10 of all items unseen in training; NDCG@10 with the
    1/log2(rank+1) discount (``topn_metrics``), macro-averaged over test users, mean over folds;
    fit time: id indexing, ``setup`` (CSR built) and the epochs (the kernels loaded before).

``search``: the explicit set ``als`` chosen on a validation split: the explicit protocol's training
80% split again at random (seed 43) into 90% fit and 10% validation; each grid point is one fit of
``FlexMFExplicitScorer(solver="als")`` on the 90% for up to 20 iterations, scored on the validation
ratings after every iteration (the best iteration counts); the best point is then fitted on the whole
training split and its test RMSE printed (the test ratings play no part in the choice).

A ``--set`` value is ``NAME:field=value,...`` of :class:`ALSSettings` fields (``--set als`` alone is
the settings recommended for the named set ``als``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from flexmf_assets.datasets.split import crossfold_users  # noqa: E402
from flexmf_assets.evaluation.topn import topn_metrics  # noqa: E402
from flexmf_assets.flexmf import _native  # noqa: E402
from flexmf_assets.flexmf.ids import IdIndex  # noqa: E402
from flexmf_assets.flexmf.als import ALSSettings, ExplicitALS, ImplicitALS  # noqa: E402

#: the settings recommended for the named sets ``als`` (what ``--set als`` runs)
RECOMMENDED = {
    "explicit": {"embedding_size": 100, "epochs": 10, "regularization": 1.2, "reg_exponent": 0.5, "bias": "learned"},
    "implicit": {"embedding_size": 256, "epochs": 15, "regularization": 10.0, "weight": 1.0, "cg_steps": 3},
}


def parse_spec(spec: str, types: dict[str, type]) -> tuple[str, dict[str, Any]]:
    """``NAME:field=value,...`` -> (name, {field: typed value})."""
    name, _, body = spec.partition(":")
    out: dict[str, Any] = {}
    for part in filter(None, body.split(",")):
        key, _, raw = part.partition("=")
        kind = types.get(key)
        if kind is None:
            raise SystemExit(f"{spec!r}: unknown field {key!r}; fields: {', '.join(types)}")
        out[key] = raw if kind is str else (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return name, out


SETTING_TYPES = {f.name: {"int": int, "str": str, "bool": bool}.get(str(f.type), float)
                 for f in dataclasses.fields(ALSSettings)}


def settings_of(spec: str, track: str) -> tuple[str, ALSSettings]:
    name, values = parse_spec(spec, SETTING_TYPES)
    base = RECOMMENDED[track] if name == "als" else {}
    return name, ALSSettings(**{**base, **values})


# ----------------------------------------------------------------------------------------------
# explicit
# ----------------------------------------------------------------------------------------------


def run_explicit(args: argparse.Namespace) -> None:
    train, test = common.random_split(common.load_movielens(args.zip))
    print(f"explicit: ml-latest-small random 80/20 seed 42: {train.height} train, {test.height} test ratings; "
          f"threads {args.threads}; load {_load()}", flush=True)
    for spec in args.set or ["als"]:
        name, s = settings_of(spec, "explicit")
        users, u = IdIndex.fit(train["user_id"])
        items, i = IdIndex.fit(train["item_id"])
        r = train["rating"].to_numpy().astype(np.float32)
        k, nu, ni = s.embedding_size, len(users), len(items)
        best = None
        for _ in range(args.repeat):
            P, Q, bu, bi = torch.empty(nu, k), torch.empty(ni, k), torch.empty(nu), torch.empty(ni)
            t0 = time.perf_counter()
            als = ExplicitALS(s, engine=args.engine, threads=args.threads).setup(u, i, r, nu, ni, P, Q, bu, bi,
                                                                                float(r.mean()))
            history = [als.epoch() for _ in range(s.epochs)]
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        tu, ti = users.lookup(test["user_id"]), items.lookup(test["item_id"])
        pred = np.full(test.height, als.mu)
        pred[tu >= 0] += bu.double().numpy()[tu[tu >= 0]]
        pred[ti >= 0] += bi.double().numpy()[ti[ti >= 0]]
        both = (tu >= 0) & (ti >= 0)
        pred[both] += (P[tu[both]] * Q[ti[both]]).sum(1).double().numpy()
        truth = test["rating"].to_numpy().astype(np.float64)
        raw = float(np.sqrt(np.mean((pred - truth) ** 2)))
        err = np.clip(pred, r.min(), r.max()) - truth
        clamped, known = float(np.sqrt(np.mean(err ** 2))), float(np.sqrt(np.mean(err[both] ** 2)))
        print(f"{name:>14}  RMSE {clamped:.4f} (unclamped {raw:.4f}; known pairs {known:.4f})  fit {best:.2f} s "
              f"({als.engine}, best of {args.repeat})  objective {history[0]:.4f} -> {history[-1]:.4f}  "
              f"{_settings_text(s, 'explicit')}", flush=True)


# ----------------------------------------------------------------------------------------------
# implicit
# ----------------------------------------------------------------------------------------------


def _folds(args: argparse.Namespace) -> list[dict[str, str]]:
    """The fold files (written once per run under benchmarks/out/splits-als)."""
    ratings = common.load_movielens(args.zip)
    out = common.OUT / "splits-als"
    folds = []
    for n, (train, test) in enumerate(crossfold_users(ratings)):
        if n >= args.folds:
            break
        paths = {part: str(out / f"implicit-fold{n}-{part}.parquet") for part in ("train", "test")}
        common.write_parquet(train.select("user_id", "item_id", "rating"), Path(paths["train"]))
        common.write_parquet(test, Path(paths["test"]))
        folds.append(paths)
    return folds


def _ours_implicit(s: ALSSettings, fold: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    """(NDCG@10, fit seconds) of our ImplicitALS on one fold (one fit; the kernels are loaded before)."""
    train = pl.read_parquet(fold["train"]).select("user_id", "item_id").unique()
    test = pl.read_parquet(fold["test"])
    _native.kernels()
    times = []
    for _ in range(1):
        t0 = time.perf_counter()
        users, u = IdIndex.fit(train["user_id"])
        items, i = IdIndex.fit(train["item_id"])
        X, Y = torch.empty(len(users), s.embedding_size), torch.empty(len(items), s.embedding_size)
        als = ImplicitALS(s, engine=args.engine, threads=args.threads).setup(
            u, i, np.ones(len(u), np.float32), len(users), len(items), X, Y)
        for _ in range(s.epochs):
            als.epoch()
        times.append(time.perf_counter() - t0)
    test_users = np.unique(test["user_id"].to_numpy())
    rows = users.lookup(test_users)
    test_users, rows = test_users[rows >= 0], rows[rows >= 0]
    scores = X[torch.from_numpy(rows)] @ Y.T
    position = np.full(len(users), -1)
    position[rows] = np.arange(len(rows))
    seen = position[u] >= 0  # training pairs of the test users: never recommended
    scores[torch.from_numpy(position[u[seen]]), torch.from_numpy(i[seen])] = -torch.inf
    top = torch.topk(scores, 10, dim=1).indices.numpy()
    item_ids = np.asarray(items.ids)
    recs = pl.DataFrame({"user_id": np.repeat(test_users, 10), "item_id": item_ids[top.ravel()],
                         "rank": np.tile(np.arange(1, 11), len(test_users))})
    ndcg = topn_metrics(recs, test.select("user_id", "item_id"), ks=(10,), discount="log2").means["ndcg@10"]
    return float(ndcg), times[-1]


def run_implicit(args: argparse.Namespace) -> None:
    folds = _folds(args)
    print(f"implicit: ml-latest-small crossfold_users(5, 5 held out) seed 42 (flexmf_assets.datasets.split), folds run "
          f"{len(folds)}; threads {args.threads}; load {_load()}", flush=True)
    runs: list[tuple[str, str, Any]] = [("ours", *settings_of(spec, "implicit")) for spec in args.set]
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for _, name, _ in runs}
    for fold in folds:  # fold by fold, every run in turn: a shared machine's load hits all alike
        for _, name, what in runs:
            ndcg, sec = _ours_implicit(what, fold, args)
            results[name][0].append(ndcg)
            results[name][1].append(sec)
    for _, name, what in runs:
        scores, times = results[name]
        desc = _settings_text(what, "implicit")
        print(f"{name:>22}  NDCG@10 {np.mean(scores):.4f}  (folds {' '.join(f'{x:.4f}' for x in scores)})  "
              f"fit {np.mean(times):.2f} s/fold  {desc}", flush=True)


# ----------------------------------------------------------------------------------------------


SEARCH_BASE = {"solver": "als", "embedding_size": 100, "epochs": 20, "regularization": 1.2, "reg_exponent": 0.5,
               "bias": "learned"}
#: stage 1: the ridge; stage 2: around stage 1's best, one field at a time
SEARCH_STAGES = [
    {"regularization": [0.8, 1.2, 2.0, 3.0, 5.0, 8.0], "reg_exponent": [0.2, 0.3, 0.4, 0.5, 0.6]},
    {"embedding_size": [64, 150, 200], "bias_regularization": [0.1, 0.5, 2.0, 5.0], "bias": ["damped"],
     "damping": [2.0, 10.0, 25.0]},
]


def run_search(args: argparse.Namespace) -> None:
    from flexmf_assets.flexmf import FlexMFExplicitScorer
    from flexmf_assets.flexmf.device import DeviceSettings

    train, test = common.random_split(common.load_movielens(args.zip))
    fit, val = common.random_split(train, seed=43, test_frac=0.1)
    device = DeviceSettings(device="cpu", threads=args.threads)
    print(f"search: explicit protocol's train split {train.height} -> fit {fit.height} + validation {val.height} "
          f"(seed 43); threads {args.threads}; load {_load()}", flush=True)

    def score(cfg: dict[str, Any]) -> tuple[float, int]:
        m = FlexMFExplicitScorer(cfg, device=device).fit(fit, val)
        return min(h["val_rmse"] for h in m.history), m.best_epoch

    best = dict(SEARCH_BASE)
    best_rmse, best_epoch = score(best)
    print(f"base {best_rmse:.4f} @{best_epoch} {best}", flush=True)
    for stage, grid in enumerate(SEARCH_STAGES, 1):
        if stage == 1:
            points = [{**best, "regularization": r, "reg_exponent": e} for r in grid["regularization"]
                      for e in grid["reg_exponent"]]
        else:
            points = [{**best, field: v} for field, values in grid.items() for v in values]
        start = dict(best)
        for point in points:
            if point == start or (point.get("bias") == "damped" and "bias_regularization" in point):
                continue
            rmse, epoch = score(point)
            mark = " *" if rmse < best_rmse else ""
            print(f"stage {stage} val RMSE {rmse:.4f} @{epoch}{mark} "
                  f"{ {k: v for k, v in point.items() if k not in ('solver',)} }", flush=True)
            if rmse < best_rmse:
                best, best_rmse, best_epoch = point, rmse, epoch
    final = {**best, "epochs": best_epoch}
    m = FlexMFExplicitScorer(final, device=device).fit(train)
    pred = m.predict(test["user_id"], test["item_id"])
    rmse = float(np.sqrt(np.mean((pred.astype(np.float64) - test["rating"].to_numpy()) ** 2)))
    print(f"chosen (val RMSE {best_rmse:.4f}): {final}; test RMSE on the explicit protocol {rmse:.4f}", flush=True)


def _settings_text(s: ALSSettings, track: str) -> str:
    keys = ["embedding_size", "epochs", "regularization"]
    keys += (["reg_exponent", "bias", "bias_regularization", "damping"] if track == "explicit"
             else ["weight", "confidence", "cg_steps", "exact"])
    return " ".join(f"{k}={getattr(s, k)}" for k in keys)


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("track", choices=["explicit", "implicit", "search"])
    ap.add_argument("--set", action="append", default=[], metavar="NAME:k=v,...")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="explicit: fits per set (the best time is printed)")
    ap.add_argument("--engine", default="auto", choices=["auto", "native", "torch"])
    ap.add_argument("--zip", type=Path, default=common.SHARED_ZIP)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the torch engine's small batched ops; the kernels take --threads
    if args.track == "explicit":
        run_explicit(args)
    elif args.track == "search":
        run_search(args)
    else:
        if not args.set:
            args.set = ["als"]
        run_implicit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
