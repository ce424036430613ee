#!/usr/bin/env python3
"""Stage 40: CSR user x item matrices (explicit float32 ratings and a binary implicit view) for train / valid / test in one shared id space, plus evaluation candidates for leave-one-out / NCF splits. Reads DATA_DIR/30_split_train_test, writes DATA_DIR/40_make_sparse_matrix."""
import sys

from recpipe.cli import run_main
from recpipe.matrix import main

if __name__ == "__main__":
    sys.exit(run_main(main))
