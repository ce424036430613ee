"""bench/bench_vs_implicit.py: the peer is scored by our protocol (hand-computed HR/NDCG from
given factors, the refit matrix, the selection rule) and, when `implicit` is installed, end to
end on a tiny synthetic leave-one-out split."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import ROOT
from recpipe import ids, matrix, split
from recpipe.cli import PipelineError
from recpipe.dataset import load_data
from stage_fixtures import make_ratings, write_stage10


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_implicit",
                                                  ROOT / "bench" / "bench_vs_implicit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_implicit"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


@pytest.fixture(scope="module")
def loo_dir(tmp_path_factory) -> Path:
    """Stages 10 (written directly) to 40, loo with 20 negatives, on 100 users x 60 items."""
    d = tmp_path_factory.mktemp("vs_implicit")
    rng = np.random.default_rng(0)
    n_users, n_items = 100, 60
    key = np.unique(rng.integers(0, n_users * n_items, 2500))
    u, i = key // n_items, key % n_items
    write_stage10(d, make_ratings(u, i, timestamps=rng.integers(0, 10**6, len(key))))
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--strategy", "loo", "--negatives", "20"])
    matrix.main(["--data-dir", str(d)])
    return d


# ---------------------------------------------------------------- scoring from given factors

def _one_dim_split():
    """Factors of dimension 1: every user is [1], so a candidate's score is its item's factor.
    Four users, 12 negatives each (item ids 1..12), the positive is item 0 with a per-user
    item table, so each row is built by giving its items their scores."""
    pos_scores = [0.5, 0.05, 0.3, 0.3]
    neg_scores = [
        [0.9, 0.8, 0.7] + [0.1] * 9,             # 3 ahead -> rank 3: hit, 1 / log2(5)
        [0.9] * 11 + [0.01],                     # 11 ahead -> miss
        [0.3] * 9 + [0.1] * 3,                   # 9 ties count against it -> rank 9: hit
        [0.3] * 10 + [0.1] * 2,                  # 10 ties -> rank 10: miss
    ]
    n_users, per = len(pos_scores), 13
    item_factors = np.zeros((n_users * per, 1), dtype=np.float32)
    items = np.zeros((n_users, per), dtype=np.int64)
    for u in range(n_users):
        ids_u = np.arange(u * per, (u + 1) * per)
        items[u] = ids_u
        item_factors[ids_u, 0] = [pos_scores[u], *neg_scores[u]]
    users = np.arange(n_users)
    user_factors = np.ones((n_users, 1), dtype=np.float32)
    return user_factors, item_factors, users, items


def test_scores_are_the_dot_products_of_the_factor_rows():
    rng = np.random.default_rng(1)
    uf = rng.normal(size=(5, 3)).astype(np.float32)
    vf = rng.normal(size=(7, 3)).astype(np.float32)
    users = np.array([4, 0, 2])
    items = np.array([[1, 2, 3], [6, 5, 0], [0, 0, 4]])
    got = bench.candidate_scores(uf, vf, users, items).numpy()
    want = np.einsum("rk,rck->rc", uf[users], vf[items])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_hr_and_ndcg_from_given_factors_match_hand_computed_values():
    uf, vf, users, items = _one_dim_split()
    fit = sp.csr_matrix((len(users), vf.shape[0]), dtype=np.float32)
    m, rows, counts = bench.score_part(uf, vf, users, items, fit, intervals=True)
    hr = [1.0, 0.0, 1.0, 0.0]
    ndcg = [1 / math.log2(3 + 2), 0.0, 1 / math.log2(9 + 2), 0.0]
    np.testing.assert_allclose(rows["hr@10"], hr)
    np.testing.assert_allclose(rows["ndcg@10"], ndcg, rtol=1e-6)
    assert m["hr@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(np.mean(ndcg), rel=1e-6)
    # the interval is our metrics.json one: mean +- 1.96 std / sqrt(n), clipped to [0, 1]
    h = 1.959963984540054 * np.std(hr, ddof=1) / 2
    assert m["hr@10_n"] == 4
    assert m["hr@10_ci"] == pytest.approx([max(0.0, 0.5 - h), min(1.0, 0.5 + h)])
    assert counts["users_scored"] == 4 and counts["users_skipped"] == 0
    assert counts["users_with_a_negative_tied_to_the_positive"] == 2
    # nothing was fitted: every user and positive is cold
    assert counts["users_without_fit_interactions"] == 4
    assert counts["positives_without_fit_interactions"] == 4


def test_a_negative_repeating_the_positive_is_dropped_not_tied():
    uf, vf, users, items = _one_dim_split()
    items = items.copy()
    items[3, 1:11] = items[3, 0]          # user 3's ten tied negatives are its positive again
    fit = sp.csr_matrix((len(users), vf.shape[0]), dtype=np.float32)
    _, rows, counts = bench.score_part(uf, vf, users, items, fit)
    assert rows["hr@10"][3] == 1.0 and rows["ndcg@10"][3] == 1.0
    assert counts["negative_columns_repeating_the_positive"] == 10


def test_non_finite_scores_raise_instead_of_counting_as_hits():
    uf, vf, users, items = _one_dim_split()
    vf = vf.copy()
    vf[items[2, 0]] = np.nan
    fit = sp.csr_matrix((len(users), vf.shape[0]), dtype=np.float32)
    with pytest.raises(FloatingPointError, match="1 of 4 candidate rows"):
        bench.score_part(uf, vf, users, items, fit)


def test_fit_matrix_counts_flag_positives_and_negatives_seen_in_fitting():
    uf, vf, users, items = _one_dim_split()
    fit = sp.lil_matrix((len(users), vf.shape[0]), dtype=np.float32)
    fit[0, items[0, 0]] = 1           # a positive already known (would be a leak)
    fit[1, items[1, 5]] = 1           # a negative the user interacted with
    fit[2, items[3, 0]] = 1           # user 2 knows user 3's positive item: not cold anymore
    _, _, counts = bench.score_part(uf, vf, users, items, fit.tocsr())
    assert counts["positives_in_fit_matrix"] == 1
    assert counts["negatives_in_fit_matrix"] == 1
    assert counts["users_without_fit_interactions"] == 1
    assert counts["positives_without_fit_interactions"] == 2


# ---------------------------------------------------------------- matrices and selection

def test_confidence_matrix_is_one_plus_alpha_on_the_interactions():
    x = sp.csr_matrix(np.array([[0, 3, 0], [1, 0, 2]], dtype=np.float64))
    c = bench.confidence_matrix(x, 40.0)
    assert c.dtype == np.float32 and c.has_sorted_indices
    np.testing.assert_array_equal(c.toarray(), [[0, 41, 0], [41, 0, 41]])
    np.testing.assert_array_equal(x.toarray(), [[0, 3, 0], [1, 0, 2]])    # not modified


def test_refit_matrix_is_train_plus_valid_and_not_test(loo_dir):
    data = load_data(loo_dir, "implicit", torch.device("cpu"))
    refit = bench.refit_matrix(data)
    train = data.train_csr
    assert refit.shape == (data.n_users, data.n_items) and refit.dtype == np.float32
    assert set(np.unique(refit.data)) == {1.0}
    vu, vi = data.valid.users.numpy().copy(), data.valid.items.numpy().copy()
    assert len(vu) > 0
    assert (np.asarray(refit[vu, vi]).ravel() == 1).all()       # every valid positive
    assert (np.asarray(train[vu, vi]).ravel() == 0).all()       # which train did not hold
    assert (refit - bench.binary(train)).min() >= 0             # and all of train
    assert refit.nnz == train.nnz + len(vu)
    tu, ti = data.test.users.numpy().copy(), data.test.items.numpy().copy()
    assert (np.asarray(refit[tu, ti]).ravel() == 0).all()       # no test positive


def test_choose_takes_the_best_valid_hr_then_ndcg_then_grid_order():
    t = [{"config": {"k": 1}, "valid": {"hr@10": 0.5, "ndcg@10": 0.3}},
         {"config": {"k": 2}, "valid": None},
         {"config": {"k": 3}, "valid": {"hr@10": 0.6, "ndcg@10": 0.2}},
         {"config": {"k": 4}, "valid": {"hr@10": 0.6, "ndcg@10": 0.25}},
         {"config": {"k": 5}, "valid": {"hr@10": 0.6, "ndcg@10": 0.25}}]
    assert bench.choose(t)["config"] == {"k": 4}
    with pytest.raises(PipelineError, match="non-finite"):
        bench.choose([{"config": {}, "valid": None}])


def test_default_grids_are_the_asked_ones():
    args = bench.build_parser().parse_args(["--data-dir", "x"])
    als = bench.PEERS["als"].grid(args)
    bpr = bench.PEERS["bpr"].grid(args)
    assert len(als) == 48 and len(bpr) == 12
    assert {c["iterations"] for c in als} == {15} and {c["iterations"] for c in bpr} == {100}
    assert {(c["factors"], c["regularization"], c["alpha"]) for c in als} == {
        (f, r, a) for f in (32, 64, 128) for r in (0.01, 0.1, 1, 10) for a in (1, 5, 10, 40)}
    assert args.models == ["als", "bpr"] and args.threads == 1 and args.seed == 0


def test_missing_implicit_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "implicit", None)          # import implicit -> ImportError
    with pytest.raises(PipelineError, match=r"pip install -r bench/requirements\.txt"):
        bench.require_implicit()


def test_help():
    script = str(ROOT / "bench" / "bench_vs_implicit.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--data-dir", "--models", "--threads", "--json", "--als-alpha", "--bpr-lr"):
        assert flag in out.stdout



def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.build_parser().parse_args(["--data-dir", "x", "--models", "svd"])
    assert e.value.code == 2 and "invalid choice: 'svd'" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="--threads must be >= 1, got 0"):
        bench.main(["--data-dir", "x", "--threads", "0"])


# ---------------------------------------------------------------- end to end (needs implicit)

def test_end_to_end_on_a_tiny_loo_split(loo_dir, tmp_path, capsys):
    implicit = pytest.importorskip("implicit")
    out_json = tmp_path / "peer.json"
    argv = ["--data-dir", str(loo_dir), "--models", "als", "bpr", "--json", str(out_json),
            "--als-factors", "4", "8", "--als-reg", "0.1", "--als-alpha", "1", "10",
            "--als-iterations", "3", "--bpr-factors", "4", "--bpr-lr", "0.05",
            "--bpr-reg", "0.01", "--bpr-iterations", "5"]
    res = bench.main(argv)
    printed = capsys.readouterr().out
    assert "not the default one" in printed and "TEST: hr@10" in printed
    assert json.loads(out_json.read_text())["results"].keys() == {"als", "bpr"}
    data = load_data(loo_dir, "implicit", torch.device("cpu"))
    tu, ti = (t.numpy() for t in data.candidates["test"])
    for name, r in res["results"].items():
        assert r["n_configurations"] == (4 if name == "als" else 1)
        assert r["chosen"] in [t["config"] for t in r["trials"]]
        c = r["test_counts"]
        assert c["users_scored"] == len(tu) == res["split_users"]["test"]
        assert c["users_skipped"] == 0 and c["negatives_per_user"] == 20
        assert c["positives_in_fit_matrix"] == 0 and c["negatives_in_fit_matrix"] == 0
        assert r["refit_interactions"] == data.train_csr.nnz + len(data.valid)
        assert r["test_rows"]["user_idx"] == tu.tolist()
        for key in ("hr@10", "ndcg@10"):
            assert 0.0 <= r["test"][key] <= 1.0
            assert r["test"][key] == pytest.approx(np.mean(r["test_rows"][key]))
            assert r["test"][f"{key}_n"] == len(tu)
    # seeded: the refit of ALS's choice, fitted again, gives the same test rows
    als = res["results"]["als"]
    model = bench.fit_als(bench.refit_matrix(data), als["chosen"], 1, 0)
    uf, vf = bench.factors_of(model)
    _, rows, _ = bench.score_part(uf, vf, tu, ti, bench.refit_matrix(data))
    np.testing.assert_array_equal(rows["hr@10"], als["test_rows"]["hr@10"])
    # our dot products are the library's own scores of those candidates (unfiltered)
    refit = bench.refit_matrix(data)
    for r in range(3):
        got_ids, got = model.recommend(int(tu[r]), refit[int(tu[r])], N=ti.shape[1],
                                       filter_already_liked_items=False, items=ti[r])
        ours = bench.candidate_scores(uf, vf, tu[r:r + 1], got_ids[None, :]).numpy()[0]
        np.testing.assert_allclose(ours, got, rtol=1e-5, atol=1e-6)
    assert implicit.__version__
