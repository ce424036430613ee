"""Every test pair is scored: pairs whose user or item has no train rating are kept by stage
30 (the default) and scored by the model's baseline (global mean + the known side's bias),
counted in metrics.json; stage 70 ranks a user without train ratings by that baseline too.
Real data: ML-100K through stages 20-60 (temporal-global split: its test holds users and
items that never occur before the cut-off)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import models
from recpipe import ids, matrix, split
from recpipe import recommend as rec_stage
from recpipe.checkpoint import load_model
from recpipe.dataset import Part
from recpipe.family import regularised_baseline
from recpipe.scoring import fallback_mask, predict_pairs, rank_items
from recpipe.train import TrainConfig, run
from stage_fixtures import write_ml100k_stage10

SPLIT = ["--strategy", "temporal-global", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data) -> Path:
    d = tmp_path_factory.mktemp("unseen")
    write_ml100k_stage10(d, shared_data)
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), *SPLIT])          # --unseen keep is the default
    matrix.main(["--data-dir", str(d)])
    run(TrainConfig(model="mf", data_dir=d, dim=16, epochs=3, batch_size=4096, threads=2))
    return d


def _npz(d: Path, name: str) -> sp.coo_matrix:
    return sp.load_npz(d / "40_make_sparse_matrix" / f"{name}.npz").tocoo()


def _unknown(part: sp.coo_matrix, *known: sp.coo_matrix) -> np.ndarray:
    n_u, n_i = part.shape
    ku = np.zeros(n_u, bool)
    ki = np.zeros(n_i, bool)
    for m in known:
        ku[m.row] = True
        ki[m.col] = True
    return ~(ku[part.row] & ki[part.col])


@pytest.mark.shared
def test_keep_is_the_default_and_every_test_pair_is_scored(trained):
    m30 = json.loads((trained / "30_split_train_test" / "manifest.json").read_text())
    assert m30["unseen"]["policy"] == "keep" and m30["unseen"]["dropped_rows"] == 0
    st = m30["unseen"]["test"]
    assert st["rows"] > 0 and st["users"] > 0 and st["items"] > 0
    tr, va, te = _npz(trained, "train"), _npz(trained, "valid"), _npz(trained, "test")
    m = json.loads((trained / "60_train" / "mf" / "metrics.json").read_text())
    test, valid = m["test"], m["valid"]
    assert test["rmse_n"] == test["mae_n"] == te.nnz == m30["sizes"]["test"]
    assert valid["rmse_n"] == va.nnz
    # the final model is refitted on train + valid: the test pairs outside both fall back;
    # the validation metrics come from the model selected on train only
    assert test["fallback_n"] == int(_unknown(te, tr, va).sum()) > 0
    assert valid["fallback_n"] == int(_unknown(va, tr).sum())
    for part in (test, valid):
        assert isinstance(part["rmse"], float)
        lo, hi = part["rmse_ci"]
        assert lo < part["rmse"] < hi
        lo, hi = part["mae_ci"]
        assert lo < part["mae"] < hi


@pytest.mark.shared
def test_fallback_pairs_are_global_mean_plus_known_bias_exactly(trained):
    model, meta = load_model(trained / "60_train" / "mf")
    tr, va, te = _npz(trained, "train"), _npz(trained, "valid"), _npz(trained, "test")
    u = torch.from_numpy(te.row.astype(np.int64))
    i = torch.from_numpy(te.col.astype(np.int64))
    miss = fallback_mask(model, u, i)
    want_miss = torch.from_numpy(_unknown(te, tr, va))
    assert miss is not None and torch.equal(miss, want_miss)
    sd = meta["state_dict"]
    mu, s = sd["global_mean"], sd["scale"]
    ku, ki = sd["known_user"], sd["known_item"]
    bu = sd["user_bias.weight"][:, 0] * s * ku
    bi = sd["item_bias.weight"][:, 0] * s * ki
    pred = predict_pairs(model, u, i)
    assert torch.equal(pred[miss], (mu + bu[u] + bi[i])[miss])
    with torch.inference_mode():
        assert torch.equal(pred[~miss], model(u, i)[~miss].float())
    # a new user with a known item: mu + b_i; a known user with a new item: mu + b_u
    new_u, new_i = ~ku[u], ~ki[i]
    both = new_u & new_i
    assert torch.equal(pred[new_u & ~new_i], (mu + bi[i])[new_u & ~new_i])
    assert torch.equal(pred[new_i & ~new_u], (mu + bu[u])[new_i & ~new_u])
    assert torch.all(pred[both] == mu)
    # the reported RMSE is that of these predictions (clipped to the scale)
    err = pred.clamp(1, 5) - torch.from_numpy(te.data.astype(np.float32))
    m = json.loads((trained / "60_train" / "mf" / "metrics.json").read_text())
    assert math.isclose(float(err.square().mean().sqrt()), m["test"]["rmse"], rel_tol=1e-5)


@pytest.mark.shared
def test_stage70_ranks_a_user_without_train_ratings_by_the_item_baseline(trained, capsys):
    model, meta = load_model(trained / "60_train" / "mf")
    sd = meta["state_dict"]
    ku = sd["known_user"].numpy()
    u = int(np.flatnonzero(~ku)[0])
    users = pd.read_parquet(trained / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(trained / "20_make_ids" / "items.parquet")
    raw = users["raw_user_id"].iloc[u]
    df = rec_stage.main(["--data-dir", str(trained), "--model", "mf", "--user", str(raw),
                         "-k", "10", "--device", "cpu"])
    base = (sd["global_mean"] + sd["item_bias.weight"][:, 0] * sd["scale"]
            * sd["known_item"]).numpy()
    order = np.lexsort((np.arange(len(base)), -base))[:10]      # ties: the lower index
    raw_items = items["raw_item_id"].to_numpy()
    assert df["raw_item_id"].tolist() == raw_items[order].tolist()
    assert np.allclose(df["score"].to_numpy(np.float64), base[order], atol=1e-6)
    # a known user's score of an item never rated in train: mu + b_u
    ki = sd["known_item"].numpy()
    j = int(np.flatnonzero(~ki)[0])
    v = int(np.flatnonzero(ku)[0])
    it, sc = rank_items(model, np.array([v]), sp.csr_matrix((1, model.n_items)),
                        model.n_items, torch.device("cpu"))
    got = sc[0][it[0] == j][0]
    want = float(sd["global_mean"] + sd["user_bias.weight"][v, 0] * sd["scale"])
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.shared
def test_unseen_drop_still_drops(tmp_path, shared_data):
    write_ml100k_stage10(tmp_path, shared_data)
    ids.main(["--data-dir", str(tmp_path)])
    split.main(["--data-dir", str(tmp_path), *SPLIT, "--unseen", "drop"])
    m30 = json.loads((tmp_path / "30_split_train_test" / "manifest.json").read_text())
    assert m30["unseen"]["policy"] == "drop"
    dropped = m30["unseen"]["test"]["rows"] + m30["unseen"]["valid"]["rows"]
    assert m30["unseen"]["dropped_rows"] == dropped > 0
    assert sum(m30["sizes"].values()) + dropped == 100_000
    d = tmp_path / "30_split_train_test"
    tr, te = pd.read_parquet(d / "train.parquet"), pd.read_parquet(d / "test.parquet")
    assert te["user_idx"].isin(tr["user_idx"]).all() and te["item_idx"].isin(tr["item_idx"]).all()


# ---- the baseline of families without bias tables, implicit ranking, old checkpoints -----


def _part(u, i, r=None) -> Part:
    u = torch.tensor(u)
    return Part(u, torch.tensor(i), torch.tensor(r if r is not None else [1.0] * len(u)))


def test_explicit_family_without_biases_falls_back_to_surprises_baseline():
    u, i = [0, 0, 1, 1, 2], [0, 1, 1, 2, 0]
    r = [5.0, 3.0, 4.0, 1.0, 2.0]
    mu = float(np.mean(r))
    model = models.MLP(4, 4, layers=(8, 4), global_mean=mu, use_bias=False)
    model.learn_fallback(_part(u, i, r), explicit=True, negatives=False)
    assert model.known_user.tolist() == [True, True, True, False]
    assert model.known_item.tolist() == [True, True, True, False]
    # Surprise's BaselineOnly ALS (reg_i 10, reg_u 15, 10 epochs), written as its loops
    bu, bi = np.zeros(4), np.zeros(4)
    for _ in range(10):
        for it in range(4):
            rows = [k for k in range(5) if i[k] == it]
            bi[it] = sum(r[k] - mu - bu[u[k]] for k in rows) / (10 + len(rows))
        for us in range(4):
            rows = [k for k in range(5) if u[k] == us]
            bu[us] = sum(r[k] - mu - bi[i[k]] for k in rows) / (15 + len(rows))
    assert np.allclose(model.base_user.numpy(), bu, atol=1e-6)
    assert np.allclose(model.base_item.numpy(), bi, atol=1e-6)
    pu, pi = torch.tensor([3, 0, 3]), torch.tensor([1, 3, 3])   # new user, new item, both
    got = predict_pairs(model.eval(), pu, pi)
    want = torch.tensor([mu + bi[1], mu + bu[0], mu], dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-6)
    tu, ti = regularised_baseline(torch.tensor(u), torch.tensor(i),
                                  torch.tensor(r, dtype=torch.float64) - mu, 4, 4)
    assert torch.equal(tu, model.base_user) and torch.equal(ti, model.base_item)


def test_implicit_user_without_interactions_gets_the_popularity_ranking():
    # item 2 has 3 users, item 0 two, item 1 one, item 3 none; user 3 has no interactions
    model = models.GMF(4, 4, dim=4)
    model.learn_fallback(_part([0, 1, 2, 0, 1, 2], [2, 2, 2, 0, 0, 1]), explicit=False,
                         negatives=True)
    assert model.known_user.tolist() == [True, True, True, False]
    assert model.known_item.all()              # fitted as sampled negatives
    top, _ = rank_items(model.eval(), np.array([3]), sp.csr_matrix((1, 4)), 4,
                        torch.device("cpu"))
    assert top[0].tolist() == [2, 0, 1, 3]
    # a known user keeps the model's own scores
    with torch.inference_mode():
        own = model.score_all(torch.tensor([0]))[0]
    _, sc = rank_items(model, np.array([0]), sp.csr_matrix((1, 4)), 4, torch.device("cpu"))
    assert np.allclose(np.sort(sc[0]), np.sort(own.numpy()))


def test_checkpoint_without_the_fallback_buffers_loads_with_every_row_known():
    m = models.BiasedMF(5, 6, dim=4)
    sd = {k: v for k, v in m.state_dict().items()
          if k not in ("known_user", "known_item", "base_user", "base_item")}
    fresh = models.BiasedMF(5, 6, dim=4)
    fresh.load_state_dict(sd)
    assert fresh.known_user.all() and fresh.known_item.all()
    assert fallback_mask(fresh, torch.arange(5), torch.arange(5)) is None


def test_folded_in_users_are_known():
    m = models.BiasedMF(5, 6, dim=4)
    m.learn_fallback(_part([0, 1], [0, 1], [4.0, 2.0]), explicit=True, negatives=False)
    folded = m.with_user_rows({"user_factors": torch.zeros(2, 4), "user_bias": torch.ones(2, 1)})
    assert folded.known_user.tolist() == [True, True] and folded.base_user.shape == (2,)
    assert m.known_user.shape == (5,)                   # the original is untouched
    got = predict_pairs(folded, torch.tensor([0, 0]), torch.tensor([0, 5]))
    assert float(got[1]) == pytest.approx(float(m.global_mean + m.scale * 1.0))
