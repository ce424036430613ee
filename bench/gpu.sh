#!/usr/bin/env bash
# GPU benchmark in one command, for a maintainer on a CUDA machine (no internet needed):
#
#     bash bench/gpu.sh                    # N=1e7 ratings; log in /tmp/gpu_bench.log
#     N=3e7 OUT=/some/dir bash bench/gpu.sh
#
# 1. checks that torch sees CUDA (stops with a message otherwise), prints nvidia-smi -L and
#    the torch version;
# 2. bench/bench_scale.py: stages 10 -> 60 on N synthetic Netflix-layout ratings, mf
#    (explicit, random split) and neumf (implicit, leave-one-out), 2 epochs at most, stage 60
#    on cuda; --max-seconds ${MAX_SECONDS:-120} stops each model's selection after the epoch
#    that crosses it and --no-refit skips the retrain on train + valid, so that the whole
#    script fits in about 8 minutes on an H200 at N=1e7 (an estimate, not yet timed on one:
#    generating the data takes some 3 minutes of one CPU core and is reused on a rerun from
#    /tmp/gpu_scale; neumf's first epoch, 90M samples at the preset batch 1024, is the
#    uncertain part: lower N if it overruns);
# 3. bench/bench_train.py on cuda: one MF epoch per optimizer:batch setting (10M ratings,
#    70k x 10k), NeuMF samples/s and the sampled-candidate evaluation.
# Everything printed also goes to ${OUT:-/tmp}/gpu_bench.log; the figures of step 2 also to
# /tmp/gpu_scale/bench_scale.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
PY=${PYTHON:-python}

{
    echo "== bench/gpu.sh $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null)"
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: torch.cuda.is_available() is False (no CUDA device, driver or CUDA build of" \
             "torch: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to run"
        exit 2
    fi
    nvidia-smi -L
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
                                  torch.cuda.get_device_name(0))'

    echo "== bench_scale.py (N=${N:-1e7})"
    "$PY" bench/bench_scale.py --ratings "${N:-1e7}" --device cuda --epochs 2 \
        --workdir /tmp/gpu_scale --max-seconds "${MAX_SECONDS:-120}" --train-args=--no-refit

    echo "== bench_train.py (cuda)"
    "$PY" bench/bench_train.py --device cuda --threads "$(nproc)" \
        --mf-runs adam:65536 sparse_adam:65536 adam:2048 sparse_adam:2048
    echo "== done"
} 2>&1 | tee "$LOG"   # pipefail: the exit status is the first failing step's
