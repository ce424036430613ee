#!/usr/bin/env python3
"""Peak memory of what sampled negatives hold at a split's size, step by step, as stage 60's
implicit selection and refit hold it together: the loaded parts, the train keys, their
KeySet filter, the refit's merged keys and their filter, the test's known rows. Prints the
process's peak RSS (ru_maxrss) after each step and the seconds so far.

    python bench/bench_keys_memory.py --data-dir WORK/data_demo_100000000_implicit
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpipe.dataset import KeySet, load_data, with_valid_in_train  # noqa: E402
from recpipe.evaluation import known_before  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path,
                    help="a pipeline folder where stages 10-40 ran on an implicit split")
    a = ap.parse_args()
    t0 = time.time()

    def peak(step: str) -> None:
        gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{step:26s} peak RSS {gib:6.2f} GiB  {time.time() - t0:6.1f} s", flush=True)

    data = load_data(a.data_dir, "implicit", torch.device("cpu"))
    peak("load_data")
    keys = data.keys()
    peak("train keys")
    held = [KeySet(keys, data.n_users * data.n_items)]
    peak("their filter")
    merged = with_valid_in_train(data, keys=True, csr=False)
    peak("refit keys")
    held.append(KeySet(merged.train_keys, data.n_users * data.n_items))
    peak("their filter")
    held.append(known_before(data, "test"))
    peak("the test's known rows")


if __name__ == "__main__":
    main()
