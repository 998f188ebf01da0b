"""Scale run: explicit k=64 training and top-20 recommendation vs data size (synthetic presets).

    python benchmarks/scale.py [--min P] [--max P] [--epochs N] [--threads 1] [--score-threads N] [field=value ...]

For each preset (synthetic-100k, -1m, -10m, -25m, from ``--min`` to ``--max``), fresh child processes:
  1. generate the preset (seed 42) into ``benchmarks/out/synthetic/<preset>.parquet`` (cached);
  2. train our explicit model, ``FlexMFExplicitConfig(embedding_size=64, epochs=E)`` plus the
     overrides, on ALL ratings (throughput, not accuracy): updates/s = epochs x ratings / training
     wall time (``model.train_seconds``, setup included) and per median epoch; peak RSS = the child's ``ru_maxrss`` (data included);
     the model is saved;
  3. load it and recommend top-20 unseen items for every user (``recommend(n=20)``, seen items
     excluded) with ``--score-threads`` threads: wall time and the child's peak RSS; in the same
     process, alternating over ``--score-rounds`` rounds (medians): the dense torch reference
     (``topk(U_b @ V.T, 20)`` over blocks of 4,096 users, excluding nothing) and the machine's
     matmul rate (torch matmul of the same shapes into a preallocated block, no top-k), so the
     achieved GFLOP/s of scoring (2 x users x items x width / seconds) stands next to it and the
     ratio reference / ours is printed from one run;
  4. with ``--implicit-eval PRESET`` (default synthetic-10m when within ``--max``): the evaluation
     of every test user of an implicit model, through the function the ``implicit_evaluation``
     asset calls (``tracks.track("implicit").report``: top-50 for every test user, metrics, the
     popularity baseline) on the project's default split (random 80/20, 10% validation, seed 42)
     of the preset; the model is the default implicit set trained for ``--implicit-epochs`` (1).
Prints a table, writes ``benchmarks/out/scale.json`` and the plot ``docs/benchmarks_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flexmf_assets.datasets.synthetic import SYNTHETIC_DATASETS  # noqa: E402

PRESETS = tuple(SYNTHETIC_DATASETS)  # the synthetic datasets, smallest first
PLOT = common.REPO / "docs" / "benchmarks_scale.png"
#: users per block of the dense torch reference
REF_BLOCK = 4096


def default_epochs(preset: str) -> int:
    """Enough epochs for a stable rate, few enough to keep the run bounded."""
    return 5 if preset in ("synthetic-100k", "synthetic-1m") else 3


# ----------------------------------------------------------------------------------------------
# children
# ----------------------------------------------------------------------------------------------


def child_generate(job: dict[str, Any]) -> dict[str, Any]:
    from flexmf_assets.datasets.synthetic import generate

    t0 = time.perf_counter()
    ratings = generate(job["preset"], seed=42).ratings.select("user_id", "item_id", "rating")
    seconds = time.perf_counter() - t0
    common.write_parquet(ratings, Path(job["data"]))
    return {"generate_s": seconds, "ratings": ratings.height,
            "users": ratings["user_id"].n_unique(), "items": ratings["item_id"].n_unique()}


def child_train(job: dict[str, Any]) -> dict[str, Any]:
    import polars as pl
    import torch

    torch.set_num_threads(job["threads"])
    from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig
    from flexmf_assets.flexmf.device import DeviceSettings
    from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer

    ratings = pl.read_parquet(job["data"])
    cfg = FlexMFExplicitConfig.from_dict(job["config"])
    t0 = time.perf_counter()
    model = FlexMFExplicitScorer(cfg, device=DeviceSettings("cpu", threads=job["threads"])).fit(ratings)
    fit_s = time.perf_counter() - t0
    model.save(job["model"])
    epoch_s = sorted(h["seconds"] for h in model.history)[len(model.history) // 2]  # median epoch
    return {"fit_s": fit_s, "train_seconds": model.train_seconds, "epochs": model.epochs_run,
            "updates_per_s": model.epochs_run * ratings.height / model.train_seconds,
            "epoch_updates_per_s": ratings.height / epoch_s, "engine": model.engine,
            "train_rss_mb": common.peak_rss_mb(), "config": cfg.to_dict()}


def child_recommend(job: dict[str, Any]) -> dict[str, Any]:
    import statistics

    import torch

    threads = job["score_threads"]
    torch.set_num_threads(threads)
    from flexmf_assets.flexmf import _native
    from flexmf_assets.flexmf.device import DeviceSettings
    from flexmf_assets.flexmf.explicit import FlexMFExplicitScorer

    model = FlexMFExplicitScorer.load(job["model"], device=DeviceSettings("cpu", threads=threads))
    loaded_rss = common.peak_rss_mb()
    U, VT = model.user_table[:-1], model.item_table[: model.n_items].T.contiguous()
    block = torch.empty(min(REF_BLOCK, model.n_users), model.n_items)

    def reference() -> None:  # dense: a fresh score block per 4,096 users, top-20, nothing excluded
        for s in range(0, model.n_users, REF_BLOCK):
            torch.topk(U[s : s + REF_BLOCK] @ VT, 20, dim=1)

    def matmul() -> None:  # the machine's matmul rate on the same shapes, no allocation, no top-k
        for s in range(0, model.n_users, REF_BLOCK):
            part = U[s : s + REF_BLOCK]
            torch.matmul(part, VT, out=block[: len(part)])

    times: dict[str, list[float]] = {"recommend_s": [], "reference_s": [], "matmul_s": []}
    rows = 0
    for _ in range(job["score_rounds"]):
        for key, fn in (("reference_s", reference), ("recommend_s", lambda: model.recommend(n=20)),
                        ("matmul_s", matmul)):
            t0 = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - t0)
            rows = out.height if out is not None else rows
    flop = 2.0 * model.n_users * model.n_items * U.shape[1]
    med = {key: statistics.median(v) for key, v in times.items()}
    return {**med, "rounds": times, "users": model.n_users, "rows": rows, "width": U.shape[1],
            "score_threads": threads, "native": _native.status(),
            "users_per_s": model.n_users / med["recommend_s"], "rss_before_mb": loaded_rss,
            "scoring_gflops": flop / med["recommend_s"] / 1e9, "matmul_gflops": flop / med["matmul_s"] / 1e9,
            "reference_gflops": flop / med["reference_s"] / 1e9,
            "speedup_vs_reference": med["reference_s"] / med["recommend_s"]}


def child_implicit_eval(job: dict[str, Any]) -> dict[str, Any]:
    import polars as pl
    import torch

    torch.set_num_threads(job["score_threads"])
    from flexmf_assets.datasets.split import split_ratings
    from flexmf_assets.flexmf.device import DeviceSettings
    from flexmf_assets.tracks import track

    implicit = track("implicit")
    split = split_ratings(pl.read_parquet(job["data"]))
    config = implicit.config_class.from_dict({**implicit.named_sets()["default"], "epochs": job["implicit_epochs"]})
    t0 = time.perf_counter()
    model = implicit.scorer_class(config, device=DeviceSettings("cpu")).fit(split.train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = implicit.report(model, split.train, split.test)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.recommend(split.test["user_id"].unique(), n=50)
    return {"evaluate_s": seconds, "test_users": report.metrics["test_users"], "fit_s": fit_s,
            "recommend_test_users_s": time.perf_counter() - t0, "ndcg@10": report.metrics["ndcg@10"],
            "train_rows": split.train.height, "test_rows": split.test.height}


CHILDREN = {"generate": child_generate, "train": child_train, "recommend": child_recommend,
            "implicit_eval": child_implicit_eval}


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def run_step(step: str, job: dict[str, Any], stem: Path, timeout: float) -> dict[str, Any]:
    job = {**job, "step": step, "result": f"{stem}-{step}.json"}
    common.write_json(job, Path(f"{stem}-{step}.job.json"))
    return common.run_child([sys.executable, str(Path(__file__).resolve()), "--child", f"{stem}-{step}.job.json"],
                            Path(job["result"]), timeout)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "updates_per_s" in r]
    if not ok:
        return
    x = [r["ratings"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["updates_per_s"] / 1e6 for r in ok], "o-", label="training fit (setup included)")
    a.plot(x, [r.get("epoch_updates_per_s", 0) / 1e6 for r in ok], "s--", label="median epoch")
    a.axhline(2.0, color="grey", ls=":", label="target 2M/s (synthetic-10m)")
    a.set(xscale="log", xlabel="ratings", ylabel="M updates/s", title="Training throughput")
    a.legend(fontsize=8)
    b.plot(x, [r["train_rss_mb"] / 1024 for r in ok], "o-", label="training peak RSS")
    rec = [r for r in ok if "recommend_rss_mb" in r]
    b.plot([r["ratings"] for r in rec], [r["recommend_rss_mb"] / 1024 for r in rec], "s-", label="top-20 all users peak RSS")
    b.axhline(3.0, color="grey", ls=":", label="target 3 GB (synthetic-25m)")
    b.set(xscale="log", xlabel="ratings", ylabel="GiB", title="Peak memory")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", metavar="JOB", help=argparse.SUPPRESS)
    ap.add_argument("--max", default=PRESETS[-1], choices=PRESETS, help="largest preset to run")
    ap.add_argument("--min", default=PRESETS[0], choices=PRESETS, help="smallest preset to run")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 5 up to 1m, else 3)")
    ap.add_argument("--threads", type=int, default=1, help="our engine's CPU threads")
    ap.add_argument("--score-threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the top-20 step, ours and the torch reference alike (default: all cores)")
    ap.add_argument("--score-rounds", type=int, default=2, help="alternating rounds of ours / reference / matmul")
    ap.add_argument("--implicit-eval", default="synthetic-10m", choices=[*PRESETS, "none"],
                    help="preset whose implicit evaluation of every test user is timed (none: skip)")
    ap.add_argument("--implicit-epochs", type=int, default=1, help="epochs of that implicit model")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("overrides", nargs="*", help="FlexMFExplicitConfig field=value overrides")
    args = ap.parse_args(argv)
    if args.child:
        job = json.loads(Path(args.child).read_text())
        common.write_json(CHILDREN[job["step"]](job), Path(job["result"]))
        return 0

    from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig

    overrides = FlexMFExplicitConfig.parse_overrides(",".join(args.overrides)) if args.overrides else {}
    out = common.OUT / "scale"
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for preset in PRESETS[PRESETS.index(args.min) : PRESETS.index(args.max) + 1]:
        epochs = args.epochs or default_epochs(preset)
        config = FlexMFExplicitConfig(embedding_size=64, epochs=epochs).replace(**overrides).to_dict()
        data = common.OUT / "synthetic" / f"{preset}.parquet"
        job = {"preset": preset, "data": str(data), "threads": args.threads, "config": config,
               "model": str(out / f"{preset}-model"), "score_threads": args.score_threads,
               "score_rounds": args.score_rounds, "implicit_epochs": args.implicit_epochs}
        stem = out / preset
        row: dict[str, Any] = {"preset": preset}
        meta = data.with_suffix(".json")
        if data.exists() and meta.exists():
            row.update(json.loads(meta.read_text()))
        else:
            gen = run_step("generate", job, stem, args.timeout)
            if "error" in gen:
                print(f"{preset}: generation failed: {gen['error']}", flush=True)
                rows.append({**row, "error": gen["error"]})
                break
            gen.pop("wall_s", None)
            row.update({k: v for k, v in gen.items() if k != "peak_rss_mb"})
            common.write_json({k: v for k, v in row.items() if k != "preset"}, meta)
        tr = run_step("train", job, stem, args.timeout)
        if "error" in tr:
            print(f"{preset}: training failed: {tr['error']}", flush=True)
            rows.append({**row, "error": tr["error"]})
            break
        row.update({k: tr[k] for k in ("updates_per_s", "epoch_updates_per_s", "engine", "train_seconds", "epochs",
                                       "config")},
                   train_rss_mb=tr["peak_rss_mb"])
        rec = run_step("recommend", job, stem, args.timeout)
        if "error" in rec:
            row["recommend_error"] = rec["error"]
        else:
            row.update({k: rec[k] for k in ("recommend_s", "users", "reference_s", "matmul_s", "scoring_gflops",
                                            "matmul_gflops", "reference_gflops", "speedup_vs_reference",
                                            "score_threads", "width", "rounds")},
                       recommend_rss_mb=rec["peak_rss_mb"], model_loaded_rss_mb=rec["rss_before_mb"])
        if preset == args.implicit_eval:
            ev = run_step("implicit_eval", job, stem, args.timeout)
            row["implicit_eval"] = ev
            print(f"{preset:>15}: implicit evaluation of every test user "
                  + (f"failed: {ev['error']}" if "error" in ev else
                     f"({ev['test_users']:,} users, top-50, metrics and popularity baseline): "
                     f"{ev['evaluate_s']:.2f} s (recommend alone {ev['recommend_test_users_s']:.2f} s; "
                     f"peak RSS {ev['peak_rss_mb']:.0f} MiB)"), flush=True)
        rows.append(row)
        print(f"{preset:>15}: {row['ratings']:>11,} ratings  train {row['updates_per_s'] / 1e6:6.2f}M upd/s "
              f"(per epoch {row['epoch_updates_per_s'] / 1e6:.2f}M) "
              f"({row['epochs']} ep, {row['train_seconds']:.1f} s, RSS {row['train_rss_mb']:.0f} MiB)  "
              f"top-20 all {row.get('users', 0):,} users {common.fmt(row.get('recommend_s'), '.2f')} s "
              f"(RSS {common.fmt(row.get('recommend_rss_mb'), '.0f')} MiB)", flush=True)
        if "scoring_gflops" in row:
            print(f"{'':>15}  scoring {row['scoring_gflops']:.0f} GFLOP/s vs torch matmul {row['matmul_gflops']:.0f} "
                  f"GFLOP/s (same shapes, {row['score_threads']} threads); dense reference "
                  f"{row['reference_s']:.2f} s: ours {row['speedup_vs_reference']:.2f}x faster", flush=True)

    headers = ["preset", "ratings", "users", "items", "epochs", "train s", "updates/s", "epoch updates/s",
               "train peak RSS MiB",
               "top-20 all users s", "recommend peak RSS MiB", "scoring GFLOP/s", "torch matmul GFLOP/s",
               "dense reference s", "ours vs reference"]
    table = [[r["preset"], f"{r.get('ratings', 0):,}", f"{r.get('users', 0):,}", f"{r.get('items', 0):,}",
              r.get("epochs", "-"), common.fmt(r.get("train_seconds")), common.fmt((r.get("updates_per_s") or 0) / 1e6, ".2f") + "M",
              common.fmt((r.get("epoch_updates_per_s") or 0) / 1e6, ".2f") + "M",
              common.fmt(r.get("train_rss_mb"), ".0f"), common.fmt(r.get("recommend_s")),
              common.fmt(r.get("recommend_rss_mb"), ".0f"), common.fmt(r.get("scoring_gflops"), ".0f"),
              common.fmt(r.get("matmul_gflops"), ".0f"), common.fmt(r.get("reference_s")),
              common.fmt(r.get("speedup_vs_reference"), ".2f") + "x"] for r in rows if "error" not in r]
    print("\n" + common.text_table(headers, table))
    report = {"machine": common.machine(), "threads": args.threads, "overrides": overrides, "rows": rows,
              "command": " ".join(["python", "benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])]),
              "total_s": time.perf_counter() - started}
    common.write_json(report, common.OUT / "scale.json")
    common.write_text(common.markdown_table(headers, table) + "\n", common.OUT / "scale.md")
    if not args.no_plot:
        plot(rows, PLOT)
        print(f"plot: {PLOT}")
    print(f"wrote {common.OUT / 'scale.json'} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
