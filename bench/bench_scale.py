#!/usr/bin/env python3
"""End-to-end pipeline at Netflix scale on one machine: stages 10 -> 20 -> 30 -> 40 -> 60.

Generates a synthetic Netflix-layout ``training_set/`` (17,770 ``mv_*.txt`` files plus
``movie_titles.txt``) once under WORKDIR/netflix_<generator>_<N>/ and reuses it on later runs,
then runs every stage as its own subprocess (``RECPIPE_PROGRESS=0``) at the presets, with no
hyperparameter flags besides the ``--epochs`` cap (and ``--max-seconds`` / ``--train-args``
when given), and times it.

    python bench/bench_scale.py                                  # 1e8 ratings, mf and neumf
    python bench/bench_scale.py --ratings 1e7 --epochs 1 --models mf
    python bench/bench_scale.py --ratings 1e7 --device cuda --train-args=--no-refit
    python bench/bench_scale.py --ratings 1e7 --skip-stages 10 20 30 40   # retrain only

Data sets. ``--generator demo`` (default) is ``recpipe.demo.generate`` at Netflix's shape:
17,770 movies, N / 209 users (Netflix: 100.5M ratings by 480,189 users), ratings from a
latent-factor model cut into 1..5 stars, distinct (user, movie) pairs, so the validation
metric measures learning. ``--generator bench_preprocessing`` is
``bench/bench_preprocessing.py``'s ``make_netflix`` (Zipf users, stars drawn independently of
user and movie): the stage-10 parser's benchmark input; stage 20 drops its many repeated
pairs (about 3 in 4 at 1e7) and there is nothing to learn beyond popularity.

Data folders (stages 10-20 run once and are shared):
  WORKDIR/data_<generator>_<N>_explicit/   30 --strategy random; models whose preset task is
                                           explicit (mf) train here
  WORKDIR/data_<generator>_<N>_implicit/   10_preprocessing/ and 20_make_ids/ hard-linked from
                                           the explicit folder; 30 --strategy loo (each user's
                                           latest interaction is test, the second latest
                                           valid, 99 sampled negatives each); implicit models
                                           (neumf, gmf, mlp) train here
Each stage's stdout/stderr goes to WORKDIR/logs/<data folder>/<stage>.log.

Figures, per stage run (printed as a table and written to WORKDIR/bench_scale.json, with the
load average at the end: other processes on the machine slow the wall times):
  wall_s          wall seconds of the subprocess, Python start-up and imports included
  input_ratings   ratings the stage reads: the rows in the generated files (10), the rows
                  the previous stage wrote (20, 30), train + valid + test (40), the train
                  ratings (60)
  ratings_per_s   input_ratings / wall_s
  peak_rss_gib    the child's peak resident set size (ru_maxrss of os.wait4), GiB; Linux
                  counts this process's own peak (some 30 MB: the data are generated in a
                  spawned process) into it
Per model, from DATA/60_train/<model>/history.csv and metrics.json:
  epochs          per epoch: samples_per_s (training samples, implicit: positives +
                  sampled negatives, per second of the training pass) and the validation
                  selection metric (explicit: RMSE on every valid rating; implicit: HR@10
                  over the positive and its 99 negatives, on up to --valid-users users)
  best_epoch      the epoch chosen on validation; test is evaluated once, with that model
                  (or, with the default --refit, with a model retrained on train + valid for
                  that many epochs)
  test / valid    the final metrics of metrics.json; test_metric is the selection metric's
                  test value
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N_MOVIES = 17_770
NETFLIX_RATINGS_PER_USER = 100_480_507 / 480_189
IMPLICIT_MODELS = {"gmf", "mlp", "neumf"}
STAGES = ("10", "20", "30", "40", "60")
SCRIPTS = {"10": "10_preprocessing.py", "20": "20_make_ids.py", "30": "30_split_train_test.py",
           "40": "40_make_sparse_matrix.py", "60": "60_train.py"}
GIB = 1024 ** 3


@dataclass
class StageRun:
    stage: str
    data_dir: str
    label: str
    wall_s: float
    peak_rss_gib: float
    returncode: int
    input_ratings: int = 0
    ratings_per_s: float = 0.0
    log: str = ""


@dataclass
class ModelResult:
    model: str
    data_dir: str
    task: str
    selection_metric: str
    best_epoch: int
    epochs_run: int
    refit: bool
    train_seconds: float
    test_metric: float
    epochs: list[dict[str, float]]
    valid: dict[str, Any]       # as in metrics.json: the metrics, their counts and CIs
    test: dict[str, Any]


def make_data(generator: str, folder: Path, n_ratings: int, seed: int = 0) -> float:
    """The synthetic training_set/ into ``folder`` unless the same one is there; the seconds
    spent (0 when reused). Runs in a spawned process: a child's ru_maxrss includes its
    parent's peak RSS at exec time, so the benchmark process itself stays small."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from bench_preprocessing import make_netflix
    from recpipe.demo import DemoSpec, generate, write_training_set

    if generator == "bench_preprocessing":
        return make_netflix(folder, n_ratings, N_MOVIES, seed)
    n_users = max(1, round(n_ratings / NETFLIX_RATINGS_PER_USER))
    spec = DemoSpec(seed=seed, n_users=n_users, n_items=N_MOVIES, n_ratings=n_ratings)
    info = folder / "scale.json"
    want = {"generator": generator, **asdict(spec)}
    if info.exists() and json.loads(info.read_text()) == want:
        return 0.0
    t0 = time.time()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_training_set(generate(spec), folder, seed)
    info.write_text(json.dumps(want))
    return time.time() - t0


def count_lines(folder: Path) -> int:
    """Ratings in a training_set/ folder: its lines less one ``N:`` header per file."""
    total = 0
    for path in folder.iterdir():
        with open(path, "rb") as f:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1
    return total


def manifest(data_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((data_dir / Path(SCRIPTS[stage]).stem / "manifest.json").read_text())


def input_ratings(stage: str, data_dir: Path, n_generated: int) -> int:
    if stage == "10":
        return n_generated
    if stage in ("20", "30"):
        return int(manifest(data_dir, str(int(stage) - 10))["n_ratings"])
    if stage == "40":
        return int(sum(manifest(data_dir, "30")["sizes"].values()))
    return int(manifest(data_dir, "40")["nnz"]["train"])


def run_stage(stage: str, label: str, data_dir: Path, args: list[str], log_dir: Path,
              n_generated: int) -> StageRun:
    """Run one stage in a child process; wall time and the child's own peak RSS (wait4)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{label}.log"
    cmd = [sys.executable, str(ROOT / SCRIPTS[stage]), "--data-dir", str(data_dir), *args]
    env = dict(os.environ, RECPIPE_PROGRESS="0")
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
    run = StageRun(stage=stage, data_dir=data_dir.name, label=label, wall_s=round(wall, 2),
                   peak_rss_gib=round(usage.ru_maxrss * 1024 / GIB, 3), returncode=rc,
                   log=str(log_path))
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        print(f"stage {label} failed (exit {rc}); last lines of {log_path}:\n  "
              + "\n  ".join(tail), flush=True)
        return run
    run.input_ratings = input_ratings(stage, data_dir, n_generated)
    run.ratings_per_s = round(run.input_ratings / max(wall, 1e-9), 1)
    return run


def model_result(model: str, data_dir: Path) -> ModelResult:
    out = data_dir / "60_train" / model
    metrics = json.loads((out / "metrics.json").read_text())
    metric = metrics["selection_metric"]
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [{"epoch": int(r["epoch"]), "samples_per_s": float(r.get("samples_per_s") or "nan"),
               "seconds": float(r["seconds"]), f"valid_{metric}": float(r[f"valid_{metric}"])}
              for r in rows]
    return ModelResult(model=model, data_dir=data_dir.name, task=metrics["config"]["task"],
                       selection_metric=metric, best_epoch=int(metrics["best_epoch"]),
                       epochs_run=int(metrics["epochs_run"]),
                       refit=bool(metrics["refit_on_train_valid"]),
                       train_seconds=float(metrics["train_seconds"]),
                       test_metric=float(metrics["test"].get(metric, float("nan"))),
                       epochs=epochs, valid=metrics["valid"], test=metrics["test"])


def print_stage_table(runs: list[StageRun]) -> None:
    print(f"\n{'stage':<22} {'data':<34} {'wall s':>9} {'input ratings':>14} "
          f"{'ratings/s':>12} {'peak RSS GiB':>13}")
    for r in runs:
        rate = f"{r.ratings_per_s:,.0f}" if r.returncode == 0 else f"FAILED ({r.returncode})"
        print(f"{r.label:<22} {r.data_dir:<34} {r.wall_s:>9.2f} {r.input_ratings:>14,} "
              f"{rate:>12} {r.peak_rss_gib:>13.2f}")


def print_model_table(res: ModelResult) -> None:
    metric = res.selection_metric
    print(f"\n{res.model} ({res.task}, {res.data_dir}): selected epoch {res.best_epoch} of "
          f"{res.epochs_run}; test {metric} {res.test_metric:.4f}"
          f"{' (refit on train + valid)' if res.refit else ''}; "
          f"training {res.train_seconds:.1f}s")
    print(f"  {'epoch':>5} {'samples/s':>12} {'epoch s':>9} {'valid ' + metric:>14}")
    for e in res.epochs:
        print(f"  {e['epoch']:>5} {e['samples_per_s']:>12,.0f} {e['seconds']:>9.1f} "
              f"{e[f'valid_{metric}']:>14.4f}")
    for part, values in (("valid", res.valid), ("test", res.test)):
        print(f"  {part + ':':<6} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()
                                              if isinstance(v, float)))


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a hard-linked copy of ``src`` (stages replace their own folders whole)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=float, default=1e8,
                    help="ratings to generate (floats such as 1e7 accepted)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale"), help="work folder")
    ap.add_argument("--models", nargs="+", default=["mf", "neumf"],
                    choices=["mf", "deepmf", "gmf", "mlp", "neumf"],
                    help="stage-60 models; gmf, mlp, neumf train on the loo (implicit) split")
    ap.add_argument("--epochs", type=int, default=2, help="stage 60 --epochs cap")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stage 60 --max-seconds (checked between epochs; 0 = none)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="stage 60 --device")
    ap.add_argument("--train-args", default="",
                    help="further stage-60 flags passed through; give them after =, "
                         'e.g. --train-args="--no-refit --threads 2"')
    ap.add_argument("--generator", choices=["demo", "bench_preprocessing"], default="demo",
                    help="synthetic data: latent-factor (demo) or bench_preprocessing's "
                         "make_netflix (see above)")
    ap.add_argument("--skip-stages", nargs="*", default=[], choices=STAGES,
                    help="stages not run (their outputs from an earlier run are used)")
    args = ap.parse_args()
    n = int(args.ratings)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    name = f"{args.generator}_{n}"

    src = work / f"netflix_{name}"
    t0 = time.time()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        gen = pool.submit(make_data, args.generator, src, n).result()
    n_rows = count_lines(src / "training_set")
    how = f"generated in {gen:.1f}s" if gen else f"reused; counted in {time.time() - t0:.1f}s"
    print(f"input: {src / 'training_set'}: {n_rows:,} ratings ({how})", flush=True)

    wants_explicit = [m for m in args.models if m not in IMPLICIT_MODELS]
    wants_implicit = [m for m in args.models if m in IMPLICIT_MODELS]
    explicit, implicit = work / f"data_{name}_explicit", work / f"data_{name}_implicit"
    train_args = ["--epochs", str(args.epochs), "--device", args.device,
                  *(["--max-seconds", str(args.max_seconds)] if args.max_seconds else []),
                  *shlex.split(args.train_args)]
    runs: list[StageRun] = []
    results: list[ModelResult] = []

    def step(stage: str, label: str, data_dir: Path, stage_args: list[str]) -> bool:
        if stage in args.skip_stages:
            return True
        run = run_stage(stage, label, data_dir, stage_args, work / "logs" / data_dir.name, n_rows)
        runs.append(run)
        return run.returncode == 0

    ok = (step("10", "10_preprocessing", explicit,
               ["--input", str(src / "training_set"), "--format", "netflix",
                "--titles", str(src / "movie_titles.txt")])
          and step("20", "20_make_ids", explicit, []))
    if ok and wants_implicit:
        implicit.mkdir(parents=True, exist_ok=True)
        for folder in ("10_preprocessing", "20_make_ids"):
            link_tree(explicit / folder, implicit / folder)
    for data_dir, strategy, models in ((explicit, "random", wants_explicit),
                                       (implicit, "loo", wants_implicit)):
        if not (ok and models and step("30", f"30_split_{strategy}", data_dir,
                                       ["--strategy", strategy])
                and step("40", "40_make_sparse_matrix", data_dir, [])):
            continue
        for model in models:
            if (step("60", f"60_train_{model}", data_dir, ["--model", model, *train_args])
                    and (data_dir / "60_train" / model / "metrics.json").exists()):
                results.append(model_result(model, data_dir))

    print_stage_table(runs)
    for res in results:
        print_model_table(res)
    report = {"ratings": n_rows, "generator": args.generator, "generated_seconds": round(gen, 1),
              "device": args.device, "epochs_cap": args.epochs, "stage60_args": train_args,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "stages": [asdict(r) for r in runs],
              "models": [asdict(r) for r in results]}
    out = work / "bench_scale.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload average now (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} CPUs; "
          f"wrote {out}")
    if any(r.returncode != 0 for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
