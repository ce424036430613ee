#!/usr/bin/env python3
"""Stage 10: read raw rating files and write one merged ratings table (+ item titles).

Reads the Netflix Prize training_set/ (or combined_data_*.txt), MovieLens 100K/1M/10M/20M/25M/
latest, the Kaggle anime ratings, NCF *.train.rating, or any CSV/TSV (--columns); .gz and .zip
inputs too. `--input demo` generates a deterministic demo dataset; `--download NAME` fetches a
MovieLens archive first. Writes DATA_DIR/10_preprocessing/{ratings,items}.parquet + manifest.json.
"""
import sys

from recpipe.cli import run_main
from recpipe.preprocess import main

if __name__ == "__main__":
    sys.exit(run_main(main))
