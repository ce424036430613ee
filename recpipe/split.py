"""Stage 30: seeded, reproducible train / valid / test splits in stage 20's id space.

Reads ``20_make_ids/`` and writes ``30_split_train_test/`` with ``train.parquet``,
``valid.parquet``, ``test.parquet`` (the columns of ``20_make_ids/ratings.parquet``) and,
for the leave-one-out and NCF protocols, ``valid_negatives.npy`` / ``test_negatives.npy``
(int32 [rows of that part, N]; row j holds the negatives of row j).

Strategies (``--strategy``) and their stated rules:

* ``random``: a seeded permutation puts ``--test-ratio`` of the ratings in test, then
  ``--valid-ratio`` of the rest in valid.
* ``user-random``: per user, round(ratio * n_u) random ratings to test, then round(valid_ratio
  * the rest) to valid; every user keeps at least one train rating.
* ``temporal-global``: one global cut-off at the (1 - test_ratio) quantile of the
  timestamps: every test rating is at or after it, every train rating strictly before; the
  valid part is cut the same way from train.
* ``temporal-user``: per user the latest round(ratio * n_u) ratings are test, the next
  latest valid; at least one train rating per user. Equal timestamps: a seeded random
  order (not item_idx, which tracks popularity in MovieLens).
* ``loo``: each user's latest interaction is test, the second latest valid (equal
  timestamps: a seeded random order; without timestamps a seeded random order); users
  with fewer than 3 interactions stay entirely in train (counted). ``--negatives`` items
  per user (default 99) are sampled uniformly without repeats among the items the user
  never interacted with in any part.
* ``probe``: the (movie, customer) pairs of a Netflix ``probe.txt`` are the test set; raw
  ids are mapped through stage 20's maps; pairs with an unknown user/item or without a
  rating are counted; valid is a random ``--valid-ratio`` of the rest.
* ``kfold``: a seeded assignment of every rating to one of ``--folds`` folds (sizes differ
  by at most one); ``--fold`` is test; valid is a random ``--valid-ratio`` of the rest.
* ``ncf``: the NCF benchmark files ``PREFIX.test.rating`` / ``PREFIX.test.negative`` give
  the test pairs and their exact negatives (in file order); the ratings of stage 20 (read
  from ``PREFIX.train.rating``) are train, minus each user's latest train interaction
  (valid, with sampled negatives) for users with at least two. For some users of the
  published ML-1M files the positive also appears among the negatives: kept as is,
  counted.

Unseen users/items (``--unseen``): a valid/test rating whose user or item has no train
rating is kept (``keep``, the default for every strategy: stage 60 scores it by the model's
baseline, global mean + the known side's bias, and counts it) or dropped (``drop``, on
request only). Counts go to the log and the manifest either way.

Everything is vectorised (numpy sorts, bincount, searchsorted); negatives are drawn in
rounds with numpy and rejected against a sorted user * n_items + item key array; each
row of negatives is in ascending item order.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .artifacts import (StageOutput, dtypes_of, read_columns, read_manifest, read_parquet,
                        stage_dir, stage_manifest, write_parquet)
from .cli import PipelineError, opt, parse_config, print_config, set_seed
from .holdout import (DROPPED, TEST, TRAIN, VALID, _index_dtype, _order_by, _round_half_up,  # noqa: F401
                      in_sorted, pair_keys,
                      flatnonzero_compact, per_user_holdout, random_holdout, rank_from_end,
                      sample_negatives, sorted_keys)
from .readers import read_ncf_test, read_probe

log = logging.getLogger("recpipe")

STAGE = "30_split_train_test"
UPSTREAM = "20_make_ids"
PROG = "30_split_train_test.py"
DESCRIPTION = (
    "Split the ratings into train / valid / test with a seeded, reproducible strategy in "
    "stage 20's shared id space. Reads DATA_DIR/20_make_ids, writes DATA_DIR/30_split_train_test. "
    "Strategies: random (test ratio, then valid ratio of the rest); user-random (per-user "
    "ratio); temporal-global (one time cut-off); temporal-user (each user's latest ratings); "
    "loo (each user's latest interaction is test, the second latest valid, --negatives sampled "
    "unrated items each; users with < 3 interactions stay in train); probe (the pairs of a "
    "Netflix probe.txt are test); kfold (--folds K, --fold I is test); ncf (the NCF files "
    "PREFIX.test.rating/.test.negative give test and its exact candidates). Valid/test "
    "ratings whose user or item has no train rating follow --unseen; all counts go to the "
    "manifest.")
IMPLICIT_STRATEGIES = ("loo", "ncf")
PART_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}


# ---------------------------------------------------------------------------------------
# vectorised building blocks


@dataclass
class Ratings:
    u: np.ndarray
    i: np.ndarray
    ts: np.ndarray | None
    n_users: int
    n_items: int

    @property
    def n(self) -> int:
        return len(self.u)


@dataclass
class Context:
    """What a strategy may need besides the ratings and the config: stage 20's raw id maps
    (``raw_user_id`` / ``raw_item_id`` frames), given or read from ``id_dir`` on first use."""

    users: pd.DataFrame | None = None
    items: pd.DataFrame | None = None
    id_dir: Path | None = None  # DATA_DIR/20_make_ids

    def raw_ids(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        if self.users is None and self.id_dir is not None:
            self.users = read_parquet(self.id_dir / "users.parquet",
                                      columns=["raw_user_id"])["raw_user_id"].to_frame()
        if self.items is None and self.id_dir is not None:
            self.items = read_parquet(self.id_dir / "items.parquet",
                                      columns=["raw_item_id"])["raw_item_id"].to_frame()
        if self.users is None or self.items is None:
            raise PipelineError("this strategy maps raw ids: it needs stage 20's users.parquet "
                                "and items.parquet (run `python 20_make_ids.py`)")
        return self.users, self.items


@dataclass
class SplitOutcome:
    part: np.ndarray               # TRAIN / VALID / TEST / DROPPED per stage-20 rating row
    details: dict[str, Any]
    test: pd.DataFrame | None = None          # a test set given from outside (ncf files)
    test_negatives: np.ndarray | None = None  # and its exact negatives


Strategy = Callable[[Ratings, "Config", Context], SplitOutcome]


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    return {name: np.random.default_rng([seed, k]) for k, name in
            enumerate(("split", "valid", "neg_test", "neg_valid", "order", "tie"))}


def _need_ts(r: Ratings, strategy: str) -> np.ndarray:
    if r.ts is None:
        raise PipelineError(
            f"--strategy {strategy} needs timestamps, but this dataset has none "
            f"(20_make_ids/ratings.parquet has no timestamp column); use --strategy random "
            f"or user-random")
    return r.ts


def _carve_valid_random(part: np.ndarray, ratio: float, rng: np.random.Generator) -> None:
    pool = flatnonzero_compact(part == TRAIN)  # int32 row numbers: half flatnonzero's memory
    part[random_holdout(len(part), ratio, rng, among=pool)] = VALID


def split_random(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    g = _rngs(cfg.seed)
    part = np.full(r.n, TRAIN, dtype=np.int8)
    part[random_holdout(r.n, cfg.test_ratio, g["split"])] = TEST
    _carve_valid_random(part, cfg.valid_ratio, g["valid"])
    return SplitOutcome(part, {})


def split_user_random(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    g = _rngs(cfg.seed)
    key = g["split"].integers(0, 2**31, r.n, dtype=np.int64)
    part = per_user_holdout(r.u, key, np.arange(r.n), r.n_users, cfg.test_ratio, cfg.valid_ratio)
    return SplitOutcome(part, {"rule": "per user: round(ratio * n_u) random ratings, >= 1 kept "
                                       "in train"})


def split_temporal_global(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    test_ratio, valid_ratio = cfg.test_ratio, cfg.valid_ratio
    ts = _need_ts(r, "temporal-global")
    part = np.full(r.n, TRAIN, dtype=np.int8)
    details: dict[str, Any] = {"rule": "test: timestamp >= cut-off; train: before it"}

    def cut(mask_pool: np.ndarray, ratio: float) -> int | None:
        pool = ts[mask_pool]
        k = int(_round_half_up(np.array(len(pool) * ratio)))
        if k == 0:
            return None
        return int(np.partition(pool, len(pool) - k)[len(pool) - k])

    t_test = cut(np.ones(r.n, dtype=bool), test_ratio)
    if t_test is not None:
        part[ts >= t_test] = TEST
    t_valid = cut(part == TRAIN, valid_ratio) if (part == TRAIN).any() else None
    if t_valid is not None:
        part[(part == TRAIN) & (ts >= t_valid)] = VALID
    if not (part == TRAIN).any():
        raise PipelineError(
            f"temporal-global: every rating is at or after the cut-off timestamp (only "
            f"{len(np.unique(ts))} distinct timestamps), so train would be empty; lower "
            f"--test-ratio/--valid-ratio or use --strategy random")
    details.update({"test_cutoff_timestamp": t_test, "valid_cutoff_timestamp": t_valid})
    return SplitOutcome(part, details)


def _random_tiebreak(r: Ratings, seed: int) -> np.ndarray:
    """A seeded random order among equal timestamps.

    Not item_idx: ids follow the raw ids, which in MovieLens track popularity and release
    order, so "larger id is later" would make the held-out items of users who rated many
    items in the same second systematically less popular (ML-100K: 415 of 943 users share
    their latest timestamp with another item).
    """
    # int32 while the rows fit: the same order, half the memory (lexsort reads the values)
    return _rngs(seed)["tie"].permutation(r.n).astype(_index_dtype(r.n))


def split_temporal_user(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    ts = _need_ts(r, "temporal-user")
    part = per_user_holdout(r.u, ts, _random_tiebreak(r, cfg.seed), r.n_users, cfg.test_ratio,
                            cfg.valid_ratio)
    return SplitOutcome(part, {"rule": "per user: the latest round(ratio * n_u) ratings (equal "
                                       "timestamps: seeded random order), >= 1 kept in train"})


def split_loo(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    seed = cfg.seed
    g = _rngs(seed)
    if r.ts is not None:
        primary, order = r.ts, "timestamp (equal timestamps: seeded random order)"
    else:
        primary = g["order"].integers(0, 2**31, r.n, dtype=np.int64)
        order = "seeded random order (no timestamps)"
    ranks, counts = rank_from_end(r.u, primary, _random_tiebreak(r, seed), r.n_users)
    eligible = (counts >= 3)[r.u]
    part = np.full(r.n, TRAIN, dtype=np.int8)
    part[eligible & (ranks == 0)] = TEST
    part[eligible & (ranks == 1)] = VALID
    n_small = int(((counts > 0) & (counts < 3)).sum())
    return SplitOutcome(part, {"order": order, "min_interactions": 3, "n_users_train_only": n_small,
                               "n_users_held_out": int((counts >= 3).sum())})


def split_kfold(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    folds, fold, seed = cfg.folds, cfg.fold, cfg.seed
    g = _rngs(seed)
    fold_of = np.empty(r.n, dtype=np.int64)
    fold_of[g["split"].permutation(r.n)] = np.arange(r.n) % folds
    part = np.where(fold_of == fold, TEST, TRAIN).astype(np.int8)
    _carve_valid_random(part, cfg.valid_ratio, np.random.default_rng([seed, 1, fold]))
    return SplitOutcome(part, {"folds": folds, "fold": fold,
                               "fold_sizes": np.bincount(fold_of, minlength=folds).tolist()})


def _map_raw(raw_ids: pd.Series, values: Any) -> np.ndarray:
    """Stage 20 index of each raw id value (-1 when unknown), in the map's own dtype."""
    index = pd.Index(raw_ids)
    vals = pd.Series(values)
    if pd.api.types.is_integer_dtype(raw_ids.dtype):
        vals = pd.to_numeric(vals, errors="coerce")
        known = vals.notna().to_numpy()
        out = np.full(len(vals), -1, dtype=np.int64)
        if known.any():
            out[known] = index.get_indexer(vals[known].astype(np.int64))
        return out
    return index.get_indexer(vals.astype(str))


def split_probe(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    """The (movie, customer) pairs of a Netflix probe.txt are test."""
    probe_path = Path(cfg.probe)
    users, items = ctx.raw_ids()
    g = _rngs(cfg.seed)
    pr = read_probe(probe_path)
    pu = _map_raw(users["raw_user_id"], pr["raw_user_id"])
    pi = _map_raw(items["raw_item_id"], pr["raw_item_id"])
    known = (pu >= 0) & (pi >= 0)
    pk = np.unique(pair_keys(pu[known], pi[known], r.n_items))
    keys = pair_keys(r.u, r.i, r.n_items)
    is_test = in_sorted(keys, pk)
    part = np.where(is_test, TEST, TRAIN).astype(np.int8)
    _carve_valid_random(part, cfg.valid_ratio, g["valid"])
    n_known = int(known.sum())
    details = {"probe": str(probe_path), "probe_pairs": int(len(pr)),
               "unknown_user": int((pu < 0).sum()), "unknown_item": int((pi < 0).sum()),
               "unknown_pairs": int((~known).sum()),
               "duplicate_pairs": int(n_known - len(pk)),
               "pairs_without_rating": int(len(pk) - is_test.sum()),
               "matched_ratings": int(is_test.sum())}
    if details["unknown_pairs"]:
        j = int(np.flatnonzero(~known)[0])
        log.warning("probe: %d of %d pairs name a user or movie unknown to stage 20 (e.g. "
                    "%s:%d customer %s movie %s); they are skipped", details["unknown_pairs"],
                    len(pr), probe_path, int(pr["line"].iat[j]), pr["raw_user_id"].iat[j],
                    pr["raw_item_id"].iat[j])
    if not is_test.any():
        raise PipelineError(f"{probe_path}: none of its {len(pr)} pairs is among the ratings "
                            f"of stage 20; expected the probe.txt of the same dataset")
    return SplitOutcome(part, details)


def split_ncf(r: Ratings, cfg: Config, ctx: Context) -> SplitOutcome:
    """Part labels over the stage-20 ratings (train/valid), the test frame and negatives."""
    prefix, seed = cfg.ncf_test, cfg.seed
    users, items = ctx.raw_ids()
    test_raw, negs_raw = read_ncf_test(prefix)
    rp = f"{prefix}.test.rating"
    tu = _map_raw(users["raw_user_id"], test_raw["raw_user_id"])
    ti = _map_raw(items["raw_item_id"], test_raw["raw_item_id"])
    flat = _map_raw(items["raw_item_id"], negs_raw.ravel())
    if (flat < 0).any():
        j = int(np.flatnonzero(flat < 0)[0])
        row = j // negs_raw.shape[1]
        raise PipelineError(
            f"{prefix}.test.negative:{row + 1}: negative item {int(negs_raw.ravel()[j])} is "
            f"not in stage 20's id space ({(flat < 0).sum()} such entries); the NCF files must "
            f"come with the PREFIX.train.rating that stage 10 read: run `python "
            f"10_preprocessing.py --input {prefix}.train.rating --format ncf` and "
            f"`python 20_make_ids.py` without minimum-count filters")
    negs = flat.reshape(negs_raw.shape).astype(np.int32)
    unknown = (tu < 0) | (ti < 0)
    if unknown.all():
        raise PipelineError(f"{rp}: none of its {len(tu)} test users/items is in stage 20's id "
                            f"space; expected the NCF files of the dataset that stage 10 read")
    if unknown.any():
        j = int(np.flatnonzero(unknown)[0])
        log.warning("ncf: %d test pairs name a user or item unknown to stage 20 (e.g. %s:%d); "
                    "they are skipped", int(unknown.sum()), rp, j + 1)
    keep = ~unknown
    test = pd.DataFrame({"user_idx": tu[keep].astype(np.int32),
                         "item_idx": ti[keep].astype(np.int32),
                         "rating": test_raw["rating"].to_numpy(np.float32)[keep]})
    if r.ts is not None:
        if "timestamp" in test_raw.columns:
            test["timestamp"] = test_raw["timestamp"].to_numpy(np.int64)[keep]
        else:
            test["timestamp"] = np.zeros(int(keep.sum()), dtype=np.int64)
    negs = negs[keep]
    dup_users = int(len(test) - test["user_idx"].nunique())
    if dup_users:
        raise PipelineError(f"{rp}: {dup_users} users have more than one test line; expected "
                            f"one held-out interaction per user (leave-one-out)")
    # train = stage 20 ratings minus any test pair; valid = each user's latest train row
    tkeys = np.sort(pair_keys(test["user_idx"], test["item_idx"], r.n_items))
    in_test = in_sorted(pair_keys(r.u, r.i, r.n_items), tkeys)
    part = np.where(in_test, DROPPED, TRAIN).astype(np.int8)
    # test pairs found in train sort first, so they never become a user's latest row
    if r.ts is not None:
        primary = np.where(in_test, r.ts.min() - 1 if r.n else 0, r.ts)
    else:
        primary = np.where(in_test, -1, _rngs(seed)["order"].integers(0, 2**31, r.n))
    ranks, _ = rank_from_end(r.u, primary, r.i, r.n_users)
    train_counts = np.bincount(r.u[~in_test], minlength=r.n_users)
    part[(part == TRAIN) & (ranks == 0) & (train_counts[r.u] >= 2)] = VALID
    pos_in_negs = (negs == test["item_idx"].to_numpy()[:, None]).any(axis=1)
    details = {"ncf_prefix": prefix, "test_lines": int(len(test_raw)),
               "unknown_test_pairs": int(unknown.sum()),
               "test_pairs_in_train": int(in_test.sum()),
               "positive_in_negatives_users": int(pos_in_negs.sum()),
               "n_users_train_only": int(((train_counts > 0) & (train_counts < 2)).sum()),
               "valid": "each user's latest train interaction (users with >= 2) + sampled "
                        "negatives"}
    return SplitOutcome(part, details, test, negs)


STRATEGIES: dict[str, Strategy] = {
    "random": split_random,
    "user-random": split_user_random,
    "temporal-global": split_temporal_global,
    "temporal-user": split_temporal_user,
    "loo": split_loo,
    "probe": split_probe,
    "kfold": split_kfold,
    "ncf": split_ncf,
}


@dataclass
class Config:
    data_dir: Path = opt(Path("data"), "data folder holding the stage artifacts")
    strategy: str = opt("random", "how to split (described above)", choices=tuple(STRATEGIES))
    test_ratio: float = opt(0.1, "share of the ratings (per user for user-random/"
                                 "temporal-user) that go to test")
    valid_ratio: float = opt(0.1, "share of the remaining train ratings carved out as valid "
                                  "(ratio strategies; 0 = no valid part)")
    seed: int = opt(42, "random seed: the same seed gives the same split")
    probe: Path | None = opt(None, "Netflix probe.txt for --strategy probe")
    negatives: int = opt(99, "sampled negatives per held-out interaction (loo; ncf valid uses "
                             "the test file's count)")
    folds: int = opt(5, "number of folds for --strategy kfold")
    fold: int = opt(0, "which fold (0-based) is test for --strategy kfold")
    ncf_test: str | None = opt(None, "NCF file prefix for --strategy ncf: reads "
                                     "PREFIX.test.rating and PREFIX.test.negative")
    unseen: str = opt("keep", "valid/test ratings whose user or item has no train rating: "
                              "keep (scored by stage 60's baseline, global mean + the known "
                              "side's bias, and counted) or drop; auto (accepted for older "
                              "command lines) = keep",
                      choices=("auto", "drop", "keep"))

    def validate(self) -> None:
        if not 0.0 <= self.test_ratio < 1.0:
            raise PipelineError(f"--test-ratio must be in [0, 1), got {self.test_ratio}")
        if not 0.0 <= self.valid_ratio < 1.0:
            raise PipelineError(f"--valid-ratio must be in [0, 1), got {self.valid_ratio}")
        if self.negatives < 0:
            raise PipelineError(f"--negatives must be >= 0, got {self.negatives}")
        if self.strategy == "probe" and self.probe is None:
            raise PipelineError("--strategy probe needs --probe PATH (a Netflix probe.txt)")
        if self.strategy == "ncf" and not self.ncf_test:
            raise PipelineError("--strategy ncf needs --ncf-test PREFIX (reads "
                                "PREFIX.test.rating and PREFIX.test.negative)")
        if self.strategy == "kfold":
            if self.folds < 2:
                raise PipelineError(f"--folds must be >= 2, got {self.folds}")
            if not 0 <= self.fold < self.folds:
                raise PipelineError(f"--fold must be in 0..{self.folds - 1}, got {self.fold}")


# ---------------------------------------------------------------------------------------
# unseen policy and the stage


def _compact_ids(a: np.ndarray) -> np.ndarray:
    """Ids as int32 (no copy when stored so), else int64."""
    return a if a.dtype == np.int32 else a.astype(np.int64)


def unseen_masks(train_u: np.ndarray, train_i: np.ndarray, u: np.ndarray, i: np.ndarray,
                 n_users: int, n_items: int) -> tuple[np.ndarray, dict[str, int]]:
    seen_u = np.bincount(train_u, minlength=n_users) > 0
    seen_i = np.bincount(train_i, minlength=n_items) > 0
    new_u = ~seen_u[u]
    new_i = ~seen_i[i]
    mask = new_u | new_i
    return mask, {"rows": int(mask.sum()), "users": int(len(np.unique(u[new_u]))),
                  "items": int(len(np.unique(i[new_i])))}


@dataclass
class SplitResult:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    valid_negatives: np.ndarray | None
    test_negatives: np.ndarray | None
    details: dict[str, Any]
    unseen: dict[str, Any]


def split(ratings: Any, n_users: int, n_items: int, cfg: Config,
          users: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
          ctx: Context | None = None, consume: bool = False) -> SplitResult:
    """Split a stage-20 ratings table (pure, apart from reading --probe / --ncf-test files).

    ``ratings``: a DataFrame or a {column: numpy array} mapping with stage 20's columns;
    ``users``/``items`` (or ``ctx``): stage 20's raw id maps, for probe and ncf.
    ``consume``: ``ratings`` is a dict handed over (stage 30's): it is emptied, so that each
    input column is freed as soon as its parts are taken (peak memory at Netflix scale).
    """
    cols = {c: np.asarray(ratings[c]) for c in ratings}
    if consume:
        ratings.clear()
    del ratings
    # ids as stored (int32) when they are; int64 keys are formed where needed (pair_keys)
    u = _compact_ids(cols["user_idx"])
    i = _compact_ids(cols["item_idx"])
    ts = cols["timestamp"] if "timestamp" in cols else None
    r = Ratings(u, i, ts, n_users, n_items)
    s = cfg.strategy
    if s not in STRATEGIES:  # parse_config restricts the choices
        raise PipelineError(f"unknown --strategy {s!r}; expected one of {', '.join(STRATEGIES)}")
    out = STRATEGIES[s](r, cfg, ctx if ctx is not None else Context(users, items))
    part, details, ext_test, ext_negs = out.part, out.details, out.test, out.test_negatives

    policy = "drop" if cfg.unseen == "drop" else "keep"     # auto: keep, for every strategy
    tr = part == TRAIN
    unseen: dict[str, Any] = {"policy": policy}
    dropped_rows = 0
    for code, name in ((VALID, "valid"), (TEST, "test")):
        if name == "test" and ext_test is not None:
            mask, st = unseen_masks(u[tr], i[tr], ext_test["user_idx"].to_numpy(),
                                    ext_test["item_idx"].to_numpy(), n_users, n_items)
            if policy == "drop" and mask.any():
                ext_test = ext_test[~mask].reset_index(drop=True)
                ext_negs = ext_negs[~mask]
                dropped_rows += int(mask.sum())
        else:
            rows = np.flatnonzero(part == code)
            mask, st = unseen_masks(u[tr], i[tr], u[rows], i[rows], n_users, n_items)
            if policy == "drop" and mask.any():
                part[rows[mask]] = DROPPED
                dropped_rows += int(mask.sum())
        unseen[name] = st
    unseen["dropped_rows"] = dropped_rows

    # the implicit strategies' negatives avoid everything a user rated: those keys are
    # formed now, so that u / i (the input id columns) are freed with the other columns
    implicit = s in IMPLICIT_STRATEGIES
    rated = sorted_keys(u, i, n_items) if implicit else None  # stage 20's rows: no sort
    del r, u, i
    # the parts, one input column at a time: each column is dropped once its parts are taken
    codes = (TRAIN, VALID) if ext_test is not None else (TRAIN, VALID, TEST)
    masks = {code: part == code for code in codes}
    taken: dict[int, dict[str, np.ndarray]] = {code: {} for code in codes}
    for c in list(cols):
        a = cols.pop(c)
        for code in codes:
            taken[code][c] = a[masks[code]]
        del a
    del masks

    def take(code: int) -> pd.DataFrame:
        return pd.DataFrame(taken.pop(code), copy=False)

    train, valid = take(TRAIN), take(VALID)
    test = ext_test if ext_test is not None else take(TEST)
    valid_negs = test_negs = None
    if implicit:
        g = _rngs(cfg.seed)
        if ext_test is not None:
            rated = np.concatenate([rated, pair_keys(test["user_idx"], test["item_idx"], n_items)])
            rated.sort()
        n_neg = cfg.negatives if ext_negs is None else ext_negs.shape[1]
        valid_negs = sample_negatives(valid["user_idx"].to_numpy(), n_neg, n_items, rated,
                                      g["neg_valid"])
        if ext_negs is not None:
            test_negs = np.ascontiguousarray(ext_negs, dtype=np.int32)
        else:
            test_negs = sample_negatives(test["user_idx"].to_numpy(), n_neg, n_items, rated,
                                         g["neg_test"])
    return SplitResult(train, valid, test, valid_negs, test_negs, details, unseen)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(Config, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    set_seed(cfg.seed)
    up = read_manifest(cfg.data_dir, UPSTREAM, needed_by=PROG)
    src = stage_dir(cfg.data_dir, UPSTREAM)
    ratings = read_columns(src / "ratings.parquet")
    n_users, n_items = int(up["n_users"]), int(up["n_items"])
    n_in = len(ratings["user_idx"])
    res = split(ratings, n_users, n_items, cfg, ctx=Context(id_dir=src), consume=True)
    del ratings
    sizes = {"train": len(res.train), "valid": len(res.valid), "test": len(res.test)}
    n_neg = 0 if res.test_negatives is None else int(res.test_negatives.shape[1])
    for name in ("valid", "test"):
        st = res.unseen[name]
        if st["rows"]:
            log.info("unseen in train (%s): %d %s ratings (%d users, %d items)",
                     res.unseen["policy"] == "drop" and "dropped" or "kept", st["rows"], name,
                     st["users"], st["items"])
    if cfg.strategy == "loo":
        log.info("loo: %d users held out; %d users with fewer than 3 interactions stay "
                 "entirely in train", res.details["n_users_held_out"],
                 res.details["n_users_train_only"])
    if cfg.strategy == "ncf":
        log.info("ncf: %d test users; for %d of them the positive also appears among the "
                 "file's negatives (kept as is)", sizes["test"],
                 res.details["positive_in_negatives_users"])
    with StageOutput(cfg.data_dir, STAGE) as out:
        for name in ("train", "valid", "test"):
            write_parquet(getattr(res, name), out.path(f"{name}.parquet"))
        if res.test_negatives is not None:
            np.save(out.path("valid_negatives.npy"), res.valid_negatives)
            np.save(out.path("test_negatives.npy"), res.test_negatives)
        manifest = {
            **stage_manifest(PROG, argv, cfg, cfg.data_dir, UPSTREAM, up),
            "strategy": cfg.strategy,
            "seed": cfg.seed,
            # the task the split is made for: implicit for the ranking protocols (sampled
            # candidates); null for splits that serve either task (stage 60 decides)
            "task": "implicit" if cfg.strategy in IMPLICIT_STRATEGIES else None,
            "sizes": sizes,
            "n_ratings_in": n_in,
            "n_users": n_users,
            "n_items": n_items,
            "n_negatives": n_neg,
            "unseen": res.unseen,
            "details": res.details,
            "dtypes": dtypes_of(res.train),
        }
        out.commit(manifest)
    log.info("%s (%s, seed %d): train %d, valid %d, test %d%s -> %s", STAGE, cfg.strategy,
             cfg.seed, sizes["train"], sizes["valid"], sizes["test"],
             f", {n_neg} negatives per held-out row" if n_neg else "",
             stage_dir(cfg.data_dir, STAGE))
    log.info("next: python 40_make_sparse_matrix.py --data-dir %s", shlex.quote(str(cfg.data_dir)))
