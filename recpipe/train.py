"""Stage 60: train a model on stage 40's artifact; select on validation, report test once.

Reads DATA_DIR/40_make_sparse_matrix/ and writes DATA_DIR/60_train/<model>/:
model.pt (best weights + metadata), checkpoint.pt (last completed epoch, for --resume),
history.csv, metrics.json, curve.png and manifest.json (written last; removed when a run
starts, so an interrupted run never looks finished).

Training keeps every tensor on the device: batches are slices of a ``torch.randperm``;
implicit negatives are drawn vectorised per batch from a seeded generator, so they are
redrawn every epoch. L2 is applied to the embedding rows the batch uses (per sample), not as
weight decay over the whole table. Model selection and early stopping use the validation
split; the test split is evaluated once, with the best model.

Speed: explicit biased MF skips autograd (``BiasedMF.mse_backward`` writes the analytic
gradient of the same objective, then the same optimiser steps; for sparse_adam,
``mse_backward_rows`` hands row-compact gradients to ``optim.RowSparseAdam``; tests check both
against autograd); batches are gathered with ``index_select``; negatives are checked against
the train interactions with a bitmap (``dataset.KeySet``) when it fits.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import models as models_mod
from .artifacts import stage_dir, upstream_entry, write_json
from .cli import (PipelineError, command_line, config_dict, opt, parse_config, print_config,
                  progress_disabled, set_seed)
from .dataset import Data, KeySet, exclusion_rows, load_data, sample_negatives
from .metrics import finish_full, full_rank_metrics, rmse_mae, sampled_rank_metrics
from .optim import RowSparseAdam
from .presets import DEFAULT_TASK, preset

log = logging.getLogger("recpipe")
PROG = "60_train.py"
STAGE = "60_train"
DESCRIPTION = ("Train a recommendation model (mf, deepmf, gmf, mlp, neumf) on stage 40's "
               "sparse matrices. Options left unset come from the model's preset "
               "(recpipe/presets.py, docs/presets.md). Selects the epoch on the validation "
               "split with early stopping, evaluates the test split once with the best "
               "model, and writes DATA_DIR/60_train/<model>/.")


AUTO_ROWS_PER_SAMPLE = 16   # --optimizer auto: sparse_adam above this table/batch ratio


@dataclasses.dataclass
class TrainConfig:
    model: str = opt("mf", "model to train", choices=sorted(models_mod.MODELS))
    task: Optional[str] = opt(None, "explicit (regress ratings, MSE) or implicit (BCE with "
                              "sampled negatives); default: explicit for mf/deepmf, implicit "
                              "for gmf/mlp/neumf", choices=["explicit", "implicit"])
    data_dir: Path = opt(Path("data"), "pipeline data folder (reads 40_make_sparse_matrix/, "
                         "writes 60_train/<model>/)")
    epochs: Optional[int] = opt(None, "maximum epochs (early stopping on validation may stop "
                                "sooner); default from the preset")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda",
                      choices=["auto", "cpu", "cuda"])
    seed: int = opt(0, "random seed (init, permutations, negatives)")
    resume: bool = opt(False, "continue from DATA_DIR/60_train/<model>/checkpoint.pt")
    dim: Optional[int] = opt(None, "embedding size (mf/gmf factors, deepmf embedding, "
                             "neumf GMF branch)")
    hidden: Optional[int] = opt(None, "deepmf: tower output size")
    layers: Optional[list[int]] = opt(None, "mlp/neumf: MLP layer sizes, first = 2 x "
                                      "embedding size (e.g. 64 32 16 8)")
    dropout: Optional[float] = opt(None, "dropout in deepmf/mlp/neumf towers")
    init_std: Optional[float] = opt(None, "std of the embedding initialisation")
    optimizer: Optional[str] = opt(None, "adam; sgd (with --momentum; --batch-size 0 makes it "
                                   "full-batch gradient descent); sparse_adam (Adam on the "
                                   "embedding rows each batch uses, for large tables); "
                                   "adagrad (sparse embedding gradients); auto (explicit mf: "
                                   "sparse_adam when the user + item tables have more than "
                                   f"{AUTO_ROWS_PER_SAMPLE} rows per batch sample, else adam)",
                                   choices=["adam", "sgd", "sparse_adam", "adagrad", "auto"])
    lr: Optional[float] = opt(None, "learning rate")
    momentum: Optional[float] = opt(None, "sgd momentum")
    batch_size: Optional[int] = opt(None, "training samples per step (implicit: positives + "
                                    "negatives); 0 = full batch")
    reg: Optional[float] = opt(None, "L2 weight on the embedding rows used by each sample")
    n_negatives: Optional[int] = opt(None, "implicit: sampled negatives per positive, "
                                     "redrawn every epoch")
    lr_schedule: Optional[str] = opt(None, "plateau (multiply lr by --lr-decay when validation "
                                     "does not improve), cosine (over --epochs) or none",
                                     choices=["plateau", "cosine", "none"])
    lr_decay: Optional[float] = opt(None, "plateau: lr factor on a non-improving epoch")
    patience: Optional[int] = opt(None, "stop after this many epochs without validation "
                                  "improvement")
    pretrained: bool = opt(False, "neumf: initialise from DATA_DIR/60_train/gmf and mlp "
                           "(train those first with the same --dim / --layers), alpha 0.5")
    alpha: float = opt(0.5, "neumf --pretrained: weight of the GMF output layer")
    refit: bool = opt(True, "after choosing the epoch on validation, retrain from scratch on "
                      "train + valid for that many epochs (same seed and learning rates) "
                      "and evaluate test with that model; --no-refit tests the selected "
                      "model itself")
    amp: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    eval_batch: int = opt(0, "users per full-ranking evaluation block (0 = automatic)")
    max_seconds: float = opt(0.0, "stop training after this many seconds (0 = no limit); "
                             "the best epoch so far is kept")

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
        for name in ("reg", "init_std", "dropout", "momentum"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.batch_size is not None and self.batch_size < 0:
            raise PipelineError(f"--batch-size must be >= 0 (0 = full batch), "
                                f"got {self.batch_size}")
        if self.layers is not None and (len(self.layers) < 1 or min(self.layers) < 1):
            raise PipelineError(f"--layers must be positive sizes, got {self.layers}")
        if self.pretrained and self.model != "neumf":
            raise PipelineError(f"--pretrained applies to --model neumf only, got {self.model}")

    def resolved(self) -> "TrainConfig":
        """A copy with the task and every unset option filled from the preset."""
        cfg = dataclasses.replace(self)
        if cfg.task is None:
            cfg.task = DEFAULT_TASK[cfg.model]
        for k, v in preset(cfg.model, cfg.task).items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, copy.deepcopy(v))
        return cfg


def for_data(cfg: TrainConfig, data: Data) -> TrainConfig:
    """``cfg`` with the choices that depend on the data made: ``--optimizer auto``.

    Dense Adam passes over every row of the embedding tables at every step, which dominates
    when the tables are much larger than a batch (Netflix: 480k users); sparse_adam (lazy
    Adam) costs in proportion to the rows a batch uses, and for explicit MF it has a fast
    analytic path. On ML-100K, ml-latest-small and the demo both reach the same validation
    RMSE (docs/presets.md), and there dense Adam is the faster of the two."""
    if cfg.optimizer != "auto":
        return cfg
    rows = data.n_users + data.n_items
    batch = cfg.batch_size or len(data.train)
    big = cfg.model == "mf" and cfg.task == "explicit" and rows > AUTO_ROWS_PER_SAMPLE * batch
    choice = "sparse_adam" if big else "adam"
    log.info("--optimizer auto: %s (%d user + item rows, batch %d)", choice, rows, batch)
    return dataclasses.replace(cfg, optimizer=choice)


# ---------------------------------------------------------------------------------------
# models and optimisers


def model_args(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """Constructor arguments (plain types) for the chosen model."""
    explicit = cfg.task == "explicit"
    sparse = cfg.optimizer in ("sparse_adam", "adagrad")
    a: dict[str, Any] = {"init_std": float(cfg.init_std), "sparse": sparse,
                         "global_mean": float(data.global_mean) if explicit else 0.0,
                         "scale": float(data.rating_std) if explicit else 1.0}
    if cfg.model == "mf":
        a["dim"] = int(cfg.dim)
    elif cfg.model == "deepmf":
        a.update(emb_dim=int(cfg.dim), hidden=int(cfg.hidden), dropout=float(cfg.dropout))
    elif cfg.model == "gmf":
        a.update(dim=int(cfg.dim), use_bias=explicit)
    elif cfg.model == "mlp":
        a.update(layers=[int(x) for x in cfg.layers], dropout=float(cfg.dropout),
                 use_bias=explicit)
    elif cfg.model == "neumf":
        a.update(gmf_dim=int(cfg.dim), layers=[int(x) for x in cfg.layers],
                 dropout=float(cfg.dropout), use_bias=explicit)
    return a


def side_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """The per-user and per-item embedding tables (names starting user_ / item_)."""
    return [m for n, m in model.named_children()
            if (n.startswith("user_") or n.startswith("item_")) and isinstance(m, nn.Embedding)]


def _fused_ok(model: nn.Module) -> bool:
    """torch's fused Adam (one pass over each tensor) on CPU and CUDA; off for sparse grads."""
    return all(not getattr(m, "sparse", False) for m in model.modules()
               if isinstance(m, nn.Embedding))


class Optimizers:
    """One or two torch optimisers behind one interface (sparse tables + dense layers)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        emb = side_embeddings(model)
        emb_ids = {id(p) for m in emb for p in m.parameters()}
        dense = [p for p in model.parameters() if id(p) not in emb_ids]
        emb_params = [p for m in emb for p in m.parameters()]
        self.opts: list[torch.optim.Optimizer] = []
        if cfg.optimizer == "adam":
            self.opts.append(torch.optim.Adam(list(model.parameters()), lr=cfg.lr,
                                              fused=_fused_ok(model)))
        elif cfg.optimizer == "sgd":
            self.opts.append(torch.optim.SGD(list(model.parameters()), lr=cfg.lr,
                                             momentum=cfg.momentum))
        elif cfg.optimizer == "sparse_adam":
            self.opts.append(RowSparseAdam(emb_params, lr=cfg.lr))
            if dense:
                self.opts.append(torch.optim.Adam(dense, lr=cfg.lr))
        elif cfg.optimizer == "adagrad":
            self.opts.append(torch.optim.Adagrad(emb_params, lr=cfg.lr))
            if dense:
                self.opts.append(torch.optim.Adam(dense, lr=cfg.lr * 0.1))
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.opts]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def step_rows(self, updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> None:
        """A sparse_adam step from row-compact embedding gradients (RowSparseAdam)."""
        self.opts[0].step_rows(updates)

    def set_factor(self, factor: float) -> None:
        for o, lrs in zip(self.opts, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * factor

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for o, s in zip(self.opts, states):
            o.load_state_dict(s)


class RowL2:
    """Collects the rows the model looks up in its user_/item_ embeddings during forward
    (models.py appends them to ``embedding.captured``), so the loss can add L2 on exactly
    the rows the batch used (per sample) without a second lookup."""

    def __init__(self, model: nn.Module):
        self.outs: list[torch.Tensor] = []
        self.tables = side_embeddings(model)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        self._active = bool(on)
        for m in self.tables:
            m.captured = self.outs if on else None

    def take(self, n_samples: int) -> torch.Tensor:
        """Sum of squares of the captured rows, divided by the samples in the batch."""
        total = sum(o.float().square().sum() for o in self.outs)
        self.outs.clear()
        return total / max(1, n_samples)

    def close(self) -> None:
        self.active = False


# ---------------------------------------------------------------------------------------
# evaluation


def users_per_block(n_items: int, device: torch.device, want: int, per_pair: bool) -> int:
    """Users per scoring block when each user is scored against ``n_items`` items. A
    dot-product model scoring all items does a block as one matrix product, so big blocks
    pay. Scoring that holds a vector per (user, item) pair (MLP towers; gathered candidate
    vectors, ``per_pair``) is fastest on CPU while that stays in cache: about 2^16 pairs,
    2-3x faster than 2^20 on 2 cores (bench_train.py's sampled evaluation). ``want`` > 0
    overrides. Used by evaluation here and by stage 70's ranking."""
    if want > 0:
        return want
    if per_pair:
        budget = 2**16 if device.type == "cpu" else 2**20      # (user, item) pairs per block
    else:
        budget = 2**25 if device.type == "cpu" else 2**27      # floats per score block
    return max(1, min(65536, budget // max(1, n_items)))


@torch.inference_mode()
def predict_pairs(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                  block: int = 1 << 18) -> torch.Tensor:
    outs = [model(users[s:s + block], items[s:s + block]).float()
            for s in range(0, users.shape[0], block)]
    return torch.cat(outs) if outs else torch.zeros(0, device=users.device)


@torch.inference_mode()
def score_candidates(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                     block: int = 0) -> torch.Tensor:
    """[U, C] scores for users [U] and candidate items [U, C], ``block`` users at a time
    (0: automatic, see ``users_per_block``)."""
    block = users_per_block(int(items.shape[-1]), items.device, block, per_pair=True)
    outs = [model(users[s:s + block, None], items[s:s + block]).float()
            for s in range(0, users.shape[0], block)]
    return torch.cat(outs)


@torch.inference_mode()
def full_ranking(model: nn.Module, data: Data, part: str, block_users: int = 0
                 ) -> dict[str, float]:
    """Full-ranking HR@10, NDCG@10, Recall@20 for the users of ``part``: candidates are all
    items not in train (for test, also not the validation items)."""
    import scipy.sparse as sp
    p = getattr(data, part)
    if len(p) == 0:
        return {}
    dev = data.device
    n_items = data.n_items
    rel_csr = sp.csr_matrix((np.ones(len(p), dtype=np.float32),
                             (p.users.cpu().numpy(), p.items.cpu().numpy())),
                            shape=(data.n_users, n_items))
    excl = data.train_csr
    if part == "test" and len(data.valid):
        v = data.valid
        excl = excl + sp.csr_matrix((np.ones(len(v), dtype=np.float32),
                                     (v.users.cpu().numpy(), v.items.cpu().numpy())),
                                    shape=(data.n_users, n_items))
    excl = excl.tocsr()
    users = np.unique(p.users.cpu().numpy())
    block = users_per_block(n_items, dev, block_users, per_pair=hasattr(model, "tower"))
    all_items = torch.arange(n_items, device=dev)[None, :]
    sums = []
    for s in range(0, len(users), block):
        ub = users[s:s + block]
        scores = model(torch.from_numpy(ub).to(dev)[:, None], all_items).float()
        r, c = exclusion_rows(excl, ub, dev)
        scores[r, c] = float("-inf")
        rr, rc = exclusion_rows(rel_csr, ub, dev)
        rel = torch.zeros(scores.shape, dtype=torch.bool, device=dev)
        rel[rr, rc] = True
        sums.append(full_rank_metrics(scores, rel))
    return finish_full(sums)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, part: str, cfg: TrainConfig, full: bool = True
             ) -> dict[str, float]:
    """Metrics of ``model`` on ``part`` ("valid" or "test").

    explicit: rmse, mae (predictions clipped to the rating scale); on a leave-one-out split
    also hr@10 / ndcg@10 ranking the candidates by predicted rating.
    implicit: hr@10, ndcg@10 over the sampled candidates when stage 40 wrote them, and (when
    ``full``, or when there are no candidates) full-ranking full_hr@10, full_ndcg@10,
    full_recall@20.
    """
    model.eval()
    p = getattr(data, part)
    out: dict[str, float] = {}
    if cfg.task == "explicit":
        if len(p):
            out.update(rmse_mae(predict_pairs(model, p.users, p.items), p.ratings,
                                data.rating_scale))
        if part in data.candidates:
            cu, ci = data.candidates[part]
            out.update(sampled_rank_metrics(score_candidates(model, cu, ci), ci))
    else:
        if part in data.candidates:
            cu, ci = data.candidates[part]
            out.update(sampled_rank_metrics(score_candidates(model, cu, ci), ci))
        if full or part not in data.candidates:
            out.update(full_ranking(model, data, part, cfg.eval_batch))
    return out


def selection_metric(cfg: TrainConfig, data: Data) -> tuple[str, bool]:
    """(metric key, higher is better) used for early stopping and model selection."""
    if cfg.task == "explicit":
        return "rmse", False
    if "valid" in data.candidates:
        return "hr@10", True
    return "full_ndcg@10", True


# ---------------------------------------------------------------------------------------
# checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               filename: str = "model.pt") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, metadata) from DIR/model.pt (weights_only load).

    ``filename="selected.pt"`` loads the model selected on validation before the refit
    (trained on train only; written only when the run refitted)."""
    path = Path(model_dir) / filename
    if not path.exists():
        raise PipelineError(f"{path} not found: train the model first with "
                            f"`python 60_train.py --model {Path(model_dir).name} "
                            f"--data-dir {Path(model_dir).parent.parent}`")
    try:
        meta = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a user-level error
        raise PipelineError(f"{path} is unreadable ({type(e).__name__}: {e}); retrain with "
                            f"`python 60_train.py --model {Path(model_dir).name}`")
    args = dict(meta["model_args"])
    args["sparse"] = False
    model = models_mod.build_model(meta["model"], n_users=meta["n_users"],
                                   n_items=meta["n_items"], **args)
    model.load_state_dict(meta["state_dict"])
    model.to(device).eval()
    return model, meta


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    gen.set_state(st["generator"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------
# history, plot


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def plot_curve(path: Path, history: list[dict[str, Any]], metric: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    key = f"valid_{metric}"
    if any(key in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [h.get(key, float("nan")) for h in history], "s-", color="tab:red",
                 label=f"valid {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# training


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but torch sees no CUDA device "
                            f"(torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device(name)


_RESUME_KEYS = ("model", "task", "dim", "hidden", "layers", "optimizer", "seed",
                "n_negatives", "batch_size", "dropout", "init_std", "reg", "lr")


class Trainer:
    """One training run: data, model, optimiser, schedule and early-stopping state."""

    def __init__(self, cfg: TrainConfig, data: Data, out_dir: Path, command: str,
                 is_refit: bool = False):
        self.cfg = cfg = for_data(cfg, data)
        self.is_refit = is_refit
        self.data = data
        self.out_dir = out_dir
        self.command = command
        self.dev = data.device
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(cfg.seed)
        set_seed(cfg.seed)
        self.args = model_args(cfg, data)
        self.model = models_mod.build_model(cfg.model, n_users=data.n_users,
                                            n_items=data.n_items, **self.args).to(self.dev)
        if cfg.pretrained:
            self._load_pretrained()
        self.opt = Optimizers(self.model, cfg)
        self.l2 = RowL2(self.model)
        self.metric, self.higher = selection_metric(cfg, data)
        self.epoch = 0
        self.saved_epoch = 0          # the epoch checkpoint.pt holds
        self.best = -math.inf if self.higher else math.inf
        self.best_epoch = 0
        self.best_valid: dict[str, float] = {}
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.bad_epochs = 0
        self.lr_factor = 1.0
        self.history: list[dict[str, Any]] = []
        self.first_loss: float | None = None
        self.train_seconds = 0.0
        self.use_amp = cfg.amp and self.dev.type == "cuda"
        self.forced_factors: list[float] | None = None
        self.epoch_factor = 1.0
        self._keyset: KeySet | None = None     # train-key membership for negatives
        self.manual_grads = True   # BiasedMF.mse_backward for explicit mf (tests: False)

    def _load_pretrained(self) -> None:
        # the selection run starts from GMF/MLP trained on train only (selected.pt, when they
        # were refitted), so validation stays unseen; the refit starts from their refits
        base = stage_dir(self.cfg.data_dir, STAGE)
        subs = {}
        for name in ("gmf", "mlp"):
            fname = "model.pt"
            if not self.is_refit and (base / name / "selected.pt").exists():
                fname = "selected.pt"
            m, meta = load_model(base / name, self.dev, fname)
            if meta.get("task") != self.cfg.task:
                raise PipelineError(f"{base / name / 'model.pt'} was trained for task "
                                    f"{meta.get('task')}, NeuMF is training {self.cfg.task}; "
                                    f"retrain it with --task {self.cfg.task}")
            subs[name] = m
        try:
            self.model.load_pretrained(subs["gmf"], subs["mlp"], alpha=self.cfg.alpha)
        except ValueError as e:
            raise PipelineError(f"--pretrained: {e}; train gmf with --dim {self.cfg.dim} and "
                                f"mlp with --layers {' '.join(map(str, self.cfg.layers))}")
        log.info("neumf initialised from pretrained gmf and mlp (alpha %.2f)", self.cfg.alpha)

    # -- checkpoint ------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "model_args": self.args,
                "config": config_dict(self.cfg), "epoch": self.epoch,
                "state_dict": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "best_metric": self.best, "best_epoch": self.best_epoch,
                "best_valid": self.best_valid, "best_state": self.best_state,
                "bad_epochs": self.bad_epochs,
                "scheduler": {"lr_factor": self.lr_factor, "kind": self.cfg.lr_schedule},
                "rng": _rng_state(self.gen), "history": self.history,
                "first_loss": self.first_loss, "train_seconds": self.train_seconds,
                "n_users": self.data.n_users, "n_items": self.data.n_items}

    def save_checkpoint(self) -> None:
        _atomic_save(self.checkpoint(), self.out_dir / "checkpoint.pt")
        self.saved_epoch = self.epoch

    def restore(self, path: Path) -> None:
        if not path.exists():
            raise PipelineError(f"--resume: {path} not found; run without --resume to start")
        try:
            # on the CPU: RNG states must be CPU ByteTensors; load_state_dict moves the rest
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise PipelineError(f"--resume: {path} is unreadable ({type(e).__name__}: {e}); "
                                f"run without --resume to start over")
        old = ck["config"]
        now = config_dict(self.cfg)
        diff = [k for k in _RESUME_KEYS if old.get(k) != now.get(k)]
        if diff or ck["n_users"] != self.data.n_users or ck["n_items"] != self.data.n_items:
            what = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {now.get(k)!r}"
                             for k in diff) or "n_users/n_items differ"
            raise PipelineError(f"--resume: {path} was made with other settings ({what}); "
                                f"resume with the same options or run without --resume")
        self.model.load_state_dict(ck["state_dict"])
        self.opt.load_state_dict(ck["optimizer"])
        self.epoch = self.saved_epoch = int(ck["epoch"])
        self.best = float(ck["best_metric"])
        self.best_epoch = int(ck["best_epoch"])
        self.best_valid = dict(ck["best_valid"])
        self.best_state = {k: v.to(self.dev) for k, v in ck["best_state"].items()}
        self.bad_epochs = int(ck["bad_epochs"])
        self.lr_factor = float(ck["scheduler"]["lr_factor"])
        self.history = list(ck["history"])
        self.first_loss = ck["first_loss"]
        self.train_seconds = float(ck["train_seconds"])
        _set_rng_state(self.gen, ck["rng"])
        log.info("resumed from %s after epoch %d (best %s %.4f at epoch %d)", path,
                 self.epoch, self.metric, self.best, self.best_epoch)

    # -- one epoch -------------------------------------------------------------------
    def _lr_factor_for(self, epoch: int) -> float:
        if self.forced_factors is not None:
            return self.forced_factors[min(epoch, len(self.forced_factors)) - 1]
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, self.cfg.epochs)))
        return self.lr_factor

    def train_epoch(self) -> tuple[float, int]:
        cfg, data, model = self.cfg, self.data, self.model
        model.train()
        self.epoch_factor = self._lr_factor_for(self.epoch + 1)
        self.opt.set_factor(self.epoch_factor)
        tr = data.train
        n = len(tr)
        implicit = cfg.task == "implicit"
        per = 1 + cfg.n_negatives if implicit else 1
        bs = cfg.batch_size if cfg.batch_size > 0 else n * per
        pos_per_batch = max(1, bs // per)
        # int32 when it fits: the same permutation as int64, half the memory and ~25% less
        # time to draw; each batch's slice is widened (index_select is slow on int32)
        perm = torch.randperm(n, device=self.dev, generator=self.gen,
                              dtype=torch.int32 if n < 2**31 else torch.int64)
        inv_var = 1.0  # explicit loss is in standardised units: the model's scale is the std
        scale = float(self.args["scale"])
        loss_sum = torch.zeros((), device=self.dev)
        samples = 0
        steps = range(0, n, pos_per_batch)
        bar = tqdm(steps, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False,
                   disable=progress_disabled())
        bce = nn.functional.binary_cross_entropy_with_logits
        # explicit biased MF: analytic gradients (same objective, same optimiser step) instead
        # of autograd, see BiasedMF.mse_backward: dense .grad for adam/sgd; for sparse_adam
        # row-compact gradients straight into RowSparseAdam (no pass over the whole tables)
        manual = (self.manual_grads and not implicit and isinstance(model, models_mod.BiasedMF)
                  and cfg.optimizer in ("adam", "sgd", "sparse_adam"))
        rows_path = manual and cfg.optimizer == "sparse_adam"
        scratch: dict = {}
        if implicit and (self._keyset is None or self._keyset.keys is not data.train_keys):
            self._keyset = KeySet(data.train_keys, data.n_users * data.n_items)
        keyset = self._keyset
        for s in bar:
            idx = perm[s:s + pos_per_batch].long()
            u = tr.users.index_select(0, idx)      # index_select: ~8x faster than users[idx]
            i = tr.items.index_select(0, idx)
            if rows_path:
                loss, updates = model.mse_backward_rows(u, i, tr.ratings.index_select(0, idx),
                                                        cfg.reg, scratch)
                self.opt.step_rows(updates)
            elif manual:
                loss = model.mse_backward(u, i, tr.ratings.index_select(0, idx), cfg.reg,
                                          scratch)
                self.opt.step()
            if manual:
                loss_sum += loss * u.shape[0]
                samples += int(u.shape[0])
                continue
            if implicit:
                neg = sample_negatives(u, data.n_items, cfg.n_negatives, keyset, self.gen)
                uu = torch.cat([u, u.repeat_interleave(cfg.n_negatives)])
                ii = torch.cat([i, neg.reshape(-1)])
                y = torch.cat([torch.ones_like(u, dtype=torch.float32),
                               torch.zeros(neg.numel(), device=self.dev)])
            else:
                uu, ii, y = u, i, tr.ratings.index_select(0, idx)
            self.l2.active = cfg.reg > 0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
                out = model(uu, ii).float()
                if implicit:
                    loss = bce(out, y)
                else:
                    loss = ((out - y) / scale).square().mean() * inv_var
            total = loss + cfg.reg * self.l2.take(uu.shape[0]) if cfg.reg > 0 else loss
            self.l2.active = False
            self.opt.zero_grad()
            total.backward()
            self.opt.step()
            loss_sum += loss.detach() * uu.shape[0]
            samples += int(uu.shape[0])
        bar.close()
        return float(loss_sum) / max(1, samples), samples

    def _check_loss(self, loss: float) -> None:
        epoch = self.epoch + 1
        hint = (f"try a lower --lr (now {self.cfg.lr:g}), more regularisation (--reg, now "
                f"{self.cfg.reg:g}) or a smaller --init-std (now {self.cfg.init_std:g})")
        if not math.isfinite(loss):
            raise PipelineError(f"training diverged: the loss is {loss} at epoch {epoch} of "
                                f"{self.cfg.model}; {hint}")
        if self.first_loss is not None and loss > 10 * self.first_loss + 1.0:
            raise PipelineError(f"training diverged: the loss grew from {self.first_loss:.4g} "
                                f"(epoch 1) to {loss:.4g} at epoch {epoch} of "
                                f"{self.cfg.model}; {hint}")

    def _improved(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        return v > self.best + 1e-6 if self.higher else v < self.best - 1e-6

    def fit(self) -> None:
        cfg = self.cfg
        log.info("training %s (%s) on %s: %d users, %d items, %d train, %d valid; "
                 "selecting on valid %s", cfg.model, cfg.task, self.dev, self.data.n_users,
                 self.data.n_items, len(self.data.train), len(self.data.valid), self.metric)
        t_run = time.perf_counter()
        while self.epoch < cfg.epochs:
            if self.bad_epochs >= cfg.patience:
                break
            if cfg.max_seconds and time.perf_counter() - t_run > cfg.max_seconds:
                log.info("stopping: --max-seconds %.0f reached", cfg.max_seconds)
                break
            t0 = time.perf_counter()
            loss, samples = self.train_epoch()
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            t_train = time.perf_counter() - t0
            self._check_loss(loss)
            if self.first_loss is None:
                self.first_loss = loss
            valid = evaluate(self.model, self.data, "valid", cfg, full=False)
            secs = time.perf_counter() - t0
            self.train_seconds += t_train
            self.epoch += 1
            v = valid.get(self.metric, float("nan"))
            if self._improved(v):
                self.best, self.best_epoch, self.best_valid = v, self.epoch, dict(valid)
                self.best_state = copy.deepcopy(self.model.state_dict())
                self.bad_epochs = 0
                mark = " *"
            else:
                self.bad_epochs += 1
                mark = ""
                if cfg.lr_schedule == "plateau":
                    self.lr_factor *= cfg.lr_decay
            row = {"epoch": self.epoch, "loss": round(loss, 6),
                   **{f"valid_{k}": round(x, 6) for k, x in valid.items()},
                   "lr": cfg.lr * self.epoch_factor, "seconds": round(secs, 3),
                   "samples_per_s": round(samples / max(t_train, 1e-9), 1)}
            self.history.append(row)
            log.info("epoch %3d  loss %.4f  valid %s %.4f%s  %.1fs  %.0f samples/s",
                     self.epoch, loss, self.metric, v, mark, secs, row["samples_per_s"])
            self.save_checkpoint()
            write_history(self.out_dir / "history.csv", self.history)
        self._warn_if_constant()

    def _warn_if_constant(self) -> None:
        """Early stopping ended a run whose validation metric never moved: the model most
        likely scores every candidate alike (for instance a tower whose ReLUs all died), which
        no number of epochs fixes. Say so instead of leaving a plausible-looking result."""
        key = f"valid_{self.metric}"
        vals = [h.get(key) for h in self.history]
        if len(vals) > self.cfg.patience and len(set(vals)) == 1:
            log.warning("validation %s stayed at %s for all %d epochs: the model probably "
                        "gives (nearly) the same score to every item; try another --seed, a "
                        "higher --lr (now %g) or a smaller --reg (now %g)", self.metric,
                        vals[0], len(vals), self.cfg.lr, self.cfg.reg)


def with_valid_in_train(data: Data) -> Data:
    """``data`` whose train part also holds the validation interactions (for the refit)."""
    import scipy.sparse as sp
    from .dataset import Part
    t, v = data.train, data.valid
    train = Part(users=torch.cat([t.users, v.users]), items=torch.cat([t.items, v.items]),
                 ratings=torch.cat([t.ratings, v.ratings]))
    vk = v.users * data.n_items + v.items
    keys = torch.unique(torch.cat([data.train_keys, vk]))          # sorted
    vcsr = sp.csr_matrix((np.ones(len(v), dtype=np.float32),
                          (v.users.cpu().numpy(), v.items.cpu().numpy())),
                         shape=(data.n_users, data.n_items))
    csr = (data.train_csr + vcsr).tocsr()
    csr.data[:] = 1.0
    return dataclasses.replace(data, train=train, train_keys=keys, train_csr=csr)


def refit(cfg: TrainConfig, data: Data, trainer: "Trainer", out_dir: Path) -> nn.Module:
    """Retrain from scratch on train + valid for the selected number of epochs, replaying the
    learning rates the selection run used in those epochs."""
    factors = [float(h["lr"]) / cfg.lr for h in trainer.history[:trainer.best_epoch]]
    t2 = Trainer(cfg, with_valid_in_train(data), out_dir, trainer.command, is_refit=True)
    t2.forced_factors = factors
    log.info("refit: retraining on train + valid (%d interactions) for the selected %d epochs",
             len(t2.data.train), len(factors))
    try:
        for _ in factors:
            t0 = time.perf_counter()
            loss, samples = t2.train_epoch()
            t2._check_loss(loss)
            if t2.first_loss is None:
                t2.first_loss = loss
            t2.epoch += 1
            secs = time.perf_counter() - t0
            trainer.train_seconds += secs
            log.info("refit epoch %3d/%d  loss %.4f  %.1fs  %.0f samples/s", t2.epoch,
                     len(factors), loss, secs, samples / max(secs, 1e-9))
    finally:
        t2.l2.close()
    return t2.model


def _metric_line(d: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in d.items())


def run(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train per ``cfg`` (resolved here) and write the stage folder; returns metrics.json."""
    cfg = cfg.resolved()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # Adam moments and L2-shrunk embeddings decay into subnormal floats, which make CPU
    # arithmetic 10-100x slower (epochs slowing down over time); flush them to zero.
    torch.set_flush_denormal(True)
    dev = resolve_device(cfg.device)
    data = load_data(cfg.data_dir, cfg.task, dev)
    if cfg.task == "explicit" and data.candidates:
        log.info("explicit task on a leave-one-out split: trains on the ratings, reports RMSE/"
                 "MAE of the held-out (latest) ratings and also ranks the sampled candidates "
                 "by predicted rating (hr@10, ndcg@10); selection on validation RMSE")
    if cfg.task == "implicit" and not data.candidates:
        log.info("implicit task without sampled candidates (random split): evaluating full "
                 "ranking only (full_hr@10, full_ndcg@10, full_recall@20)")
    up40 = data.manifest                       # load_data has read and checked it
    out_dir = stage_dir(cfg.data_dir, STAGE) / cfg.model
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)   # not finished until written again
    trainer = Trainer(cfg, data, out_dir, command)
    cfg = trainer.cfg                          # with the data-dependent choices made
    if cfg.resume:
        trainer.restore(out_dir / "checkpoint.pt")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        # checkpoint.pt already holds the last completed epoch (written at every epoch end),
        # which is what --resume continues from exactly. It is not rewritten here: the model,
        # optimizer and RNG are mid-epoch now, and saving them would make the resumed run
        # differ from an uninterrupted one. History and curve are brought up to that epoch.
        done = trainer.saved_epoch
        if done > 0:
            history = [h for h in trainer.history if h["epoch"] <= done]
            write_history(out_dir / "history.csv", history)
            plot_curve(out_dir / "curve.png", history, trainer.metric,
                       f"{cfg.model} ({cfg.task})")
            log.info("interrupted: checkpoint of epoch %d is in %s; continue with `%s "
                     "--resume`", done, out_dir / "checkpoint.pt",
                     command or f"python {PROG} --model {cfg.model}")
        raise
    finally:
        trainer.l2.close()
    if trainer.best_epoch == 0:
        raise PipelineError(f"no epoch produced a finite validation {trainer.metric}; check "
                            f"the validation split of {cfg.data_dir}/40_make_sparse_matrix")
    # the selected model on validation; then (refit) the same recipe on train + valid;
    # the test split is evaluated once, with the final model
    trainer.model.load_state_dict(trainer.best_state)
    valid = evaluate(trainer.model, data, "valid", cfg, full=True)
    final = refit(cfg, data, trainer, out_dir) if cfg.refit else trainer.model
    test = evaluate(final, data, "test", cfg, full=True)
    meta = {"model": cfg.model, "model_args": trainer.args,
            "state_dict": final.state_dict(), "task": cfg.task, "refit": bool(cfg.refit),
            "rating_scale": [float(data.rating_scale[0]), float(data.rating_scale[1])],
            "n_users": data.n_users, "n_items": data.n_items,
            "best_epoch": trainer.best_epoch, "valid_metric": valid,
            "config": config_dict(cfg)}
    if cfg.refit:
        _atomic_save({**meta, "state_dict": trainer.best_state, "refit": False},
                     out_dir / "selected.pt")
    else:
        (out_dir / "selected.pt").unlink(missing_ok=True)
    _atomic_save(meta, out_dir / "model.pt")
    write_history(out_dir / "history.csv", trainer.history)
    plot_curve(out_dir / "curve.png", trainer.history, trainer.metric,
               f"{cfg.model} ({cfg.task}), best epoch {trainer.best_epoch}")
    metrics = {"test": test, "valid": valid, "best_epoch": trainer.best_epoch,
               "refit_on_train_valid": bool(cfg.refit),
               "epochs_run": trainer.epoch, "selection_metric": trainer.metric,
               "train_seconds": round(trainer.train_seconds, 3), "config": config_dict(cfg)}
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "manifest.json", {
        "stage": STAGE, "model": cfg.model, "task": cfg.task,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_users": data.n_users, "n_items": data.n_items, "dataset": up40.get("dataset"),
        "best_epoch": trainer.best_epoch, "valid": valid, "test": test,
        "files": ["model.pt", "checkpoint.pt", "history.csv", "metrics.json", "curve.png"]
        + (["selected.pt"] if cfg.refit else []),
        "config": config_dict(cfg), "command": command,
        "upstream": upstream_entry(cfg.data_dir, "40_make_sparse_matrix")})
    log.info("best epoch %d of %d (validation %s)", trainer.best_epoch, trainer.epoch,
             trainer.metric)
    log.info("valid: %s", _metric_line(valid))
    log.info("test:  %s", _metric_line(test))
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TrainConfig, argv, PROG, DESCRIPTION)
    print_config(cfg.resolved(), PROG)
    command = command_line(PROG, argv)
    metrics = run(cfg, command)
    out = stage_dir(cfg.data_dir, STAGE) / cfg.model
    print(json.dumps({"model": cfg.model, "test": metrics["test"], "valid": metrics["valid"],
                      "best_epoch": metrics["best_epoch"],
                      "train_seconds": metrics["train_seconds"]}, indent=None))
    log.info("wrote %s; next: `python 70_recommend.py --data-dir %s --model %s`", out,
             cfg.data_dir, cfg.model)
    return metrics
