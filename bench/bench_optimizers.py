#!/usr/bin/env python3
"""Dense Adam vs sparse_adam (lazy, row-wise Adam) for explicit MF on tables much larger than a
batch: validation RMSE and seconds per epoch, both in this process (prints figures).

Synthetic explicit data as in bench_train.py (default 2M ratings over 70k users x 10k items,
about 28 ratings per user; 1% held out as validation), the mf preset (dim 128, lr 1e-2,
batch 2048, reg 0.1) with a constant learning rate, for a fixed number of epochs. This is the
situation where ``--optimizer auto`` picks sparse_adam (user + item rows > 16 x batch).

    python bench/bench_optimizers.py [--ratings 2000000] [--users 70000] [--items 10000]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import data_args, synthetic  # noqa: E402
from recpipe.metrics import rmse_mae  # noqa: E402
from recpipe.scoring import predict_pairs  # noqa: E402
from recpipe.train import Trainer, TrainConfig  # noqa: E402


def main() -> None:
    ap = data_args(__doc__, 2_000_000)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = synthetic(args.ratings, args.users, args.items, 0, torch.device("cpu"), "explicit")
    out = Path(__file__).resolve().parent / "out" / "bench_optimizers"
    print(f"synthetic: {len(data.train):,} train, {len(data.valid):,} valid ratings, "
          f"{args.users:,} users x {args.items:,} items; mf preset, constant lr")
    for name in ("adam", "sparse_adam"):
        t = Trainer(TrainConfig(model="mf", optimizer=name, lr_schedule="none").resolved(),
                    data, out, "bench")
        cells = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            t.train_epoch()
            secs = time.perf_counter() - t0
            pred = predict_pairs(t.model, data.valid.users, data.valid.items)
            rm = rmse_mae(pred, data.valid.ratings, data.rating_scale)["rmse"]
            cells.append(f"{rm:.4f} ({secs:.1f}s)")
        t.l2.close()
        print(f"{name:12s} valid RMSE (epoch seconds) per epoch: " + "  ".join(cells))


if __name__ == "__main__":
    main()
