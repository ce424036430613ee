"""The autoencoder families (recpipe/autoencoders.py): I-AutoRec (``--model autorec``,
explicit) and Mult-VAE (``--model multvae``, implicit), trained by stage 60 over rows, scored
and served by the same paths as every family. On ML-100K: the masked loss ignores unobserved
entries, a few epochs beat the global mean (AutoRec) and popularity (Mult-VAE), stage 70
recommends for a user and folds a new one in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recpipe import recommend
from recpipe.autoencoders import AutoRec, DeviceCSR, MultVAE, masked_mse
from recpipe.cli import parse_config
from recpipe.dataset import load_data
from recpipe.metrics import sampled_rank_metrics
from recpipe.train import TrainConfig, run
from stage_fixtures import ml100k_stage40, new_user_recommendations, top10_unseen

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def rand(tmp_path_factory) -> Path:
    return ml100k_stage40(tmp_path_factory, "ae_rand", "--strategy", "random", "--seed", "42")


@pytest.fixture(scope="module")
def loo(tmp_path_factory) -> Path:
    return ml100k_stage40(tmp_path_factory, "ae_loo", "--strategy", "loo", "--negatives", "99",
                    "--seed", "42")


def _train(d: Path, model: str, *argv: str) -> dict:
    return run(parse_config(TrainConfig, ["--data-dir", str(d), "--threads", "2", "--model",
                                          model, "--no-refit", "--device", "cpu", *argv],
                            "60_train.py", ""))


def test_device_rows_match_scipy():
    rng = np.random.default_rng(0)
    m = sp.random(30, 17, density=0.2, format="csr", random_state=1, dtype=np.float32)
    coo = m.tocoo()
    rows = DeviceCSR(torch.from_numpy(coo.row.astype(np.int64)),
                     torch.from_numpy(coo.col.astype(np.int64)),
                     torch.from_numpy(coo.data), 30, 17)
    idx = rng.permutation(30)[:11]
    x, obs = rows.rows(torch.from_numpy(idx))
    np.testing.assert_array_equal(x.numpy(), m[idx].toarray())
    np.testing.assert_array_equal(obs.numpy(), m[idx].toarray() != 0)


def test_autorec_masked_loss_ignores_unobserved_entries(rand):
    data = load_data(rand, "explicit", torch.device("cpu"))
    torch.manual_seed(0)
    model = AutoRec(data.n_users, data.n_items, data.global_mean, data.rating_std, dim=32)
    rows = model.row_data(data)
    x, obs = rows.rows(torch.arange(40))
    assert 0 < int(obs.sum()) < obs.numel()

    def loss_and_grad(target):
        model.zero_grad()
        loss = masked_mse(model.reconstruct(x), target, obs)
        loss.backward()
        return (float(loss.detach()), model.encoder.weight.grad.clone(),
                model.out_w.weight.grad.clone())

    base = loss_and_grad(x)
    other = x.clone()
    other[~obs] = 3.7                              # any value where nothing was observed
    changed = loss_and_grad(other)
    assert base[0] == changed[0]
    assert torch.equal(base[1], changed[1]) and torch.equal(base[2], changed[2])
    # an observed entry does count
    other[obs.nonzero()[0, 0], obs.nonzero()[0, 1]] += 1.0
    assert loss_and_grad(other)[0] != base[0]


@pytest.fixture(scope="module")
def autorec(rand) -> dict:
    return _train(rand, "autorec", "--epochs", "2", "--batch-size", "64", "--lr", "3e-3")


def test_autorec_beats_the_global_mean(rand, autorec):
    data = load_data(rand, "explicit", torch.device("cpu"))
    base = float(((data.valid.ratings - data.global_mean) ** 2).mean().sqrt())
    assert autorec["valid"]["rmse"] < base - 0.05, (autorec["valid"], base)
    assert autorec["test"]["rmse"] < base, autorec["test"]


def test_stage70_autorec_user_and_new_user(rand, autorec, tmp_path, capsys):
    users = pd.read_parquet(rand / "20_make_ids" / "users.parquet")
    df = recommend.main(["--data-dir", str(rand), "--model", "autorec", "--user",
                         str(users.raw_user_id.iloc[0])])
    assert len(df) == 10
    new_user_recommendations(rand, "autorec", tmp_path, 10,
                             [5 if k % 2 else 1 for k in range(10)], ["--foldin-steps", "50"])
    assert "item-based" in capsys.readouterr().out


@pytest.fixture(scope="module")
def multvae(loo) -> dict:
    return _train(loo, "multvae", "--epochs", "4", "--batch-size", "100", "--lr", "3e-3")


def test_multvae_beats_popularity(loo, multvae):
    data = load_data(loo, "implicit", torch.device("cpu"))
    pop = torch.bincount(data.train.items, minlength=data.n_items).float()
    cu, ci = data.candidates["valid"]
    pop_hr = sampled_rank_metrics(pop[ci], ci)["hr@10"]
    assert multvae["valid"]["hr@10"] > pop_hr + 0.02, (multvae["valid"], pop_hr)


def test_multvae_stage70_user_and_fold_in(loo, multvae, tmp_path, capsys):
    users = pd.read_parquet(loo / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(loo / "20_make_ids" / "items.parquet")
    df = recommend.main(["--data-dir", str(loo), "--model", "multvae", "--user",
                         str(users.raw_user_id.iloc[0])])
    assert len(df) == 10
    # the user's ranking is the decoder's logits from their train row, train items left out
    model = MultVAE(len(users), len(items))
    model.load_state_dict(torch.load(loo / "60_train" / "multvae" / "model.pt",
                                     weights_only=True)["state_dict"])
    model.eval()
    train = sp.load_npz(loo / "40_make_sparse_matrix" / "train_implicit.npz").tocsr()
    row = torch.from_numpy(train[0].toarray().astype(np.float32))
    with torch.no_grad():
        s = model.score_all(torch.tensor([0]), row)[0]
    assert df.raw_item_id.tolist() == top10_unseen(s, row[0].numpy(), items)
    # a new user: encoded from their given items, none recommended back
    new_user_recommendations(loo, "multvae", tmp_path, 20)
    assert "Mult-VAE needs no fold-in" in capsys.readouterr().out
