#!/usr/bin/env python3
"""Dense Adam vs sparse_adam (lazy, row-wise Adam) on tables much larger than a batch:
the validation metric and seconds per epoch, both in this process (prints figures).

Synthetic data as in bench_train.py (default 2M ratings over 70k users x 10k items, about 28
ratings per user; 1% held out as validation), a model's preset with a constant learning rate,
for a fixed number of epochs. This is the situation where ``--optimizer auto`` picks
sparse_adam (user + item rows > 16 x batch).

- ``--model mf`` (explicit, dim 128, lr 1e-2, batch 2048, reg 0.1): validation RMSE.
- ``--model deepmf`` (explicit), or any model with ``--task explicit``: validation RMSE.
- ``--model neumf`` / ``gmf`` / ``mlp`` (implicit presets): validation HR@10 of each held-out
  pair against 99 items drawn uniformly (a fixed draw; the NCF protocol's shape).

    python bench/bench_optimizers.py [--model mf] [--task explicit] [--ratings 2000000] [--users 70000]
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
from recpipe.metrics import rmse_mae, sampled_rank_metrics  # noqa: E402
from recpipe.scoring import predict_pairs, score_candidates  # noqa: E402
from recpipe.train import Trainer, TrainConfig  # noqa: E402


def main() -> None:
    ap = data_args(__doc__, 2_000_000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--model", default="mf")
    ap.add_argument("--task", default=None, help="default: the family's own")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    training_numerics()                        # as stage 60 does
    cfg0 = TrainConfig(model=args.model, task=args.task, lr_schedule="none").resolved()
    data = synthetic(args.ratings, args.users, args.items, 0, torch.device("cpu"), cfg0.task)
    out = Path(__file__).resolve().parent / "out" / "bench_optimizers"
    g = torch.Generator().manual_seed(1)
    v = data.valid
    cands = torch.cat([v.items[:, None],
                       torch.randint(0, args.items, (len(v), 99), generator=g)], 1)
    print(f"synthetic: {len(data.train):,} train, {len(v):,} valid pairs, {args.users:,} users "
          f"x {args.items:,} items; {args.model} preset ({cfg0.task}, batch "
          f"{cfg0.batch_size}), constant lr")
    for name in ("adam", "sparse_adam"):
        t = Trainer(TrainConfig(model=args.model, task=cfg0.task, optimizer=name,
                                lr_schedule="none").resolved(), data, out, "bench")
        cells = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            _, n = t.train_epoch()
            secs = time.perf_counter() - t0
            if cfg0.task == "explicit":
                pred = predict_pairs(t.model, v.users, v.items)
                metric = rmse_mae(pred, v.ratings, data.rating_scale)["rmse"]
            else:
                t.model.eval()
                metric = sampled_rank_metrics(score_candidates(t.model, v.users, cands),
                                              cands)["hr@10"]
            cells.append(f"{metric:.4f} ({secs:.1f}s, {n / secs / 1e6:.2f}M/s)")
        t.l2.close()
        what = "RMSE" if cfg0.task == "explicit" else "HR@10"
        print(f"{name:12s} valid {what} (epoch seconds, samples/s) per epoch: "
              + "  ".join(cells))


if __name__ == "__main__":
    main()
