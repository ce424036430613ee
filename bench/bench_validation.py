#!/usr/bin/env python3
"""Per-epoch validation cost at Netflix scale (prints figures; not a test).

An implicit random split of Netflix-sized data has one validation pair or more for most of
its 480k users; stage 60's per-epoch selection metric (full_ndcg@10) ranks every item for
each of them. This bench builds such a validation part (``--valid-users`` users, one held-out
item each, on the synthetic train set of bench_train.py) and times one per-epoch
validation of an untrained GMF, the preset's dot-product model, with all users and with the
default ``--valid-users`` sample of stage 60 (50,000 users). The full pass is timed on
``--full-users`` users and scaled to all of them (it is linear in the users: blocks of
equal size), which the output says.

    python bench/bench_validation.py                     # 480k x 17,770, 440k valid users
    python bench/bench_validation.py --full-users 0      # time the full pass itself
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import data_args, synthetic  # noqa: E402
from recpipe.dataset import Part, sample_users  # noqa: E402
from recpipe.evaluation import evaluate  # noqa: E402
from recpipe.train import Trainer, TrainConfig  # noqa: E402


def main() -> None:
    ap = data_args(__doc__, 2_000_000)
    ap.set_defaults(users=480_000, items=17_770)
    ap.add_argument("--valid-users", type=int, default=440_000)
    ap.add_argument("--sample", type=int, default=50_000, help="stage 60's --valid-users")
    ap.add_argument("--full-users", type=int, default=100_000,
                    help="time the all-users pass on this many users and scale (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    data = synthetic(args.ratings, args.users, args.items, 0, dev, "implicit")
    rng = np.random.default_rng(1)
    vu = np.sort(rng.choice(args.users, args.valid_users, replace=False))
    vi = rng.integers(0, args.items, len(vu))
    valid = Part(torch.from_numpy(vu), torch.from_numpy(vi), torch.ones(len(vu)))
    data = dataclasses.replace(data, valid=valid)
    cfg = TrainConfig(model="gmf", task="implicit").resolved()
    model = Trainer(cfg, data, Path("/tmp"), "bench").model.eval()
    print(f"torch {torch.__version__}, {args.threads} threads; {args.users:,} users x "
          f"{args.items:,} items, {len(vu):,} validation users, gmf (dim {cfg.dim})")

    def timed(d) -> float:
        t0 = time.perf_counter()
        evaluate(model, d, "valid", "implicit", 0, full=False)
        return time.perf_counter() - t0

    sub, kept, total = sample_users(data, "valid", args.sample, 0)
    t_sample = timed(sub)
    if args.full_users and args.full_users < total:
        part, k2, _ = sample_users(data, "valid", args.full_users, 1)
        t_full = timed(part) * total / k2
        how = f"timed on {k2:,} users, scaled x{total / k2:.1f}"
    else:
        t_full, how = timed(data), "timed"
    print(f"per-epoch validation, all {total:,} users: {t_full:.1f}s ({how})")
    print(f"per-epoch validation, fixed sample of {kept:,} users (stage 60's default): "
          f"{t_sample:.1f}s ({t_full / t_sample:.1f}x less)")


if __name__ == "__main__":
    main()
