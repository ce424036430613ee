"""bench/seeds.py: the paired bootstrap on hand-made per-unit values, the per-row ranking
metrics it rests on (recpipe.metrics.sampled_rank_rows), the rescoring of a saved model
against stage 60's metrics.json, and one end-to-end run on a tiny synthetic pipeline."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from recpipe import ids, matrix, split
from recpipe.cli import PipelineError
from recpipe.metrics import sampled_rank_metrics, sampled_rank_rows
from recpipe.train import main as train_main
from stage_fixtures import make_ratings, write_stage10


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_seeds"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


seeds = _load_bench()


def _synthetic_pipeline(data_dir: Path, *split_args: str) -> Path:
    """Stages 10 (written directly) to 40 on 100 users x 60 items, about 2,400 ratings."""
    rng = np.random.default_rng(0)
    n_users, n_items = 100, 60
    key = np.unique(rng.integers(0, n_users * n_items, 2500))
    u, i = key // n_items, key % n_items
    r = np.clip(np.round(3 + (u % 3 - 1) + (i % 2) + rng.normal(0, 0.7, len(key))), 1, 5)
    write_stage10(data_dir, make_ratings(u, i, r, timestamps=rng.integers(0, 10**6, len(key))))
    ids.main(["--data-dir", str(data_dir)])
    split.main(["--data-dir", str(data_dir), *split_args])
    matrix.main(["--data-dir", str(data_dir)])
    return data_dir


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return _synthetic_pipeline(tmp_path_factory.mktemp("random"), "--strategy", "random")


@pytest.fixture(scope="module")
def loo_dir(tmp_path_factory) -> Path:
    return _synthetic_pipeline(tmp_path_factory.mktemp("loo"), "--strategy", "loo",
                               "--negatives", "20")


def _train(data_dir: Path, model: str, *extra: str) -> None:
    train_main(["--data-dir", str(data_dir), "--model", model, "--epochs", "2",
                "--threads", "1", *extra])


# ---------------------------------------------------------------- the paired bootstrap

def _units(n_users: int = 40, per_user: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), rng.integers(1, per_user + 1, n_users))
    return users, rng.random(len(users))


@pytest.mark.parametrize("name", ["rmse", "hr@10"])
def test_identical_models_give_exactly_zero(name):
    users, a = _units()
    assert seeds.paired_bootstrap(users, a, a.copy(), name, 500, 0) == (0.0, 0.0)
    assert seeds.verdict(0.0, 0.0, name) == "not separable"


def test_a_constant_shift_gives_an_interval_at_the_shift():
    users, b = _units()
    lo, hi = seeds.paired_bootstrap(users, b + 0.1, b, "hr@10", 500, 0)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)
    # with noise per unit: the interval brackets the shift and lies above zero
    noisy = b + 0.1 + np.random.default_rng(1).normal(0, 0.05, len(b))
    lo, hi = seeds.paired_bootstrap(users, noisy, b, "hr@10", 2000, 0)
    assert 0 < lo < 0.1 < hi
    assert seeds.verdict(lo, hi, "hr@10") == "A better"
    assert seeds.verdict(lo, hi, "rmse") == "B better"      # lower is better for RMSE


def test_rmse_of_a_resample_by_user_weights_equals_the_direct_computation():
    users = np.array([0, 0, 1, 2, 2, 2])
    sq = np.array([1.0, 4.0, 9.0, 0.25, 0.0, 2.25])
    # one resample drawing users 0, 0, 2: user 0's pairs twice, user 2's once, user 1 not
    weights = np.array([[2.0, 0.0, 1.0]])
    sums = np.bincount(users, weights=sq)
    counts = np.bincount(users).astype(float)
    got = seeds.resampled_metric(weights, sums, counts, "rmse")
    drawn = np.concatenate([sq[users == 0], sq[users == 0], sq[users == 2]])
    assert got[0] == pytest.approx(math.sqrt(drawn.mean()), rel=1e-12)
    assert seeds.resampled_metric(weights, sums, counts, "hr@10")[0] == pytest.approx(
        drawn.mean(), rel=1e-12)


def test_resample_weights_are_counts_of_a_draw_with_replacement():
    w = seeds.resample_weights(7, 300, np.random.default_rng(0))
    assert w.shape == (300, 7)
    assert (w >= 0).all() and (w == np.round(w)).all() and (w.sum(1) == 7).all()
    assert abs(w.mean() - 1.0) < 0.05                        # each user drawn once on average


def test_bootstrap_is_deterministic_for_a_seed_and_bounded_in_memory(monkeypatch):
    users, a = _units(seed=2)
    b = np.random.default_rng(3).random(len(a))
    first = seeds.paired_bootstrap(users, a, b, "rmse", 400, 7)
    assert seeds.paired_bootstrap(users, a, b, "rmse", 400, 7) == first
    assert seeds.paired_bootstrap(users, a, b, "rmse", 400, 8) != first
    # weight matrices of a few resamples at a time: the same draws, the same interval
    monkeypatch.setattr(seeds, "BOOTSTRAP_CELLS", 3 * len(np.unique(users)))
    assert seeds.paired_bootstrap(users, a, b, "rmse", 400, 7) == pytest.approx(first)


def test_bootstrap_of_10k_pairs_takes_well_under_a_second():
    import time
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 943, 10_000))
    t = time.perf_counter()
    seeds.paired_bootstrap(users, rng.random(10_000), rng.random(10_000), "rmse", 2000, 0)
    assert time.perf_counter() - t < 1.0


# ---------------------------------------------------------------- per-row ranking metrics

def test_sampled_rank_rows_by_hand_and_their_means_are_sampled_rank_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3],     # rank 0
                           [0.5, 0.9, 0.5, 0.1],     # one above, one tie: rank 2
                           [0.5, 0.5, 0.1, 0.2],     # a tie: rank 1
                           [0.5, 0.5, 0.1, 0.2]])    # the tie is the positive's item again
    items = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [7, 7, 3, 4]])
    rows = sampled_rank_rows(scores, items, ks=(1, 2))
    assert rows["hr@1"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert rows["hr@2"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert rows["ndcg@2"].tolist() == pytest.approx([1.0, 0.0, 1 / math.log2(3), 1.0])
    means = sampled_rank_metrics(scores, items, ks=(1, 2))
    assert list(means) == list(rows)
    for k, v in rows.items():
        assert means[k] == pytest.approx(float(v.mean()))


# ---------------------------------------------------------------- rescoring saved models

def test_rescored_candidates_reproduce_metrics_json(loo_dir):
    _train(loo_dir, "gmf")
    metrics, units = seeds.score_test_units(loo_dir, "gmf")
    assert units.task == "implicit" and len(units.users) == metrics["test"]["hr@10_n"]
    for k in ("hr@10", "ndcg@10"):
        assert units.values[k].mean() == pytest.approx(metrics["test"][k], abs=1e-5)


def test_a_rescoring_that_disagrees_with_metrics_json_stops_the_bench(random_dir):
    _train(random_dir, "mf", "--seed", "5")
    path = random_dir / "60_train" / "mf" / "metrics.json"
    m = json.loads(path.read_text())
    m["test"]["rmse"] += 1e-3
    path.write_text(json.dumps(m))
    with pytest.raises(PipelineError, match=r"rmse recomputed from model\.pt .* > 1e-05"):
        seeds.score_test_units(random_dir, "mf")


def test_full_ranking_only_splits_are_refused(random_dir):
    _train(random_dir, "gmf")            # implicit on a random split: no sampled candidates
    with pytest.raises(PipelineError, match="sampled-candidate protocol"):
        seeds.score_test_units(random_dir, "gmf")


# ---------------------------------------------------------------- end to end

def test_end_to_end_two_models_two_seeds(random_dir, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seeds.py"), "--data-dir", str(random_dir),
         "--models", "mf", "deepmf", "--seeds", "0", "1",
         "--train-args", "--epochs 2 --threads 1", "--resamples", "300", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("+ python 60_train.py") == 4
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1] and res["resamples"] == 300 and res["bootstrap_seed"] == 0
    assert len(res["commands"]) == 4
    for model in ("mf", "deepmf"):
        r = res["models"][model]
        assert r["task"] == "explicit" and r["recompute_check"].startswith("passed")
        kept = [json.loads(Path(run["metrics_json"]).read_text()) for run in r["runs"]]
        assert [k["config"]["seed"] for k in kept] == [0, 1]
        # the last seed's copy is the metrics.json stage 60 left in the data folder
        assert kept[-1] == json.loads(
            (random_dir / "60_train" / model / "metrics.json").read_text())
        for name in ("rmse", "mae"):
            per_seed = [k["test"][name] for k in kept]
            assert r["test"][name]["per_seed"] == per_seed
            assert r["test"][name]["mean"] == pytest.approx(np.mean(per_seed))
            assert r["test"][name]["std"] == pytest.approx(np.std(per_seed, ddof=1))
        for run, k in zip(r["runs"], kept):
            assert run["recomputed_test"]["rmse"] == pytest.approx(k["test"]["rmse"], abs=1e-5)
        assert r["best_epoch"] == [k["best_epoch"] for k in kept]
    (pair,) = res["pairs"]
    assert (pair["a"], pair["b"], pair["metric"], pair["better"]) == ("deepmf", "mf", "rmse",
                                                                      "lower")
    lo, hi = pair["ci95"]
    assert lo <= hi and pair["verdict"] == seeds.verdict(lo, hi, "rmse")
    assert pair["diff_of_seed_means"] == pytest.approx(
        res["models"]["deepmf"]["test"]["rmse"]["mean"]
        - res["models"]["mf"]["test"]["rmse"]["mean"])
    assert "paired bootstrap" in proc.stdout and "deepmf - mf" in proc.stdout


def test_a_variant_trains_its_family_with_its_own_options(random_dir, tmp_path):
    """--models LABEL=FAMILY with --variant-args: the variant's runs carry its options, the
    plain label keeps the preset, and the pair compares them on the same test units."""
    out = tmp_path / "variant.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seeds.py"), "--data-dir", str(random_dir),
         "--models", "mf", "mf_plain=mf", "--variant-args", "mf_plain=--reg-power 0",
         "--seeds", "0", "--train-args", "--epochs 2 --threads 1", "--resamples", "200",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["variants"] == {"mf_plain": {"family": "mf", "args": ["--reg-power", "0"]}}
    powers = {label: json.loads(Path(res["models"][label]["runs"][0]["metrics_json"])
                                .read_text())["config"]["reg_power"]
              for label in ("mf", "mf_plain")}
    assert powers == {"mf": 0.5, "mf_plain": 0.0}
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("mf_plain", "mf")]
    assert (res["models"]["mf"]["test"]["rmse"]["mean"]
            != res["models"]["mf_plain"]["test"]["rmse"]["mean"])


def test_variant_args_must_name_a_variant(random_dir):
    with pytest.raises(PipelineError, match="LABEL=OPTIONS with LABEL a variant"):
        seeds.parse_args(["--data-dir", str(random_dir), "--models", "mf",
                          "--variant-args", "mf=--reg 0.1"])
