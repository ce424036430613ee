"""Stage 20: contiguous, deterministic user and item ids.

Reads ``10_preprocessing/ratings.parquet`` (raw ids) and writes ``20_make_ids/`` with
``ratings.parquet`` (user_idx, item_idx int32, rating float32, [timestamp int64]) and the
both-way maps ``users.parquet`` / ``items.parquet``.

Policies (stated here and stored in the manifest):

* ids: ``user_idx`` / ``item_idx`` number the distinct raw ids in ascending raw-id order
  (numeric order for integer ids, lexicographic for string ids), after duplicates and the
  minimum-count filters are applied. The file order of the input therefore never matters.
* duplicate (user, item) rows, ``--duplicates``:
  ``latest`` (default) keeps the row with the greatest timestamp, ties and sources without
  timestamps resolved by the last occurrence in file order; ``first`` keeps the earliest
  (smallest timestamp, ties and no timestamps: first occurrence in file order); ``mean``
  keeps the mean of the pair's non-missing ratings with the latest timestamp; ``error``
  stops with the first duplicated pair named. The number of rows removed is logged and
  stored in the manifest.
* minimum counts, ``--min-user-ratings`` / ``--min-item-ratings``: counted on the
  de-duplicated ratings. By default one pass drops every rating whose user or item is below
  its minimum (both counts taken before the pass, so a user may end up below the minimum
  after its items were dropped); ``--kcore`` repeats the pass until every remaining user and
  item meets its minimum (iterative k-core). The number of passes is in the manifest.
* ``ratings.parquet`` is sorted by (user_idx, item_idx) and has one row per pair.

Everything is vectorised (pandas factorize, numpy lexsort/bincount/reduceat): no Python
object per rating.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .artifacts import (StageOutput, dtypes_of, read_columns, read_manifest, read_parquet,
                        stage_dir, stage_manifest, write_parquet)
from .cli import PipelineError, opt, parse_config, print_config

log = logging.getLogger("recpipe")

STAGE = "20_make_ids"
UPSTREAM = "10_preprocessing"
PROG = "20_make_ids.py"
DESCRIPTION = ("Assign contiguous, deterministic user and item ids (sorted by raw id), drop "
               "duplicate (user, item) rows by a stated policy and optionally filter rare "
               "users/items. Reads DATA_DIR/10_preprocessing, writes DATA_DIR/20_make_ids.")
DUPLICATE_POLICIES = ("latest", "first", "mean", "error")


@dataclass
class Config:
    data_dir: Path = opt(Path("data"), "data folder holding the stage artifacts")
    min_user_ratings: int = opt(1, "drop users with fewer ratings than this (after duplicates)")
    min_item_ratings: int = opt(1, "drop items with fewer ratings than this (after duplicates)")
    kcore: bool = opt(False, "repeat the minimum-count filter until every remaining user and "
                             "item meets it (iterative k-core); otherwise one pass")
    duplicates: str = opt("latest", "duplicate (user, item) rows: latest = keep the latest by "
                                    "timestamp (else the last in file order), first = keep the "
                                    "earliest, mean = average the ratings, error = stop",
                          choices=DUPLICATE_POLICIES)

    def validate(self) -> None:
        if self.min_user_ratings < 1 or self.min_item_ratings < 1:
            raise PipelineError("--min-user-ratings and --min-item-ratings must be >= 1 "
                                f"(got {self.min_user_ratings} and {self.min_item_ratings})")


@dataclass
class IdResult:
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    stats: dict[str, Any]


def _factorize_sorted(values: pd.Series, what: str, source: str) -> tuple[np.ndarray, Any]:
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    if len(codes) and codes.min() < 0:
        row = int(np.flatnonzero(codes < 0)[0])
        raise PipelineError(f"{source}: row {row} has a missing {what}; expected every rating "
                            f"to have one; rerun `python 10_preprocessing.py` on a clean input")
    return codes.astype(np.int32), uniques  # ids < 2**31; half the memory of intp


def _dedupe(u_code: np.ndarray, i_code: np.ndarray, n_items: int, ts: np.ndarray | None,
            rating: np.ndarray, policy: str,
            ) -> tuple[np.ndarray, np.ndarray | None, dict[str, int]]:
    """Rows to keep (sorted by (user, item)) and, for ``mean``, the new ratings.

    One stable argsort of the keys user_code * n_items + item_code; only the rows of
    duplicated pairs are then ordered by timestamp. Returns (row indices, mean ratings or
    None, counts).
    """
    n = len(u_code)
    key = u_code.astype(np.int64) * np.int64(max(n_items, 1)) + i_code
    order = np.argsort(key, kind="stable")  # equal keys keep file order
    if n == 0:
        return order, None, {"removed_rows": 0, "duplicated_pairs": 0}
    sk = key[order]
    del key
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(sk[1:], sk[:-1], out=new_group[1:])
    n_groups = int(np.count_nonzero(new_group))
    if n_groups == n:  # the common case: no duplicates, nothing more to allocate
        return order, None, {"removed_rows": 0, "duplicated_pairs": 0}
    starts = np.flatnonzero(new_group)
    del new_group
    sizes = np.diff(starts, append=n)
    counts = {"removed_rows": int(n - n_groups), "duplicated_pairs": int((sizes > 1).sum())}
    ends = starts + sizes - 1
    latest = policy in ("latest", "mean")
    pick = order[ends] if latest else order[starts]  # by file order
    if ts is not None:  # among duplicated pairs only: by timestamp, ties by file order
        dup_groups = np.flatnonzero(sizes > 1)
        dpos = np.flatnonzero(np.repeat(sizes > 1, sizes))
        drows = order[dpos]
        dkey = sk[dpos]
        srows = drows[np.lexsort((ts[drows], dkey))]
        dstart = np.flatnonzero(np.r_[True, dkey[1:] != dkey[:-1]])
        dend = np.r_[dstart[1:], len(dkey)] - 1
        pick[dup_groups] = srows[dend] if latest else srows[dstart]
    if policy == "mean":
        r = rating[order].astype(np.float64)
        finite = np.isfinite(r)
        sums = np.add.reduceat(np.where(finite, r, 0.0), starts)
        cnt = np.add.reduceat(finite.astype(np.int64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan).astype(np.float32)
        return pick, mean, counts
    return pick, None, counts


def _filter_counts(u: np.ndarray, i: np.ndarray, n_u: int, n_i: int, min_u: int, min_i: int,
                   kcore: bool) -> tuple[np.ndarray, int]:
    """Boolean mask of ratings kept by the minimum-count filter, and the number of passes."""
    keep = np.ones(len(u), dtype=bool)
    if min_u <= 1 and min_i <= 1:
        return keep, 0
    passes = 0
    while True:
        passes += 1
        uc = np.bincount(u[keep], minlength=n_u)
        ic = np.bincount(i[keep], minlength=n_i)
        bad = keep & ((uc[u] < min_u) | (ic[i] < min_i))
        if not bad.any():
            break
        keep &= ~bad
        if not kcore:
            break
    return keep, passes


def make_ids(ratings: pd.DataFrame | dict[str, Any], duplicates: str = "latest",
             min_user_ratings: int = 1,
             min_item_ratings: int = 1, kcore: bool = False,
             items_meta: pd.DataFrame | None = None, source: str = "ratings",
             consume: bool = False) -> IdResult:
    """Assign contiguous ids to a stage-10 ratings table (pure function; no files).

    ``ratings``: a DataFrame or a {column: array} mapping (see ``read_columns``).
    ``consume=True`` deletes the columns from ``ratings`` as they are used (less peak memory).
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise PipelineError(f"unknown duplicates policy {duplicates!r}; expected one of "
                            f"{', '.join(DUPLICATE_POLICIES)}")
    for col in ("raw_user_id", "raw_item_id", "rating"):
        if col not in ratings:
            raise PipelineError(f"{source} has no column {col!r} (columns: "
                                f"{', '.join(map(str, ratings))}); rerun "
                                f"`python 10_preprocessing.py --input PATH`")
    n_in = len(ratings["raw_user_id"])
    has_ts = "timestamp" in ratings
    raw_dtypes = ratings["raw_user_id"].dtype, ratings["raw_item_id"].dtype
    u_code, u_uni = _factorize_sorted(ratings["raw_user_id"], "raw_user_id", source)
    i_code, i_uni = _factorize_sorted(ratings["raw_item_id"], "raw_item_id", source)
    if consume and duplicates != "error":
        del ratings["raw_user_id"], ratings["raw_item_id"]
    n_u0, n_i0 = len(u_uni), len(i_uni)
    rating = np.asarray(ratings["rating"], dtype=np.float32)
    ts = np.asarray(ratings["timestamp"], dtype=np.int64) if has_ts else None
    if consume and duplicates != "error":
        del ratings["rating"]
        if has_ts:
            del ratings["timestamp"]

    rows, mean, dup = _dedupe(u_code, i_code, n_i0, ts, rating, duplicates)
    if duplicates == "error" and dup["removed_rows"]:
        order = np.lexsort((np.arange(n_in), i_code, u_code))
        su, si = u_code[order], i_code[order]
        same = np.flatnonzero((su[1:] == su[:-1]) & (si[1:] == si[:-1]))
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raw_u = _show(_at(ratings["raw_user_id"], a))
        raw_i = _show(_at(ratings["raw_item_id"], a))
        raise PipelineError(
            f"{source}: {dup['removed_rows']} duplicate (user, item) rows in "
            f"{dup['duplicated_pairs']} pairs, e.g. raw_user_id {raw_u} raw_item_id {raw_i} at "
            f"rows {a} and {b} (0-based); expected each pair once; choose a policy: "
            f"`python 20_make_ids.py --duplicates latest` (or first, mean)")
    u = u_code[rows]
    i = i_code[rows]
    r = mean if mean is not None else rating[rows]
    t = ts[rows] if ts is not None else None
    del u_code, i_code, rows, rating, ts

    keep, passes = _filter_counts(u, i, n_u0, n_i0, min_user_ratings, min_item_ratings, kcore)
    n_dedup = len(u)
    if not keep.all():
        u, i, r = u[keep], i[keep], r[keep]
        if t is not None:
            t = t[keep]
    if len(u) == 0:
        raise PipelineError(
            f"no ratings left after the filters (--min-user-ratings {min_user_ratings}, "
            f"--min-item-ratings {min_item_ratings}{', --kcore' if kcore else ''}) out of "
            f"{n_dedup} de-duplicated ratings; lower the minimums")

    u_cnt = np.bincount(u, minlength=n_u0)
    i_cnt = np.bincount(i, minlength=n_i0)
    u_present, i_present = u_cnt > 0, i_cnt > 0
    u_new = (np.cumsum(u_present) - 1).astype(np.int32)
    i_new = (np.cumsum(i_present) - 1).astype(np.int32)
    user_idx = u_new[u]
    item_idx = i_new[i]
    n_users, n_items = int(u_present.sum()), int(i_present.sum())

    out = {"user_idx": user_idx, "item_idx": item_idx, "rating": r.astype(np.float32, copy=False)}
    if t is not None:
        out["timestamp"] = t.astype(np.int64, copy=False)
    ratings_out = pd.DataFrame(out)

    raw_u = _take_uniques(u_uni, u_present, raw_dtypes[0])
    raw_i = _take_uniques(i_uni, i_present, raw_dtypes[1])
    users = pd.DataFrame({"user_idx": np.arange(n_users, dtype=np.int32), "raw_user_id": raw_u,
                          "n_ratings": u_cnt[u_present].astype(np.int32)})
    items = pd.DataFrame({"item_idx": np.arange(n_items, dtype=np.int32), "raw_item_id": raw_i,
                          "n_ratings": i_cnt[i_present].astype(np.int32)})
    n_titled = 0
    if items_meta is not None and len(items_meta) and "raw_item_id" in items_meta.columns:
        items, n_titled = _attach_titles(items, items_meta)

    stats = {
        "n_input_ratings": int(n_in),
        "duplicates": {"policy": duplicates, "removed_rows": dup["removed_rows"],
                       "duplicated_pairs": dup["duplicated_pairs"],
                       "rule": _DUP_RULES[duplicates](has_ts)},
        "filters": {"min_user_ratings": min_user_ratings, "min_item_ratings": min_item_ratings,
                    "kcore": kcore, "passes": passes,
                    "dropped_ratings": int(n_dedup - len(u)),
                    "dropped_users": int(n_u0 - n_users), "dropped_items": int(n_i0 - n_items)},
        "n_items_with_title": n_titled,
    }
    return IdResult(ratings_out, users, items, stats)


_DUP_RULES = {
    "latest": lambda ts: ("kept the row with the latest timestamp (ties: last in file order)"
                          if ts else "kept the last occurrence in file order"),
    "first": lambda ts: ("kept the row with the earliest timestamp (ties: first in file order)"
                         if ts else "kept the first occurrence in file order"),
    "mean": lambda ts: ("kept the mean of the pair's ratings" +
                        (" with the latest timestamp" if ts else "")),
    "error": lambda ts: "duplicates are an error",
}


def _at(col: Any, j: int) -> Any:
    return col.iloc[j] if hasattr(col, "iloc") else col[j]


def _show(v: Any) -> str:
    """A raw id as the user wrote it: 12 for integers, 'abc' for strings."""
    v = v.item() if isinstance(v, np.generic) else v
    return repr(v) if isinstance(v, str) else str(v)


def _take_uniques(uniques: Any, present: np.ndarray, dtype: Any) -> Any:
    """The raw ids still present, in the dtype stage 10 wrote them."""
    kept = uniques[present] if len(present) else uniques
    if isinstance(kept, pd.Index):
        kept = kept.array
    return pd.array(kept, dtype=dtype)


def _attach_titles(items: pd.DataFrame, meta: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    meta = meta.drop_duplicates("raw_item_id", keep="first")
    key = meta["raw_item_id"]
    raw = items["raw_item_id"]
    if key.dtype != raw.dtype:  # e.g. int ids in ratings, strings in the titles file
        key = key.astype(str)
        raw = raw.astype(str)
    pos = pd.Index(key).get_indexer(raw)
    found = pos >= 0
    items = items.copy()
    for col in ("title", "year"):
        if col in meta.columns:
            vals = meta[col].take(np.where(found, pos, 0)).reset_index(drop=True)
            vals = vals.where(pd.Series(found), pd.NA) if not found.all() else vals
            items[col] = vals.astype(meta[col].dtype) if col == "year" else vals
    return items, int(found.sum())


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(Config, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    up = read_manifest(cfg.data_dir, UPSTREAM, needed_by=PROG)
    src_dir = stage_dir(cfg.data_dir, UPSTREAM)
    ratings = read_columns(src_dir / "ratings.parquet")
    items_meta = None
    if (src_dir / "items.parquet").exists():
        items_meta = read_parquet(src_dir / "items.parquet")
    res = make_ids(ratings, cfg.duplicates, cfg.min_user_ratings, cfg.min_item_ratings,
                   cfg.kcore, items_meta, source=str(src_dir / "ratings.parquet"), consume=True)
    del ratings
    st = res.stats
    d = st["duplicates"]
    log.info("duplicates (%s): %d rows removed in %d duplicated (user, item) pairs; %s",
             d["policy"], d["removed_rows"], d["duplicated_pairs"], d["rule"])
    f = st["filters"]
    if f["passes"]:
        log.info("filters: dropped %d ratings, %d users, %d items in %d pass(es)",
                 f["dropped_ratings"], f["dropped_users"], f["dropped_items"], f["passes"])
    with StageOutput(cfg.data_dir, STAGE) as out:
        write_parquet(res.ratings, out.path("ratings.parquet"))
        write_parquet(res.users, out.path("users.parquet"))
        write_parquet(res.items, out.path("items.parquet"))
        manifest = {
            **stage_manifest(PROG, argv, cfg, cfg.data_dir, UPSTREAM, up),
            "has_timestamp": "timestamp" in res.ratings.columns,
            "n_users": len(res.users),
            "n_items": len(res.items),
            "n_ratings": len(res.ratings),
            "n_unrated": int(np.isnan(res.ratings["rating"].to_numpy()).sum()),
            **st,
            "id_order": "ascending raw id",
            "dtypes": {"ratings": dtypes_of(res.ratings), "users": dtypes_of(res.users),
                       "items": dtypes_of(res.items)},
        }
        out.commit(manifest)
    log.info("%s: %d ratings, %d users, %d items -> %s", STAGE, len(res.ratings),
             len(res.users), len(res.items), stage_dir(cfg.data_dir, STAGE))
    if up.get("format") == "ncf":
        prefix = str((up.get("inputs") or ["PREFIX.train.rating"])[0]).split(".train.rating")[0]
        log.info("next: python 30_split_train_test.py --data-dir %s --strategy ncf --ncf-test %s",
                 shlex.quote(str(cfg.data_dir)), prefix)
    else:
        log.info("next: python 30_split_train_test.py --data-dir %s --strategy random",
                 shlex.quote(str(cfg.data_dir)))
