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

Everything is vectorised (a lookup table or pandas factorize for the ids, one in-place
int64 sort, numpy bincount/reduceat): no Python object per rating. Memory (Netflix shape,
100M ratings): about 34 bytes a rating at the peak; the columns are read one at a time and
dropped once used.
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


DENSE_SLACK = 1 << 20  # dense id table: up to len(values) + this many slots (5 bytes each)
CHUNK = 1 << 20  # rows per step where a whole-array temporary would cost 8 bytes per rating
PACK_BITS = 63  # pair key and row number packed into one int64 when they fit in this many


def _factorize_sorted(values: Any, what: str, source: str) -> tuple[np.ndarray, Any]:
    """int32 codes numbering the distinct values in ascending order, and those values.

    Non-negative integer ids no larger than about the number of ratings (Netflix: < 2.7M)
    take a lookup table (a few MB, no hashing, no int64 codes); anything else pd.factorize.
    Both give the same codes and uniques.
    """
    arr = values.to_numpy() if (isinstance(values, pd.Series)
                                and isinstance(values.dtype, np.dtype)) else values
    if (isinstance(arr, np.ndarray) and arr.dtype.kind in "iu" and len(arr)
            and arr.min() >= 0 and int(arr.max()) < len(arr) + DENSE_SLACK):
        return _dense_codes(arr)
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    if len(codes) and codes.min() < 0:
        row = int(np.flatnonzero(codes < 0)[0])
        raise PipelineError(f"{source}: row {row} has a missing {what}; expected every rating "
                            f"to have one; rerun `python 10_preprocessing.py` on a clean input")
    return codes.astype(np.int32), uniques  # ids < 2**31; half the memory of intp


def _dense_codes(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    present = np.zeros(int(arr.max()) + 1, dtype=bool)
    present[arr] = True
    remap = np.cumsum(present, dtype=np.int32)
    remap -= 1
    return remap[arr], np.flatnonzero(present).astype(arr.dtype)


def _sort_by_pair(u_code: np.ndarray, i_code: np.ndarray, n_items: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, keys): the row order by (user, item), equal pairs in file order, and the sorted
    pair keys user * n_items + item (int64).

    When key and row number fit in 63 bits together (Netflix: 33 + 27) they are packed into
    one int64 and sorted in place: the keys are then distinct, so an unstable sort gives the
    stable order, at 8 bytes a rating and a fraction of the time of a stable argsort.
    """
    n = len(u_code)
    n_items = max(n_items, 1)
    n_users = int(u_code.max()) + 1 if n else 1
    row_bits = max(n - 1, 1).bit_length()
    key_bits = (n_users * n_items - 1).bit_length()
    if key_bits + row_bits > PACK_BITS or row_bits > 31:  # huge: stable argsort of the keys
        key = u_code.astype(np.int64) * np.int64(n_items) + i_code
        rows = np.argsort(key, kind="stable")
        return rows, key[rows]
    packed = u_code.astype(np.int64)
    packed *= n_items
    packed += i_code
    packed <<= row_bits
    for s in range(0, n, CHUNK):
        packed[s:s + CHUNK] |= np.arange(s, min(s + CHUNK, n), dtype=np.int64)
    packed.sort()
    rows = packed.astype(np.int32)  # the low 32 bits, then the row number's bits
    rows &= np.int32((1 << row_bits) - 1)
    packed >>= row_bits
    return rows, packed


def _dedupe(keys: np.ndarray, ts: np.ndarray | None, rating: np.ndarray, policy: str,
            ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, int]]:
    """Positions to keep in the (user, item)-sorted rows (None: all) and, for ``mean``, the
    new ratings.

    ``keys``, ``ts`` and ``rating`` are in (user, item) order, equal pairs in file order, so
    "last in file order" is the last position of a pair. With timestamps the pick is the
    pair's latest (``first``: earliest) timestamp, ties by position. Returns (positions,
    mean ratings or None, counts).
    """
    n = len(keys)
    none = {"removed_rows": 0, "duplicated_pairs": 0}
    if n == 0:
        return None, None, none
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(keys[1:], keys[:-1], out=new_group[1:])
    n_groups = int(np.count_nonzero(new_group))
    if n_groups == n:  # the common case: no duplicates, nothing more to allocate
        return None, None, none
    starts = np.flatnonzero(new_group)
    del new_group
    sizes = np.diff(starts, append=n)
    counts = {"removed_rows": int(n - n_groups), "duplicated_pairs": int((sizes > 1).sum())}
    latest = policy in ("latest", "mean")
    if ts is None:  # by file order
        pick = starts + sizes - 1 if latest else starts
    else:  # the positions holding their pair's best timestamp; of those the last (first)
        best = (np.maximum if latest else np.minimum).reduceat(ts, starts)
        cand = np.flatnonzero(ts == np.repeat(best, sizes))
        del best
        group = np.searchsorted(starts, cand, side="right")
        edge = np.empty(len(cand), dtype=bool)
        if latest:
            np.not_equal(group[1:], group[:-1], out=edge[:-1])
            edge[-1] = True
        else:
            np.not_equal(group[1:], group[:-1], out=edge[1:])
            edge[0] = True
        pick = cand[edge]
    if policy == "mean":
        r = rating.astype(np.float64)
        finite = np.isfinite(r)
        r[~finite] = 0.0
        sums = np.add.reduceat(r, starts)
        del r
        cnt = np.add.reduceat(finite, starts, dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan).astype(np.float32)
        return pick, mean, counts
    return pick, None, counts


def _split_keys(keys: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(user codes, item codes) as int32 from pair keys, a chunk at a time."""
    u = np.empty(len(keys), dtype=np.int32)
    i = np.empty(len(keys), dtype=np.int32)
    for s in range(0, len(keys), CHUNK):
        q, r = np.divmod(keys[s:s + CHUNK], max(n_items, 1))
        u[s:s + CHUNK] = q
        i[s:s + CHUNK] = r
    return u, i


def _filter_counts(u: np.ndarray, i: np.ndarray, n_u: int, n_i: int, min_u: int, min_i: int,
                   kcore: bool) -> tuple[np.ndarray, int]:
    """Boolean mask of ratings kept by the minimum-count filter, and the number of passes."""
    keep = np.ones(len(u), dtype=bool)
    if min_u <= 1 and min_i <= 1:
        return keep, 0
    passes = 0
    while True:
        passes += 1
        low_u = np.bincount(u[keep], minlength=n_u) < min_u
        low_i = np.bincount(i[keep], minlength=n_i) < min_i
        bad = keep & (low_u[u] | low_i[i])
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
    has_ts = "timestamp" in ratings
    # one column at a time, in this order, each deleted once used (with consume=True; a
    # _LazyColumns mapping also reads each one only here)
    raw_dtypes = []
    codes = []
    for col in ("raw_user_id", "raw_item_id"):
        raw_dtypes.append(ratings[col].dtype)
        codes.append(_factorize_sorted(ratings[col], col, source))
        if consume:
            del ratings[col]
    (u_code, u_uni), (i_code, i_uni) = codes
    del codes
    n_in = len(u_code)
    n_u0, n_i0 = len(u_uni), len(i_uni)
    rows, keys = _sort_by_pair(u_code, i_code, n_i0)
    del u_code, i_code
    # timestamp and rating in (user, item) order
    ts = None
    if has_ts:
        ts = np.asarray(ratings["timestamp"], dtype=np.int64)[rows]
        if consume:
            del ratings["timestamp"]
    rating = np.asarray(ratings["rating"], dtype=np.float32)[rows]
    if consume:
        del ratings["rating"]
    if duplicates != "error":
        del rows

    pick, mean, dup = _dedupe(keys, ts, rating, duplicates)
    if duplicates == "error" and dup["removed_rows"]:
        j = int(np.argmax(keys[1:] == keys[:-1]))  # the first duplicated pair in (user, item)
        a, b = int(rows[j]), int(rows[j + 1])      # order: its first two rows in file order
        raw_u = _show(_at(u_uni, int(keys[j] // max(n_i0, 1))))
        raw_i = _show(_at(i_uni, int(keys[j] % max(n_i0, 1))))
        raise PipelineError(
            f"{source}: {dup['removed_rows']} duplicate (user, item) rows in "
            f"{dup['duplicated_pairs']} pairs, e.g. raw_user_id {raw_u} raw_item_id {raw_i} at "
            f"rows {a} and {b} (0-based); expected each pair once; choose a policy: "
            f"`python 20_make_ids.py --duplicates latest` (or first, mean)")
    if pick is not None:
        keys = keys[pick]
        rating = mean if mean is not None else rating[pick]
        if ts is not None:
            ts = ts[pick]
    u, i = _split_keys(keys, n_i0)
    r, t = rating, ts
    del keys, pick, mean, rating, ts

    keep, passes = _filter_counts(u, i, n_u0, n_i0, min_user_ratings, min_item_ratings, kcore)
    n_dedup = len(u)
    if not keep.all():
        u, i, r = u[keep], i[keep], r[keep]
        if t is not None:
            t = t[keep]
    del keep
    if len(u) == 0:
        raise PipelineError(
            f"no ratings left after the filters (--min-user-ratings {min_user_ratings}, "
            f"--min-item-ratings {min_item_ratings}{', --kcore' if kcore else ''}) out of "
            f"{n_dedup} de-duplicated ratings; lower the minimums")

    u_cnt = np.bincount(u, minlength=n_u0)
    i_cnt = np.bincount(i, minlength=n_i0)
    u_present, i_present = u_cnt > 0, i_cnt > 0
    n_users, n_items = int(u_present.sum()), int(i_present.sum())
    # codes renumbered over the users/items still present (unchanged when none was dropped)
    user_idx = u if n_users == n_u0 else (np.cumsum(u_present) - 1).astype(np.int32)[u]
    item_idx = i if n_items == n_i0 else (np.cumsum(i_present) - 1).astype(np.int32)[i]
    del u, i

    out = {"user_idx": user_idx, "item_idx": item_idx, "rating": r.astype(np.float32, copy=False)}
    if t is not None:
        out["timestamp"] = t.astype(np.int64, copy=False)
    ratings_out = pd.DataFrame(out, copy=False)
    del out, user_idx, item_idx, r, t

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
                    "dropped_ratings": int(n_dedup - len(ratings_out)),
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


class _LazyColumns:
    """A Parquet table as a {column: array} mapping (``read_columns``) that reads a column
    when it is first used and forgets it on ``del``: ``make_ids(consume=True)`` then holds
    only the columns it is working on, not the whole table at once."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.path = path
        self.cols: dict[str, Any] = {}
        try:
            self.names = list(pq.read_schema(path).names)
        except (OSError, pa.ArrowException):
            read_columns(path)  # raises the missing/unreadable error
            raise

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name: str) -> Any:
        if name not in self.names:
            raise KeyError(name)
        if name not in self.cols:
            self.cols[name] = read_columns(self.path, [name])[name]
        return self.cols[name]

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        self.cols.pop(name, None)


def _release_freed_arrow_memory() -> None:
    """Let the columns that make_ids has consumed go back to the system at once.

    Arrow's default pool (mimalloc) keeps freed memory for its own reuse, where the numpy
    arrays built from the columns cannot use it; jemalloc with no decay delay returns it.
    """
    import pyarrow as pa
    if "jemalloc" in pa.supported_memory_backends():
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(0)
    else:
        pa.set_memory_pool(pa.system_memory_pool())


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(Config, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    up = read_manifest(cfg.data_dir, UPSTREAM, needed_by=PROG)
    src_dir = stage_dir(cfg.data_dir, UPSTREAM)
    _release_freed_arrow_memory()
    ratings = _LazyColumns(src_dir / "ratings.parquet")
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
