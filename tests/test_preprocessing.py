"""Stage 10: every raw format from tiny fixtures, bad input, real data, the demo source."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recpipe import demo, preprocess, readers
from recpipe.cli import PipelineError
from tests.conftest import FIXTURES, run_script

RAW = FIXTURES / "raw"
BAD = RAW / "bad"
SCRIPT = "10_preprocessing.py"


def run10(data_dir: Path, *args: str):
    """Run stage 10 in-process; the manifest, ratings and items (or None)."""
    out = preprocess.main([*args, "--data-dir", str(data_dir)])
    manifest = json.loads((out / "manifest.json").read_text())
    ratings = pd.read_parquet(out / "ratings.parquet")
    items = pd.read_parquet(out / "items.parquet") if (out / "items.parquet").exists() else None
    return manifest, ratings, items


def test_help():
    proc = run_script(SCRIPT, "--help")
    for flag in ["--input", "--format", "--columns", "--sep", "--keep-unrated", "--download",
                 "--base-url", "--data-dir", "--header", "--no-header"]:
        assert flag in proc.stdout


# --------------------------------------------------------------------------- formats (fixtures)

@pytest.mark.parametrize("args, fmt, dataset, n, users, items, scale, has_ts", [
    (["--input", str(RAW / "netflix")], "netflix", "netflix", 6, 4, 3, [1, 5], True),
    (["--input", str(RAW / "netflix" / "training_set")], "netflix", "netflix", 6, 4, 3, [1, 5], True),
    (["--input", str(RAW / "netflix" / "training_set" / "mv_0000002.txt")], "netflix", "netflix",
     2, 2, 1, [1, 5], True),
    (["--input", str(RAW / "netflix_combined")], "netflix", "netflix", 5, 4, 3, [1, 5], True),
    (["--input", str(RAW / "ml-100k")], "ml-100k", "ml-100k", 4, 3, 3, [1, 5], True),
    (["--input", str(RAW / "ml-100k" / "u.data")], "ml-100k", "ml-100k", 4, 3, 3, [1, 5], True),
    (["--input", str(RAW / "ml-1m")], "movielens-dat", "ml-1m", 3, 2, 2, [1, 5], True),
    (["--input", str(RAW / "ml-10M100K")], "movielens-dat", "ml-10m", 3, 2, 2, [0.5, 5], True),
    (["--input", str(RAW / "ml-latest-small")], "movielens-csv", "ml-latest-small", 3, 2, 2,
     [0.5, 5], True),
    (["--input", str(RAW / "anime")], "anime", "anime", 3, 3, 2, [1, 10], False),
    (["--input", str(RAW / "ncf")], "ncf", "ncf-ml-tiny", 3, 2, 2, [4, 5], True),
    (["--input", str(RAW / "csv" / "ratings.tsv")], "csv", "csv", 3, 2, 2, [1, 4.5], False),
    (["--input", str(RAW / "csv" / "plain.csv")], "csv", "csv", 3, 2, 2, [2, 5], True),
    (["--input", str(RAW / "csv" / "ratings.csv.gz")], "csv", "csv", 3, 2, 2, [3, 5], False),
    (["--input", str(RAW / "zip" / "ml-latest-small.zip")], "movielens-csv", "ml-latest-small",
     3, 2, 2, [0.5, 5], True),
    (["--input", str(RAW / "ml-100k" / "u.data"), "--format", "csv"], "csv", "csv", 4, 3, 3,
     [1, 5], True),
])
def test_formats(tmp_path, args, fmt, dataset, n, users, items, scale, has_ts):
    m, r, _ = run10(tmp_path / "data", *args)
    assert (m["format"], m["dataset"]) == (fmt, dataset)
    assert (m["n_ratings"], m["n_users"], m["n_items"]) == (n, users, items)
    assert len(r) == n and r["raw_user_id"].nunique() == users and r["raw_item_id"].nunique() == items
    assert m["rating_scale"] == scale
    assert m["has_timestamp"] is has_ts and ("timestamp" in r.columns) is has_ts
    assert r["rating"].dtype == np.float32
    if has_ts:
        assert r["timestamp"].dtype == np.int64
    assert m["command"].startswith("python 10_preprocessing.py")
    assert m["config"]["input"] == args[1]


def test_netflix_values_titles_and_midnight_dates(tmp_path):
    m, r, items = run10(tmp_path / "data", "--input", str(RAW / "netflix"))
    first = r.iloc[0]
    assert (first.raw_user_id, first.raw_item_id, first.rating) == (1488844, 1, 3.0)
    assert first.timestamp == 1125964800  # 2005-09-06 00:00 UTC
    assert (r["timestamp"] % 86400 == 0).all()
    assert r["raw_item_id"].tolist() == [1, 1, 1, 2, 2, 3]
    t = items.set_index("raw_item_id")
    assert t.loc[3, "title"] == "At Home Among Strangers, A Stranger Among His Own"
    assert t.loc[4, "title"] == "Smokey Joe's Café"
    assert pd.isna(t.loc[2, "year"]) and t.loc[1, "year"] == 2003
    assert str(items["year"].dtype) == "Int32"


def test_netflix_combined_matches_per_movie_files(tmp_path):
    _, a, _ = run10(tmp_path / "a", "--input", str(RAW / "netflix_combined"))
    assert a["raw_item_id"].tolist() == [1, 1, 2, 3, 3]
    assert a["timestamp"].iloc[3] == 942278400  # 1999-11-11, CRLF file
    # the same movies in the per-movie layout give the same rows
    ts = tmp_path / "ts" / "training_set"
    ts.mkdir(parents=True)
    (ts / "mv_0000001.txt").write_text("1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n")
    (ts / "mv_0000002.txt").write_text("2:\n2059652,4,2005-09-05\n")
    (ts / "mv_0000003.txt").write_text("3:\n822109,1,1999-11-11\n885013,2,2004-01-02\n")
    _, b, _ = run10(tmp_path / "b", "--input", str(ts))
    pd.testing.assert_frame_equal(a, b)


def test_movielens_titles(tmp_path):
    _, _, items = run10(tmp_path / "a", "--input", str(RAW / "ml-100k"))
    t = items.set_index("raw_item_id")
    assert t.loc[377, "title"] == "Misérables, Les (1995)" and t.loc[377, "year"] == 1995
    assert t.loc[267, "title"] == "unknown" and pd.isna(t.loc[267, "year"])
    _, _, items = run10(tmp_path / "b", "--input", str(RAW / "ml-1m"))
    assert items.set_index("raw_item_id").loc[73, "title"] == "Misérables, Les (1995)"
    _, r, items = run10(tmp_path / "c", "--input", str(RAW / "ml-latest-small"))
    assert items.set_index("raw_item_id").loc[29, "title"] == \
        "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert r["rating"].tolist() == [4.0, 0.5, 3.5]


def test_anime_unrated_dropped_or_kept_and_titles_unescaped(tmp_path):
    m, r, items = run10(tmp_path / "a", "--input", str(RAW / "anime"))
    assert m["n_unrated"] == 2 and m["dropped"]["unrated"] == 2 and len(r) == 3
    assert not r["rating"].isna().any()
    t = items.set_index("raw_item_id")["title"]
    assert t[9969] == "Gintama'" and t[30] == '"Bungaku Shoujo" Movie'
    m, r, _ = run10(tmp_path / "b", "--input", str(RAW / "anime"), "--keep-unrated")
    assert m["n_unrated"] == 2 and m["dropped"]["unrated"] == 0 and len(r) == 5
    assert r["rating"].isna().sum() == 2


def test_generic_csv_string_ids_names_and_dates(tmp_path):
    m, r, _ = run10(tmp_path / "a", "--input", str(RAW / "csv" / "ratings.tsv"))
    assert r["raw_user_id"].tolist() == ["u1", "u2", "u1"] and r["rating"].tolist() == [4.5, 3, 1]
    m, r, _ = run10(tmp_path / "b", "--input", str(RAW / "csv" / "custom.csv"),
                    "--columns", "reviewer,product,stars,when")
    assert r["raw_item_id"].tolist() == ["p1", "p1", "p2"]
    assert r["timestamp"].tolist() == [1577923200, 1583316000, 1640908800]
    # positions and a declared separator give the same table
    m2, r2, _ = run10(tmp_path / "c", "--input", str(RAW / "csv" / "custom.csv"),
                      "--columns", "0,1,2,3", "--sep", ";", "--header")
    pd.testing.assert_frame_equal(r, r2)
    # the first line read as data when declared so: its text rating is then an error
    with pytest.raises(PipelineError, match=r"custom.csv:1: .*stars"):
        run10(tmp_path / "d", "--input", str(RAW / "csv" / "custom.csv"), "--columns", "0,1,2",
              "--sep", ";", "--no-header")


def test_rating_scale_option_checks_ncf_and_csv(tmp_path):
    m, _, _ = run10(tmp_path / "a", "--input", str(RAW / "ncf"), "--rating-scale", "1", "5")
    assert m["rating_scale"] == [1, 5]
    with pytest.raises(PipelineError, match=r"plain.csv:3: '10,101,5,1000000002': rating 5 is "
                                            r"outside the scale \[1, 4\]"):
        run10(tmp_path / "b", "--input", str(RAW / "csv" / "plain.csv"), "--rating-scale", "1", "4")


# --------------------------------------------------------------------------- bad input

BAD_CASES = {
    "netflix no header": ([str(BAD / "netflix_no_header")],
                          ["mv_0000001.txt:1:", "'1488844,3,2005-09-06'", "MovieID:"]),
    "netflix rating out of scale": ([str(BAD / "netflix_bad_rating")],
                                    ["mv_0000002.txt:3:", "'1488844,7,2003-12-30'", "[1, 5]"]),
    "netflix bad date": ([str(BAD / "netflix_bad_date")],
                         ["mv_0000005.txt:3:", "'yesterday'", "YYYY-MM-DD"]),
    "missing field": ([str(BAD / "missing_field")],
                      ["u.data:2:", "'186\\t302\\t3'", "missing field (timestamp)"]),
    "non-numeric id": ([str(BAD / "non_numeric_id")],
                       ["ratings.dat:2:", "'abc::661::3::978302109'", "UserID 'abc' is not an integer"]),
    "non-numeric rating": ([str(BAD / "non_numeric_rating")],
                           ["ratings.csv:3:", "'1,2,good,964982704'", "rating 'good' is not a number"]),
    "rating outside scale": ([str(BAD / "out_of_scale")],
                             ["ratings.csv:4:", "'1,3,6.0,964982705'", "[0.5, 5]"]),
    "anime rating outside scale": ([str(BAD / "anime_bad")], ["rating.csv:3:", "'1,24,11'", "-1"]),
    "header-only csv": ([str(BAD / "header_only.csv")], ["header_only.csv", "'user,item,rating'",
                                                         "no data rows"]),
    "empty file": ([str(BAD / "empty.csv")], ["empty.csv", "empty file", "expected"]),
    "truncated gz": ([str(BAD / "truncated.csv.gz")], ["truncated.csv.gz", "truncated or corrupt gzip"]),
    "binary garbage": ([str(BAD / "garbage.csv")], ["garbage.csv:1:", "binary data", "expected"]),
    "unknown folder": ([str(BAD / "unknown_folder")], ["unknown_folder", "notes.txt", "expected"]),
    "nonexistent path": (["/nonexistent/ratings"], ["/nonexistent/ratings", "no such file"]),
    "wrong --format": ([str(RAW / "ml-100k"), "--format", "netflix"], ["ml-100k", "format netflix"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    args, needles = BAD_CASES[case]
    proc = run_script(SCRIPT, "--input", *args, "--data-dir", str(tmp_path / "data"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not (tmp_path / "data" / "10_preprocessing").exists()


def test_failed_run_keeps_previous_artifact(tmp_path):
    data = tmp_path / "data"
    run10(data, "--input", str(RAW / "ml-100k"))
    before = (data / "10_preprocessing" / "manifest.json").read_bytes()
    with pytest.raises(PipelineError):
        run10(data, "--input", str(BAD / "out_of_scale"))
    assert (data / "10_preprocessing" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["10_preprocessing"]  # no temp folder left


def test_located_errors_in_combined_and_many_files(tmp_path):
    f = tmp_path / "combined_data_1.txt"
    f.write_text("1:\n1,3,2005-09-06\n2:\n5,4,2005-09-05\n6,x,2005-09-05\n")
    with pytest.raises(PipelineError, match=r"combined_data_1.txt:5: '6,x,2005-09-05': rating 'x' "
                                            r"is not an integer"):
        run10(tmp_path / "d", "--input", str(f))
    f.write_text("1:\n1,3,2005-09-06\n2:\n3:\n5,4,2005-09-05\n6,4,12:30\n")
    with pytest.raises(PipelineError, match=r"combined_data_1.txt:6: '6,4,12:30': bad `MovieID:`"):
        run10(tmp_path / "d", "--input", str(f))
    f.write_text("1:\n1,3,2005-09-06\n2:\n3:\r\n5,4,2005-09-05\r\n")  # movie 2 has no rows
    _, r, _ = run10(tmp_path / "d", "--input", str(f))
    assert r["raw_item_id"].tolist() == [1, 3] and r["raw_user_id"].tolist() == [1, 5]
    ts = tmp_path / "training_set"
    ts.mkdir()
    for k in range(1, 40):
        (ts / f"mv_{k:07d}.txt").write_text(f"{k}:\n" + "".join(f"{u},3,2005-01-01\n" for u in range(k)))
    (ts / "mv_0000020.txt").write_text("20:\n1,3,2005-01-01\n\n2,4,2005-01-01\n")
    with pytest.raises(PipelineError, match=r"mv_0000020.txt:3: '': empty line"):
        run10(tmp_path / "e", "--input", str(ts))
    (ts / "mv_0000020.txt").write_text("20:\n1,3,2005-01-01\n2,0,2005-01-01\n")
    with pytest.raises(PipelineError, match=r"mv_0000020.txt:3: '2,0,2005-01-01': rating 0 is outside"):
        run10(tmp_path / "f", "--input", str(ts))


def test_netflix_reader_pipelined_chunks(tmp_path):
    """Many small chunks: rows stream to the sink in order; an error in a later chunk is located."""
    ts = tmp_path / "training_set"
    ts.mkdir()
    for k in range(1, 61):
        nl = "\r\n" if k % 2 else "\n"  # CRLF and LF files mixed
        body = "".join(f"{1000 + u},{1 + (u + k) % 5},2004-02-{1 + u % 28:02d}{nl}" for u in range(k))
        (ts / f"mv_{k:07d}.txt").write_text(f"{k}:{nl}{body}", newline="")
    files = sorted(ts.iterdir())
    seen = []
    assert readers.read_netflix_files(files, sink=seen.append, chunk_bytes=500) is None
    table = pa.concat_tables(seen)
    assert len(seen) > 10 and table.num_rows == 60 * 61 // 2
    assert table.equals(readers.read_netflix_files(files))  # no sink: one table, same rows
    item = table.column("raw_item_id").to_numpy()
    assert np.array_equal(item, np.repeat(np.arange(1, 61), np.arange(1, 61)))
    assert table.column("timestamp").to_numpy()[0] == 1075593600  # 2004-02-01 UTC
    (ts / "mv_0000050.txt").write_text("50:\n1000,3,2004-02-01\n1001,3,2004-02-30\n")
    with pytest.raises(PipelineError, match=r"mv_0000050.txt:3: '1001,3,2004-02-30': date "):
        readers.read_netflix_files(files, chunk_bytes=500)


def test_netflix_titles_option(tmp_path):
    m, _, items = run10(tmp_path / "d", "--input", str(RAW / "netflix_combined"),
                        "--titles", str(RAW / "netflix" / "movie_titles.txt"))
    assert m["has_titles"] and len(items) == 4
    with pytest.raises(SystemExit):  # argparse-level: --rating-scale needs LO HI
        run10(tmp_path / "e", "--input", str(RAW / "ncf"), "--rating-scale", "5", "1")
    with pytest.raises(PipelineError, match="--titles .*: no such file"):
        run10(tmp_path / "f", "--input", str(RAW / "netflix_combined"), "--titles", "nope.txt")


def test_corrupt_zip_and_gz_member(tmp_path):
    z = tmp_path / "ratings.zip"
    z.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(PipelineError, match="ratings.zip: not a valid zip archive"):
        run10(tmp_path / "d", "--input", str(z))
    ts = tmp_path / "nf" / "training_set"
    ts.mkdir(parents=True)
    (ts / "mv_0000001.txt.gz").write_bytes(gzip.compress(b"1:\n1,3,2005-01-01\n" * 50)[:-30])
    with pytest.raises(PipelineError, match=r"mv_0000001.txt.gz: truncated or corrupt gzip"):
        run10(tmp_path / "d", "--input", str(ts.parent))


# --------------------------------------------------------------------------- real data

@pytest.mark.shared
def test_real_ml100k(shared_data, tmp_path):
    m, r, items = run10(tmp_path / "d", "--input", str(shared_data / "movielens" / "ml-100k"))
    assert (m["n_ratings"], m["n_users"], m["n_items"]) == (100_000, 943, 1_682)
    assert m["rating_scale"] == [1, 5] and r["rating"].between(1, 5).all()
    t = items.set_index("raw_item_id")["title"]
    assert t[543] == "Misérables, Les (1995)"
    assert t[1104] == "C'est arrivé près de chez vous (1992)"


@pytest.mark.shared
def test_real_ml_latest_small(shared_data, tmp_path):
    m, _, items = run10(tmp_path / "d", "--input", str(shared_data / "movielens" / "ml-latest-small"))
    assert (m["n_ratings"], m["n_users"], m["n_items"]) == (100_836, 610, 9_724)
    assert m["dataset"] == "ml-latest-small" and len(items) == 9_742
    assert items.set_index("raw_item_id")["title"][73] == "Misérables, Les (1995)"


@pytest.mark.shared
def test_real_netflix(shared_data, tmp_path):
    m, r, items = run10(tmp_path / "d", "--input", str(shared_data / "netflix"))
    assert m["n_ratings"] == 20_352 and m["n_items"] == 10
    per_movie = r.groupby("raw_item_id").size().tolist()
    assert per_movie == [547, 145, 2012, 142, 1140, 1019, 93, 14910, 95, 249]
    t = items.set_index("raw_item_id")
    assert len(items) == 17_770 and items["year"].isna().sum() == 7
    assert t.loc[6483, "title"] == "Smokey Joe's Café"
    assert t.loc[72, "title"] == "At Home Among Strangers, A Stranger Among His Own"
    assert pd.isna(t.loc[4388, "year"])
    assert (r["timestamp"] % 86400 == 0).all()


@pytest.mark.shared
def test_real_anime_titles_unescaped(shared_data, tmp_path):
    folder = tmp_path / "anime"
    folder.mkdir()
    (folder / "rating.csv").write_text("user_id,anime_id,rating\n1,9969,10\n2,32281,-1\n")
    (folder / "anime.csv").symlink_to(shared_data / "anime" / "anime.csv")
    m, _, items = run10(tmp_path / "d", "--input", str(folder))
    assert len(items) == 12_294 and m["n_unrated"] == 1
    t = items.set_index("raw_item_id")["title"]
    assert t[9969] == "Gintama'"
    assert not items["title"].str.contains("&#039;|&quot;|&amp;", regex=True).any()


# --------------------------------------------------------------------------- demo

def test_demo_generation_is_deterministic():
    spec = demo.DemoSpec(seed=3, n_users=300, n_items=120, n_ratings=6000)
    a, b = demo.generate(spec), demo.generate(spec)
    for k in ["user", "item", "stars", "day"]:
        assert np.array_equal(a[k], b[k])
    c = demo.generate(demo.DemoSpec(seed=4, n_users=300, n_items=120, n_ratings=6000))
    assert not np.array_equal(a["stars"], c["stars"])
    assert abs(len(a["item"]) - 6000) <= 60
    # no duplicate (user, item) pairs, every user has >= 5 ratings
    assert len(np.unique(a["user"] * 1000 + a["item"])) == len(a["item"])
    assert np.bincount(np.unique(a["user"], return_inverse=True)[1]).min() >= 5


def test_demo_default_size_and_distribution(tmp_path):
    data = tmp_path / "data"
    m, r, items = run10(data, "--input", "demo")
    assert m["dataset"] == "demo" and m["format"] == "netflix"
    assert 590_000 <= m["n_ratings"] <= 610_000
    assert (m["n_users"], m["n_items"]) == (6000, 1500) and len(items) == 1500
    assert abs(r["rating"].mean() - 3.6) < 0.05
    shares = r["rating"].value_counts(normalize=True).sort_index().to_numpy()
    assert np.allclose(shares, demo.STAR_SHARES, atol=0.005)
    per_item = r.groupby("raw_item_id").size()
    assert per_item.max() > 20 * per_item.median()  # long-tailed popularity
    per_user = r.groupby("raw_user_id").size()
    assert per_user.max() > 5 * per_user.median()   # long-tailed activity
    assert r["timestamp"].min() >= 942278400 and r["timestamp"].max() <= 1135987200
    # a second run reuses the files; the same seed gives the same ratings
    mv1 = data / "raw" / "demo" / "training_set" / "mv_0000001.txt"
    stamp = mv1.stat().st_mtime_ns
    _, r2, _ = run10(tmp_path / "data", "--format", "demo")
    assert mv1.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(r, r2)
    shutil.rmtree(data / "raw")
    _, r3, _ = run10(tmp_path / "data", "--input", "demo")
    pd.testing.assert_frame_equal(r, r3)
