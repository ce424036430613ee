"""Item kNN on baseline residuals (recpipe/knn.py, ``--model knn``): the similarities and the
predictions against plain loops on a small random table, scoring all items equal to scoring
pairs, the fold-in of a known user's own ratings equal to that user, and stage 60 / 70 on
ML-100K (shrinkage chosen on validation, the selected model's file scoring what selection
measured)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models  # noqa: F401 - registers the families
from recpipe import kernels, knn, recommend
from recpipe.checkpoint import load_model
from recpipe.cli import parse_config
from recpipe.dataset import Part, load_data
from recpipe.evaluation import evaluate
from recpipe.family import family, regularised_baseline
from recpipe.train import TrainConfig, run
from stage_fixtures import ml100k_stage40, new_user_recommendations


def _table(seed=0, n_users=40, n_items=15, density=0.45):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < density
    mask[-1] = False                                  # the last user has no train rating
    u, i = np.nonzero(mask)
    r = rng.integers(1, 6, len(u)).astype(np.float32)
    part = Part(torch.tensor(u), torch.tensor(i), torch.tensor(r))
    return part, n_users, n_items


def _fitted(part, n_users, n_items, k, lam):
    mu = float(part.ratings.mean())
    m = family("knn")(n_users, n_items, dim=k, global_mean=mu)
    m.learn_fallback(part, True, False)
    m.fit_closed_form(part, {"reg": lam})
    return m.eval(), mu


def _reference(part, n_users, n_items, k, lam, mu, sims=None):
    """The module docstring's formulas by loops over users and item pairs (float64); with
    ``sims``, the predictions from those similarities, of equal similarities the lower item
    ids taken first (Python's sort is stable)."""
    u, i, r = (t.numpy() for t in (part.users, part.items, part.ratings))
    bu, bi = regularised_baseline(part.users, part.items, part.ratings.double() - mu,
                                  n_users, n_items)
    bu, bi = bu.double().numpy(), bi.double().numpy()
    z = {}
    for a, b, x in zip(u, i, r):
        z[(a, b)] = x - mu - bu[a] - bi[b]
    s = np.zeros((n_items, n_items))
    for a in range(n_items):
        for b in range(n_items):
            if a == b:
                continue
            co = [v for v in range(n_users) if (v, a) in z and (v, b) in z]
            if len(co) < 2:
                continue
            num = sum(z[(v, a)] * z[(v, b)] for v in co)
            den = math.sqrt(sum(z[(v, a)] ** 2 for v in co) * sum(z[(v, b)] ** 2 for v in co))
            if den > 0:
                s[a, b] = max(0.0, num / den * (len(co) - 1) / (len(co) - 1 + lam))
    use = s if sims is None else sims
    pred = np.zeros((n_users, n_items))
    for v in range(n_users):
        rated = [b for b in range(n_items) if (v, b) in z]
        for t in range(n_items):
            order = sorted(rated, key=lambda b: -use[t, b])
            nb = order[:k]
            w = np.array([use[t, b] for b in nb])
            zz = np.array([z[(v, b)] for b in nb])
            extra = float(w @ zz / w.sum()) if len(nb) and w.sum() > 0 else 0.0
            pred[v, t] = mu + bu[v] + bi[t] + extra
    return s, pred


@pytest.mark.parametrize("k, lam, path", [(3, 10.0, "kernel"), (100, 0.0, "kernel"),
                                          (3, 10.0, "blocks"), (100, 0.0, "blocks"),
                                          (3, 10.0, "small blocks")])
def test_similarities_and_predictions_match_plain_loops(k, lam, path, monkeypatch):
    """``path``: the CPU's compiled pass (``kernels.knn_terms``) or the vectorised blocks of
    other devices, also with blocks so small that one holds one or two pairs and the pairs
    of one user are split across blocks."""
    if path == "kernel" and not kernels.available():
        pytest.skip("numba is not installed")
    if path != "kernel":
        monkeypatch.setattr(kernels, "available", lambda: False)
    if path == "small blocks":
        monkeypatch.setattr(knn, "_BLOCK_FLOATS", 20)
    part, nu, ni = _table()
    m, mu = _fitted(part, nu, ni, k, lam)
    s, _ = _reference(part, nu, ni, k, lam, mu)
    # bfloat16 similarities: 3 significant digits
    np.testing.assert_allclose(m.sim.float().numpy(), s, rtol=8e-3, atol=1e-6)
    _, pred = _reference(part, nu, ni, k, lam, mu, m.sim.double().numpy())
    users = torch.arange(nu).repeat_interleave(ni)
    items = torch.arange(ni).repeat(nu)
    shuffle = torch.randperm(len(users), generator=torch.Generator().manual_seed(0))
    got = np.empty(len(users))
    got[shuffle.numpy()] = m(users[shuffle], items[shuffle]).double().numpy()  # pairs mixed
    got = got.reshape(nu, ni)
    assert np.allclose(got[-1], mu + m.base_item.double().numpy())    # no history: baseline
    np.testing.assert_allclose(got, pred, atol=2e-5, rtol=0)
    # scoring every item of a block of users is the pairwise scoring
    torch.testing.assert_close(m.score_all(torch.arange(nu)),
                               m(users, items).view(nu, ni))
    if k < ni:         # similarities cut to three levels: ties at the k-th neighbour abound
        m.sim.copy_((m.sim.float() * 6).round().clamp_(0, 2) / 8)
        _, pred = _reference(part, nu, ni, k, lam, mu, m.sim.double().numpy())
        got = m(users, items).double().numpy().reshape(nu, ni)
        np.testing.assert_allclose(got, pred, atol=2e-5, rtol=0)


def test_the_correlation_pass_reads_the_models_own_float32_residuals():
    """No copy of the ratings beside the model's: the CSR the sparse products read is the
    model's stored residuals (float32) and item ids, and the products are float32."""
    part, nu, ni = _table()
    m = family("knn")(nu, ni, dim=3, global_mean=float(part.ratings.mean()))
    m.learn_fallback(part, True, False)
    z = m._store_residuals(*m._residuals(part))
    assert z.dtype == np.float32 and z.nnz == len(part)
    assert np.shares_memory(z.data, m.resid.numpy())
    assert np.shares_memory(z.indices, m.rated.numpy())
    rho, cnt = knn.correlations(z)
    assert rho.dtype == cnt.dtype == torch.float32
    # the co-rater counts are exact: the mask's own product
    mask = np.zeros((nu, ni))
    mask[part.users.numpy(), part.items.numpy()] = 1
    co = mask.T @ mask
    np.fill_diagonal(co, 0)
    assert np.array_equal(cnt.numpy()[co >= 2], co[co >= 2])


def test_fold_in_of_a_known_users_own_ratings_reproduces_that_user():
    """The baseline's last step is the user's bias given the item biases: folding a trained
    user's own ratings in gives the same bias, residuals and predictions."""
    part, nu, ni = _table(seed=3)
    m, _ = _fitted(part, nu, ni, 5, 20.0)
    for user in (0, 7):
        sel = part.users == user
        folded, how = m.fold_in(None, 0.0, np.zeros(int(sel.sum()), dtype=np.int64),
                                part.items[sel].numpy(), part.ratings[sel].numpy(), 1)
        assert "nothing was optimised" in how
        torch.testing.assert_close(folded.score_all(torch.tensor([0])),
                                   m.score_all(torch.tensor([user])), atol=1e-5, rtol=0)
    assert m.n_users == nu and int(m.indptr[-1]) == len(part.users)     # m untouched


@pytest.fixture(scope="module")
def rand(tmp_path_factory):
    return ml100k_stage40(tmp_path_factory, "knn_rand", "--strategy", "random", "--seed", "42")


@pytest.mark.shared
def test_stage60_and_70_on_ml100k(rand, tmp_path):
    """Stage 60 chooses the shrinkage on validation (one correlation pass for the grid),
    refits on train + valid and beats the bias-only baseline and mf's preset region; the
    saved selection model scores validation exactly as the grid measured it; stage 70
    serves a known user and folds a new one in."""
    argv = ["--data-dir", str(rand), "--model", "knn", "--device", "cpu"]
    m = run(parse_config(TrainConfig, argv, "60_train.py", ""))
    data = load_data(rand, "explicit", torch.device("cpu"))
    cls = family("knn")
    hist = (rand / "60_train" / "knn" / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + len(cls.reg_grid)                     # one row per candidate
    chosen = m["config"]["reg"]
    assert chosen in cls.reg_grid and m["refit_on_train_valid"]
    sel, _ = load_model(rand / "60_train" / "knn", torch.device("cpu"), "selected.pt")
    again = evaluate(sel, data, "valid", "explicit", 0, full=False)["rmse"]
    assert again == pytest.approx(m["valid"]["rmse"], abs=1e-6)
    best = min(float(r.split(",")[[h for h in hist[0].split(",")].index("valid_rmse")])
               for r in hist[1:])
    assert again == pytest.approx(best, abs=1e-5)
    mu = float(data.global_mean)
    base = float(((data.test.ratings - mu) ** 2).mean().sqrt())
    assert m["test"]["rmse"] < base - 0.2 and m["test"]["rmse"] < 0.91, m["test"]
    assert m["test"]["rmse_n"] == len(data.test)
    saved = json.loads((rand / "60_train" / "knn" / "metrics.json").read_text())
    assert saved["test"]["rmse"] == pytest.approx(m["test"]["rmse"])
    df = recommend.main(["--data-dir", str(rand), "--model", "knn", "--user", "1"])
    assert len(df) == 10
    given, new = new_user_recommendations(rand, "knn", tmp_path, 10)
    assert len(new) == 10
