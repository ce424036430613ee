"""Stage 60: train a model on stage 40's artifact; select on validation, report test once.

Reads DATA_DIR/40_make_sparse_matrix/ and writes DATA_DIR/60_train/<model>/:
model.pt (the final weights + metadata), selected.pt (the model selected on validation,
when refitted), checkpoint.pt (last completed epoch), history.csv, metrics.json, curve.png
and manifest.json (written last). The folder is built beside the published one, in
``60_train/.<model>.work/`` (which also holds the checkpoint an interrupted run resumes
from), under the stage's lock, and swapped in when the run finishes.

The trainer is generic over the model families (``models.py``, through
``recpipe.family.Family``): it builds the family from its options, fits it by epochs of
mini-batches on the task's objective (``objectives.py``) or in closed form, evaluates
through ``evaluation.py`` and saves through ``checkpoint.py``. Training keeps every tensor
on the device: batches are slices of a ``torch.randperm``; implicit negatives are drawn
vectorised per batch from a seeded generator, so they are redrawn every epoch. L2 is applied
to the embedding rows the batch uses (per sample), not as weight decay over the whole table.
A family with an analytic gradient of the objective (``analytic_tasks``) skips autograd:
dense gradients for adam/sgd, row-compact ones straight into ``optim.RowSparseAdam`` for
sparse_adam (tests check both against autograd).

Under ``torchrun --nproc_per_node N`` the same loop runs on every rank (``distributed.py``,
docs/distributed.md): each rank takes its chunk of every global batch, the gradients are
combined with collectives before each step, evaluation is sharded and combined, and only
rank 0 takes the lock and writes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

import models as _models  # noqa: F401 - registers the built-in families
from .artifacts import StageOutput, read_manifest, stage_dir, upstream_entry, write_json
from .checkpoint import load_model, resolve_device, rng_state, save, set_rng_state
from .cli import (PipelineError, command_line, config_dict, parse_config,
                  print_config, progress_disabled, set_seed, training_numerics)
from .dataset import (STAGE40, Data, KeySet, has_times, load_data, pair_recency_weights,
                      require_times, sample_users, with_valid_in_train)
from . import distributed, tune
from .distributed import derived_seed, table_names
from .evaluation import evaluate, metric_line, selection_metric
from .holdout import LATEST_HELD_OUT
from .family import Family, distinct_rows, family
from .objectives import RowL2, for_task
from .optim import Optimizers
from .train_config import (AUTO_ROWS_PER_SAMPLE, TrainConfig, decide_task,  # noqa: F401
                           for_data, model_args, rowsgd_eligible, weights_pairs_by_recency)
from .report import plot_curve, write_history

__all__ = ["TrainConfig", "Trainer", "run", "main", "load_model", "decide_task", "for_data"]

log = logging.getLogger("recpipe")
PROG = "60_train.py"
STAGE = "60_train"
DESCRIPTION = ("Train a recommendation model on stage 40's sparse matrices. Options left "
               "unset come from the model's preset (recpipe/presets.py, docs/presets.md). "
               "Selects the epoch on the validation split with early stopping, evaluates the "
               "test split once with the best model, and writes DATA_DIR/60_train/<model>/.")

# configuration keys a resumed run may change: they do not alter what was trained so far
_RESUME_FREE = {"epochs", "resume", "device", "threads", "eval_batch", "max_seconds", "refit",
                "patience", "data_dir", "test_users", "full_rank_users", "dist_backend", "dist_timeout",
                "tune_seconds"}


class Trainer:
    """One training run: data, model, objective, optimiser, schedule, early stopping."""

    def __init__(self, cfg: TrainConfig, data: Data, out_dir: Path, command: str,
                 is_refit: bool = False):
        self.cfg = cfg = for_data(cfg, data)
        self.is_refit = is_refit
        self.data = data
        self.out_dir = out_dir
        self.command = command
        self.dev = data.device
        # under torchrun (distributed.py): this rank's place; a world of one otherwise
        self.dist = distributed.current()
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(cfg.seed)
        set_seed(cfg.seed)
        self.args = model_args(cfg, data)
        self.cls = family(cfg.model)
        self.model: Family = self.cls(data.n_users, data.n_items, **self.args).to(self.dev)
        if cfg.pretrained:
            self._load_pretrained()
        self.objective = for_task(cfg.task, scale=float(data.rating_std),
                                  n_negatives=cfg.n_negatives)
        # --recency on the implicit pair objective: one loss weight per train row (the
        # refit's rows count the validation interactions among the later ones)
        self.weights = (pair_recency_weights(data, cfg.recency, cfg.recency_floor,
                                             merged=is_refit)
                        if cfg.recency and weights_pairs_by_recency(cfg.model, cfg.task)
                        else None)
        # rows without train data are scored by a baseline (family.py): record them
        self.model.learn_fallback(data.train, self.objective.needs_ratings,
                                  self.objective.draws_negatives)
        self.by_epochs = self.cls.fit_by == "epochs"
        if cfg.optimizer == "rowsgd":
            self._check_rowsgd()
        self.opt = Optimizers(self.model, cfg.optimizer, cfg.lr, cfg.momentum) \
            if self.by_epochs else None
        self.l2 = RowL2(self.model.row_sparse_tables())
        self.metric, self.higher = selection_metric(cfg.task, data)
        # per-epoch validation on a bounded, fixed sample of users (the final one uses all)
        self.epoch_data, self.valid_epoch_users, self.valid_users = sample_users(
            data, "valid", cfg.valid_users, cfg.seed)
        if not is_refit and self.valid_epoch_users < self.valid_users:
            log.info("per-epoch validation on a fixed sample of %d of the %d validation users "
                     "(--valid-users, seed %d); the final validation and the test use all "
                     "users (beside sampled candidates, their full-ranking extras at most "
                     "--full-rank-users)", self.valid_epoch_users, self.valid_users, cfg.seed)
        self.epoch = 0
        self.saved_epoch = 0          # the epoch checkpoint.pt holds
        self.best = -math.inf if self.higher else math.inf
        self.best_epoch = 0
        self.best_valid: dict[str, float] = {}
        # a refit selects nothing and never reads its best_state: references, not a copy
        self.best_state = (self.model.state_dict() if is_refit
                           else copy.deepcopy(self.model.state_dict()))
        self.bad_epochs = 0
        self.mark = self.best         # the metric at the last epoch that counted (--min-delta)
        self.lr_factor = 1.0
        self.history: list[dict[str, Any]] = []
        self.first_loss: float | None = None
        self.train_seconds = 0.0
        # --tune: called after every epoch with (epoch, best so far); True ends the run
        self.on_epoch: Callable[[int, float], bool] | None = None
        self.use_amp = cfg.amp and self.dev.type == "cuda"
        self.epoch_factor = 1.0
        self._keyset: KeySet | None = None     # train-key membership for negatives
        self._fused_scratch: dict = {}           # rowsgd: the kernel's view of the ratings
        self._tables = table_names(self.model)
        # draws that differ between ranks (negatives): seeded per (seed, epoch, rank)
        self.rank_gen = torch.Generator(device=self.dev)
        self.manual_grads = True   # the family's analytic gradient when it has one (tests)
        self.compact_rows = True   # sparse_adam via row-compact leaves, not sparse grads (tests)

    def _check_rowsgd(self) -> None:
        why = rowsgd_eligible(self.cfg.model, self.cfg.task, self.dev, not self.dist.multi)
        if why:
            raise PipelineError(f"--optimizer rowsgd: {why}")

    def _load_pretrained(self) -> None:
        # the selection run starts from parts trained on train only (selected.pt, when they
        # were refitted), so validation stays unseen; the refit starts from their refits
        base = stage_dir(self.cfg.data_dir, STAGE)
        parts = {}
        for name in self.cls.pretrain_from:
            fname = "model.pt"
            if not self.is_refit and (base / name / "selected.pt").exists():
                fname = "selected.pt"
            m, meta = load_model(base / name, self.dev, fname)
            if meta.get("task") != self.cfg.task:
                raise PipelineError(f"{base / name / 'model.pt'} was trained for task "
                                    f"{meta.get('task')}, {self.cfg.model} is training "
                                    f"{self.cfg.task}; retrain it with --task {self.cfg.task}")
            parts[name] = m
        try:
            self.model.init_from(parts, alpha=self.cfg.alpha)
        except ValueError as e:
            raise PipelineError(f"--pretrained: {e}; train {' and '.join(parts)} with the "
                                f"same sizes (--dim {self.cfg.dim}, --layers "
                                f"{' '.join(map(str, self.cfg.layers or []))})")
        log.info("%s initialised from pretrained %s (alpha %.2f)", self.cfg.model,
                 " and ".join(parts), self.cfg.alpha)

    # -- checkpoint ------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "model_args": self.args,
                "config": config_dict(self.cfg), "epoch": self.epoch,
                "state_dict": self.model.state_dict(),
                "optimizer": self.opt.state_dict() if self.opt else [],
                "best_metric": self.best, "best_epoch": self.best_epoch,
                "best_valid": self.best_valid,
                # the tables once: None when this epoch is the best (its weights are
                # state_dict); after the run, "best_ref" names selected.pt or model.pt instead
                "best_state": None if self.best_epoch == self.epoch else self.best_state,
                "bad_epochs": self.bad_epochs, "mark": self.mark,
                "scheduler": {"lr_factor": self.lr_factor, "kind": self.cfg.lr_schedule},
                "rng": rng_state(self.gen), "history": self.history,
                "first_loss": self.first_loss, "train_seconds": self.train_seconds,
                "n_users": self.data.n_users, "n_items": self.data.n_items,
                "upstream": self.data.fingerprint, "world_size": self.dist.world}

    def save_checkpoint(self) -> None:
        if self.dist.leader:                   # every rank holds the same state: rank 0 saves
            save(self.checkpoint(), self.out_dir / "checkpoint.pt")
        self.saved_epoch = self.epoch

    def _write_history(self) -> None:
        if self.dist.leader:
            write_history(self.out_dir / "history.csv", self.history)

    def _best_state(self, ck: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
        """The best epoch's weights of checkpoint ``ck``: its own, its current ones, or
        those of the file it references (beside it, or in the published folder)."""
        ref = ck.get("best_ref")
        if not ref:
            return ck["best_state"] if ck["best_state"] is not None else ck["state_dict"]
        for folder in (path.parent, stage_dir(self.cfg.data_dir, STAGE) / self.cfg.model):
            if (folder / ref).exists():
                return torch.load(folder / ref, map_location="cpu",
                                  weights_only=True)["state_dict"]
        raise PipelineError(f"--resume: {path} keeps its best weights in {ref}, which is "
                            f"missing beside it; run without --resume to start over")

    def restore(self, path: Path) -> None:
        if not path.exists():
            raise PipelineError(f"--resume: {path} not found; run without --resume to start")
        try:
            # on the CPU: RNG states must be CPU ByteTensors; load_state_dict moves the rest
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise PipelineError(f"--resume: {path} is unreadable ({type(e).__name__}: {e}); "
                                f"run without --resume to start over")
        old, now = ck["config"], config_dict(self.cfg)
        diff = [k for k in sorted(set(old) | set(now)) if k not in _RESUME_FREE
                and old.get(k) != now.get(k)]
        up_now = self.data.fingerprint
        world = int(ck.get("world_size", 1))
        if world != self.dist.world:
            raise PipelineError(f"--resume: {path} was trained by {world} process(es), this "
                                f"run has {self.dist.world}: the per-rank negatives and "
                                f"batch shards differ; resume with `torchrun "
                                f"--nproc_per_node {world} ...` (or plain python for 1), or "
                                f"run without --resume")
        if ck.get("upstream") != up_now:
            raise PipelineError(f"--resume: {path} was trained on another build of "
                                f"{STAGE40} (fingerprint {ck.get('upstream')}, now {up_now}): "
                                f"the split or matrices changed since; run without --resume")
        if diff or ck["n_users"] != self.data.n_users or ck["n_items"] != self.data.n_items:
            what = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {now.get(k)!r}"
                             for k in diff) or "n_users/n_items differ"
            raise PipelineError(f"--resume: {path} was made with other settings ({what}); "
                                f"resume with the same options or run without --resume")
        self.model.load_state_dict(ck["state_dict"])
        if self.opt:
            self.opt.load_state_dict(ck["optimizer"])
        self.epoch = self.saved_epoch = int(ck["epoch"])
        self.best = float(ck["best_metric"])
        self.best_epoch = int(ck["best_epoch"])
        self.best_valid = dict(ck["best_valid"])
        self.best_state = {k: v.to(self.dev).clone()
                           for k, v in self._best_state(ck, path).items()}
        self.bad_epochs = int(ck["bad_epochs"])
        self.mark = float(ck.get("mark", self.best))
        self.lr_factor = float(ck["scheduler"]["lr_factor"])
        self.history = list(ck["history"])
        self.first_loss = ck["first_loss"]
        self.train_seconds = float(ck["train_seconds"])
        set_rng_state(self.gen, ck["rng"])
        log.info("resumed from %s after epoch %d (best %s %.4f at epoch %d)", path,
                 self.epoch, self.metric, self.best, self.best_epoch)

    # -- one epoch -------------------------------------------------------------------
    def _lr_factor_for(self, epoch: int, factors: list[float] | None) -> float:
        if factors is not None:
            return factors[min(epoch, len(factors)) - 1]
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, self.cfg.epochs)))
        return self.lr_factor

    def train_epoch(self, factors: list[float] | None = None) -> tuple[float, int]:
        """One pass over the train part; returns (mean loss, samples)."""
        cfg, data, model, objective = self.cfg, self.data, self.model, self.objective
        if not self.by_epochs:
            model.fit_closed_form(self._closed_form_train(),
                                  {**config_dict(cfg), "is_refit": self.is_refit})
            return 0.0, len(data.train)
        model.train()
        self.epoch_factor = self._lr_factor_for(self.epoch + 1, factors)
        self.opt.set_factor(self.epoch_factor)
        if self.cls.batches == "rows":          # autoencoders: batches of rows, not pairs
            return self._train_row_epoch()
        tr = data.train
        n = len(tr)
        if cfg.optimizer == "rowsgd":          # the fused kernel shuffles itself (kernels.py)
            seed = int(torch.randint(0, 2**31 - 2**16, (), generator=self.gen))
            sq = model.fused_epoch(tr.users, tr.items, tr.ratings, seed, self.opt.accumulators,
                                   self.opt.lr, cfg.reg, torch.get_num_threads(),
                                   self._fused_scratch)
            return sq / max(1, n), n
        per = objective.samples_per_positive
        bs = cfg.batch_size if cfg.batch_size > 0 else n * per
        pos_per_batch = max(1, bs // per)
        # int32 when it fits: the same permutation as int64, half the memory and ~25% less
        # time to draw; each batch's slice is widened (index_select is slow on int32)
        perm = torch.randperm(n, device=self.dev, generator=self.gen,
                              dtype=torch.int32 if n < 2**31 else torch.int64)
        loss_sum = torch.zeros((), device=self.dev)
        samples = 0
        bar = tqdm(range(0, n, pos_per_batch), desc=f"epoch {self.epoch + 1}", unit="batch",
                   leave=False, disable=progress_disabled())
        manual = (self.manual_grads and cfg.task in self.cls.analytic_tasks
                  and cfg.optimizer in ("adam", "sgd", "sparse_adam"))
        rows_path = manual and cfg.optimizer == "sparse_adam"
        # sparse_adam through autograd: the distinct rows of each table are a leaf of their
        # own (family.look), and their gradients go to RowSparseAdam.step_rows
        rows_compact = not manual and cfg.optimizer == "sparse_adam" and self.compact_rows
        scratch: dict = {}
        if per > 1 and (self._keyset is None or self._keyset.keys is not data.keys()):
            self._keyset = KeySet(data.keys(), data.n_users * data.n_items)
        dist = self.dist
        neg_gen = self._rank_draws() if dist.world > 1 else self.gen
        for s in bar:
            batch = perm[s:s + pos_per_batch]
            idx, share = self._my_chunk(batch)
            # index_select: ~8x faster than users[idx]; the batch's ids widened to int64 (the
            # parts hold int32, dataset.id_dtype), as the models and the keys expect
            u = tr.users.index_select(0, idx).long()
            i = tr.items.index_select(0, idx).long()
            r = tr.ratings.index_select(0, idx)
            w = denom = None
            if self.weights is not None:
                w = objective.sample_weights(self.weights.index_select(0, idx))
                if dist.world > 1:
                    # each rank divides by its share of the global batch's weight, so that
                    # the share-weighted sum of the ranks' gradients is one process's
                    denom = (self.weights.index_select(0, batch.long()).sum()
                             * (per * share) if share > 0 else None)
            if manual:
                loss, updates = model.analytic_grad(u, i, r, cfg.reg, scratch, rows_path)
                if rows_path:
                    self.opt.step_rows(dist.reduce_rows(updates, share, self._tables))
                else:
                    dist.reduce_grads(model, share)
                    self.opt.step()
                if share > 0:
                    loss_sum += loss * u.shape[0]
                    samples += int(u.shape[0])
                continue
            uu, ii, y = objective.expand(u, i, r, self._keyset, data.n_items, neg_gen)
            self.l2.active = cfg.reg > 0
            compact = self._compact(rows_compact)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
                out = model(uu, ii).float()
                loss = objective.loss(out, y) if w is None else objective.loss(out, y, w, denom)
            total = loss + cfg.reg * self.l2.take(uu.shape[0]) if cfg.reg > 0 else loss
            self.l2.active = False
            self.opt.zero_grad()
            total.backward()
            dist.reduce_grads(model, share)            # the towers (and sparse/dense tables)
            self.opt.step()
            if compact:                                # the tables' rows: RowSparseAdam
                self.opt.step_rows(dist.reduce_rows(self._compact_updates(), share,
                                                    self._tables))
            if share > 0:
                loss_sum += loss.detach() * uu.shape[0]
                samples += int(uu.shape[0])
        bar.close()
        return self._epoch_loss(loss_sum, samples)

    def _compact(self, on: bool) -> bool:
        """Turn on row-compact lookups for the next forward (``family.look`` appends
        (rows, leaf) of each lookup to the table's ``compact`` list)."""
        if on:
            keys: dict = {}                     # one unique per index tensor (family.py)
            for m in self.model.row_sparse_tables():
                m.compact = []
                m.compact_keys = keys
        return on

    def _compact_updates(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The (weight, distinct rows, their summed gradient) of each table the forward
        looked up, for ``RowSparseAdam.step_rows``; the lookups are switched off again."""
        updates = []
        for m in self.model.row_sparse_tables():
            looked = [(r, leaf.grad) for r, leaf in m.compact if leaf.grad is not None]
            m.compact = m.compact_keys = None
            if len(looked) == 1:
                updates.append((m.weight, *looked[0]))
            elif looked:                        # several lookups of one table: sum by row
                rows, inv = distinct_rows(torch.cat([r for r, _ in looked]),
                                          m.weight.shape[0], m)
                grad = m.weight.new_zeros((rows.numel(), *m.weight.shape[1:])).index_add_(
                    0, inv, torch.cat([g for _, g in looked]))
                updates.append((m.weight, rows, grad))
        return updates

    def _my_chunk(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous chunk of a global batch ``idx`` and its share of the
        batch (the weight of its gradient). A rank left without samples (a last batch
        smaller than the world) computes on one sample with weight 0, so that every rank
        takes part in the same collectives."""
        if self.dist.world == 1:
            return idx.long(), 1.0
        n = idx.numel()
        mine = torch.tensor_split(idx, self.dist.world)[self.dist.rank]
        if mine.numel() == 0:
            return idx[:1].long(), 0.0
        return mine.long(), mine.numel() / n

    def _rank_draws(self) -> torch.Generator:
        """Under torchrun: seed this epoch's per-rank draws from (seed, epoch, rank): the
        negatives (the returned generator) and torch's global RNG (dropout, VAE noise).
        Reproducible for a given world size, with nothing per rank to checkpoint."""
        s = derived_seed(self.cfg.seed, self.epoch + 1, self.dist.rank)
        torch.manual_seed(s)
        self.rank_gen.manual_seed(s)
        return self.rank_gen

    def _epoch_loss(self, loss_sum: torch.Tensor, samples: int) -> tuple[float, int]:
        """(mean loss, samples) of the epoch over every rank."""
        if self.dist.world > 1:
            t = self.dist.all_reduce(torch.stack([loss_sum.double().reshape(()),
                                                  torch.tensor(float(samples),
                                                               dtype=torch.float64,
                                                               device=self.dev)]))
            loss_sum, samples = t[0], int(t[1])
        return float(loss_sum) / max(1, samples), samples

    def _train_row_epoch(self) -> tuple[float, int]:
        """One epoch of a family with ``batches = "rows"`` (recpipe/autoencoders.py):
        ``batch_size`` rows per step from a seeded permutation of the family's training rows
        (kept on the device, built once per data), ``row_loss`` with ``--reg``, then the
        family's ``rows_done`` (e.g. refreshing cached item codes). Returns (mean loss, rows)."""
        cfg, model = self.cfg, self.model
        if getattr(self, "_rows_for", None) is not self.data.train:
            self._rows, self._rows_for = model.row_data(self.data), self.data.train
        rows = self._rows
        n = rows.n_rows
        bs = cfg.batch_size if cfg.batch_size > 0 else n
        perm = torch.randperm(n, device=self.dev, generator=self.gen)
        loss_sum = torch.zeros((), device=self.dev)
        bar = tqdm(range(0, n, bs), desc=f"epoch {self.epoch + 1}", unit="batch", leave=False,
                   disable=progress_disabled())
        if self.dist.world > 1:
            self._rank_draws()
        done = 0
        for s in bar:
            idx, share = self._my_chunk(perm[s:s + bs])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
                loss = model.row_loss(idx, rows, cfg.reg or 0.0)
            self.opt.zero_grad()
            loss.float().backward()
            self.dist.reduce_grads(model, share)
            self.opt.step()
            if share > 0:
                loss_sum += loss.detach().float() * idx.shape[0]
                done += int(idx.shape[0])
        bar.close()
        model.eval()
        model.rows_done(rows)
        return self._epoch_loss(loss_sum, done)

    def _check_loss(self, loss: float) -> None:
        epoch = self.epoch + 1
        c = self.cfg
        hint = (f"try a lower --lr (now {c.lr}), more regularisation (--reg, now {c.reg}) or "
                f"a smaller --init-std (now {c.init_std})")
        if not math.isfinite(loss):
            raise PipelineError(f"training diverged: the loss is {loss} at epoch {epoch} of "
                                f"{self.cfg.model}; {hint}")
        if self.first_loss is not None and loss > 10 * self.first_loss + 1.0:
            raise PipelineError(f"training diverged: the loss grew from {self.first_loss:.4g} "
                                f"(epoch 1) to {loss:.4g} at epoch {epoch} of "
                                f"{self.cfg.model}; {hint}")
        if self.first_loss is None:
            self.first_loss = loss

    def _improved(self, v: float, than: float, by: float = 1e-6) -> bool:
        if not math.isfinite(v):
            return False
        return v > than + by if self.higher else v < than - by

    def fit(self, lr_factors: list[float] | None = None) -> float:
        """Train; returns the seconds spent in training passes.

        Without ``lr_factors``: epochs until ``--epochs``, ``--patience`` epochs without a
        better validation metric, or ``--max-seconds``, keeping the best epoch (selection).
        With them (the refit): exactly ``len(lr_factors)`` epochs at those learning-rate
        factors, no validation. A closed-form family fits once."""
        cfg = self.cfg
        refit = lr_factors is not None
        epochs = len(lr_factors) if refit else (cfg.epochs if self.by_epochs else 1)
        log.info("%s %s (%s) on %s: %d users, %d items, %d train, %d valid%s",
                 "refit:" if refit else "training", cfg.model, cfg.task, self.dev,
                 self.data.n_users, self.data.n_items, len(self.data.train),
                 len(self.data.valid), "" if refit else f"; selecting on valid {self.metric}")
        if not self.by_epochs:
            return self._fit_closed_form_grid(refit)
        t_run, spent = time.perf_counter(), 0.0
        while self.epoch < epochs:
            if not refit and self.bad_epochs >= cfg.patience:
                break
            if not refit and cfg.max_seconds and self.dist.broadcast_flag(
                    time.perf_counter() - t_run > cfg.max_seconds):   # rank 0's clock
                log.info("stopping: --max-seconds %.0f reached", cfg.max_seconds)
                break
            t0 = time.perf_counter()
            loss, samples = self.train_epoch(lr_factors)
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            t_train = time.perf_counter() - t0
            self._check_loss(loss)
            spent += t_train
            self.dist.check_replicas(self.model, self.epoch + 1)
            if refit:
                self.epoch += 1
                log.info("refit epoch %3d/%d  loss %.4f  %.1fs  %.0f samples/s", self.epoch,
                         epochs, loss, t_train, samples / max(t_train, 1e-9))
                continue
            valid = evaluate(self.model, self.epoch_data, "valid", cfg.task, cfg.eval_batch,
                             full=False)
            secs = time.perf_counter() - t0
            self.train_seconds += t_train
            self.epoch += 1
            v = valid.get(self.metric, float("nan"))
            mark = ""
            if self._improved(v, self.best):
                self.best, self.best_epoch, self.best_valid = v, self.epoch, dict(valid)
                self.best_state = copy.deepcopy(self.model.state_dict())
                mark = " *"
            if self._improved(v, self.mark, max(cfg.min_delta, 1e-6)):
                self.mark = v
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
                if cfg.lr_schedule == "plateau":
                    self.lr_factor *= cfg.lr_decay
            row = {"epoch": self.epoch, "loss": round(loss, 6),
                   **{f"valid_{k}": round(x, 6) for k, x in valid.items()},
                   "lr": (cfg.lr or 0.0) * self.epoch_factor, "seconds": round(secs, 3),
                   "samples_per_s": round(samples / max(t_train, 1e-9), 1)}
            self.history.append(row)
            log.info("epoch %3d  loss %.4f  valid %s %.4f%s  %.1fs  %.0f samples/s",
                     self.epoch, loss, self.metric, v, mark, secs, row["samples_per_s"])
            self.save_checkpoint()
            self._write_history()
            if self.on_epoch is not None and self.on_epoch(self.epoch, self.best):
                break
        self._fused_scratch.clear()             # rowsgd's copy of the ratings (a refit
        if not refit:                           # builds its own from train + valid)
            self._warn_if_constant()
        return spent

    def _fit_closed_form_grid(self, refit: bool) -> float:
        """A closed-form family: one fit per candidate ``reg``, the best on validation.

        Candidates: ``--reg`` when given, else the family's ``reg_grid`` (one fit with
        ``reg`` unset when it has none). Each is fitted on train, evaluated like an epoch
        (the per-epoch validation sample) and logged as a history row (epoch k = the k-th
        candidate); the best is fitted again when it was not the last (no copy of the model
        per candidate) and fixed in ``self.cfg.reg``, the very config object the refit,
        metrics.json and model.pt read, so the refit on train + valid fits that one value.
        A family may offer ``closed_form_solver(train_csr)``, a context manager giving
        ``fit(hp)`` that shares work between candidates (EASE: the Gram matrix); otherwise
        ``fit_closed_form`` runs per candidate. Returns the seconds spent fitting."""
        cfg, data, model = self.cfg, self.data, self.model
        grid = ([cfg.reg] if cfg.reg is not None
                else [float(r) for r in getattr(self.cls, "reg_grid", ())] or [None])
        # the history's recency half-life (EASE): --recency, else the family's grid when stage
        # 40 wrote timestamps, else off; every candidate is scored for every reg (one fit)
        recency = getattr(model, "half_life", None)
        if recency is None:
            halves = [None]
        elif cfg.recency is not None:
            if cfg.recency > 0:
                require_times(data)
            halves = [float(cfg.recency)]
        else:
            halves = [float(h) for h in self.cls.recency_grid] if has_times(data) else [0.0]
        solver = getattr(model, "closed_form_solver", None)
        train = self._closed_form_train()
        ctx = solver(train) if solver is not None else contextlib.nullcontext(
            lambda hp: model.fit_closed_form(train, hp))
        self.history, self.epoch, self.best_epoch = [], 0, 0
        self.best = -math.inf if self.higher else math.inf
        self.best_state = model.state_dict()        # references: no copy of a large model
        best_reg, best_half, fitted, t_run = None, None, None, time.perf_counter()
        with ctx as fit:
            for reg in grid:
                if not refit and cfg.max_seconds and self.dist.broadcast_flag(
                        time.perf_counter() - t_run > cfg.max_seconds):
                    log.info("stopping the grid: --max-seconds %.0f reached", cfg.max_seconds)
                    break
                t0 = time.perf_counter()
                fit({**config_dict(cfg), "reg": reg, "is_refit": refit})
                fitted = reg
                if self.dev.type == "cuda":
                    torch.cuda.synchronize()
                t_fit = time.perf_counter() - t0
                if refit:
                    if halves[0] is not None:          # the chosen one (cfg.recency)
                        model.half_life.fill_(halves[0])
                    self.epoch += 1
                    self.dist.check_replicas(model, self.epoch)
                    log.info("refit: %s in closed form on train + valid%s, %.1fs",
                             cfg.model, "" if reg is None else f", reg {reg}", t_fit)
                    continue
                for half in halves:
                    t1 = time.perf_counter()
                    if half is not None:
                        model.half_life.fill_(half)
                    self.epoch += 1
                    self.dist.check_replicas(model, self.epoch)
                    valid = evaluate(model, self.epoch_data, "valid", cfg.task,
                                     cfg.eval_batch, full=False)
                    v = valid.get(self.metric, float("nan"))
                    mark = ""
                    if self._improved(v, self.best):
                        self.best, self.best_epoch, self.best_valid = v, self.epoch, dict(valid)
                        best_reg, best_half, mark = reg, half, " *"
                    self.history.append({
                        "epoch": self.epoch, "reg": reg,
                        **({} if half is None else {"recency": half}), "loss": float("nan"),
                        **{f"valid_{k}": round(x, 6) for k, x in valid.items()},
                        "lr": 0.0, "fit_seconds": round(t_fit, 3),
                        "seconds": round(time.perf_counter() - t1 + t_fit, 3)})
                    log.info("%s%s valid %s %.4f%s  fit %.1fs",
                             "fit" if reg is None else f"reg {reg:<8}",
                             "" if half is None else f" recency {half:<5g}", self.metric, v,
                             mark, t_fit)
                    t_fit = 0.0
                    self._write_history()
            if not refit and self.best_epoch and fitted != best_reg:
                fit({**config_dict(cfg), "reg": best_reg, "is_refit": False})
            if not refit and best_half is not None:
                model.half_life.fill_(best_half)
            # references again, to the tensors the best fit left (a fit may rebind a buffer
            # whose size is the data's: knn's residuals)
            self.best_state = model.state_dict()
            spent = time.perf_counter() - t_run
        if not refit:
            self.train_seconds += spent
            if len(grid) > 1 and best_reg in (grid[0], grid[-1]) and best_reg != 0 \
                    and math.isfinite(best_reg):
                log.warning("reg %s, the best on validation, is at the edge of the grid %s: "
                            "the optimum may lie beyond; try --reg values past it", best_reg,
                            grid)
            if len(halves) > 1 and best_half == halves[-1]:
                log.warning("recency %s, the best on validation, is at the edge of the grid "
                            "%s; try --recency values past it", best_half, halves)
            if best_reg is not None:
                log.info("chose reg %s%s: validation %s %.4f (candidate %d of %d)", best_reg,
                         "" if best_half is None else f", recency {best_half:g}",
                         self.metric, self.best, self.best_epoch, len(self.history))
                cfg.reg = best_reg
                if best_half is not None:
                    cfg.recency = best_half
            self.save_checkpoint()
        return spent

    def _closed_form_train(self):
        """What a closed-form fit reads (the family's ``closed_form_input``): the binary
        train CSR (``"csr"``: EASE), the train ratings as a ``dataset.Part`` (``"pairs"``:
        bpmf) or the whole ``Data`` (``"data"``: blend, which fits on the validation part)."""
        return {"pairs": self.data.train, "data": self.data}.get(self.cls.closed_form_input,
                                                                 self.data.train_csr)

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


def refit(cfg: TrainConfig, data: Data, trainer: Trainer, out_dir: Path) -> torch.nn.Module:
    """Retrain from scratch on train + valid for the selected number of epochs, replaying the
    learning rates the selection run used in those epochs: ``fit`` with those factors."""
    factors = [float(h["lr"]) / cfg.lr if cfg.lr else 1.0
               for h in trainer.history[:trainer.best_epoch]]
    # the merged keys and CSR only where the refit reads them: sampled negatives, a closed
    # form that reads the CSR (the test is evaluated on ``data``, not on the merged copy)
    merged = with_valid_in_train(data, keys=trainer.objective.draws_negatives,
                                 csr=not trainer.by_epochs
                                 and trainer.cls.closed_form_input == "csr")
    # the selection's train keys and their filter are not read again (the test is scored
    # from the CSR): freed before the refit builds its own (0.8 + 0.25 GB at 100M)
    trainer._keyset = None
    data.train_keys = None
    t2 = Trainer(cfg, merged, out_dir, trainer.command, is_refit=True)
    try:
        trainer.train_seconds += t2.fit(lr_factors=factors)
    finally:
        t2.l2.close()
    return t2.model


def _metric_line(d: dict[str, float]) -> str:
    return metric_line(d)         # with the intervals and the fallback count


def run(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train per ``cfg`` (resolved here) and write the stage folder; returns metrics.json."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    training_numerics()        # subnormals flushed to zero, freed memory reused (cli.py)
    dev = resolve_device(cfg.device)
    # under torchrun: join the group (gloo on the CPU, NCCL on CUDA; cuda:LOCAL_RANK)
    dist = distributed.setup(cfg.dist_backend, dev, cfg.dist_timeout)
    dev = dist.device if dist.enabled else dev
    dist.new_run()
    up40 = read_manifest(cfg.data_dir, STAGE40, needed_by=PROG)
    rated = int((up40.get("nnz") or {}).get("train", 1)) > 0
    cls = family(cfg.model)
    task = decide_task(cfg.task, cls, up40.get("task"), rated)
    # --tune searches only what the command line left to the preset
    given = {k for k in tune.TUNABLE if getattr(cfg, k) is not None}
    if cfg.tune and dist.multi:
        raise PipelineError("--tune runs in one process: search with plain python, then pass "
                            "the chosen values (metrics.json, tune) to the torchrun run")
    if cfg.tune and cls.fit_by != "epochs":
        raise PipelineError(f"--tune: --model {cfg.model} is fitted in closed form and "
                            f"already chooses its --reg on validation (one fit per candidate)")
    # the presets' recency holds on the splits that hold out each user's latest interactions,
    # where stage 40 wrote the train timestamps it is computed from
    latest = (up40.get("strategy") in LATEST_HELD_OUT
              and "train" in (up40.get("times") or []))
    cfg = dataclasses.replace(cfg, task=task).resolved(
        device=dev, one_process=not dist.multi, latest_held_out=latest)
    print_config(cfg, PROG)
    data = load_data(cfg.data_dir, cfg.task, dev)
    final_dir = stage_dir(cfg.data_dir, STAGE) / cfg.model
    # the run builds its folder beside the published one (the work folder also holds the
    # checkpoint --resume continues from) and swaps it in at the end: a failed, refused,
    # diverged or killed run leaves the previous model, metrics and manifest as they were
    work = work_dir(cfg.data_dir, cfg.model)
    if dist.world > 1:
        _stop_on_sigterm(dist, final_dir, work)
    try:
        if not dist.leader:
            # rank 0 holds the lock and writes; the others train and evaluate with it
            dist.barrier()
            metrics = _train_and_test(cfg, data, work, command, up40, given)[0]
        else:
            with StageOutput(cfg.data_dir, f"{STAGE}/{cfg.model}", work_dir=work) as out:
                _prepare_work(work, final_dir, cfg.resume)
                dist.barrier()             # the work folder (and its checkpoint) is ready
                metrics, manifest = _train_and_test(cfg, data, work, command, up40, given)
                out.commit(manifest)
        dist.barrier()                     # the ranks leave together, after the commit
        return metrics
    except RuntimeError as e:
        if dist.world > 1 and _lost_peer(e):
            raise PipelineError(
                f"rank {dist.rank} of {dist.world}: lost contact with another rank "
                f"({str(e).strip().splitlines()[0][:200]}); {final_dir} is unchanged and "
                f"{work / 'checkpoint.pt'} holds the last completed epoch: rerun with "
                f"--resume and the same --nproc_per_node") from None
        raise


def _stop_on_sigterm(dist: "distributed.Dist", final_dir: Path, work: Path) -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: end with one line
    (and the usual cleanup: the lock released, the published folder untouched) instead of
    dying mid-step without a word."""
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)      # a second one ends at once
        raise PipelineError(f"rank {dist.rank} of {dist.world}: stopped by torchrun because "
                            f"another rank failed (see its message above); {final_dir} is "
                            f"unchanged and {work / 'checkpoint.pt'} holds the last completed "
                            f"epoch: rerun with --resume and the same --nproc_per_node")
    signal.signal(signal.SIGTERM, stop)


def _lost_peer(e: Exception) -> bool:
    """A collective failed because another rank died or stopped answering (gloo's
    connection errors, a timeout, NCCL's errors)."""
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connection", "timed out", "timeout", "peer", "gloo",
                                   "nccl", "distbackend", "broken pipe", "socket"))


def work_dir(data_dir: Path, model: str) -> Path:
    """Where a stage-60 run of ``model`` builds its output and keeps its resumable
    checkpoint until it finishes: ``DATA_DIR/60_train/.<model>.work/``."""
    return stage_dir(data_dir, STAGE) / f".{model}.work"


def _prepare_work(work: Path, final_dir: Path, resume: bool) -> None:
    """A fresh run starts from an empty work folder. --resume continues the checkpoint of
    the interrupted run there, else that of the finished run in the published folder."""
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / "checkpoint.pt"
    if resume and not ck.exists() and (final_dir / "checkpoint.pt").exists():
        shutil.copy2(final_dir / "checkpoint.pt", ck)
        for name in ("history.csv", tune.RESULT, tune.TABLE):
            if (final_dir / name).exists():
                shutil.copy2(final_dir / name, work / name)


def _trial_runner(data: Data, command: str):
    """--tune's trial: one selection run (no refit, no test), its epoch logs quieted."""
    def run_trial(tcfg: TrainConfig, trial_dir: Path, on_epoch: Callable[[int, float], bool]
                  ) -> tuple[float, int, int]:
        level = log.level
        log.setLevel(logging.WARNING)
        t = Trainer(tcfg, data, trial_dir, command)
        t.on_epoch = on_epoch
        try:
            t.fit()
        finally:
            t.l2.close()
            log.setLevel(level)
        return t.best, t.best_epoch, t.epoch
    return run_trial


def _train_and_test(cfg: TrainConfig, data: Data, out_dir: Path, command: str,
                    up40: dict[str, Any], given: set[str] = frozenset()
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(--tune: the search on validation,) selection on validation, the refit, the one test
    evaluation; writes every file of the stage into ``out_dir`` and returns (metrics.json,
    the manifest to commit)."""
    searched = None
    if cfg.tune:
        cfg, searched = tune.search(cfg, data, out_dir, given, _trial_runner(data, command))
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
        if done > 0 and trainer.dist.leader:
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
                            f"the validation split of {cfg.data_dir}/{STAGE40}")
    # the selected model on validation; then (refit) the same recipe on train + valid;
    # the test split is evaluated once, with the final model
    if searched and abs(trainer.best - searched["best_value"]) > 1e-6:
        log.warning("--tune: the selection run reached valid %s %.6f, its trial %.6f: "
                    "training is not deterministic here", trainer.metric, trainer.best,
                    searched["best_value"])
    trainer.model.load_state_dict(trainer.best_state)
    # the model now holds the selected weights, and nothing trains it again: its own tensors
    # stand for best_state (selected.pt), not a second copy of every table
    trainer.best_state = trainer.model.state_dict()
    # the final validation and the test: every user, or the stated sample of --test-users
    # (metrics.json: test_users of test_users_total, and every metric's 95% interval)
    final_data, n_eval, n_total = data, {}, {}
    for part in ("valid", "test"):
        final_data, n_eval[part], n_total[part] = sample_users(final_data, part,
                                                               cfg.test_users, cfg.seed + 1)
        if n_eval[part] < n_total[part]:
            log.info("final %s evaluation on a fixed sample of %d of its %d users "
                     "(--test-users, seed %d); metrics.json gives the 95%% intervals", part,
                     n_eval[part], n_total[part], cfg.seed + 1)
    # beside sampled candidates, the full-ranking extras on at most --full-rank-users users
    ranked = {"full_rank_users": cfg.full_rank_users, "seed": cfg.seed + 2}
    valid = evaluate(trainer.model, final_data, "valid", cfg.task, cfg.eval_batch, full=True,
                     **ranked)
    final = refit(cfg, data, trainer, out_dir) if cfg.refit else trainer.model
    test = evaluate(final, final_data, "test", cfg.task, cfg.eval_batch, full=True, **ranked)
    dist = trainer.dist
    described = dist.describe() if dist.enabled else None
    if not dist.leader:
        return {"test": test, "valid": valid, "best_epoch": trainer.best_epoch,
                "train_seconds": round(trainer.train_seconds, 3)}, {}
    meta = {"model": cfg.model, "model_args": trainer.args,
            "state_dict": final.state_dict(), "task": cfg.task, "refit": bool(cfg.refit),
            "rating_scale": [float(data.rating_scale[0]), float(data.rating_scale[1])],
            "n_users": data.n_users, "n_items": data.n_items,
            "best_epoch": trainer.best_epoch, "valid_metric": valid,
            "config": config_dict(cfg)}
    if cfg.refit:
        save({**meta, "state_dict": trainer.best_state, "refit": False},
             out_dir / "selected.pt")
    else:
        (out_dir / "selected.pt").unlink(missing_ok=True)
    save(meta, out_dir / "model.pt")
    if trainer.by_epochs and trainer.best_epoch != trainer.epoch:
        # checkpoint.pt (the last epoch, for --resume) refers to the best weights instead of
        # holding a second copy of them; it is rewritten from disk, since the model in
        # memory now holds the best epoch, not the last
        ck_path = out_dir / "checkpoint.pt"
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        save({**ck, "best_state": None,
              "best_ref": "selected.pt" if cfg.refit else "model.pt"}, ck_path)
    write_history(out_dir / "history.csv", trainer.history)
    plot_curve(out_dir / "curve.png", trainer.history, trainer.metric,
               f"{cfg.model} ({cfg.task}), best epoch {trainer.best_epoch}")
    metrics = {"test": test, "valid": valid, "best_epoch": trainer.best_epoch,
               "refit_on_train_valid": bool(cfg.refit),
               "epochs_run": trainer.epoch, "selection_metric": trainer.metric,
               "valid_users": trainer.valid_users,
               "valid_epoch_users": trainer.valid_epoch_users,
               "valid_final_users": n_eval["valid"], "test_users": n_eval["test"],
               "test_users_total": n_total["test"],
               "train_seconds": round(trainer.train_seconds, 3), "config": config_dict(cfg),
               # torchrun: world size, backend, devices, bytes per step, replica checksums
               "distributed": described or {"world_size": 1, "backend": "none",
                                            "devices": [str(data.device)]}}
    if searched:
        metrics["tune"] = searched
    write_json(out_dir / "metrics.json", metrics)
    manifest = {
        "stage": STAGE, "model": cfg.model, "task": cfg.task,
        "n_users": data.n_users, "n_items": data.n_items, "dataset": up40.get("dataset"),
        "best_epoch": trainer.best_epoch, "valid": valid, "test": test,
        "files": ["model.pt", "checkpoint.pt", "history.csv", "metrics.json", "curve.png"]
        + (["selected.pt"] if cfg.refit else [])
        + ([tune.TABLE, tune.RESULT] if searched else []),
        "config": config_dict(cfg), "command": command,
        "upstream": upstream_entry(cfg.data_dir, STAGE40)}
    log.info("best epoch %d of %d (validation %s)", trainer.best_epoch, trainer.epoch,
             trainer.metric)
    log.info("valid: %s", _metric_line(valid))
    log.info("test:  %s", _metric_line(test))
    return metrics, manifest


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TrainConfig, argv, PROG, DESCRIPTION)
    command = command_line(PROG, argv)
    metrics = run(cfg, command)
    if not distributed.current().leader:
        return metrics
    out = stage_dir(cfg.data_dir, STAGE) / cfg.model
    print(json.dumps({"model": cfg.model, "test": metrics["test"], "valid": metrics["valid"],
                      "best_epoch": metrics["best_epoch"],
                      "train_seconds": metrics["train_seconds"]}, indent=None))
    log.info("wrote %s; next: `python 70_recommend.py --data-dir %s --model %s`", out,
             shlex.quote(str(cfg.data_dir)), cfg.model)
    return metrics
