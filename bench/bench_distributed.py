#!/usr/bin/env python3
"""Stage 60 with 1 and N processes (torchrun, gloo on the CPU), and the bytes per step.

Part 1, measured: builds a MovieLens 100K pipeline (or uses ``--data-dir``: a folder with
stage 40 done), then runs ``60_train.py`` for each model at its preset, plain and under
``torchrun --standalone --nproc_per_node N``, ``--epochs E`` (default 3), and prints per run:
samples/s of each epoch, the test metrics, the bytes communicated per step (each table's
collective payload, metrics.json ``distributed.per_step``) and whether the replicas'
checksums agreed. On one machine the processes share its cores, so expect no speed-up on 2
cores: the point is that the numbers match. The torchrun run goes first, and the
one-process run is given the optimizer its ``--optimizer auto`` picked (in one process auto
can mean rowsgd, a one-process CPU kernel: mf), so both train with the same algorithm.

Part 2, counted (no training): the rows a step touches at Netflix's shape (480,189 users x
17,770 movies; users drawn by the demo generator's log-normal activity, items by its Zipf
popularity, ``recpipe.demo``), at the batch ``--batch-scale`` gives at 100M ratings (32,768
samples), for 2 and 8 ranks, and the bytes per step per rank this gives for mf (k = 128) and
neumf (its preset: GMF 16, MLP embeddings 32, 8 negatives): each table goes by (rows,
gradients) all-gather or dense all-reduce, whichever moves fewer bytes, as stage 60 does.

    python bench/bench_distributed.py                        # ML-100K, mf and neumf, N = 2
    python bench/bench_distributed.py --models mf --epochs 1 --nproc 2 --data-dir DIR
    python bench/bench_distributed.py --epochs 0 --train-args      # the presets, with refit
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RECPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", RECPIPE_PROGRESS="0", PYTHONUNBUFFERED="1")
SPLIT = {"mf": "random", "neumf": "loo", "gmf": "loo", "mlp": "loo", "deepmf": "random",
         "ease": "loo", "autorec": "random", "multvae": "loo"}


def pipeline(data_dir: Path, strategy: str) -> None:
    if (data_dir / "40_make_sparse_matrix" / "manifest.json").exists():
        return
    src = SHARED / "movielens" / "ml-100k"
    if not src.is_dir():
        sys.exit(f"MovieLens 100K not found at {src}; pass --data-dir with stage 40 done")
    for script, *args in (("10_preprocessing.py", "--input", str(src)),
                          ("20_make_ids.py",),
                          ("30_split_train_test.py", "--strategy", strategy, "--seed", "42"),
                          ("40_make_sparse_matrix.py",)):
        subprocess.run([sys.executable, str(ROOT / script), "--data-dir", str(data_dir),
                        *args], check=True, env=ENV, capture_output=True)


def train(data_dir: Path, model: str, nproc: int, epochs: int, extra: list[str]) -> dict:
    args = [str(ROOT / "60_train.py"), "--data-dir", str(data_dir), "--model", model,
            *(["--epochs", str(epochs)] if epochs > 0 else []), "--threads", "1", *extra]
    cmd = ([sys.executable, *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), *args])
    t0 = time.time()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = data_dir / "60_train" / model
    metrics = json.loads((out / "metrics.json").read_text())
    hist = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    col = hist[0].index("samples_per_s")
    picked = re.search(r"--optimizer auto: (\w+)", proc.stderr + proc.stdout)
    return {"wall": wall, "metrics": metrics, "optimizer": picked and picked.group(1),
            "samples_per_s": [float(r[col]) for r in hist[1:]]}


def part1(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    try:
        print(f"# Part 1: stage 60, 1 vs {args.nproc} processes (gloo, OMP_NUM_THREADS=1), "
              f"--epochs {args.epochs or 'preset'} {' '.join(args.train_args)}, "
              f"{os.cpu_count()} CPU cores")
        for model in args.models:
            if args.data_dir:
                data_dir = args.data_dir
            else:
                data_dir = tmp / SPLIT.get(model, "random")
                pipeline(data_dir, SPLIT.get(model, "random"))
            # torchrun first: in one process `--optimizer auto` can mean rowsgd (a one-process
            # CPU kernel), so the one-process run is given what auto picked under torchrun
            many = train(data_dir, model, args.nproc, args.epochs, args.train_args)
            same = (["--optimizer", many["optimizer"]]
                    if many["optimizer"] and "--optimizer" not in args.train_args else [])
            rows = {1: train(data_dir, model, 1, args.epochs, [*args.train_args, *same]),
                    args.nproc: many}
            print(f"\n## {model} ({data_dir})")
            print("| processes | samples/s per epoch | wall s | test metrics | bytes/step "
                  "| checksums equal |")
            print("|---|---|---|---|---|---|")
            for n, r in rows.items():
                m, d = r["metrics"], r["metrics"]["distributed"]
                test = ", ".join(f"{k} {v:.4f}" for k, v in m["test"].items()
                                 if isinstance(v, float) and not k.endswith("_n")
                                 and k in ("rmse", "mae", "hr@10", "ndcg@10"))
                checks = d.get("checksums") or []
                equal = ("-" if n == 1 else
                         f"{sum(len(set(c)) == 1 for c in checks)}/{len(checks)} epochs")
                sps = " / ".join(f"{s / 1e3:.0f}k" for s in r["samples_per_s"])
                m_best = f" (best epoch {m['best_epoch']} of {m['epochs_run']})"
                print(f"| {n} | {sps} | {r['wall']:.1f} | {test}{m_best} | "
                      f"{d.get('bytes_per_step', 0):,.0f} | {equal} |")
            d = rows[args.nproc]["metrics"]["distributed"]
            print(f"\nper table, per step, {args.nproc} processes ({d.get('steps')} steps):")
            for name, s in d.get("per_step", {}).items():
                print(f"  {name:28s} {s['bytes']:>12,.0f} bytes  {s['rows']:>9,.1f} rows sent"
                      f"  dense all-reduce on {s['dense_steps'] * 100:.0f}% of steps")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part2(batch: int, worlds: tuple[int, ...], steps: int = 20) -> None:
    sys.path.insert(0, str(ROOT))
    from recpipe.demo import DemoSpec, _activity
    U, I = 480_189, 17_770
    rng = np.random.default_rng(0)
    act = _activity(rng, DemoSpec(seed=0, n_users=U, n_items=I, n_ratings=100_480_507))
    pu = act / act.sum()
    pop = 1.0 / (np.arange(I) + 10.0) ** 1.3
    pi = pop / pop.sum()
    print(f"\n# Part 2: rows touched per step at Netflix's shape ({U:,} x {I:,}), global "
          f"batch {batch:,} samples, counted over {steps} random batches (no training)")
    f32 = 4
    models = {
        # name: (positives per step, per side: [(table, row floats)], negatives, tower floats)
        "mf (explicit, k 128)": (batch, {"user": [("user_factors + user_bias", 129)],
                                         "item": [("item_factors + item_bias", 129)]}, 0, 0),
        "neumf (implicit, preset)": (batch // 9, {"user": [("user_gmf", 16), ("user_mlp", 32)],
                                                  "item": [("item_gmf", 16), ("item_mlp", 32)]},
                                     8, _neumf_tower_floats()),
    }
    print("| model | ranks | table | rows per rank (max) | gathered bytes | dense bytes | "
          "chosen |")
    print("|---|---|---|---|---|---|---|")
    for name, (pos, sides, negs, tower) in models.items():
        for world in worlds:
            per = {t: [] for side in sides.values() for t, _ in side}
            for _ in range(steps):
                users = rng.choice(U, size=pos, p=pu)
                items = rng.choice(I, size=pos, p=pi)
                if negs:
                    items = np.concatenate([items, rng.integers(0, I, pos * negs)])
                    users_all = np.concatenate([users, np.repeat(users, negs)])
                else:
                    users_all = users
                for side, ids_ in (("user", users_all), ("item", items)):
                    # each rank's contiguous chunk of positives (and their negatives)
                    chunks = np.array_split(np.arange(pos), world)
                    for t, _ in sides[side]:
                        m = 0
                        for c in chunks:
                            sel = ids_[c] if not negs else np.concatenate(
                                [ids_[c]] + ([ids_[pos + np.repeat(c * negs, negs)
                                                   + np.tile(np.arange(negs), len(c))]]))
                            m = max(m, np.unique(sel).size)
                        per[t].append(m)
            total = 0.0
            for side, tables in sides.items():
                n_rows = U if side == "user" else I
                for t, w in tables:
                    m = float(np.mean(per[t]))
                    gathered = world * m * (w * f32 + 8)
                    dense = n_rows * w * f32
                    chosen = min(gathered, dense)
                    total += chosen
                    print(f"| {name} | {world} | {t} | {m:,.0f} | {gathered / 1e6:,.2f} MB | "
                          f"{dense / 1e6:,.2f} MB | {'gather' if gathered < dense else 'dense'} |")
            if tower:
                total += tower * f32
                print(f"| {name} | {world} | towers (all-reduce) | - | - | "
                      f"{tower * f32 / 1e3:,.1f} kB | dense |")
            print(f"| {name} | {world} | **total per step** | | | | "
                  f"**{total / 1e6:,.2f} MB** |")


def _neumf_tower_floats() -> int:
    sys.path.insert(0, str(ROOT))
    import models  # noqa: F401
    from recpipe.family import family
    m = family("neumf")(10, 10, gmf_dim=16, layers=[64, 32, 16, 8])
    tables = {id(p) for t in m.row_sparse_tables() for p in t.parameters()}
    return sum(p.numel() for p in m.parameters() if id(p) not in tables)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mf", "neumf"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3,
                    help="epochs per run (0: the preset's, with early stopping)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="a pipeline folder with stage 40 done (default: ML-100K built here, "
                         "random split for explicit models, loo for implicit)")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=["--no-refit"],
                    help="more 60_train.py arguments (default: --no-refit)")
    ap.add_argument("--skip-training", action="store_true", help="part 2 only")
    ap.add_argument("--batch", type=int, default=32768,
                    help="part 2's global batch (samples; 32,768 is --batch-scale at 100M)")
    args = ap.parse_args()
    if not args.skip_training:
        part1(args)
    part2(args.batch, (2, 8))


if __name__ == "__main__":
    main()
