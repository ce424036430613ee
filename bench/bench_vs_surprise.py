#!/usr/bin/env python3
"""Surprise SVD vs our biased MF on the same ML-100K split, in one process (prints figures).

The split is the pipeline's own: stages 10-40 on ml-100k/u.data (random 90/10, 10% of train
as validation, seed 42) are run in-process into bench/out/vs_surprise/ unless --data-dir
points at an existing stage-40 artifact. Surprise SVD (default settings: 100 factors,
20 epochs, lr 0.005, reg 0.02) is fitted on train + valid (all non-test ratings: it has no
use for a validation split), our MF on train with validation early stopping (the preset).
Both are scored once on the same test ratings, clipped to the rating scale. Wall times
cover fitting plus test prediction; ours also includes per-epoch validation and writing its
checkpoint files.

    python bench/bench_vs_surprise.py [--data-dir DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_split(data_dir: Path, shared: Path) -> None:
    from recpipe import ids, matrix, preprocess, split
    preprocess.main(["--data-dir", str(data_dir), "--input",
                     str(shared / "movielens" / "ml-100k" / "u.data")])
    ids.main(["--data-dir", str(data_dir)])
    split.main(["--data-dir", str(data_dir), "--strategy", "random"])
    matrix.main(["--data-dir", str(data_dir)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("RECPIPE_PROGRESS", "0")
    import torch
    torch.set_num_threads(args.threads)
    from recpipe.cli import setup_logging
    setup_logging()
    logging.getLogger("recpipe").setLevel(logging.WARNING)
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = ROOT / "bench" / "out" / "vs_surprise"
        if not (data_dir / "40_make_sparse_matrix" / "manifest.json").exists():
            build_split(data_dir, args.shared_data)
    d40 = data_dir / "40_make_sparse_matrix"
    tr = sp.load_npz(d40 / "train.npz").tocoo()
    va = sp.load_npz(d40 / "valid.npz").tocoo()
    te = sp.load_npz(d40 / "test.npz").tocoo()
    import json
    lo, hi = json.loads((d40 / "manifest.json").read_text()).get("rating_scale", [1.0, 5.0])
    print(f"split {d40}: train {tr.nnz:,}, valid {va.nnz:,}, test {te.nnz:,}; "
          f"torch threads {args.threads}")

    # --- Surprise SVD, defaults -----------------------------------------------------
    import pandas as pd
    from surprise import SVD, Dataset, Reader
    fit_df = pd.DataFrame({"u": np.r_[tr.row, va.row], "i": np.r_[tr.col, va.col],
                           "r": np.r_[tr.data, va.data]})
    t0 = time.perf_counter()
    trainset = Dataset.load_from_df(fit_df, Reader(rating_scale=(lo, hi))).build_full_trainset()
    algo = SVD(random_state=args.seed)
    algo.fit(trainset)
    pred = np.array([algo.predict(int(u), int(i), clip=True).est for u, i in zip(te.row, te.col)])
    s_secs = time.perf_counter() - t0
    s_rmse = float(np.sqrt(np.mean((pred - te.data) ** 2)))
    print(f"Surprise SVD (defaults, fit on train+valid): test RMSE {s_rmse:.4f}  wall {s_secs:.2f}s")

    # --- ours -----------------------------------------------------------------------
    from recpipe.train import TrainConfig, run
    t0 = time.perf_counter()
    m = run(TrainConfig(model="mf", data_dir=data_dir, seed=args.seed, threads=args.threads))
    o_secs = time.perf_counter() - t0
    o_rmse = m["test"]["rmse"]
    print(f"ours biased MF (preset, fit on train, early stopping on valid): test RMSE "
          f"{o_rmse:.4f}  valid RMSE {m['valid']['rmse']:.4f}  best epoch {m['best_epoch']}  "
          f"wall {o_secs:.2f}s (training {m['train_seconds']:.2f}s)")
    ok = o_rmse <= s_rmse and o_secs < s_secs
    print(f"ours reaches Surprise SVD's test RMSE in less wall time: {'yes' if ok else 'NO'} "
          f"(RMSE {o_rmse:.4f} vs {s_rmse:.4f}, {o_secs:.2f}s vs {s_secs:.2f}s)")


if __name__ == "__main__":
    main()
