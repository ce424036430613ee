"""Stage 40: CSR user x item matrices in one shared id space.

Reads ``30_split_train_test/`` and writes ``40_make_sparse_matrix/``:

* ``train.npz``, ``valid.npz``, ``test.npz``: scipy CSR float32 [n_users, n_items] of the
  explicit ratings (rows whose rating is NaN, i.e. interactions kept without a rating, are
  left out of these);
* ``train_implicit.npz``, ``valid_implicit.npz``, ``test_implicit.npz``: the binary view,
  1.0 for every interaction (unrated ones included);
* ``train_time.npy``, ``valid_time.npy`` (when the split has timestamps): int64 [nnz], the
  timestamp of each entry of ``train_implicit.npz`` / ``valid_implicit.npz`` in the CSR's own
  order (entry k of the matrix's ``data``), so a history can be weighted by recency (EASE's
  ``--recency``) without a second copy of the indices;
* for leave-one-out / NCF splits, ``valid_candidates.npz`` and ``test_candidates.npz`` with
  ``users`` int32 [n] and ``items`` int32 [n, 1 + N], column 0 the held-out positive, the
  other columns that row's negatives in their stored order.

Every matrix has the shape (n_users, n_items) of stage 20, whatever part it holds. The CSR
arrays are built directly (bincount for the row pointers), indices int32, sorted within
each row.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from .artifacts import (CORRUPT_FILE_ERRORS, StageOutput, read_columns, read_manifest,
                        rerun_command, stage_dir, stage_manifest)
from .cli import PipelineError, opt, parse_config, print_config

log = logging.getLogger("recpipe")

STAGE = "40_make_sparse_matrix"
UPSTREAM = "30_split_train_test"
PROG = "40_make_sparse_matrix.py"
DESCRIPTION = ("Build CSR user x item matrices (explicit float32 ratings and a binary "
               "implicit view) for train / valid / test in one shared id space, plus the "
               "evaluation candidates of leave-one-out / NCF splits. Reads "
               "DATA_DIR/30_split_train_test, writes DATA_DIR/40_make_sparse_matrix.")
PARTS = ("train", "valid", "test")


@dataclass
class Config:
    data_dir: Path = opt(Path("data"), "data folder holding the stage artifacts")


def _ids(a: np.ndarray) -> np.ndarray:
    """Ids as int32 when stored so (no copy), else int64."""
    a = np.asarray(a)
    return a if a.dtype == np.int32 else a.astype(np.int64)


def _strictly_sorted(u: np.ndarray, i: np.ndarray, chunk: int = 1 << 23) -> bool:
    """Whether the (u, i) pairs ascend strictly (the order of stage 30's parts), checked a
    chunk at a time: no n-long int64 key."""
    n = len(u)
    for a in range(0, max(n - 1, 0), chunk):
        b = min(a + chunk, n - 1)
        u0, u1, i0, i1 = u[a:b], u[a + 1:b + 1], i[a:b], i[a + 1:b + 1]
        if not ((u1 > u0) | ((u1 == u0) & (i1 > i0))).all():
            return False
    return True


def to_csr(u: np.ndarray, i: np.ndarray, values: np.ndarray, n_users: int, n_items: int,
           ) -> sp.csr_matrix:
    """CSR float32 [n_users, n_items] from (user, item, value) triples with unique pairs.

    Already sorted pairs (stage 30's parts) are used as they are: int32 ids and float32
    values are not copied (the matrix may share them with the caller).
    """
    u = _ids(u)
    i = _ids(i)
    values = np.asarray(values, dtype=np.float32)
    if len(u):
        if u.min() < 0 or u.max() >= n_users or i.min() < 0 or i.max() >= n_items:
            raise PipelineError(
                f"ids outside the shared id space [{n_users} users, {n_items} items] (user_idx "
                f"{u.min()}..{u.max()}, item_idx {i.min()}..{i.max()}); rerun "
                f"`python 30_split_train_test.py` from the current stage 20")
        if not _strictly_sorted(u, i):
            key = u.astype(np.int64) * np.int64(n_items) + i
            order = np.argsort(key, kind="stable")
            u, i, values, key = u[order], i[order], values[order], key[order]
            if (key[1:] == key[:-1]).any():
                raise PipelineError("a (user, item) pair occurs twice in one split part; rerun "
                                    "`python 20_make_ids.py` (it removes duplicates)")
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=n_users), out=indptr[1:])
    idx_dtype = np.int32 if len(u) < 2**31 else np.int64
    return sp.csr_matrix((values, i.astype(idx_dtype, copy=False), indptr.astype(idx_dtype)),
                         shape=(n_users, n_items))


def part_matrices(df: Any, n_users: int, n_items: int,
                  ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(explicit, implicit) CSR matrices of one split part (a DataFrame or column mapping).

    Sorted parts with int32 ids (stage 30's) give matrices that share the part's arrays: the
    item column as both matrices' indices, the ratings as the explicit data when all are
    rated. Copy a matrix before changing it in place.
    """
    u = _ids(df["user_idx"])
    i = _ids(df["item_idx"])
    r = np.asarray(df["rating"], dtype=np.float32)
    rated = ~np.isnan(r)
    if rated.all():  # every interaction rated: no subset copies
        del rated
        explicit = to_csr(u, i, r, n_users, n_items)
    else:
        explicit = to_csr(u[rated], i[rated], r[rated], n_users, n_items)
        del rated
    implicit = to_csr(u, i, np.ones(len(u), dtype=np.float32), n_users, n_items)
    return explicit, implicit


def csr_order(u: np.ndarray, i: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    """``values`` of the (u, i) pairs in the order of the CSR ``to_csr`` builds from them
    (as they are when the pairs already ascend, stage 30's order)."""
    u, i = _ids(u), _ids(i)
    if _strictly_sorted(u, i):
        return values
    return values[np.argsort(u.astype(np.int64) * np.int64(n_items) + i, kind="stable")]


def candidates(df: Any, negatives: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    n = len(df["user_idx"])
    if negatives.ndim != 2 or negatives.shape[0] != n:
        raise PipelineError(f"{path} has shape {negatives.shape} but its part has {n} "
                            f"rows; rerun `python 30_split_train_test.py`")
    items = np.empty((n, 1 + negatives.shape[1]), dtype=np.int32)
    items[:, 0] = np.asarray(df["item_idx"], dtype=np.int32)
    items[:, 1:] = negatives
    return {"users": np.asarray(df["user_idx"], dtype=np.int32), "items": items}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(Config, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    up = read_manifest(cfg.data_dir, UPSTREAM, needed_by=PROG)
    src = stage_dir(cfg.data_dir, UPSTREAM)
    n_users, n_items = int(up["n_users"]), int(up["n_items"])
    n_neg = int(up.get("n_negatives") or 0)
    nnz: dict[str, int] = {}
    global_mean: float | None = None
    rating_std: float | None = None
    n_candidates: dict[str, Any] = {}
    timed: list[str] = []
    with StageOutput(cfg.data_dir, STAGE) as out:
        for name in PARTS:
            # the columns the matrices and candidates need (the timestamps apart, below)
            df = read_columns(src / f"{name}.parquet", ["user_idx", "item_idx", "rating"])
            explicit, implicit = part_matrices(df, n_users, n_items)
            sp.save_npz(out.path(f"{name}.npz"), explicit, compressed=False)
            sp.save_npz(out.path(f"{name}_implicit.npz"), implicit, compressed=False)
            if name != "test" and up.get("has_timestamp"):
                ts = read_columns(src / f"{name}.parquet", ["timestamp"])["timestamp"]
                np.save(out.path(f"{name}_time.npy"),
                        csr_order(df["user_idx"], df["item_idx"], ts.astype(np.int64,
                                                                            copy=False), n_items))
                timed.append(name)
                del ts
            nnz[name] = int(explicit.nnz)
            nnz[f"{name}_implicit"] = int(implicit.nnz)
            del implicit  # saved: its data need not sit beside the float64 copies below
            if name == "train":
                global_mean = float(explicit.data.mean(dtype=np.float64)) if explicit.nnz else None
                # torch's std (n - 1), as stage 60 standardises with it
                rating_std = (float(explicit.data.astype(np.float64).std(ddof=1))
                              if explicit.nnz > 1 else None)
            neg_path = src / f"{name}_negatives.npy"
            if name != "train" and neg_path.exists():
                try:        # a truncated or corrupt file: one line naming its rebuild
                    negatives = np.load(neg_path, allow_pickle=False)
                except CORRUPT_FILE_ERRORS as e:
                    raise PipelineError(
                        f"{neg_path} is unreadable ({type(e).__name__}: {e}); rebuild it with "
                        f"`{rerun_command(cfg.data_dir, UPSTREAM)}`") from None
                cand = candidates(df, negatives, neg_path)
                np.savez(out.path(f"{name}_candidates.npz"), **cand)
                n_candidates[name] = int(len(cand["users"]))
            del df, explicit
        task = up.get("task")      # stage 30's: what the split was made for (null: either)
        manifest = {
            **stage_manifest(PROG, argv, cfg, cfg.data_dir, UPSTREAM, up),
            "strategy": up.get("strategy"),
            "n_users": n_users,
            "n_items": n_items,
            "shape": [n_users, n_items],
            "nnz": nnz,
            "global_mean": global_mean,
            "rating_std": rating_std,
            "n_negatives": n_neg,
            "candidates": n_candidates,
            "times": timed,
            "task": task,
            "dtype": "float32",
        }
        out.commit(manifest)
    log.info("%s: %d x %d; nnz train %d, valid %d, test %d (implicit %d/%d/%d); global mean "
             "%s; split task %s -> %s", STAGE, n_users, n_items, nnz["train"], nnz["valid"],
             nnz["test"], nnz["train_implicit"], nnz["valid_implicit"], nnz["test_implicit"],
             "n/a" if global_mean is None else f"{global_mean:.4f}", task,
             stage_dir(cfg.data_dir, STAGE))
    log.info("next: python 60_train.py --data-dir %s", shlex.quote(str(cfg.data_dir)))
