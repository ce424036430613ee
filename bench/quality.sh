#!/usr/bin/env bash
# Reproduces the quality table of the README: every stage on the real data in ../shared/data,
# with the presets. Usage: bash bench/quality.sh [WORK_DIR]   (2 minutes on 2 idle cores before ease, autorec and multvae joined; far longer on busy cores)
W=${1:-bench/out/quality}
source "$(dirname "$0")/lib.sh"
show() { $PY - "$1" "$2" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(sys.argv[2], m["config"]["model"], "best_epoch", m["best_epoch"], "train_s",
      round(m["train_seconds"], 1))
for part in ("valid", "test"):
    d = m[part]
    cells = [f"{k} {v:.4f}" + (f" [{d[k + '_ci'][0]:.4f}, {d[k + '_ci'][1]:.4f}]"
                               if k + "_ci" in d else "")
             for k, v in d.items() if isinstance(v, float)]
    counts = {k: v for k, v in d.items() if k.endswith("_n") and isinstance(v, int)}
    print(f"  {part:5s}", "; ".join(cells), counts)
PY
}
for ds in ml-100k ml-latest-small; do
  D="$W/$ds-random"
  pipeline "$D" --strategy random --seed 42 -- --input "$SHARED/movielens/$ds"
  models="mf"; [ "$ds" = ml-100k ] && models="mf deepmf autorec"
  for m in $models; do
    run $PY 60_train.py --data-dir "$D" --model "$m"
    show "$D/60_train/$m/metrics.json" "$ds random 90/10:"
  done
done
D="$W/ml-100k-loo"
pipeline "$D" --strategy loo --negatives 99 --seed 42 -- --input "$SHARED/movielens/ml-100k"
for m in gmf mlp neumf ease multvae; do
  run $PY 60_train.py --data-dir "$D" --model "$m"
  show "$D/60_train/$m/metrics.json" "ml-100k loo+99:"
done
