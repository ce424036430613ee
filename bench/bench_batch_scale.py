#!/usr/bin/env python3
"""Validation RMSE per epoch and ratings/s of the mf preset at several batch sizes, on
Netflix-sized tables (prints figures; not a test). The measurement behind ``--batch-scale``
(docs/presets.md).

Synthetic explicit data from bench_train.py (default 10M ratings over 480,189 users x 17,770
items, 1% held out as validation), the mf preset with a constant learning rate and
sparse_adam (what ``--optimizer auto`` picks at this size). The settings are interleaved
epoch by epoch, so machine noise hits them alike.

    python bench/bench_batch_scale.py                          # 2 epochs, batches 2048 8192 32768
    python bench/bench_batch_scale.py --threads 1 --epochs 3 --batches 2048:0.01 32768:0.02
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import data_args, synthetic  # noqa: E402
from recpipe.cli import training_numerics  # noqa: E402
from recpipe.metrics import rmse_mae  # noqa: E402
from recpipe.scoring import predict_pairs  # noqa: E402
from recpipe.train import Trainer, TrainConfig  # noqa: E402


def main() -> None:
    ap = data_args(__doc__, 10_000_000)
    ap.set_defaults(users=480_189, items=17_770)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", nargs="+", default=["2048:0.01", "8192:0.01", "32768:0.01"],
                    metavar="BATCH:LR")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    training_numerics()                        # as stage 60 does
    data = synthetic(args.ratings, args.users, args.items, 0, torch.device("cpu"), "explicit")
    v = data.valid
    print(f"synthetic: {len(data.train):,} train, {len(v):,} valid ratings, {args.users:,} "
          f"users x {args.items:,} items; mf preset, sparse_adam, constant lr, "
          f"{args.threads} thread(s)", flush=True)
    out = Path(__file__).resolve().parent / "out" / "bench_batch_scale"
    trainers, lines = {}, {}
    for spec in args.batches:
        bs, lr = spec.split(":")
        cfg = TrainConfig(model="mf", batch_size=int(bs), lr=float(lr), lr_schedule="none",
                          optimizer="sparse_adam").resolved()
        trainers[spec], lines[spec] = Trainer(cfg, data, out, "bench"), []
    for epoch in range(1, args.epochs + 1):
        for spec, t in trainers.items():
            t0 = time.perf_counter()
            _, n = t.train_epoch()
            secs = time.perf_counter() - t0
            t.epoch += 1
            rmse = rmse_mae(predict_pairs(t.model, v.users, v.items, data.train_csr),
                            v.ratings, data.rating_scale)["rmse"]
            lines[spec].append(f"epoch {epoch}: valid RMSE {rmse:.4f}, {n / secs / 1e6:.2f}M "
                               f"ratings/s")
            print(f"batch {spec.split(':')[0]:>6} lr {spec.split(':')[1]}: "
                  + " | ".join(lines[spec]), flush=True)


if __name__ == "__main__":
    main()
