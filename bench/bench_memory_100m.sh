#!/bin/bash
# Peak RSS and wall seconds of stages 20, 30 and 40 at Netflix scale (issue "Netflix scale on
# one machine").
#
#   bench/bench_memory_100m.sh                  # stage 20 at 100M ratings under /tmp/m100 (~2.3 GB of disk)
#   N=10000000 W=/tmp/m10 bench/bench_memory_100m.sh
#   bench/bench_memory_100m.sh --duplicates mean   # arguments go to 20_make_ids.py
#   STAGES="20 30 40" bench/bench_memory_100m.sh   # stages 30 and 40 on stage 20's output
#   SOURCE=unique STAGES="30 40" bench/bench_memory_100m.sh
#   S30_ARGS="--strategy loo" STAGES="30 40" bench/bench_memory_100m.sh
#
# SOURCE=netflix (default): generates the synthetic Netflix-layout training_set/ once
# (bench_preprocessing.make_netflix: 17,770 per-movie files, 480,189 sparse user ids < 2.65M,
# Zipf sizes), runs stage 10 on it once, then stage 20; its Zipf users repeat (user, movie)
# pairs, so stage 20 keeps only 13.2M of 100M ratings. SOURCE=unique: writes stage 20's
# output directly (once) under $W/unique: N distinct uniform (user, item) pairs over
# 480,189 users x 17,770 movies (Netflix's 100M ratings are distinct pairs), stars and
# days like make_netflix; stage 20 is not run there. Each stage in STAGES runs under
# /usr/bin/time -v (log: $W/stageNN.log or $W/unique/stageNN.log); S30_ARGS / S40_ARGS go
# to stages 30 / 40. Target at 100M: < 5 GB peak RSS per stage.
# Measured (2 shared cores), stage 20 (SOURCE=netflix): 9.6 GiB, 95 s before; 3.2 GiB,
# 21-26 s after the one-sort rewrite. SOURCE=unique, 100M, S30_ARGS="--unseen drop", on a
# loaded machine: stage 30 6.13 GiB, 67-136 s before; 3.8 GiB, 52-59 s after the int32 /
# column-at-a-time rewrite; stage 40 5.7-5.8 GiB, 29-47 s before; 2.47 GiB, 20-23 s after.
# Remove $W afterwards: rm -rf /tmp/m100
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${N:-100000000}
W=${W:-/tmp/m100}
PY=${PYTHON:-python3}
export RECPIPE_PROGRESS=0
STAGES=${STAGES:-20}
SOURCE=${SOURCE:-netflix}
mkdir -p "$W"
measure() {  # measure STAGE LOG SCRIPT ARGS...: one stage under /usr/bin/time -v
  local st=$1 logf=$2; shift 2
  /usr/bin/time -v $PY "$@" > "$logf" 2>&1 || { cat "$logf"; exit 1; }
  [ "$st" = 20 ] && grep -E "duplicates \(|20_make_ids:" "$logf" | cut -c10-
  local wall kb
  wall=$(grep "Elapsed (wall clock)" "$logf" | awk '{print $NF}')
  kb=$(grep "Maximum resident set size" "$logf" | awk '{print $NF}')
  $PY -c "print(f'stage $st at {$N:,} ratings ($SOURCE): wall $wall, peak RSS {$kb / 2**20:.2f} GiB '
              f'({$kb * 1024 / $N:.1f} bytes/rating)')"
}
if [ "$SOURCE" = unique ]; then
  D=$W/unique
  $PY - "$D" "$N" <<'PYEOF'
import json, sys
sys.path[:0] = ['.']
from pathlib import Path
import numpy as np
import pandas as pd
from recpipe.artifacts import StageOutput, dtypes_of, write_parquet
from recpipe.demo import FIRST_DAY, LAST_DAY, STAR_SHARES
data, n = Path(sys.argv[1]) / "data", int(sys.argv[2])
n_users, n_items, seed = 480_189, 17_770, 0
want = {"n_ratings": n, "n_users": n_users, "n_items": n_items, "seed": seed, "version": 2}
info = data.parent / "bench.json"
if info.exists() and json.loads(info.read_text()) == want:
    sys.exit(0)
rng = np.random.default_rng(seed)
cells = n_users * n_items
keys = np.empty(0, dtype=np.int64)
while len(keys) < n:  # distinct pairs (a sort, not np.unique's hash table), exactly n of them
    extra = n - len(keys)
    keys = np.concatenate([keys, rng.integers(0, cells, extra + extra * n // cells + 1000)])
    keys.sort()
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    if len(keys) > n:  # drop a random few of the surplus
        drop = np.zeros(len(keys), dtype=bool)
        drop[rng.choice(len(keys), len(keys) - n, replace=False)] = True
        keys = keys[~drop]
ratings = pd.DataFrame({"user_idx": (keys // n_items).astype(np.int32),
                        "item_idx": (keys % n_items).astype(np.int32)})
del keys
ratings["rating"] = (rng.choice(5, n, p=STAR_SHARES) + 1).astype(np.float32)
ratings["timestamp"] = rng.integers(FIRST_DAY, LAST_DAY + 1, n).astype(np.int64) * 86400
with StageOutput(data, "20_make_ids") as out:
    write_parquet(ratings, out.path("ratings.parquet"))
    out.commit({"command": "bench/bench_memory_100m.sh SOURCE=unique", "config": want,
                "upstream": {}, "dataset": "netflix", "rating_scale": [1.0, 5.0],
                "has_timestamp": True, "n_users": n_users, "n_items": n_items,
                "n_ratings": n, "n_unrated": 0, "n_input_ratings": n,
                "dtypes": {"ratings": dtypes_of(ratings)}})
info.write_text(json.dumps(want))
PYEOF
else
  D=$W
  $PY -c "
import sys; sys.path[:0] = ['bench', '.']
from pathlib import Path
from bench_preprocessing import make_netflix
make_netflix(Path('$W/netflix'), $N, 17770)"
  n10() { $PY -c "import json; print(json.load(open('$1'))['n_ratings'])" 2>/dev/null || true; }
  if [ "$(n10 "$W/data/10_preprocessing/manifest.json")" != "$N" ]; then
    $PY 10_preprocessing.py --data-dir "$W/data" --input "$W/netflix/training_set" \
      > "$W/stage10.log" 2>&1
  fi
fi
for st in $STAGES; do
  case $st in
    20) [ "$SOURCE" = unique ] && { echo "stage 20: not run with SOURCE=unique"; continue; }
        measure 20 "$D/stage20.log" 20_make_ids.py --data-dir "$D/data" "$@" ;;
    30) measure 30 "$D/stage30.log" 30_split_train_test.py --data-dir "$D/data" ${S30_ARGS:-} ;;
    40) measure 40 "$D/stage40.log" 40_make_sparse_matrix.py --data-dir "$D/data" ${S40_ARGS:-} ;;
    *) echo "STAGES: expected 20, 30 or 40, got $st" >&2; exit 2 ;;
  esac
done
