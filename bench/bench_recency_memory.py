#!/usr/bin/env python3
"""Memory and time of the pair models' recency weights (``--recency``, the neumf and mlp
presets on splits that hold out each user's latest) at a split's size, as stage 60 builds
them: the loaded split, the selection's weights, the refit's merged train, the refit's
weights. Prints the resident memory after each step, the peak so far (sampled every 50 ms)
and the seconds so far.

    python bench/bench_recency_memory.py --data-dir WORK/data_demo_100000000_implicit
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpipe.cli import training_numerics  # noqa: E402
from recpipe.dataset import load_data, pair_recency_weights, with_valid_in_train  # noqa: E402
from recpipe.presets import preset  # noqa: E402


def rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path,
                    help="a pipeline folder where stages 10-40 ran on a leave-one-out split")
    ap.add_argument("--half-life", type=float,
                    default=preset("neumf", "implicit")["recency_latest"],
                    help="default: neumf's preset (recency_latest)")
    ap.add_argument("--floor", type=float, default=preset("neumf", "implicit")["recency_floor"],
                    help="default: the presets' recency_floor")
    a = ap.parse_args()
    torch.set_num_threads(2)
    training_numerics()                          # stage 60's allocator settings
    peak = [0.0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], rss_gib())
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()

    def report(step: str) -> None:
        time.sleep(0.2)                          # one more sample after the step
        print(f"{step:<32} resident {rss_gib():6.2f} GiB   peak so far {peak[0]:6.2f} GiB   "
              f"{time.perf_counter() - t0:6.1f} s", flush=True)

    data = load_data(a.data_dir, "implicit", torch.device("cpu"))
    report("loaded")
    w = pair_recency_weights(data, a.half_life, a.floor)
    report(f"selection weights ({len(w):,})")
    merged = with_valid_in_train(data)
    report("refit's merged train")
    w2 = pair_recency_weights(merged, a.half_life, a.floor, merged=True)
    report(f"refit weights ({len(w2):,})")


if __name__ == "__main__":
    main()
