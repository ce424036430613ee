#!/usr/bin/env bash
# Do the defaults generalise? Surprise SVD's defaults vs our mf and bpmf presets (untuned for
# these) on data the presets were not chosen on, each through the whole pipeline (random
# 90/10, seed 42):
#   netflix    the 10 Netflix Prize movie files in ../shared/data (another source; 19.5k users,
#              10 movies, so most test users have one train rating)
#   mls-x2     ml-latest-small with every rating doubled: a 1-10 scale in whole steps
#   ml100k-x20 ML-100K with every rating times 20: a 20-100 scale
# Needs bench/requirements.txt (scikit-surprise). Usage: bash bench/unseen_scales.sh [WORK_DIR]
# (about 1 minute on 2 cores, plus Surprise's grid search: GridSearchCV, 36 settings x 3
# folds per data set, several minutes each)
W=${1:-bench/out/unseen}
source "$(dirname "$0")/lib.sh"
$PY - "$SHARED" "$W" <<'PYEOF'
import sys
import pandas as pd
shared, w = sys.argv[1], sys.argv[2]
d = pd.read_csv(f"{shared}/movielens/ml-latest-small/ratings.csv")
d.assign(rating=d.rating * 2).to_csv(f"{w}/mls_x2.csv", index=False)
d = pd.read_csv(f"{shared}/movielens/ml-100k/u.data", sep="\t", names=["u", "i", "r", "t"])
d.assign(r=d.r * 20).to_csv(f"{w}/ml100k_x20.csv", index=False)
PYEOF
SPLIT=(--strategy random --seed 42)
pipeline "$W/netflix" "${SPLIT[@]}" -- --input "$SHARED/netflix/training_set"
pipeline "$W/mls-x2" "${SPLIT[@]}" -- --input "$W/mls_x2.csv" --format csv \
  --rating-scale 1 10 --columns userId,movieId,rating,timestamp
pipeline "$W/ml100k-x20" "${SPLIT[@]}" -- --input "$W/ml100k_x20.csv" --format csv \
  --rating-scale 20 100 --columns u,i,r,t
for ds in netflix mls-x2 ml100k-x20; do
  echo "== $ds"
  $PY bench/bench_vs_surprise.py --data-dir "$W/$ds" --grid
  echo "bpmf, its preset (the same test pairs):"
  $PY 60_train.py --model bpmf --data-dir "$W/$ds" 2>&1 | grep -E " (valid|test): "
done
