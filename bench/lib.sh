# Shared by the bench shell scripts (source it after setting W, the work folder):
# settings, run (a command, its output kept in $W/last.log and shown only on failure) and
# pipeline DIR SPLIT_ARGS -- STAGE10_ARGS (stages 10-40 into DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SHARED=${RECPIPE_SHARED_DATA:-../shared/data}
PY=${PYTHON:-python3}
export RECPIPE_PROGRESS=0
mkdir -p "$W"
run() { echo "+ $*" >&2; "$@" > "$W/last.log" 2>&1 || { cat "$W/last.log"; exit 1; }; }
pipeline() {
  local D=$1; shift
  local split=()
  while [ "$1" != "--" ]; do split+=("$1"); shift; done
  shift
  run $PY 10_preprocessing.py --data-dir "$D" "$@"
  run $PY 20_make_ids.py --data-dir "$D"
  run $PY 30_split_train_test.py --data-dir "$D" "${split[@]}"
  run $PY 40_make_sparse_matrix.py --data-dir "$D"
}
