#!/usr/bin/env python3
"""Stage-60 throughput on synthetic data (prints figures; not a test).

Builds a synthetic explicit data set in memory (default 10M ratings, 70k users x 10k items,
Zipf-like item popularity, low-rank ratings plus noise on 1..5) directly as the device
tensors stage 60 trains on, then times:
  1. explicit biased MF, k = the preset's 128 (--mf-dim): training ratings/s over one epoch
     (target >= 3M/s, 2 CPU cores), for each --mf-runs OPTIMIZER:BATCH (rowsgd ignores the
     batch: one step per rating)
  2. NeuMF with 4 sampled negatives: training samples/s (positives + negatives; >= 1M/s);
     with --pair-models, each MODEL:TASK at its preset as stage 60 resolves it for the data
     (the optimizer auto picks, the batch --batch-scale gives)
  3. sampled-candidate evaluation of 70k users x 100 candidates (HR@10/NDCG@10; < 2 s)

    python bench/bench_train.py                      # the issue's sizes
    python bench/bench_train.py --ratings 1000000    # quicker
    python bench/bench_train.py --optimizer sparse_adam --batch-size 65536
    python bench/bench_train.py --users 480189 --items 17770 --skip mf eval --threads 1 \
        --optimizer sparse_adam --batch-size 32768 --neumf-positives 300000 --sparse-paths
    python bench/bench_train.py --skip neumf eval --rounds 2 \
        --mf-runs adam:65536 sparse_adam:65536 adam:2048 sparse_adam:2048
    python bench/bench_train.py --users 480189 --items 17770 --skip mf neumf eval \
        --neumf-positives 200000 --rounds 2 --pair-models gmf:implicit mlp:implicit \
        neumf:implicit deepmf:explicit deepmf:implicit gmf:explicit mlp:explicit neumf:explicit
    python bench/bench_train.py --users 480189 --items 17770 --skip mf neumf eval \
        --neumf-positives 200000 --rounds 3 --kernel-paths --matmul-bound \
        --pair-models gmf:implicit neumf:implicit mlp:implicit deepmf:explicit
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpipe import family  # noqa: E402
from recpipe.cli import training_numerics  # noqa: E402
from recpipe.dataset import Data, Part  # noqa: E402
from recpipe.metrics import sampled_rank_metrics  # noqa: E402
from recpipe.scoring import score_candidates  # noqa: E402
from recpipe.presets import ROWSGD, preset  # noqa: E402
from recpipe.train import Trainer, TrainConfig, for_data  # noqa: E402


def synthetic(n_ratings: int, n_users: int, n_items: int, seed: int, device: torch.device,
              task: str) -> Data:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n_ratings)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    i = rng.choice(n_items, n_ratings, p=pop / pop.sum())
    key = np.unique(u.astype(np.int64) * n_items + i)          # no duplicate pairs
    u, i = (key // n_items), (key % n_items)
    k = 8
    pu = rng.normal(0, 0.5, (n_users, k)).astype(np.float32)
    qi = rng.normal(0, 0.5, (n_items, k)).astype(np.float32)
    r = np.clip(np.rint(3.5 + (pu[u] * qi[i]).sum(1) + rng.normal(0, 0.7, len(u))), 1, 5)
    r = r.astype(np.float32)
    perm = rng.permutation(len(u))
    nv = len(u) // 100
    va, tr = perm[:nv], perm[nv:]

    def part(idx):
        return Part(users=torch.from_numpy(u[idx]).to(device),
                    items=torch.from_numpy(i[idx]).to(device),
                    ratings=torch.from_numpy(r[idx]).to(device))

    csr = sp.csr_matrix((np.ones(len(tr), np.float32), (u[tr], i[tr])), shape=(n_users, n_items))
    keys = torch.from_numpy(np.sort(u[tr] * n_items + i[tr])).to(device)
    return Data(manifest={}, n_users=n_users, n_items=n_items, rating_scale=(1.0, 5.0),
                global_mean=float(r[tr].mean()) if task == "explicit" else 0.0,
                rating_std=float(r[tr].std()) if task == "explicit" else 1.0, task=task,
                train=part(tr), valid=part(va), test=part(va), train_csr=csr,
                train_keys=keys, candidates={}, device=device)


def _head(data: Data, n: int) -> Data:
    """``data`` whose train part is its first ``n`` (already shuffled) interactions."""
    t = data.train
    return dataclasses.replace(data, train=Part(t.users[:n], t.items[:n], t.ratings[:n]))


def time_epoch(data: Data, cfg: TrainConfig, out: Path, limit: int = 0,
               compact: bool = True) -> tuple[float, int, float, str]:
    """Seconds, samples and loss of one training epoch (over the first ``limit`` train
    interactions when given), after a short warm-up epoch on 3 batches (rowsgd: and one
    untimed epoch over the data, which groups the ratings into the kernel's blocks); and
    the optimizer (``auto`` resolved for the full data)."""
    chosen = for_data(cfg.resolved(), data).optimizer
    cfg = dataclasses.replace(cfg, optimizer=chosen)
    trainer = Trainer(cfg.resolved(), _head(data, 3 * cfg.batch_size), out, "bench")
    trainer.compact_rows = compact       # sparse_adam: row-compact leaves, or sparse grads
    trainer.train_epoch()                              # warm-up (allocations, threads)
    trainer.data = _head(data, limit) if limit else data
    if chosen == "rowsgd":      # its first epoch also groups the ratings into blocks: untimed
        trainer.train_epoch()
    t0 = time.perf_counter()
    loss, samples = trainer.train_epoch()
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, samples, loss, chosen


def per_sample_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The layers a pair family runs once per sample in training: the NCF towers' layers
    after the first (which runs once per distinct row), deepmf's two sides when dropout
    makes them per sample (else per distinct row: none)."""
    tower = getattr(model, "tower", None)
    if tower is not None:
        return [m for m in tower.rest if isinstance(m, torch.nn.Linear)]
    if hasattr(model, "tower_user") and model.drop.p > 0:
        return [model.tower_user, model.tower_item]
    return []


def matmul_bound(name: str, task: str, cfg: TrainConfig, data: Data, reps: int = 10) -> str:
    """The matrix products of ``name``'s per-sample layers at the batch ``cfg`` trains with,
    timed alone on random inputs: x W^T, g W and g^T x per layer (forward, input gradient,
    weight gradient), and the samples/s they alone would allow."""
    model = Trainer(cfg, _head(data, cfg.batch_size), Path("/tmp"), "bench").model
    layers = per_sample_linears(model)
    if not layers:
        return f"[{name} {task}: no per-sample layers]"
    s = cfg.batch_size
    xs = [torch.randn(s, m.in_features) for m in layers]
    gs = [torch.randn(s, m.out_features) for m in layers]
    ws = [m.weight.detach().clone() for m in layers]

    def products() -> None:
        for x, g, w in zip(xs, gs, ws):
            x @ w.t()
            g @ w
            g.t() @ x
    products()                                                     # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        products()
    secs = (time.perf_counter() - t0) / reps
    flops = sum(6 * s * m.in_features * m.out_features for m in layers)
    shapes = ", ".join(f"{m.in_features}->{m.out_features}" for m in layers)
    return (f"[{name} {task}: matrix products alone] layers {shapes} per sample, "
            f"{flops / s / 1e3:.0f}k flops a sample, {flops / secs / 1e9:.0f} GFLOP/s at batch "
            f"{s:,}: at most {s / secs / 1e6:.2f}M samples/s from them alone")


def data_args(doc: str, ratings: int) -> argparse.ArgumentParser:
    """The options every synthetic-data bench takes (sizes and threads)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=ratings)
    ap.add_argument("--users", type=int, default=70_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main() -> None:
    ap = data_args(__doc__, 10_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizer", default="adam",
                    help="optimizer for both training benches (adam, sparse_adam, sgd, adagrad)")
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--neumf-positives", type=int, default=2_000_000,
                    help="time NeuMF over this many positives (x5 samples with 4 negatives); "
                         "0 = the whole epoch")
    ap.add_argument("--mf-runs", nargs="*", default=[], metavar="OPTIMIZER:BATCH",
                    help="MF settings timed one after the other in this process, e.g. "
                         "adam:65536 sparse_adam:65536 adam:2048 sparse_adam:2048 "
                         "(default: --optimizer:--batch-size)")
    ap.add_argument("--mf-dim", type=int, default=preset("mf", "explicit")["dim"],
                    help="MF factors (default: the mf explicit preset's)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the MF settings this often")
    ap.add_argument("--pair-models", nargs="*", default=[], metavar="MODEL:TASK",
                    help="families timed at their presets as stage 60 resolves them for "
                         "this data (--optimizer auto, --batch-scale), over the first "
                         "--neumf-positives positives, e.g. gmf:implicit mlp:implicit "
                         "neumf:implicit deepmf:explicit; --rounds times, interleaved")
    ap.add_argument("--kernel-paths", action="store_true",
                    help="time each --pair-models family twice a round, with the fused CPU "
                         "kernels (family.Dropout, tower_input, pair_dot) and with torch's "
                         "ops in their place, alternating which goes first")
    ap.add_argument("--matmul-bound", action="store_true",
                    help="with --pair-models: also time, alone, the matrix products of each "
                         "family's per-sample layers (forward, input gradient, weight "
                         "gradient) at its batch: the samples/s those products alone allow")
    ap.add_argument("--skip", nargs="*", default=[], choices=["mf", "neumf", "eval"])
    ap.add_argument("--sparse-paths", action="store_true",
                    help="with --optimizer sparse_adam: time NeuMF's embedding updates both "
                         "ways, row-compact leaves (stage 60's path) and sparse COO "
                         "gradients (the old one), --rounds times, side by side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    training_numerics()                 # as stage 60 does (subnormals, malloc reuse)
    dev = torch.device(args.device)
    out = Path(__file__).resolve().parent / "out" / "bench_train"
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} threads, device {dev}; synthetic "
          f"{args.ratings:,} ratings, {args.users:,} users x {args.items:,} items")

    if "mf" not in args.skip:
        t0 = time.perf_counter()
        data = synthetic(args.ratings, args.users, args.items, 0, dev, "explicit")
        print(f"data built in {time.perf_counter() - t0:.1f}s: {len(data.train):,} train ratings")
        runs = args.mf_runs or [f"{args.optimizer}:{args.batch_size}"]
        for rnd in range(args.rounds):            # rounds interleave the settings (noise)
            for spec in runs:
                opt_name, bs = spec.split(":")
                lr = ROWSGD[("mf", "explicit")]["lr"] if opt_name == "rowsgd" else 1e-2
                cfg = TrainConfig(model="mf", task="explicit", dim=args.mf_dim,
                                  optimizer=opt_name, batch_size=int(bs), lr=lr,
                                  device=args.device)
                secs, n, loss, chosen = time_epoch(data, cfg, out)
                if chosen != opt_name:
                    opt_name = f"{opt_name} = {chosen}"
                print(f"[mf explicit k={args.mf_dim}, {opt_name}, batch {int(bs)}] one epoch {n:,} "
                      f"ratings in {secs:.2f}s = {n / secs / 1e6:.2f}M ratings/s "
                      f"(target >= 3M/s), loss {loss:.4f}")
        del data

    by_task: dict[str, Data] = {}
    for rnd in range(args.rounds if args.pair_models else 0):
        for spec in args.pair_models:
            name, task = spec.split(":")
            if task not in by_task:
                by_task[task] = synthetic(args.ratings, args.users, args.items, 0, dev, task)
            d = by_task[task]
            final = for_data(TrainConfig(model=name, task=task, device=args.device
                                         ).resolved(device=d.device), d)
            paths = [(True, "")]
            if args.kernel_paths:                  # the order alternates between rounds
                paths = [(True, ", kernels"), (False, ", torch ops")][::1 - 2 * (rnd % 2)]
            for on, label in paths:
                family.USE_KERNELS = on
                secs, n, loss, chosen = time_epoch(d, final, out, args.neumf_positives)
                pos = min(args.neumf_positives or len(d.train), len(d.train))
                print(f"[{name} {task} at its preset: {chosen}, batch {final.batch_size}"
                      f"{label}] {n:,} samples ({pos:,} positives) in {secs:.2f}s = "
                      f"{n / secs / 1e6:.2f}M samples/s, {pos / secs / 1e6:.2f}M positives/s "
                      f"(target >= 1M samples/s), loss {loss:.4f}", flush=True)
            family.USE_KERNELS = True
            if args.matmul_bound and rnd == 0:
                print(matmul_bound(name, task, final, d), flush=True)
    by_task.clear()

    if "neumf" not in args.skip:
        data = synthetic(args.ratings, args.users, args.items, 0, dev, "implicit")
        cfg = TrainConfig(model="neumf", task="implicit", dim=16, layers=[64, 32, 16, 8],
                          optimizer=args.optimizer, batch_size=args.batch_size, lr=1e-3,
                          n_negatives=4, device=args.device)
        paths = ([("row-compact", True), ("sparse gradients", False)] * args.rounds
                 if args.sparse_paths and args.optimizer == "sparse_adam" else [("", True)])
        for label, compact in paths:
            secs, n, loss, _ = time_epoch(data, cfg, out, args.neumf_positives, compact)
            print(f"[neumf implicit, 4 negatives, {args.optimizer}"
                  f"{' ' + label if label else ''}, batch {args.batch_size}] one "
                  f"epoch {n:,} samples in {secs:.2f}s = {n / secs / 1e6:.2f}M samples/s "
                  f"(target >= 1M/s), loss {loss:.4f}; timed over "
                  f"{args.neumf_positives or len(data.train):,} positives of "
                  f"{len(data.train):,}", flush=True)
        model = Trainer(cfg.resolved(), data, out, "bench").model.eval()
    else:
        data = synthetic(min(args.ratings, 1_000_000), args.users, args.items, 0, dev, "implicit")
        model = Trainer(TrainConfig(model="neumf", task="implicit").resolved(), data, out,
                        "bench").model.eval()

    if "eval" not in args.skip:
        g = torch.Generator(device=dev).manual_seed(1)
        users = torch.arange(args.users, device=dev)
        cand = torch.randint(0, args.items, (args.users, 100), device=dev, generator=g)
        score_candidates(model, users[:1000], cand[:1000])          # warm-up
        t0 = time.perf_counter()
        res = sampled_rank_metrics(score_candidates(model, users, cand), cand)
        secs = time.perf_counter() - t0
        print(f"[sampled evaluation, neumf] {args.users:,} users x 100 candidates in "
              f"{secs:.3f}s (target < 2 s): {res}")
        mf = Trainer(TrainConfig(model="mf", task="explicit", dim=64).resolved(), data, out,
                     "bench").model.eval()
        score_candidates(mf, users[:1000], cand[:1000])
        t0 = time.perf_counter()
        res = sampled_rank_metrics(score_candidates(mf, users, cand), cand)
        secs = time.perf_counter() - t0
        print(f"[sampled evaluation, mf k=64] {args.users:,} users x 100 candidates in "
              f"{secs:.3f}s (target < 2 s): {res}")


if __name__ == "__main__":
    main()
