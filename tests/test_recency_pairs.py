"""``--recency`` on the implicit pair objective: each positive's BCE (with its negatives') is
weighted by how recent it is in its user's train history (``dataset.pair_recency_weights``,
``objectives.ImplicitBCE``), the preset's half-life holds on the splits that hold out each
user's latest interactions only, and stage 60 trains with the weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recpipe import ids, matrix, split
from recpipe.checkpoint import load_model
from recpipe.cli import PipelineError, parse_config
from recpipe.dataset import load_data, pair_recency_weights, with_valid_in_train
from recpipe.objectives import ImplicitBCE
from recpipe.presets import preset
from recpipe.train import TrainConfig, Trainer, run
from stage_fixtures import make_ratings, write_stage10

N_USERS, PER_USER, N_ITEMS = 6, 8, 30


def test_weighted_bce_by_hand():
    obj = ImplicitBCE(n_negatives=2)
    w = obj.sample_weights(torch.tensor([0.5, 2.0]))
    # positives first, then each positive's negatives with its weight (expand's order)
    assert w.tolist() == [0.5, 2.0, 0.5, 0.5, 2.0, 2.0]
    out = torch.tensor([1.0, -0.5, 0.3, -2.0, 0.0, 1.5])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    bce = [np.log1p(np.exp(-o)) if t else np.log1p(np.exp(o)) for o, t in zip(out.tolist(), y)]
    want = sum(wi * b for wi, b in zip(w.tolist(), bce)) / sum(w.tolist())
    assert float(obj.loss(out, y, w)) == pytest.approx(want, rel=1e-6)
    # equal weights: the plain mean, whatever their value
    assert float(obj.loss(out, y, torch.full((6,), 3.0))) == pytest.approx(
        float(obj.loss(out, y)), rel=1e-6)


def test_ranks_losses_add_up_to_one_process_loss():
    """Under torchrun each rank scores its chunk of the global batch and the gradients are
    summed weighted by the chunk's share (``Trainer._my_chunk``); with ``total`` = the share
    times the global batch's weight, the shares times the ranks' losses are the one-process
    weighted mean, whatever the chunks' own weights."""
    obj = ImplicitBCE(n_negatives=3)
    gen = torch.Generator().manual_seed(0)
    pos_w = torch.rand(10, generator=gen) + 0.1
    out = torch.randn(40, generator=gen)
    y = torch.cat([torch.ones(10), torch.zeros(30)])
    one = obj.loss(out, y, obj.sample_weights(pos_w))
    summed = torch.zeros(())
    for chunk in (torch.arange(0, 3), torch.arange(3, 10)):      # unequal, like tensor_split
        share = len(chunk) / 10
        rows = torch.cat([chunk, 10 + (chunk[:, None] * 3 + torch.arange(3)).reshape(-1)])
        total = pos_w.sum() * obj.samples_per_positive * share
        summed += share * obj.loss(out[rows], y[rows], obj.sample_weights(pos_w[chunk]), total)
    assert float(summed) == pytest.approx(float(one), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_loo(tmp_path_factory) -> Path:
    """Six users with eight interactions each at distinct times, item ids shuffled against
    time, split leave-one-out (the latest is test, the one before it valid)."""
    rng = np.random.default_rng(3)
    users, items, times = [], [], []
    for u in range(N_USERS):
        its = rng.choice(N_ITEMS, PER_USER, replace=False)
        users += [u] * PER_USER
        items += its.tolist()
        times += (1000 * u + rng.permutation(PER_USER) * 10).tolist()
    d = tmp_path_factory.mktemp("recency")
    write_stage10(d, make_ratings(users, items, timestamps=times))
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--strategy", "loo", "--negatives", "5"])
    matrix.main(["--data-dir", str(d)])
    return d


def test_stage60_applies_the_preset_where_timestamps_order_the_holdout(tiny_loo, tmp_path):
    """neumf's preset recency on the splits that hold out each user's latest by timestamp
    (loo, temporal-user); 0 on a loo split without timestamps (stage 30 then holds out a
    seeded random interaction, not the latest) and on a random one."""
    d = tmp_path / "untimed"
    ratings = pd.read_parquet(tiny_loo / "10_preprocessing" / "ratings.parquet")
    write_stage10(d, ratings.drop(columns=["timestamp"]))
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--strategy", "loo", "--negatives", "5"])
    matrix.main(["--data-dir", str(d)])
    # the same timed ratings split by each user's latest ratings (temporal-user) and at random
    splits = {}
    for strategy in ("temporal-user", "random"):
        splits[strategy] = tmp_path / strategy
        write_stage10(splits[strategy], ratings)
        ids.main(["--data-dir", str(splits[strategy])])
        split.main(["--data-dir", str(splits[strategy]), "--strategy", strategy])
        matrix.main(["--data-dir", str(splits[strategy])])
    got = {}
    for name, folder in (("timed", tiny_loo), ("untimed", d), *splits.items()):
        m = run(parse_config(TrainConfig, ["--data-dir", str(folder), "--model", "neumf",
                                           "--threads", "1", "--epochs", "1", "--no-refit"],
                             "60_train.py", ""))
        got[name] = m["config"]["recency"]
    assert got == {"timed": preset("neumf", "implicit")["recency_latest"], "untimed": 0.0,
                   "temporal-user": preset("neumf", "implicit")["recency_latest"],
                   "random": 0.0}


def _by_time(d: Path, data, merged: bool) -> dict[tuple[int, int], int]:
    """(user, item) -> how many of the user's known interactions are later, from the raw
    times the test wrote (train, or train + valid for the refit)."""
    t = np.load(d / "40_make_sparse_matrix" / "train_time.npy")
    m = data.train_csr.tocoo()
    rows = list(zip(m.row.tolist(), m.col.tolist(), t.tolist()))
    if merged:
        tv = np.load(d / "40_make_sparse_matrix" / "valid_time.npy")
        v = data.valid
        rows += list(zip(v.users.tolist(), v.items.tolist(), tv.tolist()))
    later = {}
    for u, i, ti in rows:
        later[(u, i)] = sum(1 for u2, _, t2 in rows if u2 == u and t2 > ti)
    return later


@pytest.mark.parametrize("merged", [False, True])
def test_weights_follow_each_users_order_in_time(tiny_loo, merged):
    data = load_data(tiny_loo, "implicit", torch.device("cpu"))
    part = with_valid_in_train(data) if merged else data
    w = pair_recency_weights(part, 2.0, 0.25, merged=merged)
    later = _by_time(tiny_loo, data, merged)
    tr = part.train
    assert len(w) == len(tr) == N_USERS * (PER_USER - 1 - (0 if merged else 1))
    for u, i, wi in zip(tr.users.tolist(), tr.items.tolist(), w.tolist()):
        r = later[(u, i)]
        assert wi == pytest.approx(0.25 + 0.75 * 0.5 ** (r / 2.0), rel=1e-6), (u, i, r)
    # every user's latest known interaction weighs 1, the oldest the least
    assert sorted(set(np.round(w.numpy(), 6)))[-1] == 1.0


@pytest.mark.parametrize("model", ["neumf", "mlp"])
def test_preset_recency_holds_where_each_users_latest_is_held_out(model):
    latest = preset(model, "implicit")["recency_latest"]
    assert latest > 0
    on = TrainConfig(model=model, task="implicit").resolved(latest_held_out=True)
    off = TrainConfig(model=model, task="implicit").resolved(latest_held_out=False)
    assert (on.recency, off.recency) == (latest, 0.0)
    assert on.recency_floor == preset(model, "implicit")["recency_floor"]
    assert off.recency_floor is None         # not read: unset, as in configs made before it
    # given on the command line: kept on any split
    given = TrainConfig(model="neumf", task="implicit", recency=3.0).resolved()
    assert given.recency == 3.0
    # EASE keeps None: stage 60 then chooses its half-life on validation (its own grid)
    assert TrainConfig(model="ease", task="implicit").resolved(
        latest_held_out=True).recency is None
    # the explicit objective and the autoencoders have no such weights: refused, with why
    for model, task in (("mf", "explicit"), ("multvae", "implicit")):
        with pytest.raises(PipelineError, match="--recency weighs EASE's history or the "
                                                "implicit loss of the pair models"):
            TrainConfig(model=model, task=task, recency=5.0).resolved()
    with pytest.raises(PipelineError, match="--recency-floor must be between 0 and 1"):
        TrainConfig(model="neumf", recency_floor=1.5).validate()


def _gmf(d: Path, *argv: str) -> list[float]:
    """Stage 60 on gmf: its per-epoch losses (history.csv)."""
    run(parse_config(TrainConfig, ["--data-dir", str(d), "--model", "gmf", "--threads", "1",
                                   "--epochs", "3", "--lr", "0.1", "--no-refit", *argv],
                     "60_train.py", ""))
    folder = d / "60_train" / "gmf"
    m = json.loads((folder / "metrics.json").read_text())
    hist = (folder / "history.csv").read_text().splitlines()
    return [m["config"]["recency"], m["config"]["recency_floor"],
            *[float(line.split(",")[1]) for line in hist[1:]]]


def test_stage60_records_the_weights_and_a_floor_of_one_is_no_weighting(tiny_loo):
    plain = _gmf(tiny_loo, "--recency", "0")
    ones = _gmf(tiny_loo, "--recency", "2", "--recency-floor", "1")
    assert plain[:2] == [0.0, None]          # the floor is read with --recency only
    assert ones[:2] == [2.0, 1.0]
    # every pair weighs 1: the same training, loss for loss
    np.testing.assert_allclose(ones[2:], plain[2:], rtol=1e-5)


def _newest_over_oldest(d: Path, tmp: Path, recency: float, floor: float) -> float:
    """gmf trained 10 epochs on train (no selection): the mean logit of each user's latest
    train item minus that of their oldest."""
    cfg = TrainConfig(model="gmf", task="implicit", data_dir=d, lr=0.1, recency=recency,
                      recency_floor=floor).resolved()
    data = load_data(d, "implicit", torch.device("cpu"))
    trainer = Trainer(cfg, data, tmp, "test")
    for _ in range(10):
        trainer.train_epoch()
    later = _by_time(d, data, merged=False)
    newest = torch.tensor([k for k, r in later.items() if r == 0]).T
    oldest = torch.tensor([k for k, r in later.items() if r == PER_USER - 3]).T
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.model(*newest).mean() - trainer.model(*oldest).mean())


def test_recent_pairs_weigh_more(tiny_loo, tmp_path):
    """A floor of 0 and a half-life of one interaction: the old pairs count for little, so
    the model ranks each user's latest train item further above their oldest than without."""
    plain = _newest_over_oldest(tiny_loo, tmp_path / "a", 0.0, 0.3)
    steep = _newest_over_oldest(tiny_loo, tmp_path / "b", 1.0, 0.0)
    assert steep > plain + 1.0, (steep, plain)
