#!/usr/bin/env python3
"""Stage 30: split the ratings into train / valid / test by a seeded, reproducible strategy (random, user-random, temporal-global, temporal-user, loo with sampled negatives, probe, kfold, ncf). Reads DATA_DIR/20_make_ids, writes DATA_DIR/30_split_train_test."""
import sys

from recpipe.cli import run_main
from recpipe.split import main

if __name__ == "__main__":
    sys.exit(run_main(main))
