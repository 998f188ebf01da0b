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
#    every user, both on `device: cuda` (target: >= 1e8 updates/s).
# Environment: PYTHON (interpreter for a new venv, default python3), GPU_BATCH (explicit batch
# size, default 262144), GPU_EPOCHS (default 3), CHECK_TIMEOUT (seconds per step, default 300).
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
print(f"recommend top-20 for all {model.n_users:,} users x {model.n_items:,} items: "
      f"{time.perf_counter() - t0:.2f} s ({recs.height:,} rows); "
      f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF
say "done"
