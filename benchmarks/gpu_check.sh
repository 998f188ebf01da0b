#!/usr/bin/env bash
# GPU check for a CUDA machine (H200-class): one command, about 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# 1. uses .venv (creates it when missing); installs torch==2.13.0 only when no torch is importable
#    (a CUDA build that is already there is reused), then `pip install -e .[dev]`;
# 2. exits 2 with a clear message when torch sees no CUDA device;
# 3. runs the tests marked `cuda` (explicit and implicit training + recommend on the GPU);
# 4. prints explicit FlexMF k=64 updates/s on synthetic-25m and the time to recommend top-20 to
#    every user, both on `device: cuda` (targets: >= 1e8 updates/s, all-user top-20 < 2 s), with
#    the GPU's matmul GFLOP/s on the same shapes and the dense reference (topk(U_b @ V.T, 20) in
#    blocks of 8,192 users, nothing excluded); then the same model's all-user top-20 on the
#    machine's CPU cores through the fused CPU kernel (recommend on a CPU copy);
# 5. when this checkout's explicit config has `solver` (the ALS solver), the ALS fit (k=64,
#    GPU_ALS_ITERATIONS iterations, default 3) on synthetic-25m on `device: cuda`; else says so.
# Environment: PYTHON (interpreter for a new venv, default python3), GPU_BATCH (explicit batch
# size, default 262144), GPU_EPOCHS (default 3), GPU_ALS_ITERATIONS (default 3), CHECK_TIMEOUT
# (seconds per step, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BATCH=${GPU_BATCH:-262144}
EPOCHS=${GPU_EPOCHS:-3}
STEP_TIMEOUT=${CHECK_TIMEOUT:-300}
start=$(date +%s)
say() { printf '[gpu_check %3ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PY (system site packages visible, so a preinstalled CUDA torch is reused)"
    "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if python -c "import torch" 2>/dev/null; then
    say "torch present: $(python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
else
    say "no torch: installing torch==2.13.0"
    pip install --quiet "torch==2.13.0"
fi
if ! python -c "import flexmf_assets" 2>/dev/null || [ "${REINSTALL:-0}" = 1 ]; then
    say "pip install -e .[dev]"
    pip install --quiet -e ".[dev]"
fi

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA device" \
         "(torch.cuda.is_available() is False): run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB')"

say "pytest -m cuda"
timeout "$STEP_TIMEOUT" python -m pytest -q -m cuda -p no:cacheprovider tests/test_explicit.py tests/test_implicit.py

say "explicit k=64 on synthetic-25m (batch $BATCH, $EPOCHS epochs) and top-20 for all users"
GPU_BATCH=$BATCH GPU_EPOCHS=$EPOCHS timeout "$STEP_TIMEOUT" python - <<'EOF'
import os
import time
from pathlib import Path

import polars as pl
import torch

from flexmf_assets.datasets.synthetic import generate
from flexmf_assets.flexmf import FlexMFExplicitScorer

cache = Path("benchmarks/out/synthetic/synthetic-25m.parquet")
t0 = time.perf_counter()
if cache.is_file():
    ratings = pl.read_parquet(cache, columns=["user_id", "item_id", "rating"])
else:
    ratings = generate("synthetic-25m").ratings.select("user_id", "item_id", "rating")
print(f"data: {ratings.height:,} ratings in {time.perf_counter() - t0:.1f} s")

batch, epochs = int(os.environ["GPU_BATCH"]), int(os.environ["GPU_EPOCHS"])
model = FlexMFExplicitScorer(embedding_size=64, epochs=epochs, batch_size=batch, device="cuda")
model.fit(ratings)
per_epoch = [round(r["seconds"], 3) for r in model.history]
best = ratings.height / min(r["seconds"] for r in model.history)
print(f"explicit k=64 train: {model.train_seconds:.2f} s for {epochs} epochs (incl. setup), "
      f"{model.updates_per_second:,.0f} updates/s overall, {best:,.0f} updates/s best epoch; "
      f"epochs {per_epoch}; target >= 1e8")

torch.cuda.synchronize()
t0 = time.perf_counter()
recs = model.recommend(n=20, batch_size=8192)
torch.cuda.synchronize()
rec_s = time.perf_counter() - t0
print(f"recommend top-20 for all {model.n_users:,} users x {model.n_items:,} items: "
      f"{rec_s:.2f} s ({recs.height:,} rows, seen excluded); target < 2 s; "
      f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

U, VT = model.user_table[:-1], model.item_table[: model.n_items].T.contiguous()
flop = 2.0 * model.n_users * model.n_items * U.shape[1]
block = torch.empty(8192, model.n_items, device=U.device)
runs = {"matmul (same shapes, no top-k)": lambda u: torch.matmul(u, VT, out=block[: len(u)]),
        "dense reference topk(U_b @ V.T, 20)": lambda u: torch.topk(u @ VT, 20, dim=1)}
for name, fn in runs.items():
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, model.n_users, 8192):
        fn(U[s : s + 8192])
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    print(f"GPU {name}: {sec:.2f} s, {flop / sec / 1e9:,.0f} GFLOP/s")
print(f"GPU recommend: {flop / rec_s / 1e9:,.0f} GFLOP/s achieved")

cpu_model = Path("benchmarks/out/gpu_check_model")
model.save(cpu_model)
threads = os.cpu_count() or 1
torch.set_num_threads(threads)
on_cpu = FlexMFExplicitScorer.load(cpu_model, device="cpu")
t0 = time.perf_counter()
recs = on_cpu.recommend(n=20)
sec = time.perf_counter() - t0
print(f"CPU recommend top-20 for all users ({threads} threads, fused kernel): {sec:.2f} s, "
      f"{flop / sec / 1e9:,.0f} GFLOP/s ({recs.height:,} rows)")
EOF

say "ALS fit on synthetic-25m (if this checkout has the ALS solver)"
GPU_ALS_ITERATIONS=${GPU_ALS_ITERATIONS:-3} timeout "$STEP_TIMEOUT" python - <<'EOF' || say "ALS step failed or timed out (exit $?)"
import dataclasses
import os
import time
from pathlib import Path

import polars as pl

from flexmf_assets.flexmf import FlexMFExplicitScorer
from flexmf_assets.flexmf.explicit_config import FlexMFExplicitConfig

if "solver" not in {f.name for f in dataclasses.fields(FlexMFExplicitConfig)}:
    print("ALS: this checkout's explicit config has no `solver` field: skipped")
    raise SystemExit(0)
cache = Path("benchmarks/out/synthetic/synthetic-25m.parquet")
if cache.is_file():
    ratings = pl.read_parquet(cache, columns=["user_id", "item_id", "rating"])
else:
    from flexmf_assets.datasets.synthetic import generate
    ratings = generate("synthetic-25m").ratings.select("user_id", "item_id", "rating")
iters = int(os.environ["GPU_ALS_ITERATIONS"])
model = FlexMFExplicitScorer(embedding_size=64, epochs=iters, solver="als", device="cuda")
t0 = time.perf_counter()
model.fit(ratings)
print(f"ALS k=64 fit: {time.perf_counter() - t0:.2f} s for {iters} iterations (incl. setup), "
      f"{model.updates_per_second:,.0f} ratings x iterations / s; "
      f"iterations {[round(r['seconds'], 3) for r in model.history]} s")
EOF
say "done"
