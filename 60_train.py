#!/usr/bin/env python3
"""Train a recommendation model (biased MF, deep MF, GMF, MLP or NeuMF) on stage 40's sparse
matrices, select the epoch on validation, evaluate the test split once, and write
DATA_DIR/60_train/<model>/ (model.pt, checkpoint.pt, metrics.json, history.csv, curve.png)."""
import sys

from recpipe.cli import run_main
from recpipe.train import main

if __name__ == "__main__":
    sys.exit(run_main(main))
