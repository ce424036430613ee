"""Stage 20: contiguous deterministic ids, both-way maps, duplicates, filters, CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from recpipe.cli import PipelineError
from recpipe.ids import make_ids
from stage_fixtures import make_ratings, write_stage10
from conftest import run_script


def _random_ratings(seed=0, n=3000, string_ids=False):
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, 200, n), rng.integers(0, 300, n)], 1), axis=0)
    u = pairs[:, 0] * 7919 + 13  # sparse, unordered raw ids
    i = pairs[:, 1] * 104729 + 5
    if string_ids:
        u = np.array([f"user-{x}" for x in u])
        i = np.array([f"item-{x}" for x in i])
    r = rng.integers(1, 6, len(pairs)).astype(np.float32)
    t = rng.integers(0, 10**9, len(pairs))
    return make_ratings(u, i, r, t)


@pytest.mark.parametrize("string_ids", [False, True])
def test_round_trip_raw_idx_raw(string_ids):
    src = _random_ratings(string_ids=string_ids)
    res = make_ids(src)
    out = res.ratings
    assert out["user_idx"].dtype == np.int32 and out["item_idx"].dtype == np.int32
    assert out["rating"].dtype == np.float32 and out["timestamp"].dtype == np.int64
    # contiguous: the maps' row i holds idx i, and every idx is used
    assert (res.users["user_idx"].to_numpy() == np.arange(len(res.users))).all()
    assert (res.items["item_idx"].to_numpy() == np.arange(len(res.items))).all()
    assert set(out["user_idx"]) == set(range(len(res.users)))
    assert set(out["item_idx"]) == set(range(len(res.items)))
    # sorted by raw id; raw -> idx -> raw gives the input back
    assert res.users["raw_user_id"].is_monotonic_increasing
    assert res.items["raw_item_id"].is_monotonic_increasing
    back = pd.DataFrame({
        "raw_user_id": res.users["raw_user_id"].to_numpy()[out["user_idx"].to_numpy()],
        "raw_item_id": res.items["raw_item_id"].to_numpy()[out["item_idx"].to_numpy()],
        "rating": out["rating"].to_numpy(), "timestamp": out["timestamp"].to_numpy()})
    key = ["raw_user_id", "raw_item_id"]
    a = src.sort_values(key).reset_index(drop=True)
    b = back.sort_values(key).reset_index(drop=True)
    assert (a[key].astype(str).to_numpy() == b[key].astype(str).to_numpy()).all()
    assert np.array_equal(a["rating"].to_numpy(), b["rating"].to_numpy())
    assert np.array_equal(a["timestamp"].to_numpy(), b["timestamp"].to_numpy())
    # raw -> idx through the map
    lookup = pd.Index(res.users["raw_user_id"]).get_indexer(src["raw_user_id"])
    assert (lookup >= 0).all()
    assert res.users["raw_user_id"].dtype == src["raw_user_id"].dtype
    # n_ratings in the maps are the counts
    assert np.array_equal(res.users["n_ratings"].to_numpy(),
                          np.bincount(out["user_idx"], minlength=len(res.users)))


def test_ids_do_not_depend_on_file_order():
    src = _random_ratings(seed=1)
    a = make_ids(src)
    shuffled = src.sample(frac=1.0, random_state=7).reset_index(drop=True)
    b = make_ids(shuffled)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    # numeric, not lexicographic, order for integer ids
    c = make_ids(make_ratings([10, 9, 100], [1, 1, 1]))
    assert c.users["raw_user_id"].tolist() == [9, 10, 100]


def _dups():
    # pair (1, 10) three times, (2, 10) twice, (1, 20) once
    return make_ratings([1, 1, 2, 1, 2, 1], [10, 10, 10, 10, 10, 20],
                        [1.0, 2.0, 3.0, 4.0, 5.0, 1.0],
                        [100, 300, 50, 200, 50, 10])


def _value(res, u, i, col="rating"):
    r = res.ratings
    uu = res.users.set_index("raw_user_id")["user_idx"][u]
    ii = res.items.set_index("raw_item_id")["item_idx"][i]
    return r[(r.user_idx == uu) & (r.item_idx == ii)][col].tolist()


def test_duplicates_latest_first_mean_and_count():
    res = make_ids(_dups(), duplicates="latest")
    assert res.stats["duplicates"] == {**res.stats["duplicates"], "removed_rows": 3,
                                       "duplicated_pairs": 2}
    assert len(res.ratings) == 3
    assert _value(res, 1, 10) == [2.0]  # timestamp 300 is the latest
    assert _value(res, 2, 10) == [5.0]  # equal timestamps: last in file order
    res = make_ids(_dups(), duplicates="first")
    assert _value(res, 1, 10) == [1.0]  # timestamp 100 is the earliest
    assert _value(res, 2, 10) == [3.0]  # equal timestamps: first in file order
    res = make_ids(_dups(), duplicates="mean")
    assert _value(res, 1, 10) == [pytest.approx(7 / 3)]
    assert _value(res, 1, 10, "timestamp") == [300]
    assert _value(res, 2, 10) == [4.0]
    # without timestamps: file order decides
    nots = _dups().drop(columns="timestamp")
    assert _value(make_ids(nots, duplicates="latest"), 1, 10) == [4.0]
    assert _value(make_ids(nots, duplicates="first"), 1, 10) == [1.0]
    with pytest.raises(PipelineError, match=r"3 duplicate .* raw_user_id 1 raw_item_id 10 .*"
                                            r"--duplicates latest"):
        make_ids(_dups(), duplicates="error")


def test_mean_ignores_missing_ratings():
    src = make_ratings([1, 1, 1], [5, 5, 6], [np.nan, 3.0, np.nan], [1, 2, 3])
    res = make_ids(src, duplicates="mean")
    assert _value(res, 1, 5) == [3.0]
    assert np.isnan(_value(res, 1, 6)[0])


def test_min_counts_one_pass_and_kcore():
    # user 1: items a,b,c; user 2: items a,b; user 3: item c only; item d rated once by 2
    src = make_ratings([1, 1, 1, 2, 2, 3, 2], ["a", "b", "c", "a", "b", "c", "d"])
    one = make_ids(src, min_user_ratings=2, min_item_ratings=2)
    # one pass: user 3 (1 rating) and item d (1 rating) dropped, both counted before the pass
    assert one.users["raw_user_id"].tolist() == [1, 2]
    assert one.items["raw_item_id"].tolist() == ["a", "b", "c"]
    assert one.stats["filters"]["passes"] == 1 and one.stats["filters"]["dropped_ratings"] == 2
    # item c now has 1 rating: the iterative k-core drops it too
    k = make_ids(src, min_user_ratings=2, min_item_ratings=2, kcore=True)
    assert k.items["raw_item_id"].tolist() == ["a", "b"]
    assert k.stats["filters"]["passes"] >= 2
    assert (k.users["n_ratings"] >= 2).all() and (k.items["n_ratings"] >= 2).all()
    with pytest.raises(PipelineError, match="no ratings left"):
        make_ids(src, min_user_ratings=10)


def test_titles_carried_from_stage10_items():
    src = make_ratings([1, 2], [7, 3])
    meta = pd.DataFrame({"raw_item_id": np.array([3, 7, 99], np.int64),
                         "title": pd.array(["Amélie, Le", "Se7en", "Unrated"], "string"),
                         "year": pd.array([2001, None, 1999], "Int32")})
    res = make_ids(src, items_meta=meta)
    assert res.items["title"].tolist() == ["Amélie, Le", "Se7en"]
    assert res.items["year"].tolist() == [2001, pd.NA]
    assert str(res.items["year"].dtype) == "Int32"
    assert res.stats["n_items_with_title"] == 2


def test_script_duplicates_manifest_and_error(tmp_path):
    write_stage10(tmp_path, _dups())
    run_script("20_make_ids.py", "--data-dir", str(tmp_path))
    m = json.loads((tmp_path / "20_make_ids" / "manifest.json").read_text())
    assert m["duplicates"]["policy"] == "latest" and m["duplicates"]["removed_rows"] == 3
    assert (m["n_users"], m["n_items"], m["n_ratings"]) == (2, 2, 3)
    assert m["upstream"].keys() == {"10_preprocessing"}
    assert m["command"].startswith("python 20_make_ids.py --data-dir")
    assert m["dataset"] == "fixture" and m["rating_scale"] == [1.0, 5.0] and m["has_timestamp"]
    before = (tmp_path / "20_make_ids" / "manifest.json").read_bytes()
    p = run_script("20_make_ids.py", "--data-dir", str(tmp_path), "--duplicates", "error",
                   check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--duplicates latest" in p.stderr and "raw_user_id 1" in p.stderr
    # the failed run left the previous artifact as it was
    assert (tmp_path / "20_make_ids" / "manifest.json").read_bytes() == before


def test_script_missing_upstream_and_help(tmp_path):
    p = run_script("20_make_ids.py", "--data-dir", str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "python 10_preprocessing.py" in p.stderr
    h = run_script("20_make_ids.py", "--help")
    for flag in ("--min-user-ratings", "--min-item-ratings", "--kcore", "--duplicates"):
        assert flag in h.stdout


@pytest.mark.parametrize("policy", ["latest", "first", "mean"])
@pytest.mark.parametrize("with_ts", [True, False])
def test_duplicates_match_a_pandas_reference(policy, with_ts):
    rng = np.random.default_rng(11)
    n = 4000  # 30 x 20 pairs: many duplicates, many timestamp ties
    src = make_ratings(rng.integers(0, 30, n), rng.integers(0, 20, n),
                       rng.integers(1, 6, n), rng.integers(0, 5, n) if with_ts else None)
    res = make_ids(src, duplicates=policy)
    ref = src.assign(pos=np.arange(n))
    key = ["raw_user_id", "raw_item_id"]
    order = key + (["timestamp", "pos"] if with_ts else ["pos"])
    ref = ref.sort_values(order)
    if policy == "mean":
        want = ref.groupby(key, as_index=False).agg(rating=("rating", "mean"))
    else:
        want = ref.drop_duplicates(key, keep="last" if policy == "latest" else "first")
    want = want.sort_values(key).reset_index(drop=True)
    got = res.ratings
    assert res.stats["duplicates"]["removed_rows"] == n - len(want)
    assert np.array_equal(res.users["raw_user_id"].to_numpy()[got["user_idx"]],
                          want["raw_user_id"].to_numpy())
    assert np.array_equal(res.items["raw_item_id"].to_numpy()[got["item_idx"]],
                          want["raw_item_id"].to_numpy())
    assert np.allclose(got["rating"].to_numpy(), want["rating"].to_numpy())
    if with_ts and policy != "mean":
        assert np.array_equal(got["timestamp"].to_numpy(), want["timestamp"].to_numpy())


def _id_kinds(x):
    """The same ids four ways, all in the same order: small non-negative integers (the
    lookup-table path), negative and huge integers and zero-padded strings (pd.factorize)."""
    x = np.asarray(x)
    return {"dense": x, "negative": x - 10**6, "huge": x + 2**40,
            "string": np.array([f"id-{v:06d}" for v in x])}


@pytest.mark.parametrize("policy", ["latest", "first", "mean"])
@pytest.mark.parametrize("with_ts", [True, False])
def test_id_paths_and_sort_paths_agree(monkeypatch, policy, with_ts):
    import recpipe.ids as ids
    rng = np.random.default_rng(5)
    n = 5000  # many duplicates and timestamp ties; some missing ratings
    u, i = rng.integers(0, 60, n) * 3 + 1, rng.integers(0, 40, n) * 7
    r = rng.integers(1, 6, n).astype(np.float32)
    r[rng.random(n) < 0.05] = np.nan
    t = rng.integers(0, 4, n) if with_ts else None
    runs = {}
    for (ku, uu), (ki, ii) in zip(_id_kinds(u).items(), _id_kinds(i).items()):
        for pack in (63, 0):  # 0: the stable-argsort fallback
            monkeypatch.setattr(ids, "PACK_BITS", pack)
            for filt in ((1, 1, False), (3, 2, True)):
                res = make_ids(make_ratings(uu, ii, r, t), duplicates=policy,
                               min_user_ratings=filt[0], min_item_ratings=filt[1],
                               kcore=filt[2])
                runs[ku, pack, filt] = res
    # the dense path is taken only for the small non-negative ids
    ref = {filt: runs["dense", 63, filt] for filt in ((1, 1, False), (3, 2, True))}
    for (kind, pack, filt), res in runs.items():
        pd.testing.assert_frame_equal(res.ratings, ref[filt].ratings)
        assert res.stats == ref[filt].stats
        assert res.users["n_ratings"].tolist() == ref[filt].users["n_ratings"].tolist()
        want_u = _id_kinds(ref[filt].users["raw_user_id"].to_numpy())[kind]
        assert res.users["raw_user_id"].to_numpy().tolist() == want_u.tolist()
    monkeypatch.setattr(ids, "DENSE_SLACK", -(10**9))  # force pd.factorize for small ids too
    forced = make_ids(make_ratings(u, i, r, t), duplicates=policy)
    pd.testing.assert_frame_equal(forced.ratings, ref[1, 1, False].ratings)
    pd.testing.assert_frame_equal(forced.users, ref[1, 1, False].users)
    pd.testing.assert_frame_equal(forced.items, ref[1, 1, False].items)


@pytest.mark.parametrize("pack", [63, 0])
def test_duplicates_error_names_the_same_rows_on_both_sort_paths(monkeypatch, pack):
    import recpipe.ids as ids
    monkeypatch.setattr(ids, "PACK_BITS", pack)
    src = make_ratings([5, 3, 3, 9, 3, 5], [2, 8, 1, 1, 8, 2])  # (3, 8) at rows 1, 4; (5, 2)
    with pytest.raises(PipelineError, match=r"2 duplicate .* in 2 pairs, e\.g\. raw_user_id 3 "
                                            r"raw_item_id 8 at rows 1 and 4 "):
        make_ids(src, duplicates="error")
    strs = make_ratings(["b", "a", "a"], ["x", "y", "y"])
    with pytest.raises(PipelineError, match=r"raw_user_id 'a' raw_item_id 'y' at rows 1 and 2"):
        make_ids(strs, duplicates="error")
