#!/usr/bin/env python3
"""Benchmark stages 20, 30 (random and loo) and 40 on a synthetic Netflix-sized artifact.

Generates a stage-10 artifact (default 10M ratings, 470k users x 17,770 items, long-tailed
user activity and item popularity, Netflix-style sparse customer ids, day-resolution
timestamps), then runs each stage as its own subprocess, the way a user does, and prints
seconds, ratings/s and the peak RSS of that process. Several ``--ratings`` sizes show how
memory grows with the ratings (it should be linear: a constant number of bytes per rating
above the interpreter's baseline).

    python bench/bench_stages_20_40.py                      # 10M ratings
    python bench/bench_stages_20_40.py --ratings 1000000 3000000 10000000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recpipe.artifacts import StageOutput, write_parquet  # noqa: E402

NETFLIX_ITEMS = 17_770
USERS_PER_10M = 470_000


def make_stage10(data_dir: Path, n_ratings: int, n_users: int, n_items: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.3, n_users)  # long-tailed user activity
    popularity = 1.0 / (np.arange(n_items) + 20.0) ** 1.1  # long-tailed item popularity
    rng.shuffle(popularity)
    u = np.searchsorted(np.cumsum(activity / activity.sum()), rng.random(n_ratings))
    i = np.searchsorted(np.cumsum(popularity / popularity.sum()), rng.random(n_ratings))
    u = np.minimum(u, n_users - 1)
    i = np.minimum(i, n_items - 1)
    raw_users = np.sort(rng.choice(2_649_430, n_users, replace=False) + 1).astype(np.int64)
    rng.shuffle(raw_users)
    day0 = int(pd.Timestamp("1999-11-11").timestamp()) // 86_400
    days = rng.integers(0, 2_243, n_ratings)  # 1999-11-11 .. 2005-12-31
    ratings = pd.DataFrame({
        "raw_user_id": raw_users[u],
        "raw_item_id": (i + 1).astype(np.int64),
        "rating": rng.choice(np.arange(1, 6, dtype=np.float32), n_ratings,
                             p=[0.05, 0.10, 0.29, 0.34, 0.22]),
        "timestamp": ((day0 + days) * 86_400).astype(np.int64),
    })
    # the order of a per-movie file set: grouped by movie
    ratings = ratings.iloc[np.argsort(i, kind="stable")].reset_index(drop=True)
    with StageOutput(data_dir, "10_preprocessing") as out:
        write_parquet(ratings, out.path("ratings.parquet"))
        out.commit({"command": f"python bench/bench_stages_20_40.py --ratings {n_ratings}",
                    "n_ratings": n_ratings, "n_users": int(len(np.unique(u))),
                    "n_items": int(len(np.unique(i))), "format": "synthetic",
                    "dataset": f"bench-{n_ratings}", "inputs": [], "rating_scale": [1.0, 5.0],
                    "has_timestamp": True, "n_unrated": 0})


def run_stage(script: str, *args: str) -> tuple[float, int, int]:
    """(seconds, peak RSS in bytes, exit code) of one stage run as a subprocess."""
    env = dict(os.environ, RECPIPE_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace"))
    return secs, usage.ru_maxrss * 1024, proc.returncode


def baseline_rss() -> int:
    code = "import recpipe.ids, recpipe.split, recpipe.matrix, pyarrow.parquet, scipy.sparse"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, nargs="+", default=[10_000_000],
                    help="sizes to run (ratings in the synthetic stage-10 artifact)")
    ap.add_argument("--users", type=int, default=None,
                    help=f"users (default {USERS_PER_10M:,} per 10M ratings)")
    ap.add_argument("--items", type=int, default=NETFLIX_ITEMS, help="items")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "stages_20_40",
                    help="scratch data folder (removed afterwards unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated artifacts")
    ap.add_argument("--generate-into", type=Path, default=None,
                    help="only write the synthetic stage-10 artifact into this data folder")
    args = ap.parse_args()
    if args.generate_into is not None:
        n = args.ratings[0]
        users = args.users or max(1_000, round(USERS_PER_10M * n / 10_000_000))
        make_stage10(args.generate_into, n, users, args.items, args.seed)
        return

    base = baseline_rss()
    print(f"cpus: {os.cpu_count()}; interpreter + imports baseline RSS: {base / 2**20:.0f} MB")
    print(f"{'ratings':>11} {'stage':<28} {'seconds':>8} {'ratings/s':>12} {'peak RSS':>10} "
          f"{'B/rating':>9}")
    failed = False
    for n in args.ratings:
        n_users = args.users or max(1_000, round(USERS_PER_10M * n / 10_000_000))
        data = args.out / f"r{n}"
        if data.exists():
            shutil.rmtree(data)
        # generated in a child process: the forked stage processes must not start from a
        # parent that holds the generated data (a fork's RSS counts the parent's pages)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-into", str(data), "--ratings",
                        str(n), "--users", str(n_users), "--items", str(args.items),
                        "--seed", str(args.seed)], check=True)
        print(f"{n:>11,} {'(generate stage 10)':<28} {time.perf_counter() - t0:8.1f}")
        d = ["--data-dir", str(data)]
        runs = [("20_make_ids", ["20_make_ids.py", *d]),
                ("30 random", ["30_split_train_test.py", *d, "--strategy", "random"]),
                ("40 (random)", ["40_make_sparse_matrix.py", *d]),
                ("30 loo (99 negatives)", ["30_split_train_test.py", *d, "--strategy", "loo"]),
                ("40 (loo, candidates)", ["40_make_sparse_matrix.py", *d])]
        for label, cmd in runs:
            secs, rss, rc = run_stage(*cmd)
            if rc != 0:
                print(f"{n:>11,} {label:<28} FAILED (exit {rc})")
                failed = True
                break
            print(f"{n:>11,} {label:<28} {secs:8.1f} {n / secs:12,.0f} {rss / 2**20:8.0f} MB "
                  f"{(rss - base) / n:9.1f}", flush=True)
            if label == "20_make_ids":
                m = json.loads((data / "20_make_ids" / "manifest.json").read_text())
                print(f"{'':>11} (after duplicates: {m['n_ratings']:,} ratings, {m['n_users']:,} "
                      f"users, {m['n_items']:,} items; "
                      f"{m['duplicates']['removed_rows']:,} duplicate rows removed)")
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    print("B/rating = (peak RSS - baseline) / ratings; the machine may be shared, so seconds vary")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
