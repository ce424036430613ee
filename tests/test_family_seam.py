"""The model-family seam: two toy families defined and registered only here (a pairwise
popularity-bias model fitted by epochs, and an EASE-like row-input model in closed form)
train through stage 60, evaluate, fold in a new user and serve stage 70, with no edit to
any stage. Also: the one place the task is decided."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recpipe import ids, matrix, presets, recommend, split
from recpipe.cli import PipelineError, parse_config
from recpipe.family import Family, family, look, register, unregister
from recpipe.train import TrainConfig, decide_task, run
from stage_fixtures import write_ml100k_stage10


class PopBias(Family):
    """score(u, i) = b_u + b_i: popularity learnt by the shared implicit objective."""

    default_task = "implicit"
    options = {"init_std": "unused (biases start at zero)"}

    def __init__(self, n_users, n_items, init_std=0.0, global_mean=0.0, scale=1.0,
                 sparse=False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.table("user", "user_bias", 1, None, sparse)
        self.table("item", "item_bias", 1, None, sparse)

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {"init_std": float(hp["init_std"]), "global_mean": float(global_mean),
                "scale": float(scale), "sparse": bool(sparse)}

    def forward(self, users, items):
        return self._out(look(self.user_bias, users).squeeze(-1)
                         + look(self.item_bias, items).squeeze(-1))

    def item_vectors(self):
        return torch.cat([self.item_bias.weight, torch.ones_like(self.item_bias.weight)], 1)


class TinyEASE(Family):
    """EASE (Steck 2019) in closed form: B = I - P / diag(P), P = (X'X + lam I)^-1, scores
    = history @ B with the user's interaction row as input."""

    default_task = "implicit"
    tasks = ("implicit",)
    input = "rows"
    fit_by = "closed_form"
    options = {"reg": "the ridge weight lambda"}

    def __init__(self, n_users, n_items, lam=50.0, global_mean=0.0, scale=1.0, sparse=False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.lam = float(lam)
        self.register_buffer("B", torch.zeros(n_items, n_items))

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {"lam": 50.0}

    def fit_closed_form(self, train, hp):
        x = torch.from_numpy(train.toarray()).double()
        g = x.T @ x + self.lam * torch.eye(self.n_items, dtype=torch.float64)
        p = torch.linalg.inv(g)
        b = -p / torch.diag(p)
        b.fill_diagonal_(0.0)
        self.B.copy_(b.float())

    def score_all(self, users, history=None):
        return history @ self.B

    def item_vectors(self):
        return self.B.T

    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=0, lr=0.0, seed=0):
        return self, "EASE needs no fold-in: it scores from the given items"


@pytest.fixture
def toy_families(monkeypatch):
    register("toy_pop")(PopBias)
    register("toy_ease")(TinyEASE)
    monkeypatch.setitem(presets.PRESETS, ("toy_pop", "implicit"),
                        {"lr": 0.05, "batch_size": 8192, "epochs": 3, "init_std": 0.0,
                         "reg": 0.0, "n_negatives": 2})
    monkeypatch.setitem(presets.PRESETS, ("toy_ease", "implicit"), {"epochs": 1, "reg": 0.0})
    yield
    unregister("toy_pop")
    unregister("toy_ease")


@pytest.fixture(scope="module")
def loo(tmp_path_factory, request) -> Path:
    shared = request.getfixturevalue("shared_data")
    d = tmp_path_factory.mktemp("seam")
    write_ml100k_stage10(d, shared)
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--seed", "1", "--strategy", "loo"])
    matrix.main(["--data-dir", str(d)])
    return d


def _train(d: Path, *argv: str) -> dict:
    return run(parse_config(TrainConfig, ["--data-dir", str(d), "--threads", "2", *argv],
                            "60_train.py", ""))


@pytest.mark.shared
@pytest.mark.parametrize("name", ["toy_pop", "toy_ease"])
def test_a_family_defined_in_a_test_trains_evaluates_folds_in_and_serves(
        toy_families, loo, tmp_path, capsys, name):
    m = _train(loo, "--model", name)
    # both beat a random ranking of 1 + 99 candidates (HR@10 = 0.10) by far
    assert m["test"]["hr@10"] > 0.3, m["test"]
    assert m["config"]["task"] == "implicit" and m["test"]["full_hr@10"] > 0.05
    users = pd.read_parquet(loo / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(loo / "20_make_ids" / "items.parquet")
    raw_user = users.raw_user_id.iloc[0]
    df = recommend.main(["--data-dir", str(loo), "--model", name, "--user", str(raw_user)])
    assert len(df) == 10
    # a new user from a ratings file: the 20 most popular items; none is recommended back
    given = items.sort_values("n_ratings", ascending=False).raw_item_id.iloc[:20].tolist()
    f = tmp_path / "new.csv"
    f.write_text("".join(f"{i},5\n" for i in given))
    new = recommend.main(["--data-dir", str(loo), "--model", name, "--ratings", str(f)])
    assert len(new) == 10 and not set(new.raw_item_id) & set(given)
    out = tmp_path / "all.csv"
    recommend.main(["--data-dir", str(loo), "--model", name, "--batch", "all",
                    "--out", str(out)])
    assert len(pd.read_csv(out)) == 10 * len(users)
    sim = recommend.main(["--data-dir", str(loo), "--model", name, "--similar-to",
                          str(given[0])])
    assert len(sim) == 10


def test_row_input_closed_form_math_on_a_hand_checked_matrix(toy_families):
    import scipy.sparse as sp
    x = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32))
    m = family("toy_ease")(4, 3, lam=1.0)
    m.fit_closed_form(x, {})
    g = x.toarray().T @ x.toarray() + np.eye(3)
    p = np.linalg.inv(g)
    want = -p / np.diag(p)
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(m.B.numpy(), want, rtol=1e-5, atol=1e-6)
    from recpipe.scoring import rank_items
    top, _ = rank_items(m, np.arange(4), x, 1, torch.device("cpu"), history=x)
    # the one item each user has not interacted with is all that is left to recommend
    assert top[:, 0].tolist() == [2, 0, 1, -1]


def test_task_is_decided_in_one_place(caplog):
    mf, gmf, ease = family("mf"), family("gmf"), None
    assert decide_task(None, mf, None) == "explicit"               # random split: the family's
    assert decide_task(None, gmf, None) == "implicit"
    assert decide_task(None, mf, "implicit") == "implicit"         # loo / ncf: the split's
    assert decide_task(None, mf, "explicit") == "explicit"         # older stage-30 manifests
    logger = logging.getLogger("recpipe")
    logger.addHandler(caplog.handler)
    try:
        assert decide_task("explicit", mf, "implicit") == "explicit"
    finally:
        logger.removeHandler(caplog.handler)
    assert "training explicit as --task asks, on a split made for the implicit task" \
        in caplog.text
    with pytest.raises(PipelineError, match="needs ratings.*use --task implicit"):
        decide_task("explicit", mf, None, rated=False)
    del ease


@pytest.mark.shared
def test_stage60_trains_the_task_stage30_recorded(loo):
    import json
    m30 = json.loads((loo / "30_split_train_test" / "manifest.json").read_text())
    m40 = json.loads((loo / "40_make_sparse_matrix" / "manifest.json").read_text())
    assert m30["task"] == m40["task"] == "implicit"
    m = _train(loo, "--model", "mf", "--epochs", "1", "--no-refit", "--batch-size", "8192",
               "--n-negatives", "2")
    assert m["config"]["task"] == "implicit" and "hr@10" in m["test"] and "rmse" not in m["test"]
