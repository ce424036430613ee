#!/usr/bin/env python3
"""Benchmark stage 10 on a synthetic Netflix-layout training_set/ (default 10M ratings, 17,770 files).

Generates the files once under bench/out/ (git-ignored; reused when the same size is already
there), runs `10_preprocessing.py` on them in a subprocess, and prints wall seconds, ratings/s
and the stage's peak RSS (getrusage of the child). Target: >= 3M ratings/s, < 2 GB.

    python bench/bench_preprocessing.py                       # 10M ratings, 17,770 files
    python bench/bench_preprocessing.py --bench-ratings 1000000 --files 2000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recpipe.demo import FIRST_DAY, LAST_DAY, STAR_SHARES, write_training_set  # noqa: E402


def make_netflix(folder: Path, n_ratings: int, n_files: int, seed: int = 0) -> float:
    """Synthetic per-movie files with Netflix's shape: 480k sparse user ids, Zipf movie sizes."""
    info = folder / "bench.json"
    want = {"n_ratings": n_ratings, "n_files": n_files, "seed": seed, "version": 2}
    if info.exists() and json.loads(info.read_text()) == want:
        return 0.0
    t0 = time.time()
    if folder.exists():
        shutil.rmtree(folder)
    rng = np.random.default_rng(seed)
    sizes = 1.0 / (np.arange(n_files) + 5.0) ** 0.9
    sizes = sizes[rng.permutation(n_files)]
    counts = np.maximum(1, np.floor(sizes / sizes.sum() * n_ratings)).astype(np.int64)
    counts[np.argmax(counts)] += n_ratings - counts.sum()
    item = np.repeat(np.arange(1, n_files + 1, dtype=np.int64), counts)
    user_ids = rng.choice(2_649_429, min(480_189, n_ratings), replace=False) + 1
    user = user_ids[np.minimum(rng.zipf(1.3, n_ratings), len(user_ids)) - 1]
    stars = (rng.choice(5, n_ratings, p=STAR_SHARES) + 1).astype(np.int8)
    day = rng.integers(FIRST_DAY, LAST_DAY + 1, n_ratings).astype(np.int32)
    d = {"user": user, "item": item, "stars": stars, "day": day,
         "years": np.full(n_files, 2000), "null_year": np.zeros(n_files, bool),
         "titles": np.array([f"Movie {m}, Part {m % 7}" for m in range(1, n_files + 1)], dtype=object)}
    folder.mkdir(parents=True)
    write_training_set(d, folder, seed)
    info.write_text(json.dumps(want))
    return time.time() - t0


def make_combined(src: Path) -> Path:
    """combined_data_1..4.txt from the per-movie files (as Netflix ships them), once."""
    out = src / "combined"
    if (out / "combined_data_4.txt").exists():
        return out
    out.mkdir(exist_ok=True)
    files = sorted((src / "training_set").iterdir())
    for k, group in enumerate(np.array_split(np.arange(len(files)), 4), 1):
        with open(out / f"combined_data_{k}.txt", "wb") as f:
            for j in group:
                f.write(files[j].read_bytes())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-ratings", type=int, default=10_000_000, help="ratings to generate")
    ap.add_argument("--files", type=int, default=17_770, help="per-movie files (Netflix: 17,770)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="work folder")
    ap.add_argument("--layout", choices=["files", "combined"], default="files",
                    help="per-movie mv_*.txt files, or the combined_data_1..4.txt layout")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the stage (best is reported)")
    args = ap.parse_args()
    src = args.out / f"netflix_{args.bench_ratings}_{args.files}"
    gen = make_netflix(src, args.bench_ratings, args.files)
    inp = src / "training_set"
    if args.layout == "combined":
        inp = make_combined(src)
    size = sum(p.stat().st_size for p in inp.iterdir())
    print(f"input: {inp}: {len(list(inp.iterdir())):,} files, {args.bench_ratings:,} ratings, "
          f"{size / 1e6:.0f} MB" + (f" (generated in {gen:.1f}s)" if gen else " (reused)"))
    data_dir = args.out / "data"
    env = dict(os.environ, RECPIPE_PROGRESS="0")
    best = None
    for _ in range(args.repeat):
        # drop the page cache effect only of our own previous run: a warm cache is the norm
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "10_preprocessing.py"), "--input", str(inp),
                               "--data-dir", str(data_dir)], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"stage 10 failed:\n{proc.stderr}")
        best = wall if best is None else min(best, wall)
        m = json.loads((data_dir / "10_preprocessing" / "manifest.json").read_text())
        print(f"  run: wall {wall:.2f}s ({m['n_ratings'] / wall / 1e6:.2f}M ratings/s), in-stage "
              f"{m['seconds']:.2f}s ({m['n_ratings'] / m['seconds'] / 1e6:.2f}M ratings/s)")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_mb = ru.ru_maxrss / 1024
    cpu = (ru.ru_utime + ru.ru_stime) / args.repeat
    m = json.loads((data_dir / "10_preprocessing" / "manifest.json").read_text())
    n = m["n_ratings"]
    print(f"stage 10: {n:,} ratings, {m['n_users']:,} users, {m['n_items']:,} items")
    print(f"best wall (process incl. Python start-up and imports): {best:.2f}s -> {n / best / 1e6:.2f}M ratings/s")
    print(f"CPU time of the stage (user+sys, per run): {cpu:.2f}s on {os.cpu_count()} cores; "
          f"load average now {os.getloadavg()[0]:.1f} (other processes slow the wall time)")
    print(f"peak RSS of the stage: {rss_mb:,.0f} MB")
    print(f"targets: >= 3M ratings/s: {'OK' if n / best >= 3e6 else 'MISSED'}; "
          f"< 2 GB: {'OK' if rss_mb < 2048 else 'MISSED'}")


if __name__ == "__main__":
    main()
