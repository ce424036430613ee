#!/usr/bin/env python3
"""Each model's test metric as mean and std over training seeds on one fixed split, and
paired-bootstrap 95% intervals of the differences between models.

HR@10 over 943 or 610 test users carries about +-0.03 of noise, so one run per model cannot
rank two models. Protocol, on a data folder where stages 10-40 already ran (the split is
fixed): for every model and seed, stage 60 runs as a user would run it (``python
60_train.py --data-dir DIR --model M --seed S TRAIN_ARGS``); its metrics.json gives the
per-seed valid and test figures, and the saved final model (model.pt) is scored again on the
test split through stage 60's own scoring path to get each unit's value (explicit: every test
pair's squared error, predictions clipped to the rating scale, the fallback included;
implicit: each sampled-candidate row's hit@10 and ndcg@10). The mean of those values must
reproduce metrics.json's test figure to 1e-5, else the bench stops. Each model's figure is
the mean and sample std (ddof=1) of the per-seed metrics.json numbers.

A pair A:B compares A - B of those seed means. Its interval resamples test users with
replacement (the same resamples for A and B: paired), recomputes both metrics from the
per-unit values averaged over the seeds (RMSE: sqrt of the mean squared error over the
resampled users' pairs, a user counted as often as drawn; HR/NDCG: the mean over the
resampled users' rows) and takes the 2.5 and 97.5 percentiles of A - B. The verdict says
whether the interval lies entirely on the better side (RMSE lower, HR/NDCG higher): "A
better", "B better" or "not separable". Bootstrap centres (metrics of the seed-averaged
values) can differ slightly from the seed means for RMSE (the sqrt of an average is not the
average of sqrts); the JSON gives both differences.

The runs go seed by seed (every model at seed 0, then every model at seed 1, ...), so a model
that combines models listed before it (``--model blend``) combines those of its own seed.
Every run overwrites DIR/60_train/M, so afterwards it holds the last seed's model; each run's
metrics.json is kept beside the JSON result (OUT without .json/M/seedS.metrics.json). Covers the
explicit and the sampled-candidate implicit protocols (stage 40's test_candidates.npz: loo,
ncf splits); full-ranking-only implicit splits are refused.

    python bench/seeds.py --data-dir DIR --models mf deepmf autorec [--seeds 0 1 2 3 4]
        [--pairs deepmf:mf autorec:mf] [--train-args "--threads 2"]
        [--out bench/out/seeds/NAME.json] [--resamples 2000] [--bootstrap-seed 0]

A variant of a family (another setting beside its preset, to compare the two on the same
seeds and test users) is ``--models LABEL=FAMILY`` with ``--variant-args LABEL="OPTIONS"``:

    python bench/seeds.py --data-dir DIR --models mf mf_old=mf \
        --variant-args "mf_old=--reg-power 0 --reg 0.1" --pairs mf:mf_old

A variant trains into its family's folder (DIR/60_train/FAMILY), as every run does, so a
blend listed after it stacks the variant.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recpipe.cli import PipelineError, run_main, training_numerics  # noqa: E402

PROG = "bench/seeds.py"
STAGE40_MANIFEST = Path("40_make_sparse_matrix") / "manifest.json"
METRICS = {"explicit": ("rmse",), "implicit": ("hr@10", "ndcg@10")}
EXTRA = {"explicit": ("mae",), "implicit": ()}     # reported per seed, not bootstrapped
LOWER_IS_BETTER = {"rmse"}
TOLERANCE = 1e-5
BENCH_SETS = ("--data-dir", "--model", "--seed")
BOOTSTRAP_CELLS = 1 << 22                 # resamples x users per weight matrix


@dataclass
class Units:
    """One run's test split as per-unit values: ``values[metric]`` float64 [units] (rmse:
    each pair's squared error; hr@10/ndcg@10: each candidate row's value) and ``users`` [units]
    (the user of each unit, the bootstrap's cluster)."""
    task: str
    users: np.ndarray
    values: dict[str, np.ndarray]

    def metric(self, name: str) -> float:
        v = float(self.values[name].mean())
        return math.sqrt(v) if name == "rmse" else v


def score_test_units(data_dir: Path, model_name: str) -> tuple[dict[str, Any], Units]:
    """(metrics.json, per-unit test values) of DIR/60_train/MODEL, scored again from model.pt
    the way stage 60's evaluation scores the test split (recpipe/evaluation.py); raises when
    their mean does not reproduce metrics.json's test figure to TOLERANCE."""
    import torch

    import models as _models  # noqa: F401 - registers the built-in families
    from recpipe.checkpoint import load_model, resolve_device
    from recpipe.dataset import load_data
    from recpipe.evaluation import history_before
    from recpipe.metrics import sampled_rank_rows
    from recpipe.scoring import predict_pairs, score_candidates

    model_dir = data_dir / "60_train" / model_name
    metrics = json.loads((model_dir / "metrics.json").read_text())
    cfg = metrics["config"]
    task = cfg["task"]
    if metrics["test_users"] < metrics["test_users_total"]:
        raise PipelineError(
            f"{model_dir / 'metrics.json'}: the test split was evaluated on a sample of "
            f"{metrics['test_users']} of its {metrics['test_users_total']} users (--test-users), "
            f"drawn with the training seed, so the seeds and models would not share units; "
            f"drop --test-users from --train-args")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    # stage 60's numerics (cli.training_numerics): without the subnormals flushed, a blend's
    # ranking rescored here swapped a near-tie (ML-100K loo, seed 3: HR@10 0.7444, 0.7455 with)
    training_numerics()
    device = resolve_device(cfg["device"])
    data = load_data(data_dir, task, device, needed_by=PROG)
    model, _ = load_model(model_dir, device)
    with torch.inference_mode():
        if task == "explicit":
            p = data.test
            known = history_before(model, data, "test")
            pred = predict_pairs(model, p.users, p.items, known).float()
            pred = pred.clamp(*data.rating_scale)
            sq = (pred - p.ratings.float()).double().square()
            units = Units(task, p.users.cpu().numpy(), {"rmse": sq.cpu().numpy()})
        elif "test" in data.candidates:
            cu, ci = data.candidates["test"]
            scores = score_candidates(model, cu, ci, history_before(model, data, "test")).float()
            rows = sampled_rank_rows(scores, ci, ks=(10,))
            units = Units(task, cu.cpu().numpy(),
                          {k: rows[k].double().cpu().numpy() for k in METRICS[task]})
        else:
            raise PipelineError(
                f"{model_dir}: the implicit task of this split has no sampled test candidates "
                f"(no {data_dir / '40_make_sparse_matrix' / 'test_candidates.npz'}), only full "
                f"ranking; {PROG} covers the sampled-candidate protocol (split with --strategy "
                f"loo or ncf) and the explicit one (--task explicit)")
    for name in METRICS[task]:
        got, want = units.metric(name), metrics["test"][name]
        if not abs(got - want) <= TOLERANCE:
            raise PipelineError(
                f"{model_dir}: {name} recomputed from model.pt is {got:.7f}, metrics.json says "
                f"{want:.7f} (|diff| {abs(got - want):.2e} > {TOLERANCE:g}): {PROG} no longer "
                f"scores the test split as stage 60 does (recpipe/evaluation.py); fix "
                f"score_test_units() to follow it")
    return metrics, units


def resample_weights(n_users: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n_users] float64: how often each user is drawn in each resample of
    ``n_users`` users with replacement (exact counts: a bincount of the drawn indices)."""
    draws = rng.integers(0, n_users, size=(resamples, n_users))
    draws += np.arange(resamples)[:, None] * n_users
    return np.bincount(draws.ravel(), minlength=resamples * n_users).reshape(
        resamples, n_users).astype(np.float64)


def resampled_metric(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray, name: str
                     ) -> np.ndarray:
    """The metric in each resample: sum of the drawn users' values over their unit count
    (weights [R, users] @ per-user sums / counts); sqrt of that for RMSE (values = squared
    errors)."""
    m = (weights @ sums) / (weights @ counts)
    return np.sqrt(m) if name == "rmse" else m


def paired_bootstrap(users: np.ndarray, a: np.ndarray, b: np.ndarray, name: str,
                     resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of metric(A) - metric(B) over ``resamples`` resamples of the
    users (each drawn with all of its units; the same draws for A and B). ``a``, ``b``:
    per-unit values (rmse: squared errors), aligned with ``users``."""
    uniq, inverse = np.unique(users, return_inverse=True)
    n = len(uniq)
    counts = np.bincount(inverse, minlength=n).astype(np.float64)
    sum_a = np.bincount(inverse, weights=a, minlength=n)
    sum_b = np.bincount(inverse, weights=b, minlength=n)
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_CELLS // n)        # resamples per weight matrix (bounded memory)
    diff = []
    for start in range(0, resamples, block):
        w = resample_weights(n, min(block, resamples - start), rng)
        diff.append(resampled_metric(w, sum_a, counts, name)
                    - resampled_metric(w, sum_b, counts, name))
    diff = np.concatenate(diff)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, name: str) -> str:
    """Which side of zero the interval of A - B lies on, read with the metric's direction."""
    a_side, b_side = (hi < 0, lo > 0) if name in LOWER_IS_BETTER else (lo > 0, hi < 0)
    return "A better" if a_side else "B better" if b_side else "not separable"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"per_seed": [float(x) for x in v], "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else None}


def train(data_dir: Path, model: str, seed: int, train_args: list[str]) -> str:
    """Run stage 60 as a subprocess from the repo root; returns the command as printed."""
    args = ["60_train.py", "--data-dir", str(data_dir), "--model", model, "--seed", str(seed),
            *train_args]
    shown = shlex.join(["python", *args])
    print(f"+ {shown}", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, RECPIPE_PROGRESS="0"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise PipelineError(f"stage 60 exited {proc.returncode} (its output is above): {shown}")
    return shown


def parse_pairs(pairs: list[str] | None, models: list[str]) -> list[tuple[str, str]]:
    if not pairs:
        return [(m, models[0]) for m in models[1:]]
    out = []
    for p in pairs:
        a, sep, b = p.partition(":")
        if not sep or a not in models or b not in models or a == b:
            raise PipelineError(f"--pairs {p}: expected A:B with two different models of "
                                f"--models ({' '.join(models)})")
        out.append((a, b))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="pipeline data folder where stages 10-40 already ran (bench/lib.sh "
                         "`pipeline` builds one); stage 60 writes DIR/60_train/<model>/")
    ap.add_argument("--models", nargs="+", required=True,
                    help="model families to train (60_train.py --model); each model's task "
                         "is stage 60's default for it on this split unless --train-args "
                         "sets --task; LABEL=FAMILY names a variant of FAMILY whose extra "
                         "options --variant-args gives")
    ap.add_argument("--variant-args", action="append", default=[], metavar="LABEL=OPTIONS",
                    help="extra 60_train.py options of the variant LABEL of --models, one "
                         "quoted string after the =, e.g. \"mf_old=--reg-power 0\"")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="training seeds, 60_train.py --seed (default: 0 1 2 3 4)")
    ap.add_argument("--pairs", nargs="+", default=None, metavar="A:B",
                    help="differences A - B to bootstrap (default: every model against the "
                         "first of --models)")
    ap.add_argument("--train-args", default="",
                    help="further 60_train.py options for every run, one quoted string, e.g. "
                         "\"--threads 2 --epochs 20\" (default: none, so the model presets of "
                         "recpipe/presets.py; the bench's own scoring uses the run's --threads); "
                         "a single option without a value needs the = form, "
                         "--train-args=--no-refit")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result (default: bench/out/seeds/<basename of DIR>.json); "
                         "each run's metrics.json is copied to OUT without .json/M/seedS."
                         "metrics.json")
    ap.add_argument("--resamples", type=int, default=2000,
                    help="bootstrap resamples of the test users (default: 2000)")
    ap.add_argument("--bootstrap-seed", type=int, default=0,
                    help="seed of the bootstrap's numpy Generator (default: 0)")
    args = ap.parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    args.train_args = shlex.split(args.train_args)
    for flag in BENCH_SETS:
        if any(a == flag or a.startswith(flag + "=") for a in args.train_args):
            raise PipelineError(f"--train-args sets {flag}, which {PROG} sets itself for every "
                                f"run; use --data-dir / --models / --seeds instead")
    import models as _models  # noqa: F401 - registers the built-in families
    from recpipe.family import REGISTRY
    labels = [e.partition("=") for e in args.models]
    args.models = [label for label, _, _ in labels]      # a repeated label is refused below
    args.family = {label: fam if sep else label for label, sep, fam in labels}
    args.extra = {}
    for v in args.variant_args:
        label, sep, opts = v.partition("=")
        if not sep or label not in args.family or args.family[label] == label:
            raise PipelineError(f"--variant-args {v}: expected LABEL=OPTIONS with LABEL a "
                                f"variant LABEL=FAMILY of --models")
        args.extra[label] = shlex.split(opts)
    unknown = [f for f in args.family.values() if f not in REGISTRY]
    if unknown:
        raise PipelineError(f"--models: unknown {' '.join(unknown)}; expected some of "
                            f"{' '.join(sorted(REGISTRY))}")
    for name, vals in (("--models", args.models), ("--seeds", args.seeds)):
        if len(set(vals)) != len(vals):
            raise PipelineError(f"{name} lists a value twice: {' '.join(map(str, vals))}")
    if args.resamples < 1:
        raise PipelineError(f"--resamples must be >= 1, got {args.resamples}")
    if not (args.data_dir / STAGE40_MANIFEST).exists():
        raise PipelineError(
            f"{args.data_dir / STAGE40_MANIFEST} not found: {PROG} needs a data folder on which "
            f"stages 10-40 ran, e.g. `W=/tmp/w bash -c 'source {ROOT}/bench/lib.sh; pipeline "
            f"{args.data_dir} --strategy random --seed 42 -- --input "
            f"../shared/data/movielens/ml-100k'`")
    args.pairs = parse_pairs(args.pairs, args.models)
    if args.out is None:
        args.out = ROOT / "bench" / "out" / "seeds" / f"{args.data_dir.name}.json"
    return args


def run_seed(args: argparse.Namespace, model: str, seed: int, commands: list[str],
             first: "Units | None") -> tuple[dict[str, Any], Units]:
    """One run of ``model`` at ``seed``: (its row of the report, its test units)."""
    fam = args.family[model]
    commands.append(train(args.data_dir, fam, seed,
                          args.train_args + args.extra.get(model, [])))
    metrics, units = score_test_units(args.data_dir, fam)
    # the next seed overwrites DIR/60_train/MODEL: keep this run's metrics.json
    kept = args.out.with_suffix("") / model / f"seed{seed}.metrics.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.data_dir / "60_train" / fam / "metrics.json", kept)
    if first is not None and (units.task != first.task
                              or not np.array_equal(units.users, first.users)):
        raise PipelineError(f"{model}: seed {seed} was trained for another task or test "
                            f"split than seed {args.seeds[0]}; the split must stay fixed")
    names = METRICS[units.task] + EXTRA[units.task]
    run = {"seed": seed, "command": commands[-1], "metrics_json": str(kept),
           "test": {k: metrics["test"][k] for k in names},
           "valid": {k: metrics["valid"][k] for k in names},
           "recomputed_test": {k: units.metric(k) for k in METRICS[units.task]},
           "best_epoch": metrics["best_epoch"],
           "train_seconds": metrics["train_seconds"]}
    print(f"  {model} seed {seed}: test "
          + ", ".join(f"{k} {run['test'][k]:.4f}" for k in names)
          + " (recomputed from model.pt: "
          + ", ".join(f"{v:.6f}" for v in run["recomputed_test"].values())
          + f"), best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.1f}s",
          flush=True)
    return run, units


def summarise(runs: list[dict[str, Any]], per_seed_units: list[Units]
              ) -> tuple[dict[str, Any], Units]:
    """A model's report over its seeds, and its units with the values averaged over seeds."""
    task = per_seed_units[0].task
    names = METRICS[task] + EXTRA[task]
    report = {
        "task": task, "metrics": list(METRICS[task]), "runs": runs,
        "test": {k: mean_std([r["test"][k] for r in runs]) for k in names},
        "valid": {k: mean_std([r["valid"][k] for r in runs]) for k in names},
        "best_epoch": [r["best_epoch"] for r in runs],
        "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
        "test_units": int(len(per_seed_units[0].users)),
        "test_users": int(len(np.unique(per_seed_units[0].users))),
        "recompute_check": f"passed: every seed's recomputed test metric within "
                           f"{TOLERANCE:g} of metrics.json",
    }
    averaged = Units(task, per_seed_units[0].users,
                     {k: np.mean([u.values[k] for u in per_seed_units], axis=0)
                      for k in METRICS[task]})
    return report, averaged


def compare(args: argparse.Namespace, reports: dict[str, Any], units: dict[str, Units]
            ) -> list[dict[str, Any]]:
    out = []
    for a, b in args.pairs:
        ua, ub = units[a], units[b]
        if ua.task != ub.task or not np.array_equal(ua.users, ub.users):
            raise PipelineError(f"pair {a}:{b}: {a} ({ua.task} task, {len(ua.users)} test "
                                f"units) and {b} ({ub.task} task, {len(ub.users)} units) were "
                                f"not scored on the same test units; pair models of one task "
                                f"(or pass --task in --train-args)")
        for name in METRICS[ua.task]:
            t = time.perf_counter()
            lo, hi = paired_bootstrap(ua.users, ua.values[name], ub.values[name], name,
                                      args.resamples, args.bootstrap_seed)
            v = verdict(lo, hi, name)
            out.append({
                "a": a, "b": b, "metric": name,
                "better": "lower" if name in LOWER_IS_BETTER else "higher",
                "diff_of_seed_means": (reports[a]["test"][name]["mean"]
                                       - reports[b]["test"][name]["mean"]),
                "diff_of_seed_averaged_units": ua.metric(name) - ub.metric(name),
                "ci95": [lo, hi], "verdict": v,
                "winner": {"A better": a, "B better": b}.get(v),
                "bootstrap_seconds": round(time.perf_counter() - t, 4)})
    return out


def print_tables(args: argparse.Namespace, reports: dict[str, Any], pairs: list[dict[str, Any]]
                 ) -> None:
    seeds = " ".join(map(str, args.seeds))
    print(f"\n{args.data_dir.name}: test metric per training seed ({seeds}), mean and sample "
          f"std over the seeds; valid mean; best epoch per seed; train seconds mean")
    width = max(7 * len(args.seeds), 9)
    print(f"{'model':8s} {'task':8s} {'metric':8s} {'per seed':{width}s} {'mean':>7s} "
          f"{'std':>7s} {'valid':>7s}  {'best_epoch':12s} {'train_s':>7s}  units (users)")
    for m, r in reports.items():
        for j, (name, t) in enumerate(r["test"].items()):
            cells = " ".join(f"{x:.4f}" for x in t["per_seed"])
            std = "-" if t["std"] is None else f"{t['std']:.4f}"
            line = (f"{m if j == 0 else '':8s} {r['task'] if j == 0 else '':8s} {name:8s} "
                    f"{cells:{width}s} {t['mean']:7.4f} {std:>7s} "
                    f"{r['valid'][name]['mean']:7.4f}")
            if j == 0:
                line += (f"  {' '.join(map(str, r['best_epoch'])):12s} "
                         f"{r['train_seconds_mean']:7.1f}  {r['test_units']} ({r['test_users']})")
            print(line)
    if not pairs:
        return
    print(f"\npaired bootstrap over test users ({args.resamples} resamples, seed "
          f"{args.bootstrap_seed}), per-unit values averaged over the seeds; "
          f"A - B of the seed means")
    print(f"{'A - B':18s} {'metric':8s} {'better':7s} {'A - B':>8s} {'95% interval':>20s}  "
          f"verdict")
    for p in pairs:
        lo, hi = p["ci95"]
        who = f" ({p['winner']})" if p["winner"] else ""
        print(f"{p['a'] + ' - ' + p['b']:18s} {p['metric']:8s} {p['better']:7s} "
              f"{p['diff_of_seed_means']:+8.4f} {f'[{lo:+.4f}, {hi:+.4f}]':>20s}  "
              f"{p['verdict']}{who}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("recpipe").setLevel(logging.WARNING)
    commands: list[str] = []
    # seed-major: every model of a seed runs before the next seed, so that a model built
    # from others trained just before it (--model blend, neumf --pretrained) combines the
    # runs of the same seed
    runs: dict[str, list] = {m: [] for m in args.models}
    seen: dict[str, list] = {m: [] for m in args.models}
    for seed in args.seeds:
        for m in args.models:
            run, u = run_seed(args, m, seed, commands, seen[m][0] if seen[m] else None)
            runs[m].append(run)
            seen[m].append(u)
    reports, units = {}, {}
    for m in args.models:
        reports[m], units[m] = summarise(runs[m], seen[m])
    pairs = compare(args, reports, units)
    print_tables(args, reports, pairs)
    result = {"data_dir": str(args.data_dir), "seeds": args.seeds,
              "train_args": args.train_args, "variants": {
                  m: {"family": args.family[m], "args": args.extra.get(m, [])}
                  for m in args.models if args.family[m] != m},
              "python": sys.executable, "commands": commands,
              "resamples": args.resamples, "bootstrap_seed": args.bootstrap_seed,
              "interval": "95% paired percentile bootstrap over test users (2.5, 97.5)",
              "tolerance": TOLERANCE, "models": reports, "pairs": pairs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
