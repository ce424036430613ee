#!/usr/bin/env python3
"""The `implicit` library's ALS and BPR beside our implicit models, on the same test pairs.

Reads a stage-40 artifact with sampled candidates (a ``loo`` or ``ncf`` split) through our
own loader (``recpipe.dataset.load_data``) and scores the peer with our own metric code
(``recpipe.metrics.sampled_rank_metrics``): the same users, the same held-out positive and
the same N sampled negatives per user (stage 40's ``{valid,test}_candidates.npz``, column 0
the positive), the same pessimistic tie rule, the same HR@10 / NDCG@10 and the same 95%
interval over users (mean +- 1.96 std / sqrt(users), the ``_ci`` of our metrics.json and the
README's "seed 0 [95% interval]" column).

Protocol, as stage 60's: choose on validation, test once.
1. Each configuration of the grid is fitted on the train interactions (binary) and scored
   on the VALID candidates; the one with the best valid HR@10 is chosen (ties: the better
   valid NDCG@10, then the first in grid order).
2. It is refitted on train + valid (``recpipe.evaluation.known_before(data, "test")``: what
   our models are refitted on and what they know when the test is scored) with the same seed
   and scored once on the TEST candidates.

Scores are the dot products of the factor rows (``user_factors[u] @ item_factors[i]``, float32
as ours), never ``recommend``, which filters liked items. BPR's factor rows carry its item bias
(its last user column is 1), so the dot product is its full score.

ALS confidence (Hu, Koren & Volinsky 2008): c_ui = 1 + alpha * x_ui with binary x. implicit
0.7 takes the matrix's values as c_ui itself (unobserved pairs weigh 1, and its own ``alpha``
argument only multiplies the values), so the matrix passed holds 1 + alpha on each
interaction and the model is built with alpha = 1. implicit's ``alpha = a`` on binary data is
our alpha = a - 1.

    python bench/bench_vs_implicit.py --data-dir DIR [--models als bpr] [--threads 1]
        [--json OUT] [--als-factors 32 64 128] [--als-reg 0.01 0.1 1 10]
        [--als-alpha 1 5 10 40] [--als-iterations 15] [--bpr-factors 32 64 128]
        [--bpr-lr 0.01 0.05] [--bpr-reg 0.001 0.01] [--bpr-iterations 100] [--seed 0]

Needs ``pip install -r bench/requirements.txt`` (implicit==0.7.3, CPU build).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recpipe.cli import PipelineError, run_main  # noqa: E402

PROG = "bench/bench_vs_implicit.py"
INSTALL = "pip install -r bench/requirements.txt"
PINNED = "0.7.3"
KS = (10,)
METRICS = ("hr@10", "ndcg@10")


# ------------------------------------------------------------------ the peer's matrices

def binary(csr: sp.csr_matrix) -> sp.csr_matrix:
    """``csr``'s pattern as float32 ones (canonical: sorted indices, no duplicates)."""
    m = sp.csr_matrix(csr, dtype=np.float32, copy=True)
    m.sum_duplicates()
    m.sort_indices()
    m.data[:] = 1.0
    return m


def confidence_matrix(csr: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """ALS's c_ui = 1 + alpha * x_ui on ``csr``'s interactions (x binary), float32 CSR; the
    input is not modified."""
    m = binary(csr)
    m.data[:] = np.float32(1.0 + alpha)
    return m


def refit_matrix(data) -> sp.csr_matrix:
    """The binary train + valid interactions the chosen configuration is refitted on, the
    same matrix our models are refitted on and score the test from."""
    from recpipe.evaluation import known_before
    return binary(known_before(data, "test"))


# ------------------------------------------------------------------ scoring, our protocol

def candidate_scores(user_factors: np.ndarray, item_factors: np.ndarray, users: np.ndarray,
                     items: np.ndarray) -> "torch.Tensor":
    """[R, C] float32 scores: row r, column c is user_factors[users[r]] @
    item_factors[items[r, c]]."""
    import torch
    uf = torch.from_numpy(np.ascontiguousarray(user_factors, dtype=np.float32))
    vf = torch.from_numpy(np.ascontiguousarray(item_factors, dtype=np.float32))
    u = uf[torch.as_tensor(np.asarray(users), dtype=torch.int64)]             # [R, k]
    v = vf[torch.as_tensor(np.asarray(items), dtype=torch.int64)]             # [R, C, k]
    return torch.bmm(v, u.unsqueeze(2)).squeeze(2)


def _in_matrix(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bool per (row, col) pair: whether ``m`` holds it."""
    coo = m.tocoo()
    n_cols = np.int64(m.shape[1])
    keys = np.sort(coo.row.astype(np.int64) * n_cols + coo.col.astype(np.int64))
    return np.isin(np.asarray(rows, np.int64) * n_cols + np.asarray(cols, np.int64), keys)


def score_part(user_factors: np.ndarray, item_factors: np.ndarray, users: np.ndarray,
               items: np.ndarray, fit: sp.csr_matrix, intervals: bool = False
               ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, int]]:
    """(metrics, per-user rows, counts) of the candidate rows ``users`` [R] / ``items``
    [R, 1 + N] (column 0 the positive) for a model fitted on ``fit``, by our metric code.

    metrics: ``hr@10``, ``ndcg@10`` (and with ``intervals`` their ``_n`` and ``_ci``); rows:
    per-row values; counts: what was scored and what to look at (users with no interaction
    in the fit matrix score 0 everywhere, so their positive ties every negative and misses).
    Non-finite scores raise: NaN would compare as a hit."""
    import torch

    from recpipe.metrics import sampled_rank_metrics, sampled_rank_rows
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    ci = torch.from_numpy(items)
    scores = candidate_scores(user_factors, item_factors, users, items)
    finite = torch.isfinite(scores).all(1)
    n_bad = int((~finite).sum())
    if n_bad:
        raise FloatingPointError(f"{n_bad} of {len(users)} candidate rows have non-finite "
                                 f"scores (first user_idx {int(users[~finite.numpy()][0])})")
    metrics = sampled_rank_metrics(scores, ci, ks=KS, intervals=intervals)
    rows = {k: v.numpy().astype(np.float64) for k, v in sampled_rank_rows(scores, ci, KS).items()}
    fit = fit.tocsr()
    pos, neg = items[:, 0], items[:, 1:]
    repeat = neg == pos[:, None]                       # dropped by our metric code
    tie = (scores[:, 1:] == scores[:, :1]).numpy() & ~repeat
    user_nnz = np.diff(fit.indptr)
    item_nnz = np.bincount(fit.indices, minlength=fit.shape[1])
    counts = {
        "users_scored": int(len(users)),
        "users_skipped": 0,
        "distinct_users": int(len(np.unique(users))),
        "negatives_per_user": int(neg.shape[1]),
        "users_without_fit_interactions": int((user_nnz[users] == 0).sum()),
        "positives_without_fit_interactions": int((item_nnz[pos] == 0).sum()),
        "positives_in_fit_matrix": int(_in_matrix(fit, users, pos).sum()),
        "negatives_in_fit_matrix": int(_in_matrix(fit, np.repeat(users, neg.shape[1]),
                                                  neg.ravel()).sum()),
        "negative_columns_repeating_the_positive": int(repeat.sum()),
        "users_with_a_negative_tied_to_the_positive": int(tie.any(1).sum()),
    }
    return metrics, rows, counts


# ------------------------------------------------------------------ the peers

def require_implicit():
    """The imported ``implicit`` package, or one line saying how to install it."""
    try:
        import implicit
    except ImportError as e:
        raise PipelineError(f"the `implicit` library is not importable ({e}); this bench "
                            f"needs it: `{INSTALL}` (implicit=={PINNED})") from None
    return implicit


def factors_of(model) -> tuple[np.ndarray, np.ndarray]:
    """(user_factors, item_factors) of a fitted implicit model as numpy float32 arrays (a GPU
    model is brought to the CPU first)."""
    if not isinstance(model.user_factors, np.ndarray) and hasattr(model, "to_cpu"):
        model = model.to_cpu()
    uf = np.asarray(model.user_factors, dtype=np.float32)
    vf = np.asarray(model.item_factors, dtype=np.float32)
    if uf.ndim != 2 or vf.ndim != 2 or uf.shape[1] != vf.shape[1]:
        raise RuntimeError(f"unexpected factor shapes {uf.shape} / {vf.shape}")
    return uf, vf


def fit_als(train: sp.csr_matrix, cfg: dict[str, Any], threads: int, seed: int):
    """implicit's AlternatingLeastSquares on the users x items ``train`` (binary), confidence
    1 + alpha (see the module docstring); returns the fitted model."""
    from implicit.als import AlternatingLeastSquares
    model = AlternatingLeastSquares(factors=int(cfg["factors"]),
                                    regularization=float(cfg["regularization"]), alpha=1.0,
                                    iterations=int(cfg["iterations"]), num_threads=threads,
                                    random_state=seed, use_gpu=False)
    model.fit(confidence_matrix(train, float(cfg["alpha"])), show_progress=False)
    return model


def fit_bpr(train: sp.csr_matrix, cfg: dict[str, Any], threads: int, seed: int):
    """implicit's BayesianPersonalizedRanking on the users x items ``train`` (binary)."""
    from implicit.bpr import BayesianPersonalizedRanking
    model = BayesianPersonalizedRanking(factors=int(cfg["factors"]),
                                        learning_rate=float(cfg["learning_rate"]),
                                        regularization=float(cfg["regularization"]),
                                        iterations=int(cfg["iterations"]), num_threads=threads,
                                        random_state=seed, use_gpu=False)
    model.fit(binary(train), show_progress=False)
    return model


@dataclass(frozen=True)
class Peer:
    """One library model: its grid (from the CLI) and its fit."""
    label: str
    grid: Callable[[argparse.Namespace], list[dict[str, Any]]]
    fit: Callable[[sp.csr_matrix, dict[str, Any], int, int], Any]


def _product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


PEERS: dict[str, Peer] = {
    "als": Peer("implicit AlternatingLeastSquares", lambda a: _product(
        factors=a.als_factors, regularization=a.als_reg, alpha=a.als_alpha,
        iterations=[a.als_iterations]), fit_als),
    "bpr": Peer("implicit BayesianPersonalizedRanking", lambda a: _product(
        factors=a.bpr_factors, learning_rate=a.bpr_lr, regularization=a.bpr_reg,
        iterations=[a.bpr_iterations]), fit_bpr),
}


def choose(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the best valid HR@10; ties: the better valid NDCG@10, then the first
    in grid order. Trials that diverged (``valid`` None) are never chosen."""
    ok = [t for t in trials if t.get("valid") is not None]
    if not ok:
        raise PipelineError("every configuration of the grid gave non-finite scores")
    return max(ok, key=lambda t: (t["valid"]["hr@10"], t["valid"]["ndcg@10"]))


def _fmt(cfg: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def bench_peer(name: str, peer: Peer, data, configs: list[dict[str, Any]], threads: int,
               seed: int) -> dict[str, Any]:
    """Grid on valid, refit of the chosen configuration on train + valid, test once."""
    train = binary(data.train_csr)
    vu, vi = (t.numpy() for t in data.candidates["valid"])
    tu, ti = (t.numpy() for t in data.candidates["test"])
    print(f"\n== {name}: {peer.label}, {len(configs)} configurations, fitted on train "
          f"({train.nnz:,} interactions), scored on the valid candidates "
          f"({len(vu):,} users x 1 + {vi.shape[1] - 1})", flush=True)
    trials, valid_counts = [], None
    t_grid = time.perf_counter()
    for j, cfg in enumerate(configs, 1):
        t0 = time.perf_counter()
        model = peer.fit(train, cfg, threads, seed)
        secs = time.perf_counter() - t0
        uf, vf = factors_of(model)
        try:
            m, _, counts = score_part(uf, vf, vu, vi, train)
        except FloatingPointError as e:
            print(f"  [{j:2d}/{len(configs)}] {_fmt(cfg)}: diverged ({e}); fit {secs:.2f}s",
                  flush=True)
            trials.append({"config": cfg, "valid": None, "fit_seconds": secs,
                           "diverged": str(e)})
            continue
        valid_counts = counts
        trials.append({"config": cfg, "valid": m, "fit_seconds": secs})
        print(f"  [{j:2d}/{len(configs)}] {_fmt(cfg)}: valid hr@10 {m['hr@10']:.4f} "
              f"ndcg@10 {m['ndcg@10']:.4f}; fit {secs:.2f}s", flush=True)
    grid_secs = time.perf_counter() - t_grid
    best = choose(trials)
    fit_times = [t["fit_seconds"] for t in trials]
    print(f"chosen on valid: {_fmt(best['config'])}: valid hr@10 {best['valid']['hr@10']:.4f} "
          f"ndcg@10 {best['valid']['ndcg@10']:.4f}  (grid {grid_secs:.1f}s; fit per "
          f"configuration {min(fit_times):.2f}-{max(fit_times):.2f}s, mean "
          f"{np.mean(fit_times):.2f}s)", flush=True)

    refit = refit_matrix(data)
    t0 = time.perf_counter()
    model = peer.fit(refit, best["config"], threads, seed)
    refit_secs = time.perf_counter() - t0
    uf, vf = factors_of(model)
    test, rows, counts = score_part(uf, vf, tu, ti, refit, intervals=True)
    print(f"refit on train + valid ({refit.nnz:,} interactions) in {refit_secs:.2f}s; TEST: "
          f"hr@10 {_ci(test, 'hr@10')}  ndcg@10 {_ci(test, 'ndcg@10')}  (n {test['hr@10_n']})",
          flush=True)
    print("test counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    n_diverged = sum(t.get("valid") is None for t in trials)
    return {"label": peer.label, "n_configurations": len(configs), "diverged": n_diverged,
            "trials": trials, "chosen": best["config"], "valid": best["valid"],
            "valid_counts": valid_counts, "grid_seconds": grid_secs,
            "fit_seconds": {"min": min(fit_times), "max": max(fit_times),
                            "mean": float(np.mean(fit_times))},
            "refit_interactions": int(refit.nnz), "refit_seconds": refit_secs,
            "test": test, "test_counts": counts,
            "test_rows": {"user_idx": tu.astype(int).tolist(),
                          **{k: v.tolist() for k, v in rows.items()}}}


# ------------------------------------------------------------------ the script

FULL_GRIDS = {"als": "factors 32 64 128 x regularization 0.01 0.1 1 10 x alpha 1 5 10 40, "
                     "iterations 15: 48",
              "bpr": "factors 32 64 128 x learning_rate 0.01 0.05 x regularization 0.001 "
                     "0.01, iterations 100: 12"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=_Formatter)
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="a pipeline data folder whose stage 40 ran on a split with sampled "
                         "candidates (30_split_train_test.py --strategy loo or ncf)")
    ap.add_argument("--models", nargs="+", choices=sorted(PEERS), default=["als", "bpr"],
                    help="the implicit models to grid, refit and test")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for implicit's fits (num_threads), BLAS and torch")
    ap.add_argument("--seed", type=int, default=0,
                    help="random_state of every fit (the grid's and the refit)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the results (every trial, the counts, the per-user test "
                         "values) to this JSON file")
    g = ap.add_argument_group("ALS grid (confidence 1 + alpha * x, binary x)")
    g.add_argument("--als-factors", type=int, nargs="+", default=[32, 64, 128])
    g.add_argument("--als-reg", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                   help="regularization")
    g.add_argument("--als-alpha", type=float, nargs="+", default=[1.0, 5.0, 10.0, 40.0],
                   help="alpha of c = 1 + alpha * x (implicit's own alpha would be 1 + this)")
    g.add_argument("--als-iterations", type=int, default=15)
    g = ap.add_argument_group("BPR grid")
    g.add_argument("--bpr-factors", type=int, nargs="+", default=[32, 64, 128])
    g.add_argument("--bpr-lr", type=float, nargs="+", default=[0.01, 0.05],
                   help="learning_rate")
    g.add_argument("--bpr-reg", type=float, nargs="+", default=[0.001, 0.01],
                   help="regularization")
    g.add_argument("--bpr-iterations", type=int, default=100)
    return ap


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written; "(default: X)" after each option's help except when None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _check_args(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise PipelineError(f"--threads must be >= 1, got {args.threads}")
    for flag in ("als_factors", "bpr_factors"):
        if min(getattr(args, flag)) < 1:
            raise PipelineError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                f"{getattr(args, flag)}")
    for flag in ("als_iterations", "bpr_iterations"):
        if getattr(args, flag) < 1:
            raise PipelineError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                f"{getattr(args, flag)}")
    for flag in ("als_reg", "als_alpha", "bpr_reg"):
        if min(getattr(args, flag)) < 0:
            raise PipelineError(f"--{flag.replace('_', '-')} must be >= 0, got "
                                f"{getattr(args, flag)}")
    if min(args.bpr_lr) <= 0:
        raise PipelineError(f"--bpr-lr must be > 0, got {args.bpr_lr}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    _check_args(args)
    implicit = require_implicit()
    import torch
    from threadpoolctl import threadpool_limits          # installed with implicit

    from recpipe.artifacts import atomic_write
    from recpipe.dataset import load_data
    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data(args.data_dir, "implicit", torch.device("cpu"), needed_by=PROG)
    missing = [p for p in ("valid", "test") if p not in data.candidates]
    if missing:
        raise PipelineError(
            f"{data.source}: stage 40 wrote no {' or '.join(missing)} candidates, so there is "
            f"no sampled protocol to score; rerun `python 30_split_train_test.py --data-dir "
            f"{args.data_dir} --strategy loo` and `python 40_make_sparse_matrix.py --data-dir "
            f"{args.data_dir}`")
    man = data.manifest
    split_users = {p: int(len(np.unique(getattr(data, p).users.numpy())))
                   for p in ("valid", "test")}
    grids = {name: PEERS[name].grid(args) for name in args.models}
    config = {"data_dir": str(args.data_dir), "models": args.models, "threads": args.threads,
              "seed": args.seed, "grids": {n: len(g) for n, g in grids.items()},
              **{k: v for k, v in vars(args).items() if k.startswith(("als_", "bpr_"))}}
    print(f"{PROG}: " + json.dumps(config, default=str), flush=True)
    defaults = build_parser().parse_args(["--data-dir", str(args.data_dir)])
    for n, g in grids.items():
        if g != PEERS[n].grid(defaults):
            print(f"note: the {n} grid is not the default one: {len(g)} configurations "
                  f"(default: {FULL_GRIDS[n]})")
    if implicit.__version__ != PINNED:
        print(f"note: implicit {implicit.__version__} is installed; bench/requirements.txt "
              f"pins {PINNED}")
    print(f"split {data.source} (dataset {man.get('dataset')}, strategy {man.get('strategy')}): "
          f"{data.n_users:,} users x {data.n_items:,} items; train {len(data.train):,}, valid "
          f"{len(data.valid):,} ({split_users['valid']:,} users), test {len(data.test):,} "
          f"({split_users['test']:,} users); candidate rows valid "
          f"{len(data.candidates['valid'][0]):,}, test {len(data.candidates['test'][0]):,}, "
          f"1 positive + {data.candidates['test'][1].shape[1] - 1} negatives each", flush=True)
    results = {}
    with threadpool_limits(limits=args.threads):
        for name in args.models:
            results[name] = bench_peer(name, PEERS[name], data, grids[name], args.threads,
                                       args.seed)
    total = time.perf_counter() - t_all
    print(f"\nsummary ({data.source}, {total:.1f}s in all, {args.threads} thread(s)):")
    for name, r in results.items():
        c = r["test_counts"]
        print(f"  {name}: {_fmt(r['chosen'])}: valid hr@10 {r['valid']['hr@10']:.4f}; test hr@10 "
              f"{_ci(r['test'], 'hr@10')}, ndcg@10 {_ci(r['test'], 'ndcg@10')}; "
              f"{c['users_scored']:,} test users scored, {c['users_skipped']} skipped; "
              f"fit {r['fit_seconds']['mean']:.2f}s mean over {r['n_configurations']} "
              f"configurations, refit {r['refit_seconds']:.2f}s")
    out = {"command": " ".join(["python", PROG, *(sys.argv[1:] if argv is None else argv)]),
           "config": config, "dataset": man.get("dataset"), "strategy": man.get("strategy"),
           "stage40_fingerprint": data.fingerprint, "n_users": data.n_users,
           "n_items": data.n_items, "split_users": split_users,
           "versions": {"implicit": implicit.__version__, "numpy": np.__version__,
                        "scipy": scipy.__version__,
                        "python": platform.python_version()},
           "protocol": "sampled candidates of stage 40, recpipe.metrics.sampled_rank_metrics "
                       "(pessimistic ties), 95% interval mean +- 1.96 std / sqrt(users); chosen "
                       "on valid hr@10, refitted on train + valid, test scored once",
           "seconds": total, "results": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("RECPIPE_PROGRESS", "0")
    sys.exit(run_main(main))
