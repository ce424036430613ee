"""Stage 60 on real data (ML-100K through stages 20-40): every model and task beats a trivial
baseline, resume equals an uninterrupted run, Ctrl-C leaves a resumable checkpoint, NaN input
and divergence are refused with clear errors, checkpoints load with weights_only=True."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from conftest import run_script
from recpipe import ids, matrix, split
from recpipe.artifacts import StageOutput
from recpipe.cli import PipelineError
from recpipe.train import Trainer, TrainConfig, load_model, run
from stage_fixtures import write_ml100k_stage10

FAST = ["--threads", "2", "--batch-size", "4096"]
IMPLICIT_FAST = ["--batch-size", "8192", "--n-negatives", "2"]
SMALL = {"mf": ["--dim", "16"], "deepmf": ["--dim", "16", "--hidden", "16"],
         "gmf": ["--dim", "8"], "mlp": ["--layers", "16", "8"],
         "neumf": ["--dim", "8", "--layers", "16", "8"]}


def _cfg(data_dir: Path, *argv: str) -> TrainConfig:
    from recpipe.cli import parse_config
    return parse_config(TrainConfig, ["--data-dir", str(data_dir), *FAST, *argv], "60_train.py", "")


def _pipeline(data_dir: Path, shared_data: Path, *split_args: str) -> Path:
    write_ml100k_stage10(data_dir, shared_data)
    ids.main(["--data-dir", str(data_dir)])
    split.main(["--data-dir", str(data_dir), "--seed", "1", *split_args])
    matrix.main(["--data-dir", str(data_dir)])
    return data_dir


@pytest.fixture(scope="module")
def ml100k_random(tmp_path_factory, request) -> Path:
    shared = request.getfixturevalue("shared_data")
    return _pipeline(tmp_path_factory.mktemp("random"), shared, "--strategy", "random")


@pytest.fixture(scope="module")
def ml100k_loo(tmp_path_factory, request) -> Path:
    shared = request.getfixturevalue("shared_data")
    return _pipeline(tmp_path_factory.mktemp("loo"), shared, "--strategy", "loo")


def _global_mean_rmse(data_dir: Path) -> float:
    d = data_dir / "40_make_sparse_matrix"
    tr = sp.load_npz(d / "train.npz")
    te = sp.load_npz(d / "test.npz")
    mu = tr.data.mean()
    return float(np.sqrt(np.mean((te.data - mu) ** 2)))


def test_help_lists_the_options():
    proc = run_script("60_train.py", "--help")
    for flag in ("--model", "--task", "--epochs", "--device", "--resume", "--optimizer",
                 "--batch-size", "--reg", "--patience", "--pretrained"):
        assert flag in proc.stdout


@pytest.mark.shared
@pytest.mark.parametrize("model", ["mf", "deepmf", "gmf", "mlp", "neumf"])
def test_explicit_beats_global_mean(ml100k_random, model):
    m = run(_cfg(ml100k_random, "--model", model, "--task", "explicit", "--epochs", "3",
                 "--lr", "1e-2", "--no-refit", *SMALL[model]))
    base = _global_mean_rmse(ml100k_random)
    assert m["test"]["rmse"] < base - 0.05, (m["test"], base)
    assert set(m) >= {"test", "valid", "best_epoch", "train_seconds", "config"}
    out = ml100k_random / "60_train" / model
    for f in ("model.pt", "checkpoint.pt", "history.csv", "metrics.json", "curve.png",
              "manifest.json"):
        assert (out / f).exists(), f


@pytest.mark.shared
@pytest.mark.parametrize("model", ["mf", "deepmf", "gmf", "mlp", "neumf"])
def test_implicit_beats_random_ranking(ml100k_loo, model):
    m = run(_cfg(ml100k_loo, "--model", model, "--task", "implicit", "--epochs", "1",
                 "--lr", "1e-2", "--no-refit", *IMPLICIT_FAST, *SMALL[model]))
    # random ranking of 1 + 99 candidates gives HR@10 = 0.10; a constant score gives 0
    assert m["test"]["hr@10"] > 0.25, m["test"]
    assert 0 < m["test"]["ndcg@10"] < m["test"]["hr@10"]
    for k in ("full_hr@10", "full_ndcg@10", "full_recall@20"):
        assert 0 <= m["test"][k] <= 1


@pytest.mark.shared
def test_implicit_on_random_split_reports_full_ranking(ml100k_random):
    m = run(_cfg(ml100k_random, "--model", "gmf", "--epochs", "1", "--lr", "1e-2",
                 *IMPLICIT_FAST, *SMALL["gmf"]))
    assert "hr@10" not in m["test"] and m["test"]["full_hr@10"] > 0.1
    assert m["selection_metric"] == "full_ndcg@10"


def _state(data_dir: Path, model: str) -> dict:
    return torch.load(data_dir / "60_train" / model / "model.pt", weights_only=True)


@pytest.mark.shared
@pytest.mark.parametrize("model,task,optimizer", [("mf", "explicit", "adam"),
                                                  ("mf", "explicit", "sparse_adam"),
                                                  ("mf", "explicit", "rowsgd"),
                                                  ("gmf", "implicit", "adam"),
                                                  ("neumf", "implicit", "sparse_adam")])
def test_resume_equals_uninterrupted_run(ml100k_loo, model, task, optimizer):
    args = ["--model", model, "--task", task, "--patience", "10", "--lr", "5e-3",
            "--optimizer", optimizer, *SMALL[model]]
    if task == "implicit":
        args += IMPLICIT_FAST
    full = run(_cfg(ml100k_loo, *args, "--epochs", "3"))
    want = _state(ml100k_loo, model)
    run(_cfg(ml100k_loo, *args, "--epochs", "1"))
    resumed = run(_cfg(ml100k_loo, *args, "--epochs", "3", "--resume"))
    got = _state(ml100k_loo, model)
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    for k, v in want["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    hist = (ml100k_loo / "60_train" / model / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + 3


@pytest.mark.shared
def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted_run(ml100k_random, monkeypatch):
    """Ctrl-C in the middle of epoch 2: the checkpoint stays the one of epoch 1 (not the
    half-trained state), the run is not marked finished, and --resume ends exactly where an
    uninterrupted run ends."""
    from recpipe.train import Optimizers
    args = ["--model", "mf", "--epochs", "3", "--patience", "10", *SMALL["mf"],
            "--optimizer", "adam"]
    out = ml100k_random / "60_train" / "mf"
    full = run(_cfg(ml100k_random, *args))
    # selected.pt: the model of the selection run itself (model.pt is the refit from scratch)
    want = torch.load(out / "selected.pt", weights_only=True)["state_dict"]
    real_step = Optimizers.step
    calls = {"n": 0, "per_epoch": 0}

    def count(self):
        calls["n"] += 1
        return real_step(self)

    monkeypatch.setattr(Optimizers, "step", count)
    run(_cfg(ml100k_random, *args[:2], "--epochs", "1", "--no-refit", *args[4:]))
    calls["per_epoch"], calls["n"] = calls["n"], 0

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == calls["per_epoch"] + 3:          # three steps into epoch 2
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Optimizers, "step", interrupted)
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(ml100k_random, *args))
    assert not (out / "manifest.json").exists()          # an interrupted run is not finished
    # the interrupted run's checkpoint is in its work folder, beside the published one
    from recpipe.train import work_dir
    ck = torch.load(work_dir(ml100k_random, "mf") / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    monkeypatch.setattr(Optimizers, "step", real_step)
    resumed = run(_cfg(ml100k_random, *args, "--resume"))
    assert resumed["valid"] == full["valid"] and resumed["best_epoch"] == full["best_epoch"]
    assert resumed["test"] == full["test"]
    got = torch.load(out / "selected.pt", weights_only=True)["state_dict"]
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
    assert (out / "manifest.json").exists()


@pytest.mark.shared
def test_ctrl_c_inside_a_rowsgd_epoch_then_resume_equals_uninterrupted_run(ml100k_random,
                                                                          monkeypatch):
    """rowsgd runs an epoch as one kernel call per stratum: Ctrl-C between two strata of
    epoch 2 leaves epoch 1's checkpoint, and --resume ends where an uninterrupted run ends."""
    from recpipe import kernels
    from recpipe.train import work_dir
    args = ["--model", "mf", "--epochs", "3", "--patience", "10", *SMALL["mf"],
            "--optimizer", "rowsgd", "--no-refit"]
    out = ml100k_random / "60_train" / "mf"
    full = run(_cfg(ml100k_random, *args))
    want = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    real = kernels._stratum
    calls = {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == kernels.BLOCKS + 3:               # stratum 3 of epoch 2
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(kernels, "_stratum", interrupted)
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(ml100k_random, *args))
    ck = torch.load(work_dir(ml100k_random, "mf") / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    monkeypatch.setattr(kernels, "_stratum", real)
    resumed = run(_cfg(ml100k_random, *args, "--resume"))
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    got = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.shared
def test_finished_checkpoint_refers_to_the_best_weights_and_resumes_exactly(ml100k_random,
                                                                            monkeypatch):
    """The tables are stored once per role: checkpoint.pt (the last epoch, for --resume)
    refers to selected.pt for the best epoch's weights instead of holding a copy, and a
    --resume with more epochs still ends where an uninterrupted run ends."""
    import recpipe.train as train_mod
    real = train_mod.evaluate
    rmse = iter([])

    def scripted(model, data, part, task, eval_batch=0, full=True, **ranked):
        out = real(model, data, part, task, eval_batch, full, **ranked)
        if not full:                      # per-epoch selection: epoch 2 is the best
            out["rmse"] = next(rmse)
        return out

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    args = ["--model", "mf", "--patience", "10", *SMALL["mf"]]
    out = ml100k_random / "60_train" / "mf"
    rmse = iter([1.0, 0.9, 0.95, 0.96])
    full = run(_cfg(ml100k_random, *args, "--epochs", "4"))
    want = torch.load(out / "selected.pt", weights_only=True)["state_dict"]
    rmse = iter([1.0, 0.9, 0.95])
    run(_cfg(ml100k_random, *args, "--epochs", "3"))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["best_epoch"] == 2
    assert ck["best_state"] is None and ck["best_ref"] == "selected.pt"
    sel = torch.load(out / "selected.pt", weights_only=True)["state_dict"]
    assert not torch.equal(sel["user_factors.weight"], ck["state_dict"]["user_factors.weight"])
    rmse = iter([0.96])
    resumed = run(_cfg(ml100k_random, *args, "--epochs", "4", "--resume"))
    assert resumed["best_epoch"] == full["best_epoch"] == 2
    assert resumed["test"] == full["test"]
    got = torch.load(out / "selected.pt", weights_only=True)["state_dict"]
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.shared
def test_test_users_evaluates_a_stated_sample_with_its_interval(ml100k_random):
    """--test-users: the final validation and the test use a fixed sample of users, which
    metrics.json states, with counts and intervals for that sample; the selection is not
    affected."""
    args = ["--model", "mf", "--epochs", "2", "--no-refit", *SMALL["mf"]]
    full = run(_cfg(ml100k_random, *args))
    part = run(_cfg(ml100k_random, *args, "--test-users", "100"))
    te = sp.load_npz(ml100k_random / "40_make_sparse_matrix" / "test.npz")
    assert full["test_users"] == full["test_users_total"] == int((te.getnnz(1) > 0).sum())
    assert part["test_users"] == 100 and part["test_users_total"] == full["test_users"]
    assert part["best_epoch"] == full["best_epoch"]
    assert full["test"]["rmse_n"] == te.nnz
    assert 0 < part["test"]["rmse_n"] < te.nnz
    lo, hi = part["test"]["rmse_ci"]
    flo, fhi = full["test"]["rmse_ci"]
    assert lo < part["test"]["rmse"] < hi and hi - lo > fhi - flo     # a wider interval


@pytest.mark.shared
def test_full_ranking_extras_use_a_stated_sample_of_users(ml100k_loo):
    """--full-rank-users on a leave-one-out split: the sampled-candidate metrics (the
    selection's) keep every user, the full-ranking extras are computed on the stated sample
    of users (their _n), the same as full ranking of exactly those users; 0 = every user."""
    from recpipe.dataset import load_data, sample_users
    from recpipe.evaluation import evaluate, full_ranking
    args = ["--model", "gmf", "--epochs", "1", "--no-refit", *SMALL["gmf"]]
    every = run(_cfg(ml100k_loo, *args, "--full-rank-users", "0"))
    part = run(_cfg(ml100k_loo, *args, "--full-rank-users", "200"))
    for m in (every, part):
        assert m["test"]["hr@10_n"] == m["valid"]["hr@10_n"] == 943
    assert every["test"]["full_hr@10_n"] == 943
    assert part["test"]["full_hr@10_n"] == part["valid"]["full_hr@10_n"] == 200
    assert part["test"]["hr@10"] == every["test"]["hr@10"]        # the same model and users
    assert part["config"]["full_rank_users"] == 200
    model, _ = load_model(ml100k_loo / "60_train" / "gmf", torch.device("cpu"))
    data = load_data(ml100k_loo, "implicit", torch.device("cpu"))
    seed = part["config"]["seed"] + 2
    got = evaluate(model, data, "test", "implicit", full_rank_users=200, seed=seed)
    want = full_ranking(model, sample_users(data, "test", 200, seed)[0], "test",
                        intervals=True)
    assert got["full_hr@10"] == pytest.approx(part["test"]["full_hr@10"], abs=1e-9)
    for k in ("full_hr@10", "full_ndcg@10", "full_recall@20"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["full_hr@10_n"] == 200
    assert evaluate(model, data, "test", "implicit")["full_hr@10_n"] == 943
    with pytest.raises(SystemExit):           # a usage error: exit 2 with the one line
        _cfg(ml100k_loo, *args, "--full-rank-users", "-1")


@pytest.mark.shared
def test_checkpoint_format_and_load_model(ml100k_random):
    run(_cfg(ml100k_random, "--model", "mf", "--epochs", "2", *SMALL["mf"]))
    out = ml100k_random / "60_train" / "mf"
    meta = torch.load(out / "model.pt", weights_only=True)
    assert meta["model"] == "mf" and meta["task"] == "explicit"
    assert meta["rating_scale"] == [1.0, 5.0] and meta["n_users"] == 943
    json.dumps(meta["model_args"]), json.dumps(meta["config"])   # plain types only
    model, meta2 = load_model(out, "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    te = sp.load_npz(ml100k_random / "40_make_sparse_matrix" / "test.npz").tocoo()
    with torch.no_grad():
        pred = model(torch.from_numpy(te.row.astype(np.int64)),
                     torch.from_numpy(te.col.astype(np.int64))).clamp(1, 5).numpy()
    rmse = math.sqrt(float(np.mean((pred - te.data) ** 2)))
    assert rmse == pytest.approx(metrics["test"]["rmse"], abs=1e-4)


def _tiny_stage40(data_dir: Path, ratings: np.ndarray) -> Path:
    u = np.array([0, 0, 1, 1, 2, 2], dtype=np.int32)
    i = np.array([0, 1, 1, 2, 0, 2], dtype=np.int32)
    with StageOutput(data_dir, "40_make_sparse_matrix") as out:
        for part in ("train", "valid", "test"):
            m = sp.csr_matrix((ratings.astype(np.float32), (u, i)), shape=(3, 3))
            sp.save_npz(out.path(f"{part}.npz"), m)
            sp.save_npz(out.path(f"{part}_implicit.npz"),
                        sp.csr_matrix((np.ones(6, np.float32), (u, i)), shape=(3, 3)))
        out.commit({"n_users": 3, "n_items": 3, "rating_scale": [1.0, 5.0]})
    return data_dir


def test_nan_rating_is_refused(tmp_path):
    d = _tiny_stage40(tmp_path, np.array([4, 3, np.nan, 5, 1, 2]))
    with pytest.raises(PipelineError, match=r"train\.npz: 1 non-finite.*--task implicit"):
        run(_cfg(d, "--model", "mf", "--epochs", "1"))


def test_diverging_loss_stops_with_advice(tmp_path):
    d = _tiny_stage40(tmp_path, np.array([4, 3, 1, 5, 1, 2], dtype=float))
    with pytest.raises(PipelineError, match=r"diverged.*epoch \d+.*lower --lr"):
        run(_cfg(d, "--model", "mf", "--epochs", "20", "--optimizer", "sgd", "--lr", "1e6",
                 "--batch-size", "0", "--reg", "0"))


def test_missing_stage40_names_the_command(tmp_path):
    with pytest.raises(PipelineError, match="40_make_sparse_matrix.py"):
        run(_cfg(tmp_path, "--model", "mf"))


def _synthetic_data(task: str, n_users: int = 60, n_items: int = 40, n: int = 900,
                    seed: int = 0):
    from recpipe.dataset import Data, Part
    rng = np.random.default_rng(seed)
    key = np.unique(rng.integers(0, n_users * n_items, n))
    u, i = key // n_items, key % n_items
    r = rng.integers(1, 6, len(key)).astype(np.float32)
    part = Part(torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(r))
    csr = sp.csr_matrix((np.ones(len(key), np.float32), (u, i)), shape=(n_users, n_items))
    explicit = task == "explicit"
    return Data(manifest={}, n_users=n_users, n_items=n_items, rating_scale=(1.0, 5.0),
                global_mean=float(r.mean()) if explicit else 0.0,
                rating_std=float(r.std()) if explicit else 1.0, task=task, train=part,
                valid=part, test=part, train_csr=csr, train_keys=torch.from_numpy(key),
                candidates={}, device=torch.device("cpu"))


@pytest.mark.parametrize("optimizer,reg", [("adam", 0.1), ("adam", 0.0), ("sgd", 0.05),
                                           ("sparse_adam", 0.1), ("sparse_adam", 0.0)])
def test_mf_fast_path_trains_like_autograd(tmp_path, optimizer, reg):
    """The explicit-MF fast path (analytic gradients) gives the same updates as autograd."""
    data = _synthetic_data("explicit")
    cfg = TrainConfig(model="mf", task="explicit", dim=8, batch_size=128, reg=reg,
                      optimizer=optimizer, lr=1e-2).resolved()
    states, losses = [], []
    for manual in (True, False):
        t = Trainer(cfg, data, tmp_path, "test")
        t.manual_grads = manual
        losses.append([t.train_epoch()[0] for _ in range(3)])
        states.append(t.model.state_dict())
        t.l2.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-6)
    assert not torch.equal(states[0]["user_factors.weight"],
                           Trainer(cfg, data, tmp_path, "t").model.user_factors.weight)


def test_row_compact_tables_with_one_index_share_its_unique(tmp_path):
    """NeuMF looks its GMF and MLP user tables up with the same users (and its two item
    tables with the same items): in row-compact training the distinct rows are computed once
    per index tensor, and each table still gets its own leaf."""
    data = _synthetic_data("implicit")
    cfg = TrainConfig(model="neumf", task="implicit", batch_size=256, dim=8, layers=[16, 8],
                      optimizer="sparse_adam", n_negatives=2).resolved()
    t = Trainer(cfg, data, tmp_path, "test")
    assert t._compact(True)
    m = t.model
    u, i = data.train.users[:50], data.train.items[:50]
    m(u, i)
    (ru, lu), = m.user_gmf.compact
    (rv, lv), = m.user_mlp.compact
    (ri, li), = m.item_gmf.compact
    assert ru is rv and ri is m.item_mlp.compact[0][0] and ru is not ri
    assert lu is not lv and lu.shape[1] == 8 and lv.shape[1] == m.user_mlp.embedding_dim
    # the distinct rows (in any order: family.distinct_rows)
    assert torch.equal(ru.sort().values, torch.unique(u))
    assert torch.equal(ri.sort().values, torch.unique(i))
    t.l2.close()


@pytest.mark.parametrize("n,b,ascending", [(10, 40, False), (1000, 40, False),
                                           (1000, 40, True), (5000, 40, True), (7, 0, False)])
def test_distinct_rows(n, b, ascending):
    """family.distinct_rows: the distinct ids and each element's position among them, as
    torch.unique gives (in any order unless asked ascending), the same on every call; the
    scratch array it keeps on its owner holds stale ids from an earlier batch, which must
    not leak into the next one. (10, 40): the mark path; (1000, 40): the slots; (1000, 40,
    ascending): marks; (5000, 40, ascending): the sort."""
    from recpipe.family import distinct_rows
    g = torch.Generator().manual_seed(n + b)
    owner = nn.Module()
    for step in range(3):
        idx = torch.randint(0, n, (b,), generator=g)
        if b:
            idx[b // 2:] = idx[: b - b // 2]          # repeats
        rows, inv = distinct_rows(idx, n, owner, ascending=ascending)
        assert torch.equal(rows[inv], idx)
        assert rows.numel() == torch.unique(idx).numel()
        assert torch.equal(rows.sort().values, torch.unique(idx))
        if ascending:
            assert torch.equal(rows, torch.unique(idx))
        again = distinct_rows(idx, n, owner, ascending=ascending)
        assert torch.equal(again[0], rows) and torch.equal(again[1], inv)
    if b and n > 2 * b and not ascending:
        assert owner._row_slots.shape == (n,)         # the slots path kept its scratch


@pytest.mark.parametrize("model,task", [("neumf", "implicit"), ("gmf", "explicit"),
                                        ("deepmf", "explicit"), ("mlp", "implicit")])
def test_row_compact_sparse_adam_steps_like_sparse_gradients(tmp_path, model, task):
    """sparse_adam through autograd: the row-compact leaves (family.look, step_rows) give the
    updates of SparseAdam on sparse embedding gradients, step counts included."""
    data = _synthetic_data(task)
    cfg = TrainConfig(model=model, task=task, batch_size=256, reg=0.01, dim=8,
                      layers=[16, 8], hidden=8, optimizer="sparse_adam", lr=1e-2,
                      n_negatives=2).resolved()
    states, losses, steps = [], [], []
    for compact in (True, False):
        t = Trainer(cfg, data, tmp_path, "test")
        t.compact_rows = compact
        losses.append([t.train_epoch()[0] for _ in range(2)])
        states.append(t.model.state_dict())
        steps.append({k: v["step"] for k, v in t.opt.opts[0].state.items()})
        t.l2.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert list(steps[0].values()) == list(steps[1].values())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-6)
    # and it trained: the tables moved from their start
    start = Trainer(cfg, data, tmp_path, "t").model.state_dict()
    table = next(k for k in states[0] if k.startswith("user_") and k.endswith("weight"))
    assert not torch.equal(states[0][table], start[table])


def test_tower_input_kernel_matches_torch_ops():
    """The NCF tower's first layer in row-compact training on the CPU (family.tower_input:
    the compiled gather + sum + relu and its gradient, kernels.gather_add_relu) gives the
    torch ops' output and gradients: rows with repeats, units at exactly zero, and a
    gradient reaching only the active units."""
    from recpipe import kernels
    from recpipe.family import _GatherAddRelu
    if not kernels.available():
        pytest.skip(kernels.missing_reason())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, requires_grad=True)
    b = torch.randn(4, 5, generator=g, requires_grad=True)
    iu = torch.randint(0, 7, (40,), generator=g)
    ii = torch.randint(0, 4, (40,), generator=g)
    with torch.no_grad():
        b[1] = -a[iu[0]]                  # a sum of exactly 0: relu's gradient there is 0
    ii[0] = 1
    want = (a.index_select(0, iu) + b.index_select(0, ii)).relu()
    got = _GatherAddRelu.apply(a, iu, b, ii)
    assert torch.equal(got, want) and got[0].eq(0).all()
    up = torch.randn(40, 5, generator=g)
    wa, wb = torch.autograd.grad((want * up).sum(), (a, b))
    ga, gb = torch.autograd.grad((got * up).sum(), (a, b))
    torch.testing.assert_close(ga, wa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, wb, rtol=1e-6, atol=1e-6)
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_pair_dot_kernel_matches_torch_ops():
    """GMF's score in row-compact training on the CPU (family.pair_dot: the compiled gather +
    product + sum and its gradient, kernels.gather_dot) gives the torch ops' scores and the
    gradients of both tables' rows and of the output weights, rows repeated in the batch."""
    from torch import nn
    from recpipe import kernels
    from recpipe.family import pair_dot
    if not kernels.available():
        pytest.skip(kernels.missing_reason())
    torch.manual_seed(0)
    users, items = nn.Embedding(9, 6), nn.Embedding(5, 6)
    w = torch.randn(6, requires_grad=True)
    u, i = torch.randint(0, 9, (60,)), torch.randint(0, 5, (60,))
    up = torch.randn(60)
    want = (users.weight[u] * w * items.weight[i]).sum(-1)
    wu, wi, ww = torch.autograd.grad((want * up).sum(), (users.weight, items.weight, w))
    for m in (users, items):
        m.compact, m.compact_keys = [], {}
    got = pair_dot(users, u, items, i, w)
    assert "GatherDot" in type(got.grad_fn.next_functions[0][0]).__name__    # the kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (gw,) = torch.autograd.grad((got * up).sum(), w, retain_graph=True)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-5)
    (got * up).sum().backward()
    for m, want_grad in ((users, wu), (items, wi)):
        (rows, leaf), = m.compact                    # the distinct rows and their gradient
        full = torch.zeros_like(m.weight).index_copy_(0, rows, leaf.grad)
        torch.testing.assert_close(full, want_grad, rtol=1e-5, atol=1e-5)
        assert rows.numel() == torch.unique(u if m is users else i).numel()


def test_kernel_dropout_is_inverted_dropout_with_its_own_mask_in_backward():
    """family.Dropout on the CPU (the compiled kernel): kept entries scaled by 1 / (1 - p),
    the others 0, about 1 - p of them kept; the gradient flows through the same mask; the
    mask is fixed by torch's seed and changes between calls; eval mode and p = 0 are the
    identity, float64 falls back to torch's dropout."""
    from recpipe import kernels
    from recpipe.family import Dropout
    if not kernels.available():
        pytest.skip(kernels.missing_reason())
    p = 0.3
    drop = Dropout(p).train()
    x = (torch.rand(257, 131) + 0.5).requires_grad_()      # no zeros: a 0 output is a drop
    torch.manual_seed(5)
    out = drop(x)
    assert "KernelDropout" in type(out.grad_fn).__name__       # the kernel ran, not torch's
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    n = kept.numel()
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    up = torch.randn(257, 131)
    (grad,) = torch.autograd.grad((out * up).sum(), x)
    torch.testing.assert_close(grad, up * kept / (1 - p))
    torch.manual_seed(5)
    assert torch.equal(drop(x), out)                        # seeded
    assert not torch.equal(drop(x) != 0, kept)              # a fresh mask per call
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    x64 = x.detach().double()
    y64 = Dropout(p).train()(x64)
    assert y64.dtype == torch.float64 and (y64 == 0).any()


def test_keyset_bitmap_matches_binary_search():
    from recpipe.dataset import KeySet, is_member, sample_negatives
    data = _synthetic_data("implicit", n_users=70, n_items=53)
    keys = data.keys()
    q = torch.randint(0, 70 * 53, (500, 3))
    q[:100, 0] = keys[:100]                       # certainly members
    bitmap, search = KeySet(keys, 70 * 53), KeySet(keys, 70 * 53, max_bytes=0)
    # a key space larger than max_bytes bits: a filter on the keys' low 11 bits, then the
    # binary search for the queries whose bit is set
    filt = KeySet(keys, 70 * 53, max_bytes=256)
    assert bitmap.bits is not None and bitmap.exact and search.bits is None
    assert not filt.exact and filt.bits.numel() == 256 and filt.mask == 2047
    want = is_member(keys, q)
    assert want[:100, 0].all() and not want.all()
    assert not (filt.bits == 255).all()           # the filter does rule some queries out
    for ks in (bitmap, search, filt):
        assert torch.equal(ks.contains(q), want)
    u = data.train.users[:200]
    negs = [sample_negatives(u, 53, 4, k, torch.Generator().manual_seed(3))
            for k in (keys, bitmap, filt)]
    assert torch.equal(negs[0], negs[1]) and torch.equal(negs[0], negs[2])
    assert not is_member(keys, u[:, None] * 53 + negs[0]).any()


@pytest.mark.parametrize("model", ["mf", "deepmf"])
def test_explicit_training_is_invariant_to_the_rating_scale(tmp_path, model):
    """Defaults carry over to another rating scale: the same data with ratings 20 r + 7 trains
    to the same standardised model, so its predictions are exactly 20 x + 7 of the original's
    (a model working in raw rating units would need other init, reg and lr)."""
    import dataclasses
    from recpipe.dataset import Part
    data = _synthetic_data("explicit")
    tr = data.train
    big = Part(tr.users, tr.items, tr.ratings * 20 + 7)
    scaled = dataclasses.replace(data, train=big, valid=big, test=big, rating_scale=(27.0, 107.0),
                                 global_mean=data.global_mean * 20 + 7,
                                 rating_std=data.rating_std * 20)
    cfg = TrainConfig(model=model, task="explicit", batch_size=128, epochs=3).resolved()
    preds = []
    for d in (data, scaled):
        t = Trainer(cfg, d, tmp_path, "test")
        for _ in range(3):
            t.train_epoch()
        t.l2.close()
        preds.append(t.model(tr.users, tr.items).detach())
    assert not torch.allclose(preds[0], torch.full_like(preds[0], data.global_mean), atol=1e-2)
    torch.testing.assert_close(preds[1], preds[0] * 20 + 7, rtol=1e-4, atol=1e-3)


def test_optimizer_auto_picks_sparse_adam_for_tables_much_larger_than_a_batch(tmp_path):
    from recpipe.optim import RowSparseAdam
    from recpipe.train import AUTO_ROWS_PER_SAMPLE, for_data
    data = _synthetic_data("explicit")                 # 60 users + 40 items = 100 rows
    assert TrainConfig(model="mf").resolved().optimizer == "auto"      # the mf preset
    small = 100 // AUTO_ROWS_PER_SAMPLE                 # a batch small enough for lazy Adam
    picks = {(m, bs): for_data(TrainConfig(model=m, optimizer="auto", batch_size=bs).resolved(),
                               data).optimizer
             for m in ("mf", "gmf") for bs in (small, 2048)}
    # lazy rows for every family once the tables outgrow the batch (issue: Netflix scale)
    assert picks == {("mf", small): "sparse_adam", ("mf", 2048): "adam",
                     ("gmf", small): "sparse_adam", ("gmf", 2048): "adam"}
    for m in ("gmf", "mlp", "neumf"):                   # the implicit NCF presets
        assert TrainConfig(model=m).resolved().optimizer == "auto"
    t = Trainer(TrainConfig(model="mf", batch_size=small, epochs=1).resolved(), data,
                tmp_path, "test")
    assert t.cfg.optimizer == "sparse_adam" and isinstance(t.opt.opts[0], RowSparseAdam)
    loss, n = t.train_epoch()
    assert n == len(data.train) and math.isfinite(loss)
    t.l2.close()


def test_batch_scale_grows_the_preset_batch_with_the_data_only():
    """--batch-scale: the preset's batch doubles while an epoch has more than SCALE_STEPS
    steps (capped), a batch the user gives is kept, the choice is made once (the refit on
    more data keeps it), and small data keeps the preset's batch."""
    import dataclasses
    from recpipe.dataset import Part
    from recpipe.train import for_data
    from recpipe.train_config import SCALE_MAX_BATCH, SCALE_STEPS
    data = _synthetic_data("explicit")
    n = SCALE_STEPS * 2048 * 3                       # 3 epochs' worth of preset-batch steps
    big = dataclasses.replace(data, train=Part(torch.zeros(n, dtype=torch.long),
                                               torch.zeros(n, dtype=torch.long),
                                               torch.ones(n)))
    cfg = TrainConfig(model="mf").resolved()
    assert cfg.batch_size == 2048 and cfg.batch_scale is True
    assert for_data(cfg, data).batch_size == 2048                 # 900 ratings: unchanged
    scaled = for_data(cfg, big)
    assert scaled.batch_size == 8192 and scaled.batch_scale is False
    assert n / scaled.batch_size <= SCALE_STEPS < n / (scaled.batch_size // 2)
    more = dataclasses.replace(big, train=Part(*(torch.cat([t, t]) for t in
                                                 (big.train.users, big.train.items,
                                                  big.train.ratings))))
    assert for_data(scaled, more).batch_size == 8192               # the refit keeps it
    huge = dataclasses.replace(big, train=Part(torch.zeros(n * 64, dtype=torch.long),
                                               torch.zeros(n * 64, dtype=torch.long),
                                               torch.ones(n * 64)))
    assert for_data(cfg, huge).batch_size == SCALE_MAX_BATCH
    given = TrainConfig(model="mf", batch_size=2048).resolved()
    assert given.batch_scale is False and for_data(given, big).batch_size == 2048
    # implicit: positives plus their negatives count as samples
    gmf = TrainConfig(model="gmf", task="implicit").resolved()
    per = 1 + gmf.n_negatives
    assert for_data(gmf, dataclasses.replace(big, task="implicit")).batch_size == min(
        SCALE_MAX_BATCH, 1024 * 2 ** max(0, math.ceil(math.log2(n * per / (SCALE_STEPS * 1024)))))


def test_a_validation_metric_that_never_moves_is_reported(tmp_path, monkeypatch, caplog):
    import recpipe.train as train_mod
    data = _synthetic_data("explicit")
    cfg = TrainConfig(model="mf", batch_size=256, epochs=10, patience=2).resolved()
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"rmse": 1.25, "mae": 1.0})
    t = Trainer(cfg, data, tmp_path, "test")
    logger = logging.getLogger("recpipe")       # stages' setup_logging stops propagation
    logger.addHandler(caplog.handler)
    try:
        t.fit()
    finally:
        logger.removeHandler(caplog.handler)
        t.l2.close()
    assert t.epoch == 3 and t.best_epoch == 1             # stopped by patience
    assert "stayed at 1.25 for all 3 epochs" in caplog.text


def test_per_epoch_validation_uses_a_fixed_bounded_sample_of_users(tmp_path, monkeypatch):
    """Above --valid-users, every epoch is scored on the same seeded sample of validation
    users (cost bounded); the final validation and the test use every user."""
    import recpipe.train as train_mod
    data = _synthetic_data("explicit")                     # 60 users, all in valid
    seen = []
    real = train_mod.evaluate

    def spy(model, d, part, *a, **k):
        seen.append((part, frozenset(d.valid.users.tolist()), len(d.valid)))
        return real(model, d, part, *a, **k)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    cfg = TrainConfig(model="mf", batch_size=256, epochs=3, patience=5, valid_users=20).resolved()
    t = Trainer(cfg, data, tmp_path, "test")
    t.fit()
    t.l2.close()
    epochs = [s for s in seen if s[0] == "valid"]
    assert len(epochs) == 3 and len({s[1] for s in epochs}) == 1       # one fixed sample
    assert len(epochs[0][1]) == 20 and epochs[0][2] < len(data.valid)
    assert (t.valid_epoch_users, t.valid_users) == (20, 60)
    again = Trainer(cfg, data, tmp_path, "test")                       # same seed: same sample
    assert set(again.epoch_data.valid.users.tolist()) == set(epochs[0][1])
    again.l2.close()
    full = Trainer(TrainConfig(model="mf", batch_size=256, epochs=1).resolved(), data,
                   tmp_path, "test")
    assert full.epoch_data is data and full.valid_epoch_users == 60     # default 50,000: all
    full.l2.close()


@pytest.mark.parametrize("min_delta, patience, epochs, lr_halvings, mark_k", [
    (0.0, 4, 12, 0, 10),      # every tiny gain counts: runs to --epochs
    (1e-4, 3, 5, 3, 0),       # 3 epochs in a row gain 3e-5 each: stopped after epoch 5
    (1e-4, 4, 12, 8, 8),      # their sum passes 1e-4 at every 4th, which counts again
])
def test_min_delta_counts_only_gains_above_it(tmp_path, monkeypatch, min_delta, patience,
                                              epochs, lr_halvings, mark_k):
    """--min-delta: an epoch resets --patience (and spares the plateau decay) only when it
    beats the last epoch that counted by more than min_delta; the best epoch is still the
    lowest validation RMSE, whatever its gain."""
    import recpipe.train as train_mod
    data = _synthetic_data("explicit")
    rmse = [1.0, 0.99] + [0.99 - 3e-5 * k for k in range(1, 11)]      # epochs 1, 2, 3..12
    curve = iter(rmse)
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"rmse": next(curve), "mae": 1})
    cfg = TrainConfig(model="mf", batch_size=256, epochs=12, patience=patience,
                      min_delta=min_delta).resolved()
    t = Trainer(cfg, data, tmp_path, "test")
    t.fit()
    t.l2.close()
    assert t.epoch == epochs and t.best_epoch == epochs          # tiny gains are still kept
    assert t.best == rmse[epochs - 1]
    assert t.lr_factor == 0.5 ** lr_halvings
    assert t.mark == rmse[mark_k + 1]                # the last epoch that counted


def test_reg_power_is_refused_where_it_does_not_apply():
    """--reg-power scales mf's explicit L2: another family, or mf on the implicit task, is
    told so instead of silently training without it; the presets fill it per task."""
    with pytest.raises(PipelineError, match=r"--reg-power applies to --model mf only, got gmf"):
        TrainConfig(model="gmf", reg_power=0.5).validate()
    with pytest.raises(PipelineError, match="explicit objective's L2 per row"):
        TrainConfig(model="mf", task="implicit", reg_power=0.5).resolved()
    assert TrainConfig(model="mf").resolved().reg_power == 0.5
    assert TrainConfig(model="mf", task="implicit").resolved().reg_power == 0.0
    assert TrainConfig(model="gmf").resolved().reg_power == 0.0
