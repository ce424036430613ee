"""``60_train.py --tune N``: a search of the preset's hyperparameters on the validation split.

Each trial is one selection run, as stage 60 makes it without ``--tune``: train on the train
part, evaluate the per-epoch validation sample after every epoch, stop early, keep the best
epoch. There is no refit and no test: the search never reads the test split. The sampler is
Optuna's TPE, seeded with ``--seed``, and the trials run one after another, so a search is
reproducible. Optuna's median pruner ends a trial whose best validation so far, at some
epoch past the first quarter of ``--epochs`` (and past the third), is worse than the median
of the earlier trials at that epoch: a slow start is not pruned.

Trial 0 is the preset itself, so the chosen values are never worse on validation than the
defaults. The space is built around the resolved preset (``search_space``):

- ``lr``: log-uniform over [lr / 10, 5 lr];
- ``reg``: log-uniform over [reg / 10, 10 reg], or [1e-6, 1e-2] when the preset has none;
- ``dim`` and ``hidden``: half, the preset's, or double;
- ``layers``: the preset's tower with every size halved, as it is, or doubled;
- ``dropout``: uniform over [0, 0.6];
- ``n_negatives``: 1 to 16 (implicit pair models);
- ``reg_power``: uniform over [0, 1] (mf, explicit).

Only the options the family reads (its ``options``; every family trained by epochs reads
``lr`` and ``reg``) and the user did not set on the command line are searched;
``--tune-params`` narrows that further. After the search, the best trial's values replace
the preset's in the stage's config and stage 60 goes on as usual: selection (which repeats
the best trial, so its validation number must come back), the refit on train + valid, the
one test evaluation. ``tune.csv`` (one row per trial) and ``metrics.json["tune"]`` record
the search; ``tune.json`` in the work folder lets ``--resume`` continue without searching
again.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .cli import PipelineError
from .dataset import Data
from .family import family
from .train_config import TrainConfig

log = logging.getLogger("recpipe")

TUNABLE = ("lr", "reg", "dim", "hidden", "layers", "dropout", "n_negatives", "reg_power")
RESULT = "tune.json"
PRUNE_AFTER_TRIALS = 3       # the median pruner compares with this many finished trials,
PRUNE_WARMUP = 0.25          # and never ends a trial in this share of --epochs (at least 3)
TABLE = "tune.csv"


def search_space(cfg: TrainConfig, given: set[str]) -> dict[str, dict[str, Any]]:
    """What ``--tune`` searches for the resolved ``cfg``: name -> {"kind", bounds or
    choices} (the module docstring gives the rule). ``given``: options set on the command
    line, which are kept as they are."""
    cls = family(cfg.model)
    reads = set(cls.options) | {"lr", "reg"}
    wanted = set(cfg.tune_params or TUNABLE)
    unknown = wanted - set(TUNABLE)
    if unknown:
        raise PipelineError(f"--tune-params: {', '.join(sorted(unknown))} cannot be searched; "
                            f"choose from {' '.join(TUNABLE)}")
    space: dict[str, dict[str, Any]] = {}

    def want(name: str) -> bool:
        return name in wanted and name in reads and name not in given

    if want("lr"):
        space["lr"] = {"kind": "log", "low": cfg.lr / 10, "high": cfg.lr * 5}
    if want("reg"):
        # a preset without reg: off, or log-uniform when on (trial 0 keeps it off)
        space["reg"] = ({"kind": "log", "low": cfg.reg / 10, "high": cfg.reg * 10}
                        if cfg.reg else {"kind": "log", "low": 1e-6, "high": 1e-2,
                                         "or_zero": True})
    sized = not cfg.pretrained       # pretrained parts fix the sizes
    for name in ("dim", "hidden"):
        if sized and want(name) and getattr(cfg, name):
            v = int(getattr(cfg, name))
            space[name] = {"kind": "choice", "choices": [max(1, v // 2), v, 2 * v]}
    if sized and want("layers") and cfg.layers:
        towers = [[max(1, x // 2) for x in cfg.layers], list(cfg.layers),
                  [2 * x for x in cfg.layers]]
        space["layers"] = {"kind": "choice", "choices": [" ".join(map(str, t)) for t in towers]}
    if want("dropout"):
        space["dropout"] = {"kind": "float", "low": 0.0, "high": 0.6}
    if want("reg_power") and cfg.task in cls.reg_power_tasks:
        space["reg_power"] = {"kind": "float", "low": 0.0, "high": 1.0}
    if (cfg.task == "implicit" and cls.batches == "pairs" and "n_negatives" in wanted
            and "n_negatives" not in given):
        space["n_negatives"] = {"kind": "int", "low": 1, "high": 16}
    return space


def _suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in space.items():
        if s.get("or_zero") and not trial.suggest_categorical(f"{name}>0", [False, True]):
            out[name] = 0.0
        elif s["kind"] == "log":
            out[name] = trial.suggest_float(name, s["low"], s["high"], log=True)
        elif s["kind"] == "float":
            out[name] = trial.suggest_float(name, s["low"], s["high"])
        elif s["kind"] == "int":
            out[name] = trial.suggest_int(name, s["low"], s["high"])
        else:
            out[name] = trial.suggest_categorical(name, s["choices"])
    return out


def as_config(params: dict[str, Any]) -> dict[str, Any]:
    """Trial values as TrainConfig fields (layers travel as a string choice)."""
    out = dict(params)
    if isinstance(out.get("layers"), str):
        out["layers"] = [int(x) for x in out["layers"].split()]
    return out


def _preset_point(cfg: TrainConfig, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The resolved preset as a point of ``space`` (trial 0), in Optuna's parameter names;
    values outside a float range are clipped into it."""
    point: dict[str, Any] = {}
    for name, s in space.items():
        v = getattr(cfg, name)
        if s.get("or_zero") and not v:
            point[f"{name}>0"] = False
            continue
        if name == "layers":
            v = " ".join(map(str, v))
        elif s["kind"] in ("log", "float", "int"):
            v = min(max(v, s["low"]), s["high"])
        point[name] = v
    return point


def search(cfg: TrainConfig, data: Data, out_dir: Path, given: set[str],
           run_trial: Callable[[TrainConfig, Path, Callable[[int, float], bool]],
                               tuple[float, int, int]]) -> tuple[TrainConfig, dict[str, Any]]:
    """Run ``cfg.tune`` trials (or reuse the finished search of ``out_dir/tune.json`` when
    resuming) and return (``cfg`` with the best values, the search's record for metrics.json).

    ``run_trial(trial_cfg, trial_dir, on_epoch)`` trains one selection run and returns
    (best validation metric, best epoch, epochs run); ``on_epoch(epoch, best_so_far)``
    returns True when the pruner ends the trial."""
    saved = out_dir / RESULT
    if cfg.resume and saved.exists():
        record = json.loads(saved.read_text())
        log.info("--tune: the search of %s is reused (--resume): %s", saved, record["params"])
        return dataclasses.replace(cfg, **as_config(record["params"])), record
    try:
        import optuna
    except ImportError:
        raise PipelineError("--tune needs optuna: pip install -r requirements.txt") from None
    space = search_space(cfg, given)
    if not space:
        raise PipelineError(f"--tune: nothing to search for --model {cfg.model}: every "
                            f"searchable option ({' '.join(TUNABLE)}) is set on the command "
                            f"line, excluded by --tune-params or not read by this family")
    from .evaluation import selection_metric
    metric, higher = selection_metric(cfg.task, data)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    n = cfg.tune
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(1, min(10, n // 2)))
    warmup = max(3, int(PRUNE_WARMUP * cfg.epochs))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS,
                                         n_warmup_steps=warmup)
    study = optuna.create_study(direction="maximize" if higher else "minimize",
                                sampler=sampler, pruner=pruner)
    study.enqueue_trial(_preset_point(cfg, space))
    log.info("--tune: %d trials of TPE (seed %d) on valid %s over %s", n, cfg.seed, metric,
             json.dumps(space))
    trial_dir = out_dir / "_trial"
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        params = _suggest(trial, space)
        tcfg = dataclasses.replace(cfg, **as_config(params), tune=0, resume=False)
        shutil.rmtree(trial_dir, ignore_errors=True)
        trial_dir.mkdir(parents=True)

        def on_epoch(epoch: int, best: float) -> bool:
            trial.report(best, epoch)
            return trial.should_prune()

        t0 = time.perf_counter()
        state, value, best_epoch, epochs = "complete", math.nan, 0, 0
        try:
            value, best_epoch, epochs = run_trial(tcfg, trial_dir, on_epoch)
            if trial.should_prune():
                state = "pruned"
        except PipelineError as e:        # diverged, or a size the data cannot take
            state = f"failed: {str(e).splitlines()[0][:200]}"
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        secs = time.perf_counter() - t0
        rows.append({"trial": trial.number, "state": state.split(":")[0], "value": value,
                     "best_epoch": best_epoch, "epochs_run": epochs,
                     "seconds": round(secs, 3), **params})
        log.info("--tune trial %d of %d%s: valid %s %.4f (best epoch %d of %d, %s, %.1fs) %s",
                 trial.number, n, " (the preset)" if trial.number == 0 else "", metric,
                 value, best_epoch, epochs, state, secs,
                 json.dumps(params))
        if state == "pruned":
            raise optuna.TrialPruned()
        return value if state == "complete" else math.nan

    t_all = time.perf_counter()
    study.optimize(objective, n_trials=n, timeout=cfg.tune_seconds or None)
    complete = [r for r in rows if r["state"] == "complete" and math.isfinite(r["value"])]
    if not complete:
        raise PipelineError(f"--tune: no trial of {len(rows)} finished with a finite "
                            f"validation {metric} (see tune.csv in {out_dir}); narrow the "
                            f"search with --tune-params or set the diverging options")
    best = (max if higher else min)(complete, key=lambda r: r["value"])
    params = {k: best[k] for k in space}
    record = {"trials": len(rows), "complete": len(complete),
              "pruned": sum(r["state"] == "pruned" for r in rows),
              "failed": sum(r["state"] == "failed" for r in rows),
              "metric": f"valid {metric}", "higher_is_better": higher,
              "preset_value": rows[0]["value"] if rows and rows[0]["state"] == "complete"
              else None,
              "best_trial": best["trial"], "best_value": best["value"],
              "best_epoch": best["best_epoch"], "params": params, "space": space,
              "sampler": f"optuna TPE, seed {cfg.seed}",
              "pruner": f"median ({PRUNE_AFTER_TRIALS} startup trials, {warmup} warm-up "
              "epochs)", "seconds": round(time.perf_counter() - t_all, 3)}
    _write_table(out_dir / TABLE, rows, list(space))
    saved.write_text(json.dumps(record, indent=1))
    log.info("--tune: chose trial %d, valid %s %.4f (preset %s): %s", best["trial"], metric,
             best["value"], "n/a" if record["preset_value"] is None
             else f"{record['preset_value']:.4f}", json.dumps(params))
    return dataclasses.replace(cfg, **as_config(params)), record


def _write_table(path: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    cols = ["trial", "state", "value", "best_epoch", "epochs_run", "seconds", *names]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
