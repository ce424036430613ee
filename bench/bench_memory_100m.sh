#!/bin/bash
# Peak RSS and wall seconds of stage 20 at Netflix scale (issue "Netflix scale on one machine").
#
#   bench/bench_memory_100m.sh                  # 100M ratings under /tmp/m100 (~2.3 GB of disk)
#   N=10000000 W=/tmp/m10 bench/bench_memory_100m.sh
#   bench/bench_memory_100m.sh --duplicates mean   # arguments go to 20_make_ids.py
#
# Generates the synthetic Netflix-layout training_set/ once (bench_preprocessing.make_netflix:
# 17,770 per-movie files, 480,189 sparse user ids < 2.65M, Zipf sizes), runs stage 10 on it
# once, then stage 20 under /usr/bin/time -v. Target at 100M: < 5 GB peak RSS.
# Measured (2 shared cores): 9.6 GiB, 95 s before; 3.2 GiB, 21-26 s after the one-sort rewrite.
# Remove $W afterwards: rm -rf /tmp/m100
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${N:-100000000}
W=${W:-/tmp/m100}
PY=${PYTHON:-python3}
export RECPIPE_PROGRESS=0
mkdir -p "$W"
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
/usr/bin/time -v $PY 20_make_ids.py --data-dir "$W/data" "$@" > "$W/stage20.log" 2>&1 \
  || { cat "$W/stage20.log"; exit 1; }
grep -E "duplicates \(|20_make_ids:" "$W/stage20.log" | cut -c10-
wall=$(grep "Elapsed (wall clock)" "$W/stage20.log" | awk '{print $NF}')
kb=$(grep "Maximum resident set size" "$W/stage20.log" | awk '{print $NF}')
$PY -c "print(f'stage 20 at {$N:,} ratings: wall $wall, peak RSS {$kb / 2**20:.2f} GiB '
            f'({$kb * 1024 / $N:.1f} bytes/rating)')"
