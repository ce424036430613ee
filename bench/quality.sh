#!/usr/bin/env bash
# Reproduces the quality table of the README: every stage on the real data in ../shared/data,
# with the presets. Usage: bash bench/quality.sh [WORK_DIR]   (about 5-10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${RECPIPE_SHARED_DATA:-../shared/data}
W=${1:-bench/out/quality}
PY=${PYTHON:-python3}
export RECPIPE_PROGRESS=0
run() { echo "+ $*" >&2; "$@" > "$W/last.log" 2>&1 || { cat "$W/last.log"; exit 1; }; }
show() { $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], m['config']['model'], 'best_epoch', m['best_epoch'], 'train_s', round(m['train_seconds'],1)); print('  valid', {k: round(v,4) for k,v in m['valid'].items()}); print('  test ', {k: round(v,4) for k,v in m['test'].items()})" "$1" "$2"; }
mkdir -p "$W"
for ds in ml-100k ml-latest-small; do
  D="$W/$ds-random"
  run $PY 10_preprocessing.py --data-dir "$D" --input "$SHARED/movielens/$ds"
  run $PY 20_make_ids.py --data-dir "$D"
  run $PY 30_split_train_test.py --data-dir "$D" --strategy random --seed 42
  run $PY 40_make_sparse_matrix.py --data-dir "$D"
  models="mf"; [ "$ds" = ml-100k ] && models="mf deepmf"
  for m in $models; do
    run $PY 60_train.py --data-dir "$D" --model "$m"
    show "$D/60_train/$m/metrics.json" "$ds random 90/10:"
  done
done
D="$W/ml-100k-loo"
run $PY 10_preprocessing.py --data-dir "$D" --input "$SHARED/movielens/ml-100k"
run $PY 20_make_ids.py --data-dir "$D"
run $PY 30_split_train_test.py --data-dir "$D" --strategy loo --negatives 99 --seed 42
run $PY 40_make_sparse_matrix.py --data-dir "$D"
for m in gmf mlp neumf; do
  run $PY 60_train.py --data-dir "$D" --model "$m"
  show "$D/60_train/$m/metrics.json" "ml-100k loo+99:"
done
