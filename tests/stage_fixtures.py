"""Helpers that write upstream stage artifacts directly, so later stages test on their own.

``write_stage10`` commits a ``10_preprocessing`` artifact following the contract in
``recpipe/__init__.py`` (ratings.parquet [+ items.parquet] and a manifest), without running
10_preprocessing.py. ``read_ml100k`` reads the real MovieLens 100K files with pandas.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from recpipe.artifacts import StageOutput, dtypes_of, write_parquet

STAGE10 = "10_preprocessing"


def make_ratings(users: Sequence, items: Sequence, ratings: Sequence[float] | None = None,
                 timestamps: Sequence[int] | None = None) -> pd.DataFrame:
    """A stage-10 ratings table with the contract's dtypes."""
    users = np.asarray(users)
    items = np.asarray(items)
    n = len(users)
    df = pd.DataFrame({
        "raw_user_id": users.astype(np.int64) if users.dtype.kind in "iu" else users.astype(str),
        "raw_item_id": items.astype(np.int64) if items.dtype.kind in "iu" else items.astype(str),
        "rating": (np.asarray(ratings, dtype=np.float32) if ratings is not None
                   else np.full(n, 4.0, np.float32)),
    })
    if timestamps is not None:
        df["timestamp"] = np.asarray(timestamps, dtype=np.int64)
    return df


def write_stage10(data_dir: Path, ratings: pd.DataFrame, items: pd.DataFrame | None = None,
                  dataset: str = "fixture", rating_scale: Sequence[float] = (1.0, 5.0),
                  fmt: str = "fixture", inputs: Sequence[str] = ()) -> dict:
    """Commit DATA_DIR/10_preprocessing as stage 10 would; returns the manifest fields."""
    ratings = ratings.copy()
    ratings["rating"] = ratings["rating"].astype(np.float32)
    if "timestamp" in ratings.columns:
        ratings["timestamp"] = ratings["timestamp"].astype(np.int64)
    manifest = {
        "command": f"python 10_preprocessing.py --data-dir {data_dir} --input FIXTURE",
        "config": {"data_dir": str(data_dir), "format": fmt},
        "n_ratings": int(len(ratings)),
        "n_users": int(ratings["raw_user_id"].nunique()),
        "n_items": int(ratings["raw_item_id"].nunique()),
        "format": fmt,
        "dataset": dataset,
        "inputs": list(inputs),
        "rating_scale": [float(rating_scale[0]), float(rating_scale[1])],
        "has_timestamp": "timestamp" in ratings.columns,
        "n_unrated": int(ratings["rating"].isna().sum()),
        "dropped": {},
        "dtypes": {"ratings": dtypes_of(ratings)},
    }
    with StageOutput(data_dir, STAGE10) as out:
        write_parquet(ratings, out.path("ratings.parquet"))
        if items is not None:
            write_parquet(items, out.path("items.parquet"))
        out.commit(manifest)
    return manifest


def read_ml100k(shared_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MovieLens 100K u.data (ratings) and u.item (titles, ISO-8859-1) as stage-10 tables."""
    root = Path(shared_data) / "movielens" / "ml-100k"
    r = pd.read_csv(root / "u.data", sep="\t", header=None,
                    names=["raw_user_id", "raw_item_id", "rating", "timestamp"],
                    dtype={"raw_user_id": np.int64, "raw_item_id": np.int64,
                           "rating": np.float32, "timestamp": np.int64})
    it = pd.read_csv(root / "u.item", sep="|", header=None, encoding="ISO-8859-1",
                     usecols=[0, 1], names=["raw_item_id", "title"],
                     dtype={"raw_item_id": np.int64, "title": str})
    year = it["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)
    items = pd.DataFrame({"raw_item_id": it["raw_item_id"].astype(np.int64),
                          "title": it["title"].astype("string"),
                          "year": pd.to_numeric(year).astype("Int32")})
    return r, items


def write_ml100k_stage10(data_dir: Path, shared_data: Path) -> dict:
    ratings, items = read_ml100k(shared_data)
    return write_stage10(data_dir, ratings, items, dataset="ml-100k", fmt="ml-100k",
                         inputs=[str(Path(shared_data) / "movielens" / "ml-100k" / "u.data")])


def ml100k_stage40(tmp_path_factory, name: str, *split_args: str) -> Path:
    """Stages 10-40 on ML-100K (../shared/data) in a fresh folder ``name``, split by
    ``split_args``; skips the test when the real data is absent."""
    import pytest
    from conftest import SHARED_DATA
    from recpipe import ids, matrix, split
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set RECPIPE_SHARED_DATA to run)")
    d = tmp_path_factory.mktemp(name)
    write_ml100k_stage10(d, SHARED_DATA)
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), *split_args])
    matrix.main(["--data-dir", str(d)])
    return d


def write_synthetic_ncf_train(prefix: Path, ncf_prefix: Path, per_user: int = 4,
                              seed: int = 0) -> pd.DataFrame:
    """A small PREFIX.train.rating consistent with the real NCF test files.

    The real ml-1m.train.rating is not available. This builds, for every user of
    ``ncf_prefix.test.rating``, ``per_user`` train interactions that avoid the user's test
    item and its 99 listed negatives, plus rows so that every item id used anywhere in the
    test files occurs in train (so stage 20's id space holds them all). Timestamps are
    earlier than the user's test timestamp. Writes ``prefix.train.rating`` (tab-separated,
    as NCF does) and returns it as a stage-10 ratings table.
    """
    test = pd.read_csv(f"{ncf_prefix}.test.rating", sep="\t", header=None,
                       names=["u", "i", "r", "t"])
    neg = pd.read_csv(f"{ncf_prefix}.test.negative", sep="\t", header=None)
    negs = neg.iloc[:, 1:].to_numpy(np.int64)
    n_users = len(test)
    n_items = int(max(test["i"].max(), negs.max())) + 1
    banned = np.zeros((n_users, n_items), dtype=bool)
    rows = np.arange(n_users)
    banned[rows[:, None], negs] = True
    banned[rows, test["i"].to_numpy()] = True
    rng = np.random.default_rng(seed)
    chosen = np.zeros_like(banned)
    # coverage: item j goes to the first user u = j, j+1, ... (mod n) that may have it
    need = np.arange(n_items)
    cand_u = need % n_users
    while len(need):
        ok = ~banned[cand_u, need] & ~chosen[cand_u, need]
        chosen[cand_u[ok], need[ok]] = True
        need, cand_u = need[~ok], (cand_u[~ok] + 1) % n_users
    # per-user random extra items
    for _ in range(per_user * 4):
        have = chosen.sum(1)
        lack = np.flatnonzero(have < per_user)
        if not len(lack):
            break
        it = rng.integers(0, n_items, len(lack))
        ok = ~banned[lack, it]
        chosen[lack[ok], it[ok]] = True
    uu, ii = np.nonzero(chosen)
    t_test = test["t"].to_numpy(np.int64)
    ts = t_test[uu] - 1000 - rng.integers(0, 10_000_000, len(uu))
    rr = rng.integers(1, 6, len(uu)).astype(np.float32)
    df = pd.DataFrame({"raw_user_id": uu.astype(np.int64), "raw_item_id": ii.astype(np.int64),
                       "rating": rr, "timestamp": ts.astype(np.int64)})
    with open(f"{prefix}.train.rating", "w") as f:
        df.assign(rating=df["rating"].astype(int)).to_csv(f, sep="\t", header=False, index=False)
    return df


def top10_unseen(scores, row, items: pd.DataFrame) -> list:
    """Raw ids of the 10 best ``scores`` (a float tensor over items) among the items the
    user's train ``row`` (a dense array) does not hold, best first."""
    import torch
    s = scores.clone()
    s[torch.from_numpy(np.asarray(row) > 0)] = -torch.inf
    return items.raw_item_id.to_numpy()[torch.topk(s, 10).indices.numpy()].tolist()


def new_user_recommendations(data_dir: Path, model: str, tmp_path: Path, n_given: int,
                             ratings: Sequence[float] | None = None,
                             args: Sequence[str] = ()) -> tuple[list, pd.DataFrame]:
    """A new user who rated the ``n_given`` most rated items (``ratings``, default all 5),
    recommended for by ``70_recommend.py --ratings``: (the given raw ids, its top 10), which
    must be 10 rows, none of them a given item."""
    from recpipe import recommend
    items = pd.read_parquet(Path(data_dir) / "20_make_ids" / "items.parquet")
    given = items.sort_values("n_ratings", ascending=False).raw_item_id.iloc[:n_given].tolist()
    f = Path(tmp_path) / "new.csv"
    f.write_text("".join(f"{i},{r:g}\n" for i, r in zip(given, ratings or [5] * n_given)))
    new = recommend.main(["--data-dir", str(data_dir), "--model", model, "--ratings", str(f),
                          *args])
    assert len(new) == 10 and not set(new.raw_item_id) & set(given)
    return given, new
