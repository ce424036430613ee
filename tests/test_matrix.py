"""Stage 40: CSR matrices round-trip to the split parts; candidates; real ML-100K 20->30->40."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recpipe import ids as ids_stage, matrix as matrix_stage, split as split_stage
from recpipe.cli import run_main
from stage_fixtures import make_ratings, write_ml100k_stage10, write_stage10
from conftest import run_script


def _check_matrices(data_dir):
    s30 = data_dir / "30_split_train_test"
    s40 = data_dir / "40_make_sparse_matrix"
    m30 = json.loads((s30 / "manifest.json").read_text())
    m40 = json.loads((s40 / "manifest.json").read_text())
    shape = (m30["n_users"], m30["n_items"])
    assert (m40["n_users"], m40["n_items"]) == shape
    for name in ("train", "valid", "test"):
        df = pd.read_parquet(s30 / f"{name}.parquet")
        ex = sp.load_npz(s40 / f"{name}.npz")
        im = sp.load_npz(s40 / f"{name}_implicit.npz")
        for mat in (ex, im):
            assert mat.format == "csr" and mat.shape == shape and mat.dtype == np.float32
            assert mat.has_sorted_indices
        rated = df[df["rating"].notna()]
        assert ex.nnz == len(rated) == m40["nnz"][name]
        assert im.nnz == len(df) == m40["nnz"][f"{name}_implicit"]
        assert (im.data == 1.0).all()
        # values round-trip: the matrix entry of every row is its rating
        got = np.asarray(ex[rated["user_idx"].to_numpy(), rated["item_idx"].to_numpy()]).ravel()
        assert np.array_equal(got, rated["rating"].to_numpy())
        coo = ex.tocoo()
        back = pd.DataFrame({"user_idx": coo.row, "item_idx": coo.col, "rating": coo.data})
        want = rated[["user_idx", "item_idx", "rating"]].sort_values(["user_idx", "item_idx"])
        assert np.array_equal(back[["user_idx", "item_idx"]].to_numpy(),
                              want[["user_idx", "item_idx"]].to_numpy())
    train = pd.read_parquet(s30 / "train.parquet")
    assert m40["global_mean"] == pytest.approx(float(train["rating"].mean()), rel=1e-6)
    return m30, m40


def test_loo_matrices_and_candidates(tmp_path):
    rng = np.random.default_rng(5)
    pairs = np.unique(np.stack([rng.integers(0, 80, 3000), rng.integers(0, 150, 3000)], 1), axis=0)
    r = rng.integers(1, 6, len(pairs)).astype(np.float32)
    r[::17] = np.nan  # interactions kept without a rating
    src = make_ratings(pairs[:, 0] + 100, pairs[:, 1] + 500, r,
                       rng.integers(0, 10**6, len(pairs)))
    write_stage10(tmp_path, src)
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path)]) == 0
    assert run_main(split_stage.main, ["--data-dir", str(tmp_path), "--strategy", "loo",
                                       "--negatives", "20"]) == 0
    assert run_main(matrix_stage.main, ["--data-dir", str(tmp_path)]) == 0
    m30, m40 = _check_matrices(tmp_path)
    assert m40["task"] == "implicit" and m40["n_negatives"] == 20
    assert m40["nnz"]["train"] < m40["nnz"]["train_implicit"]  # NaN rows only in implicit
    s30, s40 = tmp_path / "30_split_train_test", tmp_path / "40_make_sparse_matrix"
    for name in ("valid", "test"):
        c = np.load(s40 / f"{name}_candidates.npz")
        part = pd.read_parquet(s30 / f"{name}.parquet")
        negs = np.load(s30 / f"{name}_negatives.npy")
        assert c["users"].dtype == np.int32 and c["items"].dtype == np.int32
        assert c["items"].shape == (len(part), 21)
        assert np.array_equal(c["users"], part["user_idx"])
        assert np.array_equal(c["items"][:, 0], part["item_idx"])
        assert np.array_equal(c["items"][:, 1:], negs)
        # the positive is never among the sampled negatives
        assert not (c["items"][:, 1:] == c["items"][:, :1]).any()
    assert m40["upstream"].keys() == {"30_split_train_test"}
    assert m40["command"] == f"python 40_make_sparse_matrix.py --data-dir {tmp_path}"


@pytest.mark.shared
def test_ml100k_through_20_30_40(tmp_path, shared_data):
    write_ml100k_stage10(tmp_path, shared_data)
    d = str(tmp_path)
    run_script("20_make_ids.py", "--data-dir", d)
    m20 = json.loads((tmp_path / "20_make_ids" / "manifest.json").read_text())
    assert (m20["n_ratings"], m20["n_users"], m20["n_items"]) == (100_000, 943, 1_682)
    assert m20["duplicates"]["removed_rows"] == 0
    items = pd.read_parquet(tmp_path / "20_make_ids" / "items.parquet")
    assert items.loc[0, "title"] == "Toy Story (1995)" and items.loc[0, "year"] == 1995
    run_script("30_split_train_test.py", "--data-dir", d, "--strategy", "random", "--seed", "1")
    p = run_script("40_make_sparse_matrix.py", "--data-dir", d)
    assert "next: python 60_train.py" in p.stderr
    m30, m40 = _check_matrices(tmp_path)
    sizes = m30["sizes"]
    assert sum(sizes.values()) + m30["unseen"]["dropped_rows"] == 100_000
    # --unseen keep (the default): the test ratings unseen in train stay in test
    assert sizes["test"] == 10_000 and m30["unseen"]["dropped_rows"] == 0
    assert (m40["n_users"], m40["n_items"]) == (943, 1_682)
    # a random split serves either task (stage 60 decides, from the model family): null
    assert m40["task"] is None and m40["rating_scale"] == [1.0, 5.0]
    assert abs(m40["rating_std"] - 1.12) < 0.02          # ML-100K's train ratings
    assert 3.4 < m40["global_mean"] < 3.7
    assert m40["dataset"] == "ml-100k"
    # rebuilding stage 30 makes stage 40 stale: stage 60 would be told to rerun 40
    run_script("30_split_train_test.py", "--data-dir", d, "--strategy", "loo")
    p = run_script("40_make_sparse_matrix.py", "--data-dir", d, check=False)
    assert p.returncode == 0  # 40 reads a fresh 30
    run_script("20_make_ids.py", "--data-dir", d, "--min-user-ratings", "25")
    p = run_script("40_make_sparse_matrix.py", "--data-dir", d, check=False)
    assert p.returncode == 1 and "stale" in p.stderr and "Traceback" not in p.stderr
    assert "python 30_split_train_test.py --data-dir" in p.stderr and "--strategy loo" in p.stderr


def test_help_and_missing_upstream(tmp_path):
    h = run_script("40_make_sparse_matrix.py", "--help")
    assert "--data-dir" in h.stdout and "CSR" in h.stdout
    p = run_script("40_make_sparse_matrix.py", "--data-dir", str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"python 30_split_train_test.py --data-dir {tmp_path}" in p.stderr


def test_to_csr_same_matrix_from_sorted_and_shuffled_rows():
    rng = np.random.default_rng(1)
    keys = np.sort(rng.choice(40 * 30, 300, replace=False))
    u, i = (keys // 30).astype(np.int32), (keys % 30).astype(np.int32)
    r = rng.integers(1, 6, len(keys)).astype(np.float32)
    a = matrix_stage.to_csr(u, i, r, 40, 30)
    perm = rng.permutation(len(keys))
    b = matrix_stage.to_csr(u[perm].astype(np.int64), i[perm], r[perm], 40, 30)
    for m in (a, b):
        assert m.indices.dtype == np.int32 and m.indptr.dtype == np.int32 and m.has_sorted_indices
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data, b.data)
    with pytest.raises(matrix_stage.PipelineError, match="occurs twice"):
        matrix_stage.to_csr(np.r_[u, u[:1]], np.r_[i, i[:1]], np.r_[r, r[:1]], 40, 30)
