"""``--model blend`` (recpipe/blend.py): the stacking solve on tiny hand-checked inputs, and on
ML-100K the protocol: validation is cross-fitted from the members' train-only models, the
test is scored once by their refitted models with the weights fitted on all of validation,
stage 70 serves and folds in through the members, and members from elsewhere are refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import models  # noqa: F401 - registers the families
from recpipe import blend, recommend
from recpipe.checkpoint import load_model
from recpipe.cli import PipelineError, parse_config
from recpipe.dataset import load_data
from recpipe.family import regularised_baseline
from recpipe.scoring import predict_pairs, with_fallback
from recpipe.train import TrainConfig, run
from stage_fixtures import ml100k_stage40, new_user_recommendations


def test_design_columns():
    """(1, r_1, r_2) times (1, f_u, f_i), in that order."""
    x = blend.design(torch.tensor([[3.0, 4.0], [2.0, 5.0]]), torch.tensor([0.5, -1.0]),
                     torch.tensor([2.0, 0.0]))
    want = [[1, 3, 4, 0.5, 1.5, 2.0, 2, 6, 8], [1, 2, 5, -1, -2, -5, 0, 0, 0]]
    torch.testing.assert_close(x, torch.tensor(want, dtype=torch.float32))


def test_ridge_recovers_exact_weights_and_shrinks_to_the_prior():
    """Without penalty an exactly linear target is recovered; a huge penalty leaves the prior
    on every column but the (unpenalised) intercept, which then absorbs the mean."""
    x = torch.tensor([[1, 1, 2], [1, 2, 1], [1, 3, 5], [1, 4, 3]], dtype=torch.float64)
    w_true = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    y = x @ w_true
    prior = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(blend.ridge(x, y, 0.0, prior), w_true)
    w = blend.ridge(x, y, 1e9, prior)
    torch.testing.assert_close(w[1:], prior[1:], atol=1e-6, rtol=0)
    # intercept = mean(y - x[:, 1:] @ prior[1:])
    assert float(w[0]) == pytest.approx(float((y - x[:, 1:] @ prior[1:]).mean()), abs=1e-6)
    # a middle penalty: the normal equations (X'X + n * reg * D) w = X'y + n * reg * D prior
    reg, d = 0.3, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    w = blend.ridge(x, y, reg, prior)
    lhs = (x.T @ x + torch.diag(4 * reg * d)) @ w
    torch.testing.assert_close(lhs, x.T @ y + 4 * reg * d * prior)


@pytest.fixture(scope="module")
def rand(tmp_path_factory):
    d = ml100k_stage40(tmp_path_factory, "blend100k", "--strategy", "random", "--seed", "42")
    common = ["--data-dir", str(d), "--threads", "2", "--device", "cpu"]
    run(parse_config(TrainConfig, [*common, "--model", "mf", "--epochs", "4"],
                     "60_train.py", ""))
    run(parse_config(TrainConfig, [*common, "--model", "bpmf", "--dim", "8", "--epochs", "16"],
                     "60_train.py", ""))
    # a member with dropout (0.5 in its preset): the blend must score it in eval mode
    run(parse_config(TrainConfig, [*common, "--model", "deepmf", "--epochs", "2"],
                     "60_train.py", ""))
    return d


MEMBERS = ("mf", "bpmf", "deepmf")


def _blend(d, *extra):
    return run(parse_config(TrainConfig, ["--data-dir", str(d), "--threads", "2", "--device",
                                          "cpu", "--model", "blend", "--members", *MEMBERS,
                                          *extra], "60_train.py", ""))


def _rmse(pred, y):
    return float(((pred.clamp(1, 5) - y) ** 2).mean().sqrt())


def test_blend_protocol_on_ml100k(rand):
    """The validation figure is out of fold, from the members' selected.pt; the test figure
    comes from their model.pt (the refits) with the all-validation weights; it beats both
    members on validation there and the worse one on test."""
    m = _blend(rand)
    data = load_data(rand, "explicit", torch.device("cpu"))
    d60 = rand / "60_train"
    sel = {n: load_model(d60 / n, "cpu", "selected.pt")[0] for n in MEMBERS}
    fin = {n: load_model(d60 / n, "cpu", "model.pt")[0] for n in MEMBERS}
    model, meta = load_model(d60 / "blend", "cpu")
    reg = meta["config"]["reg"]
    assert reg in blend.Blend.reg_grid and m["best_epoch"] >= 1
    v, t = data.valid, data.test

    def preds(ms, p):
        return torch.stack([predict_pairs(ms[n], p.users, p.items).clamp(1, 5)
                            for n in MEMBERS], 1)

    def feats(p, tr_users, tr_items):
        fu = torch.log1p(torch.bincount(tr_users, minlength=data.n_users).double()).float()
        fi = torch.log1p(torch.bincount(tr_items, minlength=data.n_items).double()).float()
        return fu, fi

    fu, fi = feats(v, data.train.users, data.train.items)
    mean_u, mean_i = fu[v.users].mean(), fi[v.items].mean()
    x = blend.design(preds(sel, v), fu[v.users] - mean_u, fi[v.items] - mean_i)
    prior = torch.tensor([0] + [1 / 3] * 3 + [0] * 8, dtype=torch.float64)
    # out of fold: each validation user's pairs by the weights fitted without their fold
    folds = model.user_fold  # zero after the refit; rebuild them as the fit draws them
    assert int(folds.abs().sum()) == 0
    vu = torch.unique(v.users)
    order = torch.randperm(len(vu), generator=torch.Generator().manual_seed(0))
    fold_of = torch.zeros(data.n_users, dtype=torch.long)
    fold_of[vu[order]] = torch.arange(len(vu)) % blend.FOLDS + 1
    f = fold_of[v.users]
    oof = torch.empty(len(v))
    for k in range(1, blend.FOLDS + 1):
        w = blend.ridge(x[f != k], v.ratings[f != k], reg, prior)
        oof[f == k] = (x[f == k].double() @ w).float()
    # pairs with a side unseen in train get the blend's own fallback, as in every family:
    # global mean + the known side's baseline (Surprise's, fitted on train)
    bu, bi = regularised_baseline(data.train.users, data.train.items,
                                  data.train.ratings.double() - data.global_mean,
                                  data.n_users, data.n_items)
    ku = torch.bincount(data.train.users, minlength=data.n_users) > 0
    ki = torch.bincount(data.train.items, minlength=data.n_items) > 0
    miss = ~(ku[v.users] & ki[v.items])
    assert int(miss.sum()) == m["valid"]["fallback_n"] > 0
    base = data.global_mean + (bu * ku)[v.users] + (bi * ki)[v.items]
    oof = torch.where(miss, base.float(), oof)
    assert m["valid"]["rmse"] == pytest.approx(_rmse(oof, v.ratings), abs=1e-5)
    # the test: the refitted members, the weights of all of validation, supports of train + valid
    w_all = blend.ridge(x, v.ratings, reg, prior)
    torch.testing.assert_close(model.weights[0], w_all)
    tu = torch.cat([data.train.users, v.users])
    ti = torch.cat([data.train.items, v.items])
    fu2, fi2 = feats(t, tu, ti)
    xt = blend.design(preds(fin, t), fu2[t.users] - mean_u, fi2[t.items] - mean_i)
    pred = with_fallback(model, t.users, t.items, (xt.double() @ w_all).float())
    assert m["test"]["rmse"] == pytest.approx(_rmse(pred, t.ratings), abs=1e-5)
    assert m["test"]["rmse_n"] == len(t)
    member = {n: json.loads((d60 / n / "metrics.json").read_text()) for n in MEMBERS}
    assert m["valid"]["rmse"] < min(r["valid"]["rmse"] for r in member.values())
    assert m["test"]["rmse"] < max(r["test"]["rmse"] for r in member.values())
    # stage 70: a known user, and a new one folded into every member
    assert len(recommend.main(["--data-dir", str(rand), "--model", "blend", "--user", "1"])) == 10


def test_blend_folds_in_a_new_user(rand, tmp_path):
    _blend(rand, "--reg", "0.01")
    given, new = new_user_recommendations(rand, "blend", tmp_path, 12)
    assert len(new) == 10


def test_blend_refuses_members_it_cannot_use(rand, tmp_path):
    """A member never trained, or trained on another stage-40 output: one line naming the
    command to run."""
    with pytest.raises(PipelineError, match=r"60_train\.py --data-dir .* --model autorec"):
        run(parse_config(TrainConfig, ["--data-dir", str(rand), "--model", "blend",
                                       "--members", "mf", "autorec"], "60_train.py", ""))
    other = tmp_path / "other"
    shutil.copytree(rand, other)
    man = other / "60_train" / "bpmf" / "manifest.json"
    m = json.loads(man.read_text())
    m["upstream"] = {"40_make_sparse_matrix": "0" * 16}
    man.write_text(json.dumps(m))
    with pytest.raises(PipelineError, match="bpmf was trained on another"):
        _blend(other)


def test_blend_scores_all_items_as_its_pairs(rand):
    """score_all (top-k, stage 70) streams the members; it equals scoring every pair."""
    _blend(rand, "--reg", "0.01")
    model, _ = load_model(rand / "60_train" / "blend", "cpu")
    users = torch.tensor([0, 5, 17])
    with torch.inference_mode():
        full = model.score_all(users)
        pairs = model(users[:, None], torch.arange(model.n_items)[None, :])
    torch.testing.assert_close(full, pairs, rtol=1e-5, atol=1e-4)
    assert full.shape == (3, model.n_items)


@pytest.fixture(scope="module")
def loo(tmp_path_factory):
    d = ml100k_stage40(tmp_path_factory, "blendloo", "--strategy", "loo", "--negatives", "99",
                       "--seed", "42")
    common = ["--data-dir", str(d), "--threads", "2", "--device", "cpu"]
    run(parse_config(TrainConfig, [*common, "--model", "ease", "--reg", "500", "--recency",
                                   "5"], "60_train.py", ""))
    run(parse_config(TrainConfig, [*common, "--model", "gmf", "--epochs", "3"],
                     "60_train.py", ""))
    return d


def _implicit_blend(d, *members, extra=()):
    return run(parse_config(TrainConfig, ["--data-dir", str(d), "--threads", "2", "--device",
                                          "cpu", "--model", "blend", "--members", *members,
                                          *extra], "60_train.py", ""))


def test_implicit_blend_of_one_member_ranks_as_it(loo):
    """z-scores per user keep each user's order, so a blend of EASE alone scores exactly as
    EASE, validation and test: EASE's recency-weighted history reaches it unchanged."""
    m = _implicit_blend(loo, "ease")
    ease = json.loads((loo / "60_train" / "ease" / "metrics.json").read_text())
    assert ease["config"]["recency"] == 5.0
    model, _ = load_model(loo / "60_train" / "blend", "cpu")
    assert model.history_half_life() == 5.0 and model.input == "rows"
    assert float(model.weights[0, 0]) > 0
    for part in ("valid", "test"):
        for k in ("hr@10", "ndcg@10"):
            assert m[part][k] == pytest.approx(ease[part][k], abs=1e-6), (part, k)


def test_implicit_blend_cross_fits_validation(loo):
    """The validation figure is out of fold: each user's candidates ranked by the weights of
    the softmax fit without their fold, on the z-scores of the members' train-only models."""
    from recpipe.evaluation import history_before
    from recpipe.metrics import sampled_rank_rows
    from recpipe.scoring import _fallback_all, dense_rows
    m = _implicit_blend(loo, "ease", "gmf")
    data = load_data(loo, "implicit", torch.device("cpu"))
    cu, ci = data.candidates["valid"]
    zs = []
    for name in ("ease", "gmf"):
        part, _ = load_model(loo / "60_train" / name, "cpu", "selected.pt")
        hist = history_before(part, data, "valid")
        rows = dense_rows(hist[cu.numpy()], 0, len(cu), torch.device("cpu")) if hist is not None \
            else None
        with torch.inference_mode():
            s = _fallback_all(part, cu, part.score_all(cu, rows).float())
        z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)
        zs.append(z.gather(1, ci).double())
    z = torch.stack(zs, 2)
    same = ci[:, 1:] == ci[:, :1]
    reg = m["config"]["reg"]
    prior = torch.full((2,), 0.5, dtype=torch.float64)
    order = torch.randperm(len(cu), generator=torch.Generator().manual_seed(0))
    fold = torch.zeros(len(cu), dtype=torch.long)
    fold[torch.argsort(cu)[order]] = torch.arange(len(cu)) % blend.FOLDS + 1
    scores = torch.empty(len(cu), ci.shape[1], dtype=torch.float64)
    for k in range(1, blend.FOLDS + 1):
        w = blend.softmax_fit(z[fold != k], same[fold != k], reg, prior)
        scores[fold == k] = z[fold == k] @ w
    rows = sampled_rank_rows(scores.float(), ci)
    assert m["valid"]["hr@10"] == pytest.approx(float(rows["hr@10"].mean()), abs=1e-6)
    gmf = json.loads((loo / "60_train" / "gmf" / "metrics.json").read_text())
    ease = json.loads((loo / "60_train" / "ease" / "metrics.json").read_text())
    assert m["valid"]["hr@10"] >= max(gmf["valid"]["hr@10"], ease["valid"]["hr@10"]) - 0.01
    assert m["test"]["hr@10_n"] == 943


def test_implicit_blend_serves_and_folds_in(loo, tmp_path):
    _implicit_blend(loo, "ease", "gmf", extra=("--reg", "0.01"))
    assert len(recommend.main(["--data-dir", str(loo), "--model", "blend", "--user", "1"])) == 10
    new_user_recommendations(loo, "blend", tmp_path, 12)


def test_softmax_fit_prefers_the_informative_member():
    """Member 0 ranks every positive first, member 1 is noise: the fit weighs member 0 more,
    and a huge penalty keeps the prior."""
    g = torch.Generator().manual_seed(0)
    good = torch.randn(200, 11, generator=g)
    good[:, 0] = good.max(1).values + 1.0
    z = torch.stack([good, torch.randn(200, 11, generator=g)], 2)
    same = torch.zeros(200, 10, dtype=torch.bool)
    prior = torch.full((2,), 0.5, dtype=torch.float64)
    w = blend.softmax_fit(z, same, 0.0, prior)
    assert float(w[0]) > 5 * abs(float(w[1]))
    torch.testing.assert_close(blend.softmax_fit(z, same, 1e9, prior), prior, atol=1e-6, rtol=0)
