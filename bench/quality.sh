#!/usr/bin/env bash
# Reproduces the quality table of the README: every stage on the real data in ../shared/data,
# with the presets. Usage: bash bench/quality.sh [WORK_DIR]   (about 2 minutes on 2 cores)
W=${1:-bench/out/quality}
source "$(dirname "$0")/lib.sh"
show() { $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], m['config']['model'], 'best_epoch', m['best_epoch'], 'train_s', round(m['train_seconds'],1)); print('  valid', {k: round(v,4) for k,v in m['valid'].items()}); print('  test ', {k: round(v,4) for k,v in m['test'].items()})" "$1" "$2"; }
for ds in ml-100k ml-latest-small; do
  D="$W/$ds-random"
  pipeline "$D" --strategy random --seed 42 -- --input "$SHARED/movielens/$ds"
  models="mf"; [ "$ds" = ml-100k ] && models="mf deepmf"
  for m in $models; do
    run $PY 60_train.py --data-dir "$D" --model "$m"
    show "$D/60_train/$m/metrics.json" "$ds random 90/10:"
  done
done
D="$W/ml-100k-loo"
pipeline "$D" --strategy loo --negatives 99 --seed 42 -- --input "$SHARED/movielens/ml-100k"
for m in gmf mlp neumf; do
  run $PY 60_train.py --data-dir "$D" --model "$m"
  show "$D/60_train/$m/metrics.json" "ml-100k loo+99:"
done
