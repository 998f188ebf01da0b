"""Side by side: our FlexMF engine vs LensKit 2026.4.0 FlexMF, Surprise SVD and ``implicit``.

    python benchmarks/compare_lenskit.py [--quick] [--rounds N] [--folds N] [--models explicit,logistic,bpr,warp,als-explicit,als-implicit]

One command from a clean checkout: creates the venvs it needs (``benchmarks/.venvs/lenskit`` with
Python 3.13 + ``lenskit==2026.4.0``; ``benchmarks/.venvs/baselines`` with scikit-surprise and
implicit 0.7) and says so when one cannot be made, then goes on without it.

Protocol (see docs/benchmarks.md):
  * split files are written once per run under ``benchmarks/out/splits`` and every library reads
    them: explicit = ml-latest-small, random 80/20 of ratings, seed 42; implicit = LensKit's
    ``crossfold_users(5, SampleN(5))`` seed 42 (fold 0 for timing, ``--folds`` for quality);
  * same configuration for ours and LensKit's: embedding_size 64, batch_size 8192, learning_rate
    0.01, 10 epochs, LensKit's regularization and loss for each model (read from its config
    classes), torch threads = ``--threads`` (2) in both;
  * per model and round, each implementation runs in a *fresh process* in alternation (ours,
    LensKit, others, ours, LensKit, ...): fit 1 = first fit in a fresh process (LensKit's includes
    ``torch.compile``), fit 2 = steady state in the same process; updates/s = epochs x training
    interactions / steady seconds; peak RSS = the child's ``ru_maxrss``;
  * quality is computed here, with OUR metrics, on every library's output: test RMSE (explicit);
    NDCG@10 with the 1/log2(rank+1) discount over all items unseen in training (implicit).
  * ALS (``als-explicit``, ``als-implicit``): our named sets ``als`` against LensKit's
    ``BiasedMFScorer`` / ``ImplicitMFScorer`` (its defaults, and at our set's size) and ``implicit``'s
    ``AlternatingLeastSquares`` (its defaults, and at our set's hyperparameters: ``alpha = weight + 1``
    on binary data), on the same split files; use ``--our-threads`` equal to ``--threads``.
Results: printed tables, ``benchmarks/out/compare_lenskit.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from flexmf_assets.datasets.split import crossfold_users  # noqa: E402
from flexmf_assets.flexmf.explicit_config import EXPLICIT_HPARAM_SETS  # noqa: E402
from flexmf_assets.flexmf.implicit_config import IMPLICIT_HPARAM_SETS  # noqa: E402

LENSKIT_PY = str(Path.home() / ".pyenv" / "versions" / "3.13.0" / "bin" / "python")
BASELINES_PY = sys.executable
LENSKIT_PKGS = ["lenskit==2026.4.0"]
BASELINE_PKGS = ["scikit-surprise", "implicit>=0.7,<0.8", "pandas", "pyarrow"]
MODELS = ("explicit", "logistic", "bpr", "warp", "als-explicit", "als-implicit")
SHARED = {"embedding_size": 64, "batch_size": 8192, "learning_rate": 0.01, "epochs": 10}

#: LensKit 2026.4.0's defaults, used when its venv is missing (the live values win when present)
LENSKIT_FALLBACK = {
    "explicit": {**SHARED, "regularization": 0.1, "reg_method": "L2"},
    "implicit": {**SHARED, "regularization": 0.01, "reg_method": "AdamW", "loss": "logistic",
                 "negative_count": 1, "positive_weight": 1.0, "user_bias": None, "item_bias": True},
    "implicit_presets": {
        "bpr": {"loss": "pairwise", "user_bias": False, "item_bias": False},
        "warp": {"loss": "warp", "negative_strategy": "misranked", "user_bias": False, "item_bias": False},
    },
}


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------


def lenskit_config(model: str) -> dict[str, Any]:
    """LensKit FlexMF config for ``model``: the shared settings, the rest LensKit's defaults."""
    if model == "explicit":
        return dict(SHARED)
    return {**SHARED, **({} if model == "logistic" else {"preset": model})}


def ours_config(model: str, lk: dict[str, Any], optimizer: str = "adam") -> dict[str, Any]:
    """Our config with the same meaning as LensKit's for ``model`` (``lk`` = its defaults)."""
    if model == "explicit":
        e = lk["explicit"]
        return {**SHARED, "regularization": e["regularization"], "reg_method": e["reg_method"],
                "optimizer": optimizer, "init_scale": 0.1}
    i = lk["implicit"]
    cfg = {**SHARED, "regularization": i["regularization"], "reg_method": i["reg_method"],
           "negative_count": i["negative_count"], "positive_weight": i["positive_weight"],
           "item_bias": i["item_bias"], "init_scale": 0.1}
    if model == "logistic":
        cfg.update(loss="logistic", negative_strategy="uniform",
                   user_bias=True if i["user_bias"] is None else i["user_bias"])
    else:
        preset = lk["implicit_presets"][model]
        cfg.update(loss=preset["loss"], negative_strategy=preset.get("negative_strategy", "uniform"),
                   user_bias=preset["user_bias"], item_bias=preset["item_bias"])
        if model == "warp":  # LensKit tries up to max_tries (200) candidates per positive: score as many
            cfg.update(preset="warp", misranked_candidates=int(lk.get("warp", {}).get("max_tries", 200)))
    return cfg


# ----------------------------------------------------------------------------------------------
# our child process
# ----------------------------------------------------------------------------------------------


def child(job_path: str) -> None:
    """Run one job of OUR engine in this (fresh) process; same contract as the other runners."""
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    from flexmf_assets.flexmf.device import DeviceSettings

    train = pl.read_parquet(job["train"])
    test = pl.read_parquet(job["test"])
    explicit = job["track"] == "explicit"
    if explicit:
        from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig as Config
        from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer as Scorer
    else:
        from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer as Scorer  # type: ignore[assignment]
        from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig as Config  # type: ignore[assignment]
    cfg = Config.from_dict(job["config"])
    device = DeviceSettings("cpu", threads=job["threads"])
    times, model = [], None
    for _ in range(job["fits"]):
        t0 = time.perf_counter()
        model = Scorer(cfg, device=device).fit(train)
        times.append(time.perf_counter() - t0)
    assert model is not None
    t0 = time.perf_counter()
    if explicit:
        out = model.predict_frame(test.select("user_id", "item_id"))
    else:
        users = test["user_id"].unique().sort()
        out = model.recommend(users, n=job["n"]).select("user_id", "item_id", "rank")
    rec_s = time.perf_counter() - t0
    common.write_parquet(out, Path(job["output"]))
    common.write_json(
        {
            "library": "ours",
            "version": "flexmf-assets",
            "torch": torch.__version__,
            "fit_s": times,
            "train_seconds": model.train_seconds,
            "recommend_s": rec_s,
            "n_train": int(train.height if explicit else train.select("user_id", "item_id").unique().height),
            "epochs": model.epochs_run,
            "config": cfg.to_dict(),
            "timed": "Scorer(config).fit(polars frame) (id indexing included)",
        },
        Path(job["result"]),
    )


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------


class Runner:
    """Runs jobs in fresh child processes, one interpreter per library."""

    def __init__(self, out: Path, threads: int, timeout: float, our_threads: int = 1):
        self.out, self.threads, self.timeout, self.our_threads = out, threads, timeout, our_threads
        self.pythons: dict[str, Path | None] = {"ours": Path(sys.executable)}
        self.scripts = {
            "ours": [str(Path(__file__).resolve()), "--child"],
            "lenskit": [str(common.BENCH / "_lenskit_runner.py")],
            "baselines": [str(common.BENCH / "_baselines_runner.py")],
        }
        self.count = 0

    def run(self, lib: str, model: str, track: str, split: dict[str, str], config: dict[str, Any],
            fits: int, tag: str) -> dict[str, Any]:
        py = self.pythons.get(lib if lib in ("ours", "lenskit") else "baselines")
        if py is None:
            return {"error": f"{lib}: venv unavailable"}
        self.count += 1
        stem = self.out / "runs" / f"{self.count:03d}-{tag}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        threads = self.our_threads if lib == "ours" else self.threads
        job = {"model": model, "track": track, "train": split["train"], "test": split["test"],
               "config": config, "fits": fits, "threads": threads, "n": 10,
               "output": f"{stem}.parquet", "result": f"{stem}.json"}
        common.write_json(job, Path(f"{stem}.job.json"))
        script = self.scripts[lib if lib in ("ours", "lenskit") else "baselines"]
        # the same OpenMP wait policy for every library (ours sets passive on import; see docs/benchmarks.md)
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive",
               "PYTHONWARNINGS": "ignore"}
        res = common.run_child([str(py), *script, f"{stem}.job.json"], Path(job["result"]), self.timeout, env)
        res["output"] = job["output"]
        return res


def evaluate(track: str, output: str, test_path: str) -> dict[str, float]:
    """Quality of a library's output with OUR metrics (identical for every library)."""
    test = pl.read_parquet(test_path)
    out = pl.read_parquet(output)
    if track == "explicit":
        from flexmf_assets.evaluation.rating import rating_metrics

        m = rating_metrics(test, out.with_columns(pl.col("prediction").cast(pl.Float64)), missing="skip")
        return {"rmse": m.rmse, "mae": m.mae, "predicted": m.n / test.height}
    from flexmf_assets.evaluation.topn import topn_metrics

    out = out.with_columns(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64))
    log2 = topn_metrics(out, test.select("user_id", "item_id"), ks=(10,), discount="log2").means
    lk = topn_metrics(out, test.select("user_id", "item_id"), ks=(10,), discount="lenskit").means
    return {"ndcg@10": log2["ndcg@10"], "ndcg@10_lenskit": lk["ndcg@10"], "recall@10": log2["recall@10"]}


def write_splits(runner: Runner, folds: int) -> dict[str, Any]:
    """Write the split files once; the implicit folds come from LensKit itself when it is there."""
    splits = common.SPLITS
    ratings = common.load_movielens(ARGS.zip)
    train, test = common.random_split(ratings)
    common.write_parquet(train.select("user_id", "item_id", "rating"), splits / "explicit-train.parquet")
    common.write_parquet(test.select("user_id", "item_id", "rating"), splits / "explicit-test.parquet")
    info: dict[str, Any] = {"explicit": {"train": str(splits / "explicit-train.parquet"),
                                          "test": str(splits / "explicit-test.parquet")}}
    made_by = "ours (flexmf_assets.datasets.split.crossfold_users; LensKit unavailable)"
    if runner.pythons.get("lenskit") is not None:
        full = common.write_parquet(ratings.select("user_id", "item_id", "rating"), splits / "ratings.parquet")
        import subprocess

        proc = subprocess.run([str(runner.pythons["lenskit"]), str(common.BENCH / "_lenskit_runner.py"),
                               "split", str(full), str(splits), str(folds)], capture_output=True, text=True)
        if proc.returncode == 0:
            made_by = "LensKit crossfold_users(data, 5, SampleN(5, rng=42), rng=42)"
        else:
            print(f"LensKit split failed ({proc.stderr.strip().splitlines()[-1:]}); using ours", flush=True)
    if not made_by.startswith("LensKit"):
        for n, (tr, te) in enumerate(crossfold_users(ratings)):
            if n >= folds:
                break
            common.write_parquet(tr.select("user_id", "item_id", "rating"), splits / f"implicit-fold{n}-train.parquet")
            common.write_parquet(te, splits / f"implicit-fold{n}-test.parquet")
    info["implicit"] = [{"train": str(splits / f"implicit-fold{n}-train.parquet"),
                         "test": str(splits / f"implicit-fold{n}-test.parquet")} for n in range(folds)]
    info["implicit_made_by"] = made_by
    return info


def als_implementations(model: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The ALS rows: our set ``als``, LensKit's ALS scorers and ``implicit``'s ALS."""
    if model == "als-explicit":
        ours = EXPLICIT_HPARAM_SETS["als"]
        return [("ours, set als", "ours", "explicit", dict(ours)),
                ("LensKit BiasedMF", "lenskit", "biasedmf", {}),
                ("LensKit BiasedMF k, epochs of als", "lenskit", "biasedmf",
                 {"embedding_size": ours["embedding_size"], "epochs": ours["epochs"]})]
    ours = IMPLICIT_HPARAM_SETS["als"]
    equal = {"factors": ours["embedding_size"], "regularization": ours["regularization"],
             "alpha": ours["weight"] + 1.0, "iterations": ours["epochs"]}
    return [("ours, set als", "ours", "implicit", dict(ours)),
            ("implicit ALS defaults", "baselines", "implicit-als", {}),
            ("implicit ALS at set als", "baselines", "implicit-als", equal),
            ("LensKit ImplicitMF", "lenskit", "implicitmf", {}),
            ("LensKit ImplicitMF at set als", "lenskit", "implicitmf",
             {"embedding_size": ours["embedding_size"], "regularization": ours["regularization"],
              "weight": ours["weight"], "epochs": ours["epochs"]})]


def implementations(model: str, lk: dict[str, Any], quick: bool) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, library, runner model name, config) of everything timed for ``model``."""
    if model.startswith("als-"):
        return als_implementations(model)
    rows: list[tuple[str, str, str, dict[str, Any]]] = [("ours", "ours", model, ours_config(model, lk))]
    if model == "explicit":
        rows.append(("ours (sgd)", "ours", model, ours_config(model, lk, optimizer="sgd")))
    # our named hyperparameter set for this loss (what flexmf.yaml trains), beside the shared config
    named = {"explicit": "default", "logistic": "default", "bpr": "bpr", "warp": "warp"}[model]
    presets = EXPLICIT_HPARAM_SETS if model == "explicit" else IMPLICIT_HPARAM_SETS
    rows.append((f"ours, set {named}", "ours", model, dict(presets[named])))
    if model == "warp":
        rows.append(("ours, set best", "ours", model, dict(IMPLICIT_HPARAM_SETS["best"])))
    if not (quick and model == "warp"):
        rows.append(("LensKit FlexMF", "lenskit", model, lenskit_config(model)))
    if model == "explicit":
        rows.append(("Surprise SVD k=64", "baselines", "surprise-svd",
                     {"n_factors": 64, "n_epochs": 40, "reg_all": 0.05}))
        rows.append(("Surprise SVD defaults", "baselines", "surprise-svd", {}))
    elif model == "logistic":
        rows.append(("implicit ALS", "baselines", "implicit-als", {"factors": 64}))
    elif model == "bpr":
        rows.append(("implicit BPR", "baselines", "implicit-bpr", {"factors": 64}))
    return rows


def summarize(runs: list[dict[str, Any]], qualities: list[dict[str, float]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no runs") if runs else "not run"}
    first = statistics.median(r["fit_s"][0] for r in ok)
    steady_runs = [r["fit_s"][1] for r in ok if len(r["fit_s"]) > 1]
    steady = statistics.median(steady_runs) if steady_runs else first
    n, epochs = ok[0]["n_train"], ok[0]["epochs"]
    q = {k: statistics.mean(x[k] for x in qualities) for k in qualities[0]} if qualities else {}
    return {
        "first_fit_s": first, "steady_s": steady, "steady_measured": bool(steady_runs),
        "updates_per_s": epochs * n / steady, "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "n_train": n, "epochs": epochs, "quality": q, "folds": len(qualities),
        "version": ok[0].get("version"), "config": ok[0].get("config"), "timed": ok[0].get("timed"),
        "first_fits": [r["fit_s"][0] for r in ok], "steady_fits": steady_runs,
    }


def table_rows(model: str, results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One table per model. Ratios are LensKit / implementation: throughput (updates/s, so runs with
    other epoch counts compare fairly) and first-fit wall time (what a user waits)."""
    qkey, qname = ("rmse", "RMSE") if model in ("explicit", "als-explicit") else ("ndcg@10", "NDCG@10")
    lk = next((r for label, r in results.items() if label.startswith("LensKit")), {})
    headers = ["implementation", "epochs", "first fit s", "steady s", "updates/s", "peak RSS MiB", qname,
               "updates/s ratio vs LensKit", "first-fit speedup vs LensKit"]
    rows = []
    for label, r in results.items():
        if "error" in r:
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", f"failed: {r['error'].split(': ', 1)[-1][:70]}"])
            continue
        steady = common.fmt(r["steady_s"], ".2f") + ("" if r["steady_measured"] else "*")
        sp = fs = "-"
        if lk and "error" not in lk:
            sp = common.fmt(r["updates_per_s"] / lk["updates_per_s"], ".2f") + "x"
            fs = common.fmt(lk["first_fit_s"] / r["first_fit_s"], ".2f") + "x"
        rows.append([label, r["epochs"], common.fmt(r["first_fit_s"], ".2f"), steady,
                     common.fmt(r["updates_per_s"] / 1e6, ".3f") + "M", common.fmt(r["peak_rss_mb"], ".0f"),
                     common.fmt(r["quality"].get(qkey), ".4f"), sp, fs])
    return headers, rows


def render(report: dict[str, Any]) -> str:
    """Print every model's table; return the Markdown document."""
    m = report["machine"]
    md = [f"# Ours vs LensKit FlexMF ({m['date']})", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; threads: others {report['threads']}, ours {report.get('our_threads', report['threads'])}; "
          f"rounds {report['rounds']}; implicit folds for quality {report['folds']}; implicit split by "
          f"{report['splits']['implicit_made_by']}.", ""]
    for model, results in report["models"].items():
        headers, rows = table_rows(model, results)
        print(f"\n== {model} ==\n{common.text_table(headers, rows)}\n", flush=True)
        md += [f"## {model}", "", common.markdown_table(headers, rows), ""]
    md += ["`*` single fit in a fresh process (first = steady).", "",
           f"Command: `{report['command']}`; total wall time {report.get('total_s', 0):.0f} s."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", metavar="JOB", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="one round, skip LensKit's WARP (141-207 s)")
    ap.add_argument("--rounds", type=int, default=None, help="fresh-process rounds per implementation (default 2; 1 with --quick)")
    ap.add_argument("--folds", type=int, default=1, help="implicit folds for the quality column (1-5)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of the other libraries")
    ap.add_argument("--our-threads", type=int, default=1,
                    help="our engine's threads (default 1: on the 2-vCPU dev machine the memory-bound "
                         "kernels are slower with 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--zip", type=Path, default=common.SHARED_ZIP)
    ap.add_argument("--no-install", action="store_true", help="do not create missing venvs")
    ap.add_argument("--report-only", action="store_true",
                    help="re-print the tables of benchmarks/out/compare_lenskit.json without running")
    ARGS = args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.report_only:
        report = json.loads((common.OUT / "compare_lenskit.json").read_text())
        common.write_text(render(report), common.OUT / "compare_lenskit.md")
        return 0
    if not 1 <= args.folds <= 5:
        raise SystemExit(f"--folds: must be 1..5, got {args.folds}")
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    rounds = args.rounds or (1 if args.quick else 2)
    out = common.OUT
    started = time.perf_counter()

    runner = Runner(out, args.threads, args.timeout, args.our_threads)
    logs = out / "logs"
    if args.no_install:
        lk_py = common.VENVS / "lenskit" / "bin" / "python"
        bl_py = common.VENVS / "baselines" / "bin" / "python"
        if not bl_py.exists():  # als_probe's venv holds implicit (not Surprise): enough for the ALS rows
            bl_py = common.VENVS / "als-implicit" / "bin" / "python"
        runner.pythons["lenskit"] = lk_py if lk_py.exists() else None
        runner.pythons["baselines"] = bl_py if bl_py.exists() else None
    else:
        runner.pythons["lenskit"] = common.ensure_venv("lenskit", LENSKIT_PY, LENSKIT_PKGS, "lenskit.flexmf", logs / "lenskit-install.log")
        runner.pythons["baselines"] = common.ensure_venv("baselines", BASELINES_PY, BASELINE_PKGS, "surprise,implicit,pyarrow", logs / "baselines-install.log")

    lk = LENSKIT_FALLBACK
    if runner.pythons["lenskit"] is not None:
        import subprocess

        desc = out / "lenskit-defaults.json"
        subprocess.run([str(runner.pythons["lenskit"]), str(common.BENCH / "_lenskit_runner.py"), "describe", str(desc)],
                       capture_output=True, check=False)
        if desc.exists():
            lk = json.loads(desc.read_text())
    splits = write_splits(runner, args.folds)
    print(f"splits: {common.SPLITS} (implicit folds by {splits['implicit_made_by']})", flush=True)

    report: dict[str, Any] = {"machine": common.machine(), "threads": args.threads,
                              "our_threads": args.our_threads, "rounds": rounds,
                              "folds": args.folds, "quick": args.quick, "splits": splits,
                              "lenskit_defaults": lk, "command": " ".join(["python", "benchmarks/compare_lenskit.py", *(argv or sys.argv[1:])]),
                              "models": {}}
    for model in models:
        track = "explicit" if model in ("explicit", "als-explicit") else "implicit"
        split0 = splits["explicit"] if track == "explicit" else splits["implicit"][0]
        impls = implementations(model, lk, args.quick)
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in impls}
        quals: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in impls}
        for rnd in range(rounds):
            for label, lib, name, cfg in impls:
                slow = lib == "lenskit" and model == "warp"
                if slow and rnd > 0:
                    continue  # LensKit's WARP: one fresh process, one fit (141-207 s)
                res = runner.run(lib, name, track, split0, cfg, 1 if slow else 2, f"{model}-{lib}-r{rnd}")
                runs[label].append(res)
                if "error" in res:
                    print(f"  {model:8s} {label:22s} round {rnd}: FAILED {res['error']}", flush=True)
                    continue
                if rnd == 0:
                    quals[label].append(evaluate(track, res["output"], split0["test"]))
                print(f"  {model:8s} {label:22s} round {rnd}: fits {', '.join(f'{t:.2f}' for t in res['fit_s'])} s, "
                      f"peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
        if track == "implicit":
            for fold in range(1, args.folds):
                for label, lib, name, cfg in impls:
                    if lib == "lenskit" and model == "warp":
                        continue
                    res = runner.run(lib, name, track, splits["implicit"][fold], cfg, 1, f"{model}-{lib}-f{fold}")
                    if "error" not in res:
                        quals[label].append(evaluate(track, res["output"], splits["implicit"][fold]["test"]))
        results = {label: summarize(runs[label], quals[label]) for label in runs}
        report["models"][model] = results
        print(f"\n== {model} ==\n{common.text_table(*table_rows(model, results))}\n", flush=True)
    report["total_s"] = time.perf_counter() - started
    common.write_json(report, out / "compare_lenskit.json")
    print("\n# summary")
    common.write_text(render(report), out / "compare_lenskit.md")
    print(f"wrote {out / 'compare_lenskit.json'} and {out / 'compare_lenskit.md'} ({report['total_s']:.0f} s)")
    return 0


ARGS: argparse.Namespace


if __name__ == "__main__":
    sys.exit(main())
