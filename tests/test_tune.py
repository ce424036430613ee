"""--tune (recpipe/tune.py): the search space around the preset, trial 0 = the preset, the
best trial's values carried into the run that is refitted and tested, the test split read
once, --resume reusing the finished search, and the refusals. Synthetic rated data made here
(300 users x 120 items with rank-3 structure), so the tests need no shared data."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from recpipe import ids, matrix, split, train, tune
from recpipe.cli import PipelineError, parse_config
from recpipe.train_config import TrainConfig
from stage_fixtures import make_ratings, write_stage10


def _cfg(*argv: str) -> TrainConfig:
    return parse_config(TrainConfig, list(argv), "60_train.py", "")


@pytest.fixture(scope="module")
def rated(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tune")
    rng = np.random.default_rng(3)
    n_u, n_i = 300, 120
    pu, qi = rng.normal(size=(n_u, 3)), rng.normal(size=(n_i, 3))
    pairs = np.array([(u, i) for u in range(n_u)
                      for i in rng.choice(n_i, 25, replace=False)])
    r = np.clip(np.rint(3 + (pu[pairs[:, 0]] * qi[pairs[:, 1]]).sum(1)
                        + rng.normal(0, 0.5, len(pairs))), 1, 5)
    ts = rng.permutation(len(pairs))
    write_stage10(d, make_ratings(pairs[:, 0], pairs[:, 1], r, ts))
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--strategy", "random"])
    matrix.main(["--data-dir", str(d)])
    return d


def test_space_is_built_around_the_preset_and_skips_what_the_user_set():
    cfg = _cfg("--model", "neumf", "--tune", "5").resolved()
    space = tune.search_space(cfg, given=set())
    assert space["lr"] == {"kind": "log", "low": cfg.lr / 10, "high": cfg.lr * 5}
    assert space["dim"]["choices"] == [cfg.dim // 2, cfg.dim, 2 * cfg.dim]
    assert space["layers"]["choices"][1] == " ".join(map(str, cfg.layers))
    assert space["reg"]["or_zero"] and cfg.reg == 0          # the implicit preset has none
    assert space["n_negatives"] == {"kind": "int", "low": 1, "high": 16}
    assert "hidden" not in space                             # neumf does not read it
    # what the command line set, and what --tune-params leaves out, is not searched
    assert set(tune.search_space(cfg, given={"lr", "dim"})) == set(space) - {"lr", "dim"}
    narrow = dataclasses.replace(cfg, tune_params=["reg"])
    assert set(tune.search_space(narrow, given=set())) == {"reg"}
    # pretrained parts fix the sizes
    pre = dataclasses.replace(cfg, pretrained=True)
    assert not {"dim", "layers"} & set(tune.search_space(pre, given=set()))
    with pytest.raises(PipelineError, match="cannot be searched"):
        tune.search_space(dataclasses.replace(cfg, tune_params=["epochs"]), given=set())
    # an explicit preset with reg: a log range around it, and no negatives to search
    mf = _cfg("--model", "deepmf", "--tune", "5").resolved()
    s = tune.search_space(mf, given=set())
    assert s["reg"] == {"kind": "log", "low": mf.reg / 10, "high": mf.reg * 10}
    assert "n_negatives" not in s and s["hidden"]["choices"][1] == mf.hidden


def test_search_starts_from_the_preset_and_the_run_keeps_the_best_trial(rated, monkeypatch):
    seen = []
    real = train.evaluate

    def counting(model, data, part, *a, **k):
        seen.append(part)
        return real(model, data, part, *a, **k)

    monkeypatch.setattr(train, "evaluate", counting)
    argv = ["--data-dir", str(rated), "--model", "deepmf", "--dim", "16", "--epochs", "3",
            "--threads", "1", "--tune", "4", "--tune-params", "lr", "reg", "--seed", "1"]
    m = train.run(_cfg(*argv))
    assert seen.count("test") == 1                           # the search never reads test
    out = rated / "60_train" / "deepmf"
    rows = list(csv.DictReader(open(out / "tune.csv")))
    assert len(rows) == 4 == m["tune"]["trials"]
    preset = _cfg(*argv).resolved()
    assert float(rows[0]["lr"]) == pytest.approx(preset.lr)
    assert float(rows[0]["reg"]) == pytest.approx(preset.reg)
    done = [r for r in rows if r["state"] == "complete"]
    best = min(done, key=lambda r: float(r["value"]))        # RMSE: lower is better
    t = m["tune"]
    assert t["best_trial"] == int(best["trial"]) and t["preset_value"] == pytest.approx(
        float(rows[0]["value"]))
    assert t["best_value"] <= t["preset_value"]
    # the run trained, refitted and tested the best trial's values, and its selection
    # repeated that trial's validation number
    assert m["config"]["lr"] == pytest.approx(float(best["lr"]))
    assert m["config"]["reg"] == pytest.approx(float(best["reg"]))
    assert min(h["valid_rmse"] for h in _history(out)) == pytest.approx(t["best_value"],
                                                                          abs=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"tune.csv", "tune.json"} <= set(manifest["files"])

    # --resume reuses the finished search instead of running new trials
    before = (out / "tune.csv").read_text()
    monkeypatch.setattr(tune, "_suggest", lambda *a: pytest.fail("searched again"))
    m2 = train.run(_cfg(*argv, "--resume", "--epochs", "4"))
    assert m2["tune"] == t and (out / "tune.csv").read_text() == before


def _history(out: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if v != ""}
            for r in csv.DictReader(open(out / "history.csv"))]


def test_refusals(rated):
    with pytest.raises(PipelineError, match="closed form"):
        train.run(_cfg("--data-dir", str(rated), "--model", "ease", "--tune", "3"))
    with pytest.raises(PipelineError, match="add --tune"):
        TrainConfig(model="mf", tune_params=["lr"]).validate()
    with pytest.raises(PipelineError, match="nothing to search"):
        train.run(_cfg("--data-dir", str(rated), "--model", "mf", "--tune", "2",
                       "--tune-params", "lr", "--lr", "0.1"))
