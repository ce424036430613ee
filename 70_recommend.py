#!/usr/bin/env python3
"""Use a trained model (stage 60): top-k recommendations for a known user (--user), for a new
user from a ratings file without retraining (--ratings, fold-in), the items most similar to an
item (--similar-to), or top-k for many users written to a CSV/Parquet file (--batch ... --out).
"""
import sys

from recpipe.cli import run_main
from recpipe.recommend import main

if __name__ == "__main__":
    sys.exit(run_main(main))
