"""models.py: forward shapes with broadcasting, the declared row tables, pretraining."""
import pytest
import torch
from torch import nn

import models

N_USERS, N_ITEMS = 6, 9
SMALL = {"mf": {"dim": 4}, "bpmf": {"dim": 2}, "deepmf": {"emb_dim": 8, "hidden": 4}, "gmf": {"dim": 4},
         "mlp": {"layers": [8, 4]}, "neumf": {"gmf_dim": 4, "layers": [8, 4]}}
# the families that score (user, item) pairs from their own row tables (and so have item
# vectors), trained on pair batches; EASE and the autoencoders have their own tests
# (tests/test_ease.py, tests/test_autoencoders.py), and so do blend, a stack of trained
# members, and knn, which keeps similarities and residuals instead of tables
# (tests/test_blend.py, tests/test_knn.py)
PAIR_FAMILIES = sorted(n for n, c in models.MODELS.items()
                       if c.input == "pairs" and c.batches == "pairs" and c.has_item_vectors)


@pytest.mark.parametrize("name", PAIR_FAMILIES)
def test_forward_shapes_and_broadcasting(name):
    torch.manual_seed(0)
    m = models.build_model(name, n_users=N_USERS, n_items=N_ITEMS, global_mean=3.5, scale=1.1,
                           **SMALL[name]).eval()
    u = torch.tensor([0, 1, 5, 2])
    i = torch.tensor([3, 8, 0, 3])
    pairs = m(u, i)
    assert pairs.shape == (4,) and pairs.dtype == torch.float32
    cand = torch.randint(0, N_ITEMS, (N_USERS, 5))
    sc = m(torch.arange(N_USERS)[:, None], cand)
    assert sc.shape == (N_USERS, 5)
    full = m(torch.arange(N_USERS)[:, None], torch.arange(N_ITEMS)[None, :])
    assert full.shape == (N_USERS, N_ITEMS)
    # every layout gives the same score for the same (user, item)
    torch.testing.assert_close(full[u, i], pairs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.gather(1, cand), sc, rtol=1e-5, atol=1e-5)
    assert m.item_vectors().shape[0] == N_ITEMS and m.item_vectors().dim() == 2


@pytest.mark.parametrize("name", PAIR_FAMILIES)
def test_declared_user_and_item_tables(name):
    """Each family declares its row tables (user_tables / item_tables): per-user tables have
    n_users rows, per-item n_items, row_sparse_tables lists them all, and moving one user's
    rows changes only that user's scores (what a fold-in relies on)."""
    m = models.build_model(name, n_users=N_USERS, n_items=N_ITEMS, **SMALL[name])
    users, items = m.user_tables(), m.item_tables()
    assert users and items
    for tables, rows in ((users, N_USERS), (items, N_ITEMS)):
        for n, c in tables.items():
            assert isinstance(c, nn.Embedding) and c.num_embeddings == rows, n
    assert {id(t) for t in m.row_sparse_tables()} == {id(t) for t in [*users.values(),
                                                                         *items.values()]}
    before = m(torch.arange(N_USERS)[:, None], torch.arange(N_ITEMS)[None]).detach()
    with torch.no_grad():
        for c in users.values():
            c.weight[2] += 0.5
    after = m(torch.arange(N_USERS)[:, None], torch.arange(N_ITEMS)[None]).detach()
    changed = (after - before).abs().sum(1) > 0
    assert changed.tolist() == [u == 2 for u in range(N_USERS)]


def test_explicit_prediction_includes_global_mean_and_scale():
    m = models.BiasedMF(3, 4, dim=2, init_std=0.0, global_mean=3.25, scale=2.0)
    assert torch.allclose(m(torch.tensor([0, 1]), torch.tensor([2, 3])), torch.tensor([3.25, 3.25]))
    with torch.no_grad():
        m.user_bias.weight[0] = 0.5
    got = float(m(torch.tensor([0]), torch.tensor([0])).detach())
    assert got == pytest.approx(3.25 + 2.0 * 0.5)


def test_neumf_pretraining_combines_gmf_and_mlp():
    torch.manual_seed(0)
    gmf = models.GMF(N_USERS, N_ITEMS, dim=4)
    mlp = models.MLP(N_USERS, N_ITEMS, layers=[8, 4])
    neu = models.NeuMF(N_USERS, N_ITEMS, gmf_dim=4, layers=[8, 4])
    neu.load_pretrained(gmf, mlp, alpha=0.5)
    u, i = torch.arange(N_USERS)[:, None], torch.arange(N_ITEMS)[None]
    with torch.no_grad():
        want = 0.5 * gmf(u, i) + 0.5 * mlp(u, i)
        torch.testing.assert_close(neu(u, i), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GMF embedding shape"):
        models.NeuMF(N_USERS, N_ITEMS, gmf_dim=8, layers=[8, 4]).load_pretrained(gmf, mlp)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="expected one of"):
        models.build_model("svd", n_users=2, n_items=2)


@pytest.mark.parametrize("reg,chunk", [(0.1, 16384), (0.0, 16384), (0.1, 7)])
def test_biased_mf_manual_gradients_match_autograd(reg, chunk, monkeypatch):
    """BiasedMF.mse_backward (the trainer's fast path) = autograd of the trainer's objective:
    per-sample MSE in standardised units + reg / B * squares of the rows each sample uses.
    chunk 7: the batch of 64 goes through in 10 chunks, the last one partial."""
    monkeypatch.setattr(models.BiasedMF, "CHUNK", chunk)
    torch.manual_seed(0)
    m = models.BiasedMF(N_USERS, N_ITEMS, dim=5, init_std=0.3, global_mean=3.5, scale=1.1)
    with torch.no_grad():
        m.user_bias.weight.normal_(0, 0.2)
        m.item_bias.weight.normal_(0, 0.2)
    u = torch.randint(0, N_USERS, (64,))          # repeated rows: gradients must accumulate
    i = torch.randint(0, N_ITEMS, (64,))
    r = torch.randint(1, 6, (64,)).float()
    loss = ((m(u, i) - r) / 1.1).square().mean()
    rows = [m.user_factors.weight[u], m.item_factors.weight[i], m.user_bias.weight[u],
            m.item_bias.weight[i]]
    (loss + reg * sum(x.square().sum() for x in rows) / 64).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        p.grad = torch.full_like(p, 7.0)           # stale gradients must be replaced
    scratch: dict = {}
    for _ in range(2):                              # the second call reuses the scratch
        got = m.mse_backward(u, i, r, reg, scratch)
        assert float(got) == pytest.approx(float(loss.detach()), rel=1e-5)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)
    assert not (set(dict(m.named_parameters())) - set(want))


@pytest.mark.parametrize("n_items,chunk", [(9, 16384), (200, 16384), (9, 2)])
def test_biased_mf_row_gradients_match_dense(n_items, chunk, monkeypatch):
    """mse_backward_rows returns the dense gradient's nonzero rows, distinct and ascending.
    n_items 9: rows by marks and cumsum; 200 > 64 * 3: by a sort; chunk 2: two chunks."""
    monkeypatch.setattr(models.BiasedMF, "CHUNK", chunk)
    torch.manual_seed(1)
    m = models.BiasedMF(N_USERS, n_items, dim=4, init_std=0.3, global_mean=3.0, scale=0.9)
    u = torch.tensor([0, 5, 0])                    # a repeated row
    i = torch.tensor([n_items - 1, 2, 2])
    r = torch.tensor([5.0, 1.0, 3.0])
    want_loss = m.mse_backward(u, i, r, 0.2)
    loss, updates = m.mse_backward_rows(u, i, r, 0.2)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    assert [w for w, _, _ in updates] == [m.user_factors.weight, m.user_bias.weight,
                                          m.item_factors.weight, m.item_bias.weight]
    for w, rows, grad in updates:
        ids = u if w.shape[0] == N_USERS else i
        assert torch.equal(rows, torch.unique(ids))
        dense = torch.zeros_like(w).index_copy_(0, rows, grad)
        torch.testing.assert_close(dense, w.grad, rtol=1e-5, atol=1e-7)


def test_reg_power_gradients_every_path_against_autograd():
    """mf with reg_power: the per-row L2 factors (n / n_mean) ** -reg_power computed by hand
    from the train counts; the autograd reference with them; the dense and row-compact
    analytic gradients and the trainer's autograd path (the row L2 of family.look, scaled by
    the table's l2_weight) all give its gradient."""
    from recpipe.dataset import Part
    from recpipe.objectives import RowL2
    torch.manual_seed(2)
    m = models.BiasedMF(N_USERS, N_ITEMS, dim=4, init_std=0.3, global_mean=3.0, scale=0.9,
                        reg_power=0.5)
    with torch.no_grad():
        m.user_bias.weight.normal_(0, 0.2)
        m.item_bias.weight.normal_(0, 0.2)
    tu = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 4])      # train counts 4 1 2 1 1 0 (user 5)
    ti = torch.tensor([0, 1, 2, 3, 0, 0, 1, 4, 8])
    m.learn_fallback(Part(users=tu, items=ti, ratings=torch.ones(9)), True, False)
    nu = torch.tensor([4.0, 1, 2, 1, 1, 0])
    fu = (nu.clamp_min(1) / (9 / 5)) ** -0.5             # 5 users with ratings, 9 ratings
    torch.testing.assert_close(m.user_reg, fu)
    assert float(m.reg_mean_count[0]) == pytest.approx(9 / 5)
    u = torch.tensor([0, 0, 1, 5, 2])
    i = torch.tensor([0, 3, 3, 8, 1])
    r = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0])
    reg = 0.3
    fi = m.item_reg
    loss = ((m(u, i) - r) / 0.9).square().mean()
    pen = (fu[u] * (m.user_factors.weight[u].square().sum(1) + m.user_bias.weight[u, 0] ** 2)
           + fi[i] * (m.item_factors.weight[i].square().sum(1) + m.item_bias.weight[i, 0] ** 2))
    (loss + reg * pen.sum() / 5).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.mse_backward(u, i, r, reg)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)
    _, updates = m.mse_backward_rows(u, i, r, reg)
    for w, rows, grad in updates:
        dense = torch.zeros_like(w).index_copy_(0, rows, grad)
        torch.testing.assert_close(dense, w.grad, rtol=1e-5, atol=1e-7)
    m.zero_grad()
    l2 = RowL2(m.row_sparse_tables())
    l2.active = True
    out = m(u, i)
    l2.active = False
    (((out - r) / 0.9).square().mean() + reg * l2.take(5)).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)
    # reg_power 0 keeps every factor at 1 (the plain per-sample L2)
    m0 = models.BiasedMF(N_USERS, N_ITEMS, dim=4)
    m0.learn_fallback(Part(users=tu, items=ti, ratings=torch.ones(9)), True, False)
    assert torch.equal(m0.user_reg, torch.ones(N_USERS))


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_mlp_tower_starts_with_live_units(name):
    """With 0.01-scale embeddings the tower must not start half dead: torch's default biases
    fixed each unit's sign for every input and left, on average, 4 of the last layer's 8 units
    alive (at worst 1; training then killed the rest on ML-100K, a constant model). With the
    NCF reference init (Glorot weights, zero biases) most units of every layer respond."""
    for seed in range(20):
        torch.manual_seed(seed)
        m = models.build_model(name, n_users=900, n_items=1600, layers=[64, 32, 16, 8],
                               init_std=0.01)
        u, i = torch.randint(0, 900, (4000,)), torch.randint(0, 1600, (4000,))
        with torch.no_grad():
            h = torch.relu(m.tower.first_user(m.user_mlp(u)) + m.tower.first_item(m.item_mlp(i)))
            live = [int((h > 0).any(0).sum())]
            for layer in m.tower.rest:
                h = layer(h)
                if isinstance(layer, nn.ReLU):
                    live.append(int((h > 0).any(0).sum()))
            assert m(u, i).std() > 0
        assert all(n >= w * 3 // 4 for n, w in zip(live, [64, 32, 16, 8])), (seed, live)


def test_mf_fold_in_uses_the_training_l2_of_reg_power():
    """The closed-form fold-in of mf with reg_power solves the ridge problem with the L2 that
    training gave a user with that many ratings, reg * n * (n / n_mean) ** -reg_power."""
    import numpy as np
    from recpipe.dataset import Part
    from recpipe.objectives import ExplicitMSE
    torch.manual_seed(3)
    m = models.BiasedMF(N_USERS, N_ITEMS, dim=3, init_std=0.4, global_mean=3.5, scale=1.2,
                        reg_power=0.5)
    tu = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])          # 8 ratings by 4 users: n_mean 2
    m.learn_fallback(Part(users=tu, items=tu % N_ITEMS, ratings=torch.ones(8)), True, False)
    users = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])   # 3 and 9 ratings
    items = np.array([0, 2, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    ratings = np.array([5.0, 1.0, 4.5, 4, 3, 2, 5, 1, 2, 3, 4, 5])
    folded, method = m.fold_in(ExplicitMSE(1.2), 0.2, users, items, ratings, 2)
    assert "** -0.5" in method
    Q = m.item_factors.weight.detach().double().numpy()
    bi = m.item_bias.weight.detach().double().numpy()[:, 0]
    for u, n in ((0, 3), (1, 9)):
        sel = users == u
        x = np.c_[Q[items[sel]], np.ones(n)]
        y = (ratings[sel] - 3.5) / 1.2 - bi[items[sel]]
        lam = 0.2 * n * (n / 2.0) ** -0.5
        theta = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ y)
        np.testing.assert_allclose(folded.user_factors.weight[u].double().numpy(), theta[:3],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(folded.user_bias.weight[u, 0]), theta[3], rtol=1e-5,
                                   atol=1e-6)


def test_mf_saves_only_the_fold_ins_l2_state_and_loads_older_checkpoints():
    """The per-row L2 factors are recomputed by every run (not in the state dict); the
    fold-in's n_mean is saved, and a checkpoint from before it loads with the default."""
    m = models.BiasedMF(N_USERS, N_ITEMS, dim=3, reg_power=0.5)
    state = m.state_dict()
    assert "user_reg" not in state and "item_reg" not in state and "reg_mean_count" in state
    del state["reg_mean_count"]
    fresh = models.BiasedMF(N_USERS, N_ITEMS, dim=3, reg_power=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.reg_mean_count, torch.ones(2, dtype=torch.float64))
