"""Bayesian MF by Gibbs sampling (recpipe/bayes.py, ``--model bpmf``): the conditional draws
against their closed forms on tiny hand-checked inputs, the factored posterior mean against a
dense SVD, the chain against a low-rank matrix it must recover, and stage 60 / 70 on ML-100K."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models
from recpipe import bayes, recommend
from recpipe.cli import PipelineError, parse_config
from recpipe.dataset import Part, load_data
from recpipe.train import TrainConfig, run
from stage_fixtures import ml100k_stage40, new_user_recommendations

DT = torch.float64


def _side(rows, cols, n):
    return bayes._Side(torch.tensor(rows), torch.tensor(cols), n)


@pytest.mark.parametrize("block", [bayes.BLOCK_BYTES, 64])
def test_precision_and_weighted_sums_match_dense(block, monkeypatch):
    """Per row, sum q q' and sum value * q over the rated columns, whichever path runs (the
    sparse product with all outer products, or chunks of ratings when those do not fit)."""
    monkeypatch.setattr(bayes, "BLOCK_BYTES", block)
    rows, cols = [0, 2, 0, 1, 2, 2], [1, 0, 2, 2, 1, 2]
    vals = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, -1.0], dtype=DT)
    other = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], dtype=DT)
    side = _side(rows, cols, 3)
    dense_p = torch.zeros(3, 2, 2, dtype=DT)
    dense_w = torch.zeros(3, 2, dtype=DT)
    for r, c, v in zip(rows, cols, vals):
        dense_p[r] += torch.outer(other[c], other[c])
        dense_w[r] += v * other[c]
    torch.testing.assert_close(bayes.precision_sums(side, other), dense_p)
    torch.testing.assert_close(bayes.weighted_sums(side, other, vals[side.order]), dense_w)
    # row 1 rated column 2 only: [3, 0.5] [3, 0.5]'
    torch.testing.assert_close(dense_p[1], torch.tensor([[9.0, 1.5], [1.5, 0.25]], dtype=DT))


@pytest.mark.parametrize("block", [bayes.BLOCK_BYTES, 64, 200])
def test_pair_dots_in_chunks_are_the_per_rating_dot_products(block, monkeypatch):
    """p_u . q_i of every rating, whatever the chunk (k = 4 in float64: 64 bytes, one rating
    a chunk; 200 bytes, chunks of three, the last one short), against a loop."""
    monkeypatch.setattr(bayes, "BLOCK_BYTES", block)
    gen = torch.Generator().manual_seed(0)
    P = torch.randn(5, 4, generator=gen, dtype=DT)
    Q = torch.randn(3, 4, generator=gen, dtype=DT)
    users = torch.tensor([0, 4, 4, 2, 1, 0, 3], dtype=torch.int32)
    items = torch.tensor([2, 0, 1, 1, 2, 0, 2], dtype=torch.int32)
    want = torch.stack([P[u] @ Q[i] for u, i in zip(users.tolist(), items.tolist())])
    torch.testing.assert_close(bayes.pair_dots(P, Q, users, items), want)


def test_row_draws_have_the_closed_form_posterior():
    """One 2-d row with sum q q' = diag(2, 1), sum z q = (1, 1), alpha 1 and a standard prior:
    the posterior is N((1/3, 1/2), diag(1/3, 1/2)). 40,000 independent draws match it."""
    n = 40000
    prec = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT).expand(n, 2, 2).clone()
    lin = torch.ones(n, 2, dtype=DT)
    gen = torch.Generator().manual_seed(0)
    x = bayes.sample_rows(prec.clone(), lin, 1.0, torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT),
                          gen)
    torch.testing.assert_close(x.mean(0), torch.tensor([1 / 3, 1 / 2], dtype=DT), atol=0.01,
                               rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor([1 / 3, 1 / 2], dtype=DT), rtol=0.03,
                               atol=0)
    assert abs(float(torch.corrcoef(x.T)[0, 1])) < 0.02
    # a prior mean pulls the draws: Lambda mu = (3, 0) adds 1 to the first mean (3 / 3)
    prec = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT).expand(1000, 2, 2).clone()
    y = bayes.sample_rows(prec, lin[:1000], 1.0, torch.eye(2, dtype=DT) * 1.0,
                          torch.tensor([3.0, 0.0], dtype=DT), gen)
    assert abs(float(y[:, 0].mean()) - 4 / 3) < 0.05


def test_bias_draws_have_the_closed_form_posterior():
    """b ~ N(alpha sum(r) / (lam + alpha n), 1 / (lam + alpha n)): row 0 has residuals 1, 2, 3
    with alpha 2 and lam 1 -> mean 12 / 7, variance 1 / 7."""
    n = 20000
    rows = torch.arange(n).repeat_interleave(3)
    side = bayes._Side(rows, torch.zeros_like(rows), n)
    resid = torch.tensor([1.0, 2.0, 3.0], dtype=DT).repeat(n)[side.order]
    b = bayes.sample_bias(side, resid, 2.0, 1.0, torch.Generator().manual_seed(1))
    assert abs(float(b.mean()) - 12 / 7) < 0.01
    assert abs(float(b.var()) - 1 / 7) < 0.01


def test_normal_wishart_draw_is_centred_on_the_rows():
    """Many rows from N(m, S): the drawn precision approaches S^-1 and the mean m."""
    rng = np.random.default_rng(0)
    cov = np.array([[0.5, 0.1], [0.1, 0.2]])
    m = np.array([0.3, -0.2])
    x = torch.tensor(rng.multivariate_normal(m, cov, size=50000), dtype=DT)
    lam, mu = bayes.sample_normal_wishart(x, np.random.default_rng(1))
    np.testing.assert_allclose(lam.numpy(), np.linalg.inv(cov), rtol=0.05, atol=0.05)
    np.testing.assert_allclose(mu.numpy(), m, atol=0.02)


def test_compress_is_the_exact_then_truncated_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 2, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    p, q = torch.randn(7, 2, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    total = a @ b.T + p @ q.T
    a2, b2 = bayes.compress(a, b, p, q, 4)              # rank 4 holds the sum exactly
    torch.testing.assert_close(a2 @ b2.T, total)
    a1, b1 = bayes.compress(a, b, p, q, 1)              # rank 1: the leading singular pair
    u, s, vh = torch.linalg.svd(total)
    torch.testing.assert_close(a1 @ b1.T, s[0] * torch.outer(u[:, 0], vh[0]))
    torch.testing.assert_close(a1.norm(), b1.norm())    # singular values split evenly


def _low_rank(seed=0, n_users=60, n_items=40, rank=2, density=0.5, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    truth = (torch.randn(n_users, rank, generator=g, dtype=DT)
             @ torch.randn(n_items, rank, generator=g, dtype=DT).T)
    truth += torch.randn(n_users, 1, generator=g, dtype=DT) * 0.5
    obs = torch.rand(n_users, n_items, generator=g) < density
    u, i = obs.nonzero(as_tuple=True)
    z = truth[u, i] + noise * torch.randn(len(u), generator=g, dtype=DT)
    return truth, obs, u, i, z


def test_chain_recovers_a_low_rank_matrix_and_is_seeded():
    truth, obs, u, i, z = _low_rank()
    out = bayes.gibbs(u, i, z, 60, 40, rank=4, sweeps=60, seed=3)
    pred = out["user"] @ out["item"].T + out["user_bias"][:, None] + out["item_bias"][None, :]
    held = ~obs
    rmse = float((pred[held] - truth[held]).square().mean().sqrt())
    base = float((truth[held] - z.mean()).square().mean().sqrt())
    assert rmse < 0.35 * base, (rmse, base)
    assert out["samples"] == 45 and out["user"].shape == (60, 16)
    assert 0.25 < 1 / math.sqrt(out["alpha"]) < 0.4         # the noise std was 0.3
    again = bayes.gibbs(u, i, z, 60, 40, rank=4, sweeps=60, seed=3)
    assert torch.equal(again["user"], out["user"])
    other = bayes.gibbs(u, i, z, 60, 40, rank=4, sweeps=60, seed=4)
    assert not torch.equal(other["user"], out["user"])
    with pytest.raises(PipelineError, match="at least 2"):
        bayes.gibbs(u, i, z, 60, 40, rank=4, sweeps=1, seed=0)


def test_longer_average_beats_a_short_chain():
    """Averaging the sweeps is the method's point: 60 averaged sweeps predict held-out entries
    better than 6 (same seed); ``keep`` sets the stored rank."""
    truth, obs, u, i, z = _low_rank(seed=1, rank=3, density=0.3, noise=0.5)
    out = bayes.gibbs(u, i, z, 60, 40, rank=6, sweeps=80, seed=0)
    pred = out["user"] @ out["item"].T + out["user_bias"][:, None] + out["item_bias"][None, :]
    held = ~obs
    avg = float((pred[held] - truth[held]).square().mean().sqrt())
    one = bayes.gibbs(u, i, z, 60, 40, rank=6, sweeps=80, seed=0, keep=6)
    single = bayes.gibbs(u, i, z, 60, 40, rank=6, sweeps=8, seed=0)   # 2 burn-in, 6 averaged
    spred = (single["user"] @ single["item"].T + single["user_bias"][:, None]
             + single["item_bias"][None, :])
    short = float((spred[held] - truth[held]).square().mean().sqrt())
    assert avg < short, (avg, short)
    assert one["user"].shape == (60, 6)


def test_family_fits_into_mf_tables_in_rating_units():
    truth, obs, u, i, z = _low_rank(seed=2)
    ratings = (3.0 + 1.5 * z).float()                # a rating scale: mean 3, std 1.5
    m = models.build_model("bpmf", 60, 40, dim=3, init_std=0.1, global_mean=3.0, scale=1.5)
    assert m.user_factors.weight.shape == (60, 12) and m.fit_by == "closed_form"
    m.fit_closed_form(Part(users=u, items=i, ratings=ratings), {"epochs": 40, "seed": 0})
    with torch.no_grad():
        pred = m(torch.arange(60)[:, None], torch.arange(40)[None, :])
    want = 3.0 + 1.5 * truth.float()
    held = ~obs
    rmse = float((pred[held] - want[held]).square().mean().sqrt())
    assert rmse < 0.35 * float((want[held] - 3.0).square().mean().sqrt())
    assert m.item_vectors().shape == (40, 12)
    assert 1.5 < float(m.noise_precision) < 30         # 1 / (0.3 / 1.5)^2 = 25 at most
    # fold-in: users 0-19 again from their observed ratings, as if new, predict their
    # held-out entries about as well as their trained rows do
    new = torch.arange(20)
    sel = u < 20
    folded, method = m.fold_in(None, None, u[sel].numpy(), i[sel].numpy(),
                               ratings[sel].numpy(), 20)
    assert "posterior mean" in method
    with torch.no_grad():
        fp = folded(new[:, None], torch.arange(40)[None, :])
    h = held[:20]
    f_rmse = float((fp[h] - want[:20][h]).square().mean().sqrt())
    t_rmse = float((pred[:20][h] - want[:20][h]).square().mean().sqrt())
    assert f_rmse < 1.2 * t_rmse + 0.02, (f_rmse, t_rmse)


@pytest.fixture(scope="module")
def rand(tmp_path_factory):
    return ml100k_stage40(tmp_path_factory, "bpmf_rand", "--strategy", "random", "--seed", "42")


@pytest.mark.shared
def test_stage60_and_70_on_ml100k(rand, tmp_path):
    """A short chain through stage 60 (selection on train, refit on train + valid, test)
    beats the bias-only baseline; stage 70 serves a known user and folds a new one in."""
    m = run(parse_config(TrainConfig, ["--data-dir", str(rand), "--threads", "2", "--model",
                                       "bpmf", "--dim", "8", "--epochs", "24", "--device",
                                       "cpu"], "60_train.py", ""))
    data = load_data(rand, "explicit", torch.device("cpu"))
    base = float(((data.test.ratings - data.global_mean) ** 2).mean().sqrt())
    assert m["test"]["rmse"] < base - 0.1, (m["test"], base)
    assert m["test"]["rmse_n"] == len(data.test) and m["refit_on_train_valid"]
    assert m["config"]["lr"] is None and m["config"]["reg"] is None
    df = recommend.main(["--data-dir", str(rand), "--model", "bpmf", "--user", "1"])
    assert len(df) == 10
    given, new = new_user_recommendations(rand, "bpmf", tmp_path, 10)
    assert len(new) == 10
