#!/usr/bin/env bash
# Reproduces the README's results table: stages 10-40 on the real data in ../shared/data (the
# seeded splits), then every model at its preset, trained once per seed of SEEDS (default
# 0 1 2 3 4) on the same split by bench/seeds.py, which prints each model's test metric as
# mean and std over the seeds and the paired-bootstrap 95% interval of each pair's
# difference; then each model's seed-0 run with its 95% interval and pair counts, and the
# peers on the same test pairs when they are installed (pip install -r bench/requirements.txt):
# Surprise SVD (defaults) on the random splits, the `implicit` library's ALS and BPR (each a
# grid chosen on validation, bench/bench_vs_implicit.py) on the leave-one-out ones.
# Usage: [SEEDS="0"] bash bench/quality.sh [WORK_DIR]
# (not timed end to end with five seeds: on 2 shared cores the two random splits took 10 and
# 7 minutes, and one mlp run on a leave-one-out split takes 2-8 minutes, so budget an hour
# or more; bpmf's five seeds beside mf's took 8 and 15 minutes of a machine busy with other
# runs, the implicit peers about a minute per leave-one-out split; SEEDS=0 for one run per
# model)
W=${1:-bench/out/quality}
SEEDS=${SEEDS:-0 1 2 3 4}
source "$(dirname "$0")/lib.sh"
show() { $PY - "$1" "$2" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(sys.argv[2], m["config"]["model"], "seed", m["config"]["seed"], "best_epoch",
      m["best_epoch"], "train_s", round(m["train_seconds"], 1))
for part in ("valid", "test"):
    d = m[part]
    cells = [f"{k} {v:.4f}" + (f" [{d[k + '_ci'][0]:.4f}, {d[k + '_ci'][1]:.4f}]"
                               if k + "_ci" in d else "")
             for k, v in d.items() if isinstance(v, float)]
    counts = {k: v for k, v in d.items() if k.endswith("_n") and isinstance(v, int)}
    print(f"  {part:5s}", "; ".join(cells), counts)
PY
}
seeds() {  # DIR NAME PAIRS MODELS...
  local D=$1 name=$2 pairs=$3; shift 3
  $PY bench/seeds.py --data-dir "$D" --models "$@" --seeds $SEEDS --pairs $pairs \
    --out "$W/seeds/$name.json"
  local first=${SEEDS%% *}
  for m in "$@"; do show "$W/seeds/$name/$m/seed$first.metrics.json" "$name:"; done
}
peer() {  # DIR NAME
  if $PY -c "import surprise" 2>/dev/null; then
    echo "$2, peer on the same test pairs:"
    $PY bench/bench_vs_surprise.py --data-dir "$1" --surprise-only --knn | grep Surprise
  else
    echo "$2: peer row skipped (scikit-surprise not installed: pip install -r bench/requirements.txt)"
  fi
}
peer_implicit() {  # DIR NAME
  if $PY -c "import implicit" 2>/dev/null; then
    echo "$2, peers on the same test pairs (implicit's ALS and BPR, grid on validation):"
    OMP_NUM_THREADS=1 $PY bench/bench_vs_implicit.py --data-dir "$1" --models als bpr \
      --threads 1 --json "$W/seeds/$2.implicit.json" | sed -n '/^summary/,/^wrote/p'
  else
    echo "$2: implicit peer skipped (not installed: pip install -r bench/requirements.txt)"
  fi
}
for ds in ml-100k ml-latest-small; do
  D="$W/$ds-random"
  pipeline "$D" --strategy random --seed 42 -- --input "$SHARED/movielens/$ds"
  # blend (last: it stacks the five models of the same seed, trained just before it)
  seeds "$D" "$ds-random" "bpmf:mf deepmf:mf autorec:mf knn:mf blend:bpmf blend:mf" \
    mf bpmf deepmf autorec knn blend
  peer "$D" "$ds-random"
done
# leave-one-out + 99 sampled negatives: ML-100K on the split seed 42, ml-latest-small on 0
for spec in ml-100k:42 ml-latest-small:0; do
  ds=${spec%%:*}
  D="$W/$ds-loo"
  pipeline "$D" --strategy loo --negatives 99 --seed "${spec##*:}" -- --input "$SHARED/movielens/$ds"
  seeds "$D" "$ds-loo" "neumf:gmf neumf:ease gmf:ease mlp:ease multvae:ease blend:ease" \
    gmf mlp neumf ease multvae blend
  peer_implicit "$D" "$ds-loo"
done
