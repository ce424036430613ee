"""Stage 30: split invariants for every strategy, negatives, probe, NCF files, CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from recpipe.cli import PipelineError, run_main
from recpipe.ids import make_ids
from recpipe import ids as ids_stage, matrix as matrix_stage, readers, split as split_stage
from recpipe.readers import read_probe
from recpipe.split import Config, sample_negatives, split
from stage_fixtures import make_ratings, write_stage10, write_synthetic_ncf_train
from conftest import run_script

RATIO_STRATEGIES = ["random", "user-random", "temporal-global", "temporal-user", "kfold"]
ALL_LOCAL = RATIO_STRATEGIES + ["loo"]


@pytest.fixture(scope="module")
def stage20():
    """A stage-20 ratings table: 300 users, 400 long-tailed items, ties in timestamps,
    some users with 1-2 ratings, a few unrated interactions (NaN)."""
    rng = np.random.default_rng(3)
    n = 12_000
    u = np.minimum(rng.geometric(0.012, n), 300) - 1
    i = np.minimum(rng.zipf(1.3, n), 400) - 1
    t = rng.integers(0, 2_000, n) * 86_400  # day resolution: many ties
    r = rng.integers(1, 6, n).astype(np.float32)
    r[rng.random(n) < 0.02] = np.nan
    extra_u = np.array([1000, 1001, 1001])  # users with 1 and 2 interactions
    extra_i = np.array([1, 2, 3])
    src = make_ratings(np.r_[u, extra_u], np.r_[i, extra_i], np.r_[r, [3, 4, 5]],
                       np.r_[t, [5, 6, 7]])
    res = make_ids(src)
    return res.ratings, len(res.users), len(res.items)


def _keys(df, n_items):
    return df["user_idx"].to_numpy(np.int64) * n_items + df["item_idx"].to_numpy(np.int64)


def _run(stage20, **kw):
    ratings, n_users, n_items = stage20
    return split(ratings, n_users, n_items, Config(**kw))


@pytest.mark.parametrize("strategy", ALL_LOCAL)
def test_invariants(stage20, strategy):
    ratings, n_users, n_items = stage20
    res = _run(stage20, strategy=strategy)
    parts = [res.train, res.valid, res.test]
    for p in parts:
        assert list(p.columns) == list(ratings.columns)
        assert p["user_idx"].dtype == np.int32 and p["item_idx"].dtype == np.int32
        assert p["rating"].dtype == np.float32 and p["timestamp"].dtype == np.int64
        assert p["user_idx"].between(0, n_users - 1).all()
        assert p["item_idx"].between(0, n_items - 1).all()
    keys = np.concatenate([_keys(p, n_items) for p in parts])
    assert len(np.unique(keys)) == len(keys), "a (user, item) pair is in two parts"
    # every row comes from stage 20 unchanged; sizes add up with the dropped unseen rows
    all_keys = _keys(ratings, n_items)
    assert np.isin(keys, all_keys).all()
    assert sum(map(len, parts)) + res.unseen["dropped_rows"] == len(ratings)
    merged = pd.concat(parts).merge(ratings, on=["user_idx", "item_idx"], suffixes=("", "_src"))
    assert np.array_equal(merged["timestamp"], merged["timestamp_src"])
    assert len(res.test) > 0 and len(res.train) > len(res.test)
    # the unseen policy held: under drop, valid/test users and items all occur in train
    if res.unseen["policy"] == "drop":
        for p in (res.valid, res.test):
            assert p["user_idx"].isin(res.train["user_idx"]).all()
            assert p["item_idx"].isin(res.train["item_idx"]).all()
    # same seed, same split; another seed, another split
    again = _run(stage20, strategy=strategy)
    for a, b in zip(parts, [again.train, again.valid, again.test]):
        pd.testing.assert_frame_equal(a, b)
    if strategy not in ("temporal-global", "temporal-user"):
        other = _run(stage20, strategy=strategy, seed=7)
        same = (np.array_equal(_keys(other.test, n_items), _keys(res.test, n_items))
                and (strategy != "loo" or np.array_equal(other.test_negatives, res.test_negatives)))
        assert not same


def test_random_sizes(stage20):
    ratings, _, _ = stage20
    res = _run(stage20, strategy="random", unseen="keep", test_ratio=0.2, valid_ratio=0.25)
    n = len(ratings)
    assert len(res.test) == round(0.2 * n)
    assert len(res.valid) == round(0.25 * (n - len(res.test)))
    none = _run(stage20, strategy="random", unseen="keep", valid_ratio=0.0)
    assert len(none.valid) == 0


def test_temporal_global_cutoff(stage20):
    res = _run(stage20, strategy="temporal-global", unseen="keep")
    cut = res.details["test_cutoff_timestamp"]
    assert res.train["timestamp"].max() < cut <= res.test["timestamp"].min()
    assert res.train["timestamp"].max() < res.details["valid_cutoff_timestamp"] \
        <= res.valid["timestamp"].min()
    assert res.valid["timestamp"].max() < cut


def test_temporal_user_latest(stage20):
    res = _run(stage20, strategy="temporal-user", unseen="keep")
    tr = res.train.groupby("user_idx")["timestamp"].max()
    te = res.test.groupby("user_idx")["timestamp"].min()
    common = te.index.intersection(tr.index)
    assert (te[common] >= tr[common]).all()
    # every user keeps at least one train rating
    assert set(res.train["user_idx"]) == set(stage20[0]["user_idx"])


def test_equal_timestamps_are_broken_at_random_not_by_item_id():
    """Among ratings given in the same second, the held-out one is a seeded random pick:
    larger ids (less popular items in MovieLens) must not be favoured."""
    n_users, per_user = 400, 6
    u = np.repeat(np.arange(n_users), per_user)
    i = np.tile(np.arange(per_user), n_users) + (u % 7)
    src = make_ratings(u, i, np.full(len(u), 4.0, np.float32), np.zeros(len(u), np.int64))
    ids = make_ids(src)
    ratings, n_u, n_i = ids.ratings, len(ids.users), len(ids.items)
    picks = []
    for seed in (0, 1):
        res = split(ratings, n_u, n_i, Config(strategy="loo", seed=seed, negatives=5))
        rank = res.test["item_idx"].to_numpy() - (res.test["user_idx"].to_numpy() % 7)
        picks.append(rank)
        # each of the 6 tied positions is picked about equally often (400 users)
        assert np.bincount(rank, minlength=per_user).min() > 30
        again = split(ratings, n_u, n_i, Config(strategy="loo", seed=seed, negatives=5))
        assert again.test.equals(res.test)                    # seeded: reproducible
    assert (picks[0] != picks[1]).mean() > 0.5                # and the seed matters


def test_user_random_keeps_every_user_in_train(stage20):
    res = _run(stage20, strategy="user-random", unseen="keep")
    assert set(res.train["user_idx"]) == set(stage20[0]["user_idx"])
    counts = stage20[0].groupby("user_idx").size()
    test_counts = res.test.groupby("user_idx").size().reindex(counts.index, fill_value=0)
    expected = np.minimum(np.floor(counts * 0.1 + 0.5), counts - 1)
    assert (test_counts == expected).all()


def test_loo_protocol(stage20):
    ratings, n_users, n_items = stage20
    res = _run(stage20, strategy="loo", negatives=50)
    assert res.unseen["policy"] == "keep" and res.unseen["dropped_rows"] == 0
    counts = ratings.groupby("user_idx").size()
    held = counts.index[counts >= 3]
    # one test and one valid row per user with >= 3 interactions; every user keeps train
    assert sorted(res.test["user_idx"]) == sorted(held)
    assert sorted(res.valid["user_idx"]) == sorted(held)
    assert set(res.train["user_idx"]) == set(range(n_users))
    assert res.details["n_users_train_only"] == int((counts < 3).sum()) >= 2
    # test is the latest interaction, valid the latest of the rest (equal timestamps: a
    # seeded random order, not item_idx)
    te = res.test.set_index("user_idx")
    va = res.valid.set_index("user_idx")
    latest = ratings.groupby("user_idx")["timestamp"].max()
    assert (te["timestamp"] == latest[te.index]).all()
    rest = ratings.merge(res.test[["user_idx", "item_idx"]], how="left", indicator=True)
    rest_latest = rest[rest["_merge"] == "left_only"].groupby("user_idx")["timestamp"].max()
    assert (va["timestamp"] == rest_latest[va.index]).all()
    # negatives: shape, dtype, no repeats per row, never an item the user interacted with
    rated = set(_keys(ratings, n_items).tolist())
    for part, negs in ((res.test, res.test_negatives), (res.valid, res.valid_negatives)):
        assert negs.shape == (len(part), 50) and negs.dtype == np.int32
        assert ((negs >= 0) & (negs < n_items)).all()
        s = np.sort(negs, axis=1)
        assert (s[:, 1:] != s[:, :-1]).all()
        keys = part["user_idx"].to_numpy(np.int64)[:, None] * n_items + negs
        assert not np.isin(keys, list(rated)).any()


def test_sample_negatives_heavy_users():
    # user 0 rated all but 5 of 40 items: rejection gets hard, the result stays exact
    n_items = 40
    rated = np.sort(np.r_[np.arange(35), 40 + np.arange(0, 40, 2)]).astype(np.int64)
    rng = np.random.default_rng(0)
    negs = sample_negatives(np.array([0, 1, 0, 2]), 5, n_items, rated, rng, max_rounds=3)
    assert negs.dtype == np.int32
    assert sorted(negs[0]) == sorted(negs[2]) == [35, 36, 37, 38, 39]
    assert set(negs[1]) <= set(range(1, 40, 2)) and len(set(negs[1])) == 5
    assert len(set(negs[3])) == 5  # user 2 rated nothing
    with pytest.raises(PipelineError, match="lower --negatives"):
        sample_negatives(np.array([0]), 6, n_items, rated, rng)


def test_sample_negatives_uniform_and_seeded():
    # 2000 draws of 3 among the 10 unrated items of one user: each item about 600 times
    n_items = 20
    rated = np.arange(0, 20, 2).astype(np.int64)  # user 0 rated the even items
    users = np.zeros(2000, dtype=np.int64)
    a = sample_negatives(users, 3, n_items, rated, np.random.default_rng(1))
    b = sample_negatives(users, 3, n_items, rated, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert (a % 2 == 1).all()
    s = np.sort(a, axis=1)
    assert (s[:, 1:] != s[:, :-1]).all()
    counts = np.bincount(a.ravel(), minlength=n_items)[1::2]
    assert counts.min() > 500 and counts.max() < 700


def test_kfold_partitions(stage20):
    ratings, _, n_items = stage20
    tests = [_run(stage20, strategy="kfold", folds=4, fold=f, unseen="keep").test
             for f in range(4)]
    keys = np.concatenate([_keys(t, n_items) for t in tests])
    assert len(keys) == len(ratings) and len(np.unique(keys)) == len(keys)
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(PipelineError, match="--fold must be in 0..3"):
        Config(strategy="kfold", folds=4, fold=4).validate()


def test_unseen_policy_counts():
    # item 9 is rated by one user only: wherever it is held out it is unseen in train
    src = make_ratings([1, 1, 1, 2, 2, 2, 3, 3], [1, 2, 9, 1, 2, 3, 1, 3],
                       timestamps=[1, 2, 9, 1, 2, 3, 2, 1])
    ids = make_ids(src)
    n_u, n_i = len(ids.users), len(ids.items)
    drop = split(ids.ratings, n_u, n_i, Config(strategy="temporal-user", test_ratio=0.34,
                                                valid_ratio=0.0, unseen="drop"))
    # keep is the default for every strategy (explicit ones included); auto means keep
    keep = split(ids.ratings, n_u, n_i, Config(strategy="temporal-user", test_ratio=0.34,
                                                valid_ratio=0.0))
    auto = split(ids.ratings, n_u, n_i, Config(strategy="temporal-user", test_ratio=0.34,
                                                valid_ratio=0.0, unseen="auto"))
    assert keep.unseen["policy"] == auto.unseen["policy"] == "keep"
    assert drop.unseen["policy"] == "drop"
    # test: user 1 -> item 9, user 2 -> item 3, user 3 -> item 1; item 9 is unseen
    assert len(keep.test) == 3
    assert keep.unseen["test"] == {"rows": 1, "users": 0, "items": 1}
    assert drop.unseen["test"] == keep.unseen["test"] and drop.unseen["dropped_rows"] == 1
    assert len(drop.test) == 2
    item9 = int(ids.items.set_index("raw_item_id").loc[9, "item_idx"])
    assert keep.test["item_idx"].isin([item9]).any()
    assert not drop.test["item_idx"].isin([item9]).any()


def test_temporal_needs_timestamps():
    src = make_ratings([1, 2], [1, 2])
    ids = make_ids(src)
    with pytest.raises(PipelineError, match="needs timestamps.*--strategy random"):
        split(ids.ratings, 2, 2, Config(strategy="temporal-global"))


# ---- Netflix probe.txt -------------------------------------------------------------------


def _probe_data(tmp_path):
    # Netflix ids: movies 1..3, customers 6, 7, 8, 10
    src = make_ratings([6, 7, 8, 6, 7, 10, 8, 6], [1, 1, 1, 2, 2, 2, 3, 3],
                       [1, 2, 3, 4, 5, 1, 2, 3], np.arange(8) * 100)
    write_stage10(tmp_path, src, dataset="netflix", fmt="netflix")
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path)]) == 0
    probe = tmp_path / "probe.txt"
    # pairs: (1,7) rated, (2,10) rated, (2,8) not rated, (3,999) unknown customer,
    # (77,6) unknown movie, (1,7) again
    probe.write_text("1:\n7\n2:\n10\n8\n3:\n999\n77:\n6\n1:\n7\n")
    return probe


def test_probe_split(tmp_path):
    probe = _probe_data(tmp_path)
    out = tmp_path / "30_split_train_test"
    # customer 10 has no other rating: unseen in train, dropped with --unseen drop (kept by
    # default, below)
    rc = run_main(split_stage.main, ["--data-dir", str(tmp_path), "--strategy", "probe",
                                     "--probe", str(probe), "--valid-ratio", "0",
                                     "--unseen", "drop"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["sizes"] == {"train": 6, "valid": 0, "test": 1}
    assert m["unseen"]["test"] == {"rows": 1, "users": 1, "items": 0}
    rc = run_main(split_stage.main, ["--data-dir", str(tmp_path), "--strategy", "probe",
                                     "--probe", str(probe), "--valid-ratio", "0"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    d = m["details"]
    assert d["probe_pairs"] == 6 and d["unknown_pairs"] == 2
    assert d["unknown_user"] == 1 and d["unknown_item"] == 1
    assert d["duplicate_pairs"] == 1 and d["pairs_without_rating"] == 1
    assert m["sizes"] == {"train": 6, "valid": 0, "test": 2}
    users = pd.read_parquet(tmp_path / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(tmp_path / "20_make_ids" / "items.parquet")
    test = pd.read_parquet(out / "test.parquet")
    raw = set(zip(users["raw_user_id"].to_numpy()[test["user_idx"]],
                  items["raw_item_id"].to_numpy()[test["item_idx"]]))
    assert raw == {(7, 1), (10, 2)}
    assert sorted(test["rating"]) == [1.0, 2.0]


def test_probe_bad_files(tmp_path):
    _probe_data(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("1:\n7\n2:\nabc\n")
    with pytest.raises(PipelineError, match=r"bad\.txt:4: 'abc' is not a `MovieID:`"):
        read_probe(bad)
    bad.write_text("7\n1:\n")
    with pytest.raises(PipelineError, match=r"bad\.txt:1: '7' is not a `MovieID:` header"):
        read_probe(bad)
    bad.write_text("")
    with pytest.raises(PipelineError, match="is empty"):
        read_probe(bad)
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), "--strategy", "probe",
                   "--probe", str(tmp_path / "nope.txt"), check=False)
    assert p.returncode == 1 and "nope.txt does not exist" in p.stderr
    assert "Traceback" not in p.stderr
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), "--strategy", "probe",
                   check=False)
    assert p.returncode == 2 and "needs --probe PATH" in p.stderr


# ---- NCF benchmark files -----------------------------------------------------------------


@pytest.mark.shared
def test_ncf_exact_candidates(tmp_path, shared_data):
    prefix = shared_data / "ncf" / "ml-1m"
    train = write_synthetic_ncf_train(tmp_path / "ml-1m", prefix)
    write_stage10(tmp_path, train, dataset="ncf-ml-1m", fmt="ncf",
                  inputs=[str(tmp_path / "ml-1m.train.rating")])
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path)]) == 0
    assert run_main(split_stage.main, ["--data-dir", str(tmp_path), "--strategy", "ncf",
                                       "--ncf-test", str(prefix)]) == 0
    out = tmp_path / "30_split_train_test"
    m = json.loads((out / "manifest.json").read_text())
    assert m["details"]["positive_in_negatives_users"] == 156
    assert m["n_negatives"] == 99 and m["sizes"]["test"] == 6040
    assert m["unseen"]["policy"] == "keep" and m["task"] == "implicit"
    users = pd.read_parquet(tmp_path / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(tmp_path / "20_make_ids" / "items.parquet")
    test = pd.read_parquet(out / "test.parquet")
    negs = np.load(out / "test_negatives.npy")
    raw_items = items["raw_item_id"].to_numpy()
    file_rating = pd.read_csv(f"{prefix}.test.rating", sep="\t", header=None)
    file_neg = pd.read_csv(f"{prefix}.test.negative", sep="\t", header=None)
    assert np.array_equal(users["raw_user_id"].to_numpy()[test["user_idx"]], file_rating[0])
    assert np.array_equal(raw_items[test["item_idx"]], file_rating[1])
    assert np.array_equal(test["timestamp"], file_rating[3])
    # the candidates are the file's, exactly and in file order
    assert negs.dtype == np.int32 and negs.shape == (6040, 99)
    assert np.array_equal(raw_items[negs], file_neg.iloc[:, 1:].to_numpy())
    # valid: each user's latest train interaction; negatives avoid everything rated
    valid = pd.read_parquet(out / "valid.parquet")
    trainp = pd.read_parquet(out / "train.parquet")
    n_items = m["n_items"]
    allk = np.concatenate([_keys(p, n_items) for p in (trainp, valid, test)])
    assert len(np.unique(allk)) == len(allk)
    vn = np.load(out / "valid_negatives.npy")
    vk = valid["user_idx"].to_numpy(np.int64)[:, None] * n_items + vn
    assert not np.isin(vk, allk).any()
    latest = pd.concat([trainp, valid]).groupby("user_idx")["timestamp"].max()
    assert (valid.set_index("user_idx")["timestamp"] == latest[valid["user_idx"]]).all()
    # stage 40 turns them into candidates: column 0 the file's positive, then its negatives
    assert run_main(matrix_stage.main, ["--data-dir", str(tmp_path)]) == 0
    c = np.load(tmp_path / "40_make_sparse_matrix" / "test_candidates.npz")
    assert np.array_equal(raw_items[c["items"][:, 0]], file_rating[1])
    assert np.array_equal(raw_items[c["items"][:, 1:]], file_neg.iloc[:, 1:].to_numpy())
    ties = (c["items"][:, 1:] == c["items"][:, :1]).any(axis=1)
    assert int(ties.sum()) == 156


def test_ncf_bad_files(tmp_path):
    src = make_ratings([0, 0, 1, 1], [0, 1, 1, 2], timestamps=[1, 2, 3, 4])
    write_stage10(tmp_path, src, fmt="ncf")
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path)]) == 0
    pre = tmp_path / "x"
    (tmp_path / "x.test.rating").write_text("0\t2\t5\t10\n1\t0\t4\t11\n")
    (tmp_path / "x.test.negative").write_text("(0,2)\t1\n(1,0)\tzz\n")
    with pytest.raises(PipelineError, match=r"x\.test\.negative:2: field 2 is 'zz'"):
        readers.read_ncf_test(str(pre))
    (tmp_path / "x.test.negative").write_text("(0,2)\t1\n(1,2)\t1\n")
    with pytest.raises(PipelineError, match=r"x\.test\.negative:2: '\(1,2\)' but .*\(1,0\)"):
        readers.read_ncf_test(str(pre))
    (tmp_path / "x.test.negative").write_text("(0,2)\t1\n(1,0)\t7\n")
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), "--strategy", "ncf",
                   "--ncf-test", str(pre), check=False)
    assert p.returncode == 1 and "negative item 7 is not in stage 20's id space" in p.stderr
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), "--strategy", "ncf",
                   "--ncf-test", str(tmp_path / "missing"), check=False)
    assert p.returncode == 1 and "missing.test.rating not found" in p.stderr


# ---- CLI ---------------------------------------------------------------------------------


def test_help_and_missing_and_stale_upstream(tmp_path):
    h = run_script("30_split_train_test.py", "--help")
    for flag in ("--strategy", "--test-ratio", "--valid-ratio", "--seed", "--probe",
                 "--negatives", "--folds", "--fold", "--ncf-test", "--unseen"):
        assert flag in h.stdout
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), check=False)
    assert p.returncode == 1 and "python 20_make_ids.py --data-dir" in p.stderr
    assert "Traceback" not in p.stderr
    src = make_ratings([1, 2, 3], [1, 2, 3])
    write_stage10(tmp_path, src)
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path), "--min-user-ratings", "1"]) == 0
    write_stage10(tmp_path, src)  # stage 10 rebuilt after stage 20: 20 is stale
    p = run_script("30_split_train_test.py", "--data-dir", str(tmp_path), check=False)
    assert p.returncode == 1 and "stale" in p.stderr
    assert "python 20_make_ids.py --data-dir" in p.stderr and "--min-user-ratings 1" in p.stderr


def test_rank_from_end_fast_path_equals_lexsort():
    rng = np.random.default_rng(2)
    n = 5000
    pairs = np.unique(np.stack([rng.integers(0, 50, n), rng.integers(0, 300, n)], 1), axis=0)
    u, i = pairs[:, 0], pairs[:, 1]  # unique pairs in (user, item) order, as stage 20 writes
    n = len(u)
    ts = rng.integers(0, 20, n)  # many ties
    fast, counts = split_stage.rank_from_end(u, ts, i, 50)
    perm = rng.permutation(n)  # shuffled rows: the lexsort path
    slow, _ = split_stage.rank_from_end(u[perm], ts[perm], i[perm], 50)
    assert np.array_equal(fast[perm], slow)
    ref = pd.DataFrame({"u": u, "t": ts, "i": i}).sort_values(["u", "t", "i"])
    ref["rank"] = ref.groupby("u").cumcount(ascending=False)
    assert np.array_equal(fast, ref.sort_index()["rank"].to_numpy())


def test_loo_without_timestamps_is_seeded_random():
    rng = np.random.default_rng(4)
    pairs = np.unique(np.stack([rng.integers(0, 40, 800), rng.integers(0, 60, 800)], 1), axis=0)
    ids = make_ids(make_ratings(pairs[:, 0], pairs[:, 1]))
    n_u, n_i = len(ids.users), len(ids.items)
    a = split(ids.ratings, n_u, n_i, Config(strategy="loo", negatives=10, seed=1))
    b = split(ids.ratings, n_u, n_i, Config(strategy="loo", negatives=10, seed=1))
    c = split(ids.ratings, n_u, n_i, Config(strategy="loo", negatives=10, seed=2))
    assert "random" in a.details["order"] and "timestamp" not in a.test.columns
    pd.testing.assert_frame_equal(a.test, b.test)
    assert np.array_equal(a.test_negatives, b.test_negatives)
    assert not a.test.equals(c.test)
    assert len(a.test) == int((ids.users["n_ratings"] >= 3).sum())


# ---- one signature for every strategy ----------------------------------------------------


def test_strategies_dict_is_the_strategy_option_and_one_signature(tmp_path):
    field = next(f for f in dataclasses.fields(Config) if f.name == "strategy")
    assert list(field.metadata["choices"]) == list(split_stage.STRATEGIES)
    assert set(split_stage.IMPLICIT_STRATEGIES) <= set(split_stage.STRATEGIES)
    # 4 users x items 0-3 (raw id = index); the NCF files hold item 4 out, item 5 negative
    n_users, n_items = 4, 6
    u = np.repeat(np.arange(n_users), 4)
    i = np.tile(np.arange(4), n_users)
    ts = np.arange(len(u), dtype=np.int64) * 10
    r = split_stage.Ratings(u, i, ts, n_users, n_items)
    ctx = split_stage.Context(pd.DataFrame({"raw_user_id": np.arange(n_users, dtype=np.int64)}),
                              pd.DataFrame({"raw_item_id": np.arange(n_items, dtype=np.int64)}))
    probe = tmp_path / "probe.txt"
    probe.write_text("1:\n0\n2:\n3\n")  # (user 0, item 1) and (user 3, item 2)
    (tmp_path / "x.test.rating").write_text("".join(f"{k}\t4\t5\t999\n" for k in range(4)))
    (tmp_path / "x.test.negative").write_text("".join(f"({k},4)\t5\n" for k in range(4)))
    extra = {"probe": {"probe": probe}, "ncf": {"ncf_test": str(tmp_path / "x")},
             "kfold": {"folds": 2, "fold": 1}}
    for name, fn in split_stage.STRATEGIES.items():
        cfg = Config(strategy=name, test_ratio=0.25, valid_ratio=0.25, seed=3,
                     **extra.get(name, {}))
        out = fn(r, cfg, ctx)
        assert isinstance(out, split_stage.SplitOutcome), name
        assert out.part.shape == (len(u),) and out.part.dtype == np.int8, name
        assert set(np.unique(out.part)) <= {split_stage.TRAIN, split_stage.VALID,
                                            split_stage.TEST, split_stage.DROPPED}, name
        assert (out.part == split_stage.TRAIN).any() and isinstance(out.details, dict), name
        if name == "ncf":
            assert out.test["item_idx"].tolist() == [4] * 4 and out.test_negatives.shape == (4, 1)
        else:
            assert out.test is None and out.test_negatives is None
            assert (out.part == split_stage.TEST).any(), name
        if name == "probe":
            rows = np.flatnonzero(out.part == split_stage.TEST)
            assert sorted(zip(u[rows], i[rows])) == [(0, 1), (3, 2)]
        # split() dispatches to the same function
        res = split({"user_idx": u.astype(np.int32), "item_idx": i.astype(np.int32),
                     "rating": np.full(len(u), 4, np.float32), "timestamp": ts},
                    n_users, n_items, Config(strategy=name, test_ratio=0.25, valid_ratio=0.25,
                                             seed=3, negatives=1, unseen="keep",
                                             **extra.get(name, {})), ctx=ctx)
        n_test = int((out.part == split_stage.TEST).sum()) if out.test is None else len(out.test)
        assert len(res.test) == n_test, name


def test_random_holdout_is_the_permutation_draw_in_less_memory():
    """random_holdout shuffles an int32 range: the same rows as the int64 permutation it
    replaced (byte-identical splits), for a plain range and for a pool of rows."""
    from recpipe import holdout
    rng = np.random.default_rng(0)
    for n, ratio, pool in [(0, 0.1, None), (1, 0.5, None), (1000, 0.1, None), (997, 0.3, None),
                           (1000, 0.2, np.flatnonzero(rng.random(1000) < 0.9)),
                           (50, 0.5, rng.permutation(200)[:50])]:
        p = np.arange(n) if pool is None else pool
        k = int(np.floor(len(p) * ratio + 0.5))
        want = np.sort(p[np.random.default_rng([7, 1]).permutation(len(p))[:k]])
        got = holdout.random_holdout(n, ratio, np.random.default_rng([7, 1]), among=pool)
        assert got.dtype == np.int64 and np.array_equal(got, want)
    mask = rng.random(10_001) < 0.7
    got = holdout.flatnonzero_compact(mask, chunk=1000)
    assert got.dtype == np.int32 and np.array_equal(got, np.flatnonzero(mask))
