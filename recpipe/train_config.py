"""Stage 60's typed configuration: the flags, where each default comes from (the model
family's preset), and the choices made before training: the task (``decide_task``, the one
place it is decided), the data-dependent optimizer (``for_data``) and the family's
constructor arguments (``model_args``)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Optional

from .cli import PipelineError, opt
from .dataset import Data
from .family import REGISTRY, Family, family
from .holdout import LATEST_HELD_OUT
from .objectives import OBJECTIVES, for_task
from .presets import DEFAULT_MODEL, PRESETS, ROWSGD, preset

log = logging.getLogger("recpipe")

AUTO_ROWS_PER_SAMPLE = 16   # --optimizer auto: sparse_adam above this table/batch ratio
SCALE_STEPS = 1024          # --batch-scale: the batch doubles while an epoch has more steps
SCALE_MAX_BATCH = 32768     # ... up to this many samples
PRESET = "; default: the preset of the model and task (recpipe/presets.py)"


def _uses(option: str) -> str:
    """What ``option`` means for each family that reads it (for --help)."""
    return "; ".join(f"{n}: {c.options[option]}" for n, c in REGISTRY.items()
                     if option in c.options)


def weights_pairs_by_recency(model: str, task: str) -> bool:
    """Whether ``--recency`` weighs ``model``'s loss on ``task``: an objective that takes
    per-pair weights (``Objective.weighs_pairs``: the implicit BCE) in a family trained by
    epochs on (user, item) pairs (``dataset.pair_recency_weights``); EASE instead weighs the
    history it scores from (its own ``recency`` option)."""
    cls = family(model)
    return (task in cls.tasks and for_task(task).weighs_pairs and cls.batches == "pairs"
            and cls.fit_by == "epochs" and "recency" not in cls.options)


@dataclasses.dataclass
class TrainConfig:
    model: str = opt(DEFAULT_MODEL, "model family to train", choices=REGISTRY)
    task: Optional[str] = opt(None, "explicit (regress ratings, MSE) or implicit (BCE with "
                              "sampled negatives); default: the split's task when stage 30 "
                              "fixed one (loo, ncf: implicit) and the model supports it, else "
                              "the model's own (" + ", ".join(
                                  f"{n}: {c.default_task}" for n, c in REGISTRY.items()) + ")",
                              choices=["explicit", "implicit"])
    data_dir: Path = opt(Path("data"), "pipeline data folder (reads 40_make_sparse_matrix/, "
                         "writes 60_train/<model>/)")
    epochs: Optional[int] = opt(None, "maximum epochs (early stopping on validation may stop "
                                "sooner)" + PRESET)
    device: str = opt("auto", "auto (cuda when available), cpu or cuda",
                      choices=["auto", "cpu", "cuda"])
    seed: int = opt(0, "random seed (init, permutations, negatives)")
    resume: bool = opt(False, "continue from DATA_DIR/60_train/<model>/checkpoint.pt")
    dim: Optional[int] = opt(None, "embedding size (" + _uses("dim") + ")" + PRESET)
    hidden: Optional[int] = opt(None, "tower output size (" + _uses("hidden") + ")" + PRESET)
    layers: Optional[list[int]] = opt(None, "MLP layer sizes, e.g. 64 32 16 8 ("
                                      + _uses("layers") + ")" + PRESET)
    dropout: Optional[float] = opt(None, "dropout (" + _uses("dropout") + ")" + PRESET)
    init_std: Optional[float] = opt(None, "std of the embedding initialisation" + PRESET)
    optimizer: Optional[str] = opt(None, "adam; sgd (with --momentum; --batch-size 0 makes it "
                                   "full-batch gradient descent); sparse_adam (Adam on the "
                                   "embedding rows each batch uses, for large tables); "
                                   "rowsgd (per-sample SGD with per-row AdaGrad steps in a "
                                   "compiled CPU kernel: mf explicit; --batch-size does not "
                                   "apply); adagrad (sparse embedding gradients); auto "
                                   "(rowsgd where it applies on the CPU in one process, else "
                                   f"sparse_adam when the user + item tables have more than "
                                   f"{AUTO_ROWS_PER_SAMPLE} rows per batch sample, else adam)" + PRESET,
                                   choices=["adam", "sgd", "sparse_adam", "rowsgd", "adagrad",
                                            "auto"])
    lr: Optional[float] = opt(None, "learning rate" + PRESET + "; rowsgd has its own "
                              "(presets.ROWSGD: mf explicit 0.1)")
    momentum: Optional[float] = opt(None, "sgd momentum" + PRESET)
    batch_size: Optional[int] = opt(None, "training samples per step (implicit: positives + "
                                    "negatives); 0 = full batch; under torchrun the global "
                                    "batch, cut into one chunk per process" + PRESET)
    batch_scale: Optional[bool] = opt(None, "grow the batch with the data: doubled while an "
                                      f"epoch has more than {SCALE_STEPS} steps, up to "
                                      f"{SCALE_MAX_BATCH:,} samples (the learning rate is "
                                      "kept; metrics.json records the batch used); default: on "
                                      "when --batch-size comes from the preset, off when given")
    reg: Optional[float] = opt(None, "L2 weight on the embedding rows used by each sample ("
                               + _uses("reg") + ")" + PRESET)
    reg_power: Optional[float] = opt(None, "scale --reg per row by (the row's train ratings / "
                                     "the mean over its side) ** -P: 0 = one weight for every "
                                     "sample, so a row's total L2 grows with its ratings "
                                     "(Funk, ALS-WR); 1 = one total L2 per row, whatever its "
                                     "ratings (" + _uses("reg_power") + "; explicit task)"
                                     + PRESET)
    recency: Optional[float] = opt(None, "weigh a user's interactions by recency, this "
                                   "half-life in interactions; 0 = off. " + _uses("recency")
                                   + "; the implicit task of the pair models (" + ", ".join(
                                       n for n in REGISTRY
                                       if any(weights_pairs_by_recency(n, t) for t in OBJECTIVES))
                                   + "): each positive's loss, with its negatives', weighs "
                                   "F + (1 - F) * 0.5 ** (r / half-life), r the user's later "
                                   "train interactions and F --recency-floor; default: the "
                                   "preset's (" + ", ".join(sorted({m for (m, _), v in
                                                                    PRESETS.items()
                                                                    if "recency_latest" in v}))
                                   + ") on a split that holds out each user's latest by "
                                   "timestamp (" + ", ".join(LATEST_HELD_OUT) + "), else 0")
    recency_floor: Optional[float] = opt(None, "--recency, pair models: the weight, 0-1, that "
                                         "a user's oldest interactions keep" + PRESET)
    n_negatives: Optional[int] = opt(None, "implicit: sampled negatives per positive, "
                                     "redrawn every epoch" + PRESET)
    lr_schedule: Optional[str] = opt(None, "plateau (multiply lr by --lr-decay when validation "
                                     "does not improve), cosine (over --epochs) or none"
                                     + PRESET, choices=["plateau", "cosine", "none"])
    lr_decay: Optional[float] = opt(None, "plateau: lr factor on a non-improving epoch"
                                    + PRESET)
    patience: Optional[int] = opt(None, "stop after this many epochs without validation "
                                  "improvement" + PRESET)
    min_delta: Optional[float] = opt(None, "an epoch counts as an improvement for --patience "
                                     "and the plateau schedule only when it gains more than "
                                     "this over the last epoch that did (in the selection "
                                     "metric's units: RMSE, HR@10); the best epoch is kept "
                                     "whatever its gain; 0 = any gain" + PRESET)
    members: Optional[list[str]] = opt(None, "the trained models a stack combines ("
                                       + _uses("members") + ")" + PRESET)
    pretrained: bool = opt(False, "initialise from the trained models this family is built "
                           "from (" + _uses("pretrained") + "; train those first on the same "
                           "data with matching sizes, e.g. --dim / --layers), see --alpha")
    alpha: float = opt(0.5, "--pretrained: weight of the first part's output layer")
    refit: bool = opt(True, "after choosing the epoch on validation, retrain from scratch on "
                      "train + valid for that many epochs (same seed and learning rates) "
                      "and evaluate test with that model; --no-refit tests the selected "
                      "model itself")
    amp: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    eval_batch: int = opt(0, "users per full-ranking evaluation block (0 = automatic)")
    valid_users: int = opt(50_000, "per-epoch selection evaluates a fixed, seeded sample of "
                           "this many validation users when the validation part has more "
                           "(full ranking of every item for 440k Netflix users would cost more "
                           "than the epoch); the final validation and the test use every "
                           "user; 0 = always all")
    test_users: int = opt(0, "the final validation and the test evaluate a fixed, seeded "
                          "sample of this many users of each part (0 = every user): for "
                          "tower models (mlp, neumf) whose full ranking of every item for "
                          "480k users would take hours; metrics.json states the sample "
                          "(test_users of test_users_total) and each metric's 95%% interval")
    full_rank_users: int = opt(50_000, "on a split with sampled candidates (loo, ncf), the "
                               "final validation's and the test's full-ranking extras "
                               "(full_hr@10, full_ndcg@10, full_recall@20: every item for every "
                               "user, the costliest part at Netflix's size) use a fixed, "
                               "seeded sample of this many users when the part has more; "
                               "the sampled-candidate metrics use every user; 0 = all")
    max_seconds: float = opt(0.0, "stop training after this many seconds (0 = no limit); "
                             "the best epoch so far is kept")
    tune: int = opt(0, "search the preset's hyperparameters on the validation split "
                    "with this many trials (Optuna TPE, seeded by --seed, median pruning; "
                    "trial 0 is the preset), then train, refit and test with the best; only "
                    "options not given on the command line are searched (recpipe/tune.py "
                    "gives the ranges; tune.csv and metrics.json record the search); 0 = off")
    tune_params: Optional[list[str]] = opt(None, "--tune: search only these options (of lr "
                                           "reg dim hidden layers dropout n_negatives reg_power); "
                                           "default: all that the model reads")
    tune_seconds: float = opt(0.0, "--tune: stop starting trials after this many seconds "
                              "(0 = run all --tune trials)")
    dist_backend: str = opt("auto", "under torchrun: the torch.distributed backend, auto "
                            "(nccl on CUDA, gloo on the CPU), gloo or nccl (ignored without "
                            "torchrun; docs/distributed.md)", choices=["auto", "gloo", "nccl"])
    dist_timeout: float = opt(300.0, "under torchrun: seconds a collective waits for a rank "
                              "that stopped answering before this rank fails with a one-line "
                              "error (torchrun then stops the others)")

    def validate(self) -> None:
        for name in ("epochs", "dim", "hidden", "n_negatives", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name in ("lr", "lr_decay"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise PipelineError(f"--{name.replace('_', '-')} must be a positive number, "
                                    f"got {v}")
        for name in ("reg", "init_std", "dropout", "momentum", "recency", "min_delta",
                     "reg_power"):
            v = getattr(self, name)
            if name == "reg" and v == math.inf and self.model in REGISTRY \
                    and math.inf in getattr(family(self.model), "reg_grid", ()):
                continue                  # a limit the family defines (knn: inf)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.recency_floor is not None and not 0 <= self.recency_floor <= 1:
            raise PipelineError(f"--recency-floor must be between 0 and 1, got "
                                f"{self.recency_floor}")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise PipelineError(f"--dist-timeout must be a positive number of seconds, got "
                                f"{self.dist_timeout}")
        if self.tune < 0 or not (self.tune_seconds >= 0 and math.isfinite(self.tune_seconds)):
            raise PipelineError(f"--tune must be >= 0 trials and --tune-seconds >= 0, got "
                                f"{self.tune} and {self.tune_seconds}")
        if self.tune_params is not None and not self.tune:
            raise PipelineError("--tune-params applies to a search: add --tune N (trials)")
        if self.test_users < 0:
            raise PipelineError(f"--test-users must be >= 0 (0 = all), got {self.test_users}")
        for name in ("valid_users", "full_rank_users"):
            if getattr(self, name) < 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got "
                                    f"{getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 0:
            raise PipelineError(f"--batch-size must be >= 0 (0 = full batch), "
                                f"got {self.batch_size}")
        if self.layers is not None and (len(self.layers) < 1 or min(self.layers) < 1):
            raise PipelineError(f"--layers must be positive sizes, got {self.layers}")
        cls = family(self.model)
        if self.members is not None and "members" not in cls.options:
            users = [n for n, c in REGISTRY.items() if "members" in c.options]
            raise PipelineError(f"--members applies to --model {' / '.join(users)} only, "
                                f"got {self.model}")
        if self.reg_power and "reg_power" not in cls.options:
            users = [n for n, c in REGISTRY.items() if "reg_power" in c.options]
            raise PipelineError(f"--reg-power applies to --model {' / '.join(users)} only, "
                                f"got {self.model}")
        if self.pretrained and not cls.pretrain_from:
            users = [n for n, c in REGISTRY.items() if c.pretrain_from]
            raise PipelineError(f"--pretrained applies to --model {' / '.join(users)} only, "
                                f"got {self.model}")

    def resolved(self, split_task: str | None = None, device: Any = None,
                 one_process: bool = True, latest_held_out: bool = False) -> "TrainConfig":
        """A copy with the task decided (``decide_task``) and every unset option filled from
        the preset.

        With ``device`` given (stage 60 passes the one it trains on), ``--optimizer auto``
        is decided here when it means rowsgd (``rowsgd_eligible``): rowsgd's own preset
        values (``presets.ROWSGD``: its learning rate) then fill the options the user did
        not give. Otherwise auto is decided from the data by ``for_data``.

        ``latest_held_out``: the split holds out each user's latest interactions by their
        timestamps (stage 60 passes it for ``holdout.LATEST_HELD_OUT`` splits with
        timestamps); a preset's
        ``recency_latest`` is the ``--recency`` there, 0 elsewhere."""
        cfg = dataclasses.replace(self)
        cfg.task = decide_task(cfg.task, family(cfg.model), split_task)
        if cfg.batch_scale is None:
            cfg.batch_scale = cfg.batch_size is None
        values = preset(cfg.model, cfg.task)
        chosen = cfg.optimizer or values.get("optimizer")
        if chosen == "auto" and device is not None and rowsgd_eligible(
                cfg.model, cfg.task, device, one_process) is None:
            chosen = cfg.optimizer = "rowsgd"
            log.info("--optimizer auto: rowsgd (per-sample SGD kernel on the CPU, one "
                     "process; recpipe/kernels.py)")
        if chosen == "rowsgd":
            values = {**values, **ROWSGD.get((cfg.model, cfg.task), {})}
        # the preset's recency holds where the held-out items are each user's latest
        # (``latest_held_out``); 0 elsewhere
        latest = values.pop("recency_latest", None)
        if cfg.recency is None and latest is not None:
            cfg.recency = float(latest) if latest_held_out else 0.0
        for k, v in values.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, copy.deepcopy(v))
        if not cfg.recency and self.recency_floor is None:
            cfg.recency_floor = None      # read with --recency only (and resume compares it)
        if cfg.recency and "recency" not in family(cfg.model).options and not \
                weights_pairs_by_recency(cfg.model, cfg.task):
            raise PipelineError(f"--recency weighs EASE's history or the implicit loss of the "
                                f"pair models; --model {cfg.model} on the {cfg.task} task has "
                                f"neither (drop --recency)")
        if cfg.reg_power and cfg.task not in family(cfg.model).reg_power_tasks:
            raise PipelineError(f"--reg-power scales the explicit objective's L2 per row; "
                                f"this run trains {cfg.model} for the {cfg.task} task (drop "
                                f"--reg-power, or add --task explicit)")
        return cfg


def rowsgd_eligible(model: str, task: str, device: Any, one_process: bool) -> str | None:
    """None when ``--optimizer rowsgd`` can train ``model`` on ``task`` here, else why not."""
    cls = family(model)
    if task not in cls.fused_tasks:
        fused = [f"{n} ({'/'.join(c.fused_tasks)})" for n, c in REGISTRY.items()
                 if c.fused_tasks]
        return (f"--model {model} has no fused kernel for the {task} task; rowsgd trains "
                f"{', '.join(fused) or 'no family'}")
    if str(device).split(":")[0] != "cpu":
        return f"rowsgd is a CPU kernel; this run is on {device} (use sparse_adam there)"
    if not one_process:
        return ("rowsgd runs in one process; under torchrun use --optimizer sparse_adam "
                "(docs/distributed.md)")
    from . import kernels            # imports numba: only where rowsgd could run
    if not kernels.available():
        return kernels.missing_reason()
    return None


def decide_task(requested: str | None, cls: type[Family], split_task: str | None,
                rated: bool = True) -> str:
    """The task stage 60 trains: the one place it is decided.

    ``--task`` when given; else the task the split fixed (stage 30 records "implicit" for
    loo/ncf, whose candidates are for ranking) when the family supports it; else the family's
    default. Implicit training on rated data is allowed (ratings become interactions);
    explicit training on data without ratings is refused."""
    # stage 30 records "implicit" for the splits made for ranking (loo, ncf) and null for
    # those that serve either task (an older version wrote "explicit" for these: rerun
    # stage 30 to let the model family choose)
    fixed = split_task
    task = requested or (fixed if fixed in cls.tasks else cls.default_task)
    if task not in cls.tasks:
        raise PipelineError(f"--model {cls.name} cannot be trained for the {task} task; it "
                            f"supports {', '.join(cls.tasks)}")
    if OBJECTIVES[task]().needs_ratings and not rated:
        raise PipelineError(f"--task {task} needs ratings, but this data has none (only "
                            f"interactions); use --task implicit")
    if requested and fixed and requested != fixed:
        log.warning("training %s as --task asks, on a split made for the %s task (stage 30 "
                    "recorded it); %s metrics are reported for it", requested, fixed, requested)
    return task


def for_data(cfg: TrainConfig, data: Data) -> TrainConfig:
    """``cfg`` with the choices that depend on the data made: ``--optimizer auto``, then
    ``--batch-scale``.

    Dense Adam passes over every row of the embedding tables at every step, which dominates
    when the tables are much larger than a batch (Netflix: 480k users); sparse_adam (lazy
    Adam on the rows a batch uses, dense Adam on tower weights) costs in proportion to the
    rows a batch touches: through the family's analytic gradient where it has one (explicit
    MF), through sparse embedding gradients otherwise. auto picks it when the user + item
    rows exceed AUTO_ROWS_PER_SAMPLE per sample of the batch asked for (before scaling). On
    ML-100K, ml-latest-small, ML-1M and the demo the tables are smaller than that and auto is
    dense Adam; where it is lazy, bench_optimizers.py measured the same or better validation
    metric (docs/presets.md).

    The batch scale: a step has a fixed cost (a few dozen tensor operations) besides its
    per-sample work, which at the presets' 1-2k samples dominates (MF on 480k x 17,770
    tables: 0.4M ratings/s at batch 2,048). The batch therefore doubles while an epoch has
    more than SCALE_STEPS steps, up to SCALE_MAX_BATCH. The data sets the presets were tuned
    on (ML-100K, ml-latest-small, ML-1M, the demo: under 600k training samples per epoch for
    the explicit presets) keep their batch; the learning rate is kept, since Adam's step size
    does not grow with the batch and a user's row is still updated about once per rating
    (docs/presets.md has the measurements). The result is applied once: the returned config
    has the batch used and ``batch_scale`` off, so the refit on train + valid keeps it."""
    if cfg.optimizer == "auto":
        rows = data.n_users + data.n_items
        batch = cfg.batch_size or len(data.train)
        choice = "sparse_adam" if rows > AUTO_ROWS_PER_SAMPLE * batch else "adam"
        log.info("--optimizer auto: %s (%d user + item rows, batch %d)", choice, rows, batch)
        cfg = dataclasses.replace(cfg, optimizer=choice)
    # families trained on batches of rows (the autoencoders) count their batch in rows, not
    # in pair samples: the rule is for pair batches
    # rowsgd steps per rating: there is no batch to scale
    if (cfg.batch_scale and cfg.batch_size and family(cfg.model).batches == "pairs"
            and cfg.optimizer != "rowsgd"):
        samples = len(data.train) * for_task(cfg.task, n_negatives=cfg.n_negatives or 1
                                             ).samples_per_positive
        batch = cfg.batch_size
        while batch * 2 <= SCALE_MAX_BATCH and samples > SCALE_STEPS * batch:
            batch *= 2
        if batch != cfg.batch_size:
            log.info("--batch-scale: batch %d (%d training samples per epoch; the preset's "
                     "%d would take %d steps)", batch, samples, cfg.batch_size,
                     -(-samples // cfg.batch_size))
        cfg = dataclasses.replace(cfg, batch_size=batch)
    if cfg.batch_scale:
        cfg = dataclasses.replace(cfg, batch_scale=False)
    return cfg


def model_args(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """Constructor arguments (plain types) of the chosen family."""
    hp = {k: getattr(cfg, k) for k in ("dim", "hidden", "layers", "dropout", "init_std",
                                       "members", "reg_power")}
    hp["data_dir"] = str(cfg.data_dir)
    sparse = cfg.optimizer in ("sparse_adam", "adagrad")
    return family(cfg.model).from_config(hp, cfg.task, data.global_mean, data.rating_std,
                                         sparse)
