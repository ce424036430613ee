"""--optimizer rowsgd: the fused per-sample SGD kernel of explicit MF (recpipe/kernels.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from recpipe import kernels
from recpipe.cli import PipelineError
from recpipe.train import TrainConfig, run
from recpipe.train_config import rowsgd_eligible
from stage_fixtures import ml100k_stage40

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.missing_reason())


@pytest.fixture(scope="module")
def ml100k_random_dir(tmp_path_factory):
    return ml100k_stage40(tmp_path_factory, "rowsgd", "--seed", "1", "--strategy", "random")


def _toy(n_users=45, n_items=23, n=600, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users - 5, (n,), generator=g)     # 5 users without ratings
    items = torch.randint(0, n_items, (n,), generator=g)
    ratings = torch.randint(1, 6, (n,), generator=g).float()
    torch.manual_seed(seed)
    m = models.build_model("mf", n_users, n_items, dim=k, init_std=0.3, global_mean=3.2,
                           scale=1.3)
    return m, users, items, ratings, g


def _accumulators():
    from recpipe.optim import ROWSGD_INITIAL
    acc: dict = {}

    def get(p):
        if p not in acc:
            acc[p] = torch.full((p.shape[0],), ROWSGD_INITIAL)
        return acc[p]
    return get, acc


def _reference_epoch(m, order_u, order_i, order_z, acc, lr, reg, ru=None, ri=None):
    """The documented update, one rating at a time in float64, in the given order; ``ru`` /
    ``ri``: each user's / item's multiplier of reg (None: 1)."""
    P = m.user_factors.weight.detach().double().numpy().copy()
    Q = m.item_factors.weight.detach().double().numpy().copy()
    bu = m.user_bias.weight.detach().double().numpy()[:, 0].copy()
    bi = m.item_bias.weight.detach().double().numpy()[:, 0].copy()
    G = [acc(w).double().numpy().copy() for w in (m.user_factors.weight, m.item_factors.weight,
                                                   m.user_bias.weight, m.item_bias.weight)]
    k = P.shape[1]
    ru = np.ones(len(P)) if ru is None else ru
    ri = np.ones(len(Q)) if ri is None else ri
    sq = 0.0
    for u, i, z in zip(order_u, order_i, order_z.astype(np.float64)):
        e = P[u] @ Q[i] + bu[u] + bi[i] - z
        sq += e * e
        lu, li = reg * ru[u], reg * ri[i]
        gp, gq = e * Q[i] + lu * P[u], e * P[u] + li * Q[i]
        G[0][u] += gp @ gp / k
        G[1][i] += gq @ gq / k
        P[u] -= lr / np.sqrt(G[0][u]) * gp
        Q[i] -= lr / np.sqrt(G[1][i]) * gq
        gb = e + lu * bu[u]
        G[2][u] += gb * gb
        bu[u] -= lr / np.sqrt(G[2][u]) * gb
        gb = e + li * bi[i]
        G[3][i] += gb * gb
        bi[i] -= lr / np.sqrt(G[3][i]) * gb
    return sq, (P, Q, bu, bi), G


def _tables(m):
    """mf's four trained tables, in the reference's order (P, Q, b_u, b_i)."""
    return (m.user_factors.weight, m.item_factors.weight, m.user_bias.weight,
            m.item_bias.weight)


def _assert_tables_are(m, want):
    """Each of ``m``'s tables equals the reference's (float64, in its shape)."""
    for w, r in zip(_tables(m), want):
        np.testing.assert_allclose(w.detach().numpy().reshape(r.shape), r, rtol=2e-5,
                                   atol=2e-6)


def test_the_kernel_is_the_documented_per_sample_update():
    from recpipe.optim import ROWSGD_INITIAL
    m, users, items, ratings, g = _toy()
    ref = models.build_model("mf", m.n_users, m.n_items, dim=5)
    ref.load_state_dict(m.state_dict())
    get2, acc2 = _accumulators()
    sc: dict = {}
    sq = m.fused_epoch(users, items, ratings, 1234, get2, 0.1, 0.05, 2, sc)
    R = sc["kernel"]
    # the epoch's order: every rating once, grouped by block, strata one after the other
    nb = kernels.BLOCKS
    got_pairs = sorted(zip(R.ou.tolist(), R.oi.tolist()))
    assert got_pairs == sorted(zip(users.tolist(), items.tolist()))
    for b in range(nb * nb):
        s_, t = divmod(b, nb)
        lo, hi = R.starts[b], R.starts[b + 1]
        assert (R.ou[lo:hi] % nb == t).all() and (R.oi[lo:hi] % nb == (t + s_) % nb).all()
    z = ((ratings.double() - float(m.global_mean)) / float(m.scale)).numpy()
    np.testing.assert_allclose(np.sort(R.oz), np.sort(z.astype(np.float32)))
    get, _ = _accumulators()
    want_sq, want, want_g = _reference_epoch(ref, R.ou, R.oi, R.oz, get, 0.1, 0.05)
    assert sq == pytest.approx(want_sq, rel=1e-5)
    _assert_tables_are(m, want)
    for w, gref in zip(_tables(m), want_g):
        np.testing.assert_allclose(acc2[w].numpy(), gref, rtol=2e-5)
    # every row a rating touched moved; rows without ratings did not
    touched = np.zeros(m.n_users, bool)
    touched[users.numpy()] = True
    g0 = get2(m.user_factors.weight).numpy()
    assert (g0 > np.float32(ROWSGD_INITIAL))[touched].all()
    assert (~touched).sum() >= 5 and (g0 == np.float32(ROWSGD_INITIAL))[~touched].all()
    # the order is the seed's: the same seed gives the same order, another seed another one
    first = R.ou.copy(), R.oi.copy()
    m.fused_epoch(users, items, ratings, 1234, get2, 0.1, 0.05, 1, sc)
    assert (R.ou == first[0]).all() and (R.oi == first[1]).all()
    m.fused_epoch(users, items, ratings, 99, get2, 0.1, 0.05, 1, sc)
    assert not ((R.ou == first[0]).all() and (R.oi == first[1]).all())


def test_reg_power_weighs_each_rows_l2_by_its_train_count():
    """With reg_power the kernel's L2 on a row is reg * (n / n_mean) ** -reg_power, n the
    row's train ratings: the reference update with those multipliers, computed here from the
    counts by hand."""
    m, users, items, ratings, g = _toy()
    m = models.build_model("mf", m.n_users, m.n_items, dim=5, init_std=0.3, global_mean=3.2,
                           scale=1.3, reg_power=0.5)
    from recpipe.dataset import Part
    m.learn_fallback(Part(users=users, items=items, ratings=ratings), True, False)
    nu = np.bincount(users.numpy(), minlength=m.n_users).astype(np.float64)
    ni = np.bincount(items.numpy(), minlength=m.n_items).astype(np.float64)
    ru = (np.maximum(nu, 1) / nu[nu > 0].mean()) ** -0.5
    ri = (np.maximum(ni, 1) / ni[ni > 0].mean()) ** -0.5
    np.testing.assert_allclose(m.user_reg.numpy(), ru, rtol=1e-6)
    np.testing.assert_allclose(m.item_reg.numpy(), ri, rtol=1e-6)
    assert ru.max() / ru[nu > 0].min() > 2          # the counts differ enough to matter
    ref = models.build_model("mf", m.n_users, m.n_items, dim=5, reg_power=0.5)
    ref.load_state_dict(m.state_dict())
    get2, acc2 = _accumulators()
    sc: dict = {}
    sq = m.fused_epoch(users, items, ratings, 7, get2, 0.1, 0.3, 1, sc)
    R = sc["kernel"]
    get, _ = _accumulators()
    want_sq, want, _ = _reference_epoch(ref, R.ou, R.oi, R.oz, get, 0.1, 0.3, ru, ri)
    plain_sq, plain, _ = _reference_epoch(ref, R.ou, R.oi, R.oz, _accumulators()[0], 0.1, 0.3)
    assert sq == pytest.approx(want_sq, rel=1e-5)
    _assert_tables_are(m, want)
    for r, p in zip(want, plain):
        assert np.abs(r - p).max() > 1e-3          # and it is not the plain update


def test_the_result_does_not_depend_on_the_threads():
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba sees one CPU: nothing to compare")
    states = []
    for threads in (1, 2):
        m, users, items, ratings, g = _toy(n_users=500, n_items=300, n=20000, k=16)
        get, _ = _accumulators()
        sc: dict = {}
        for seed in range(3):
            m.fused_epoch(users, items, ratings, seed, get, 0.1, 0.05, threads, sc)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_auto_is_rowsgd_for_mf_on_the_cpu_with_its_own_learning_rate():
    from recpipe.presets import ROWSGD, preset
    cpu = torch.device("cpu")
    cfg = TrainConfig(model="mf").resolved(device=cpu)
    assert cfg.optimizer == "rowsgd" and cfg.lr == ROWSGD[("mf", "explicit")]["lr"]
    assert cfg.lr != preset("mf", "explicit")["lr"]          # Adam's stays Adam's
    assert TrainConfig(model="mf", lr=0.03).resolved(device=cpu).lr == 0.03   # --lr wins
    # elsewhere auto is decided from the data as before (for_data), with the Adam preset
    for dev, one in ((torch.device("cuda"), True), (cpu, False)):
        cfg = TrainConfig(model="mf").resolved(device=dev, one_process=one)
        assert cfg.optimizer == "auto" and cfg.lr == preset("mf", "explicit")["lr"]
    assert TrainConfig(model="gmf", task="implicit").resolved(device=cpu).optimizer == "auto"
    assert TrainConfig(model="mf", optimizer="adam").resolved(device=cpu).optimizer == "adam"


def test_where_rowsgd_cannot_run_it_says_why():
    assert "no fused kernel" in rowsgd_eligible("gmf", "implicit", "cpu", True)
    assert "no fused kernel" in rowsgd_eligible("mf", "implicit", "cpu", True)
    assert "CPU kernel" in rowsgd_eligible("mf", "explicit", "cuda:0", True)
    assert "torchrun" in rowsgd_eligible("mf", "explicit", "cpu", False)
    assert rowsgd_eligible("mf", "explicit", "cpu", True) is None


@pytest.mark.shared
def test_rowsgd_on_ml100k_matches_the_adam_path(ml100k_random_dir):
    """Real data, whole stage 60 (selection, refit, test) at the presets: auto is rowsgd,
    and its test RMSE is no worse than the batch Adam path's (seed noise allowed)."""
    from recpipe.cli import parse_config
    base = ["--data-dir", str(ml100k_random_dir), "--model", "mf", "--dim", "32",
            "--epochs", "25"]
    fast = run(parse_config(TrainConfig, base, "60_train.py", ""))
    assert fast["config"]["optimizer"] == "rowsgd"
    adam = run(parse_config(TrainConfig, [*base, "--optimizer", "adam"], "60_train.py", ""))
    assert fast["test"]["rmse"] < 0.93 and fast["test"]["rmse_n"] == adam["test"]["rmse_n"]
    assert fast["test"]["rmse"] <= adam["test"]["rmse"] + 0.005, (fast["test"], adam["test"])


def test_the_trainer_refuses_rowsgd_for_a_model_without_a_kernel(tmp_path):
    from recpipe.train import Trainer
    from test_train import _synthetic_data
    cfg = TrainConfig(model="gmf", task="implicit", optimizer="rowsgd").resolved()
    with pytest.raises(PipelineError, match="rowsgd: --model gmf has no fused kernel"):
        Trainer(cfg, _synthetic_data("implicit"), tmp_path, "test")
