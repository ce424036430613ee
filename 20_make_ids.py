#!/usr/bin/env python3
"""Stage 20: assign contiguous, deterministic user and item ids (sorted by raw id), with both-way maps, a duplicate (user, item) policy and optional minimum-count filters. Reads DATA_DIR/10_preprocessing, writes DATA_DIR/20_make_ids."""
import sys

from recpipe.cli import run_main
from recpipe.ids import main

if __name__ == "__main__":
    sys.exit(run_main(main))
