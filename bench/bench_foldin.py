#!/usr/bin/env python3
"""Fold-in quality of stage 70 on MovieLens 100K: folded-in users vs the same users trained.

1. Pick ``--users`` held-out users (seeded) and split each one's ratings at random into a
   fold-in part F (``--fold-share``) and an evaluation part E.
2. Variant "normal": the data without E (F stays in), run through stages 10-40 and trained
   with 60_train.py. The random train/valid/test split of stage 30 moves some of F out of
   train; F' = the part of F that landed in train is what the model saw of those users.
3. Variant "held out": the data without the held-out users at all, same stages, same training
   options. Each held-out user is then folded in from F' by recpipe.recommend.fold_in (closed
   form for explicit mf; Adam on a fresh user row for the others), no retraining.
4. Both are scored on E (items unknown to either model are left out of both):
   explicit: RMSE (predictions clipped to the rating scale, as stage 60 reports it);
   implicit (``--implicit-model``, e.g. gmf): HR@10 with each E item ranked against 99 sampled
   items the user never rated (the NCF protocol).
   The gap (fold-in minus trained) is printed; "same model" lines also fold the held-out users
   into the normal model itself, from F', and compare with their trained rows.

Run:  python bench/bench_foldin.py [--users 50] [--fold-share 0.5] [--implicit-model gmf]
All stages run as the user runs them (subprocesses of the numbered scripts) in a temporary
data folder; the commands are printed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from recpipe.recommend import fold_in, load_recommender, user_embeddings  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "movielens" / "ml-100k"


def sh(script: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / script), *args]
    print("  $ python " + " ".join(shlex.quote(a) for a in [script, *args]), flush=True)
    env = dict(os.environ, RECPIPE_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"    ({time.perf_counter() - t0:.1f}s)", flush=True)


def write_variant(ratings: pd.DataFrame, src: Path, folder: Path) -> Path:
    """An ml-100k folder holding ``ratings`` as u.data and the real u.item beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings[["user", "item", "rating", "ts"]].to_csv(folder / "u.data", sep="\t", header=False,
                                                     index=False)
    if (src / "u.item").exists():
        (folder / "u.item").symlink_to(src / "u.item")
    return folder


def run_stages(raw: Path, data: Path, train_args: list[list[str]], split_seed: int) -> None:
    sh("10_preprocessing.py", "--input", str(raw), "--data-dir", str(data))
    sh("20_make_ids.py", "--data-dir", str(data))
    sh("30_split_train_test.py", "--data-dir", str(data), "--seed", str(split_seed))
    sh("40_make_sparse_matrix.py", "--data-dir", str(data))
    for args in train_args:
        sh("60_train.py", "--data-dir", str(data), *args)


def index_of(series: pd.Series, values: np.ndarray) -> np.ndarray:
    return pd.Index(series).get_indexer(pd.Index(values)).astype(np.int64)


def train_part(data: Path, users: np.ndarray) -> pd.DataFrame:
    """(raw user, raw item, rating) of ``users``' train ratings in ``data`` (stage 40 train)."""
    ids = data / "20_make_ids"
    u_map = pd.read_parquet(ids / "users.parquet")
    i_map = pd.read_parquet(ids / "items.parquet")
    m = sp.load_npz(data / "40_make_sparse_matrix" / "train.npz").tocoo()
    rows = index_of(u_map["raw_user_id"], users)
    keep = np.isin(m.row, rows[rows >= 0])
    return pd.DataFrame({"user": u_map["raw_user_id"].to_numpy()[m.row[keep]],
                         "item": i_map["raw_item_id"].to_numpy()[m.col[keep]],
                         "rating": m.data[keep]})


@torch.inference_mode()
def predict(model, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(users), torch.as_tensor(items)).float().numpy()


def rmse(pred: np.ndarray, truth: np.ndarray, scale: tuple[float, float]) -> float:
    return float(np.sqrt(np.mean((np.clip(pred, *scale) - truth) ** 2)))


@torch.inference_mode()
def hit_rate(model, user_rows: np.ndarray, pos_items: np.ndarray, negs: np.ndarray) -> float:
    """HR@10: each positive ranked against its row of negatives; ties count against it."""
    cand = np.concatenate([pos_items[:, None], negs], axis=1)
    s = model(torch.as_tensor(user_rows)[:, None], torch.as_tensor(cand)).float().numpy()
    rank = (s[:, 1:] >= s[:, :1]).sum(1)
    return float((rank < 10).mean())


def sample_negatives(rated: dict, users: np.ndarray, n_items_raw: np.ndarray, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """k raw items per row that the row's user never rated (in the full data)."""
    out = np.empty((len(users), k), dtype=n_items_raw.dtype)
    for j, u in enumerate(users):          # 50 users x a few dozen rows: not a hot path
        pool = np.setdiff1d(n_items_raw, rated[u], assume_unique=True)
        out[j] = rng.choice(pool, size=k, replace=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the ml-100k folder")
    ap.add_argument("--users", type=int, default=50, help="held-out users")
    ap.add_argument("--fold-share", type=float, default=0.5,
                    help="share of each held-out user's ratings used to fold them in")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out users and split")
    ap.add_argument("--model", default="mf", help="explicit model to compare")
    ap.add_argument("--train-args", default="", help="extra 60_train.py options (both runs)")
    ap.add_argument("--implicit-model", default="",
                    help="also compare HR@10 for this implicit model (e.g. gmf); empty: skip")
    ap.add_argument("--implicit-args", default="", help="extra 60_train.py options for it")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    if not (args.data / "u.data").exists():
        sys.exit(f"{args.data / 'u.data'} not found; pass --data PATH/ml-100k")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_foldin_"))
    print(f"work folder: {work}")

    full = pd.read_csv(args.data / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(full["user"].unique(), size=args.users, replace=False))
    is_held = full["user"].isin(held).to_numpy()
    key = rng.random(len(full))
    rank = pd.Series(key).groupby(full["user"].to_numpy()).rank(method="first").to_numpy()
    n_u = full.groupby("user")["user"].transform("size").to_numpy()
    in_f = is_held & (rank <= np.ceil(n_u * args.fold_share))
    in_e = is_held & ~in_f
    print(f"held out {args.users} users ({int(is_held.sum())} ratings): fold-in part "
          f"{int(in_f.sum())}, evaluation part {int(in_e.sum())}")

    explicit = ["--model", args.model, *shlex.split(args.train_args)]
    train_runs = [explicit]
    if args.implicit_model:
        train_runs.append(["--model", args.implicit_model, "--task", "implicit",
                           *shlex.split(args.implicit_args)])
    t0 = time.perf_counter()
    print("variant normal (held-out users' fold-in part in the data):")
    raw_a = write_variant(full[~in_e], args.data, work / "raw_normal" / "ml-100k")
    run_stages(raw_a, work / "normal", train_runs, args.seed)
    print("variant held out (held-out users absent):")
    raw_b = write_variant(full[~is_held], args.data, work / "raw_heldout" / "ml-100k")
    run_stages(raw_b, work / "heldout", train_runs, args.seed)
    print(f"stages took {time.perf_counter() - t0:.0f}s")

    cpu = torch.device("cpu")
    # F' = the fold-in ratings the normal model trained on
    fprime = train_part(work / "normal", held)
    evalp = full[in_e]

    def compare(name: str) -> None:
        rec_a = load_recommender(work / "normal", name, cpu)
        rec_b = load_recommender(work / "heldout", name, cpu)
        users_a = index_of(rec_a.users["raw_user_id"], held)
        item_a = index_of(rec_a.items["raw_item_id"], evalp["item"].to_numpy())
        item_b = index_of(rec_b.items["raw_item_id"], evalp["item"].to_numpy())
        ok = (item_a >= 0) & (item_b >= 0)
        ev = evalp[ok]
        ev_user = np.searchsorted(held, ev["user"].to_numpy())          # 0..n_held-1
        ev_item_a, ev_item_b = item_a[ok], item_b[ok]
        f_item_b = index_of(rec_b.items["raw_item_id"], fprime["item"].to_numpy())
        f_ok = f_item_b >= 0
        f_user = np.searchsorted(held, fprime["user"].to_numpy()[f_ok])
        f_item_a = index_of(rec_a.items["raw_item_id"], fprime["item"].to_numpy()[f_ok])
        f_rating = fprime["rating"].to_numpy()[f_ok]
        t = time.perf_counter()
        fold_b = fold_in(rec_b, f_user, f_item_b[f_ok], f_rating, len(held))
        t_fold = time.perf_counter() - t
        fold_a = fold_in(rec_a, f_user, f_item_a, f_rating, len(held))
        print(f"\n[{name}, {rec_a.task}] {len(held)} held-out users, fold-in from "
              f"{int(f_ok.sum())} ratings (F' in train of the normal run), evaluated on "
              f"{len(ev)} ratings ({int((~ok).sum())} left out: item unknown to a model)")
        print(f"  fold-in method: {fold_b.method}")
        print(f"  fold-in time for all {len(held)} users: {t_fold:.3f}s")
        if rec_a.task == "explicit":
            truth = ev["rating"].to_numpy()
            r_train = rmse(predict(rec_a.model, users_a[ev_user], ev_item_a), truth,
                           rec_a.rating_scale)
            r_fold = rmse(predict(fold_b.model, ev_user, ev_item_b), truth, rec_b.rating_scale)
            r_same = rmse(predict(fold_a.model, ev_user, ev_item_a), truth, rec_a.rating_scale)
            mu_b = float(rec_b.model.global_mean)
            zero = rec_b.model.with_user_rows({n: torch.zeros(len(held), e.weight.shape[1])
                                                 for n, e in user_embeddings(rec_b.model).items()})
            r_zero = rmse(predict(zero, ev_user, ev_item_b), truth, rec_b.rating_scale)
            print(f"  RMSE on E, trained normally (F' in training):     {r_train:.4f}")
            print(f"  RMSE on E, held out + fold-in (no retraining):    {r_fold:.4f}")
            print(f"  fold-in gap (fold-in - trained):                  {r_fold - r_train:+.4f}")
            print(f"  same model: fold-in into the normal model:        {r_same:.4f} "
                  f"(gap {r_same - r_train:+.4f})")
            print(f"  reference, no fold-in: held-out model with a zero user row: "
                  f"{r_zero:.4f}; global mean {mu_b:.3f}: "
                  f"{rmse(np.full(len(truth), mu_b), truth, rec_b.rating_scale):.4f}")
        else:
            rated = {u: g.to_numpy() for u, g in full.groupby("user")["item"]}
            nrng = np.random.default_rng(args.seed + 1)
            known_both = np.intersect1d(rec_a.items["raw_item_id"].to_numpy(),
                                        rec_b.items["raw_item_id"].to_numpy())
            negs_raw = sample_negatives(rated, ev["user"].to_numpy(), known_both, 99, nrng)
            neg_a = index_of(rec_a.items["raw_item_id"], negs_raw.ravel()).reshape(negs_raw.shape)
            neg_b = index_of(rec_b.items["raw_item_id"], negs_raw.ravel()).reshape(negs_raw.shape)
            h_train = hit_rate(rec_a.model, users_a[ev_user], ev_item_a, neg_a)
            h_fold = hit_rate(fold_b.model, ev_user, ev_item_b, neg_b)
            h_same = hit_rate(fold_a.model, ev_user, ev_item_a, neg_a)
            print(f"  HR@10 on E (vs 99 sampled negatives), trained normally: {h_train:.4f}")
            print(f"  HR@10 on E, held out + fold-in (no retraining):         {h_fold:.4f}")
            print(f"  fold-in gap (fold-in - trained):                         "
                  f"{h_fold - h_train:+.4f}")
            print(f"  same model: fold-in into the normal model:               {h_same:.4f} "
                  f"(gap {h_same - h_train:+.4f})")

    compare(args.model)
    if args.implicit_model:
        compare(args.implicit_model)


if __name__ == "__main__":
    main()
