"""Row-wise (lazy) Adam for embedding tables, without sparse tensors.

``torch.optim.SparseAdam`` updates only the rows a batch touched: each row's moment estimates
move only when the row has a gradient, so a step costs in proportion to the batch, not to
the table. Fed through autograd it needs sparse gradients, whose coalescing (a sort) and
masked adds make it slower than dense Adam on CPU. ``RowSparseAdam`` keeps SparseAdam's
update rule and state (it is a subclass: same ``state_dict``, so checkpoints interchange),
and adds ``step_rows``, which takes the distinct rows and their summed gradients directly
(as ``BiasedMF.mse_backward_rows`` produces them) and updates them with a few gathers and
index writes.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch


class RowSparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` plus ``step_rows([(param, rows, grad_rows), ...])``."""

    @torch.no_grad()
    def step_rows(self, updates: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> None:
        """One SparseAdam step from row-compact gradients: ``rows`` are distinct row indices
        of ``param`` (any order), ``grad_rows`` their gradients ``[len(rows), ...]``. Every
        listed parameter counts one step, as SparseAdam counts one per parameter with a
        gradient; parameters not listed are left alone."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for p, rows, grad in updates:
            group = group_of[id(p)]
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            if rows.numel() == 0:
                continue
            if group.get("maximize", False):
                grad = -grad
            step = state["step"]
            m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
            v = state["exp_avg_sq"].index_select(0, rows)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
            lr = float(group["lr"])
            step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            # -step_size * m / (sqrt(v) + eps), scaled in the divisor: index_add_ with an
            # alpha takes a slow path on CPU
            p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"]).mul_(-1.0 / step_size)))


# rowsgd's accumulators start here (LIBMF starts at 1): 0.1 gives larger first steps, chosen
# on validation (docs/presets.md: equal after 60 epochs, better after 1-3 at 10M ratings)
ROWSGD_INITIAL = 0.1


class RowAdaGrad(torch.optim.Optimizer):
    """The state of ``--optimizer rowsgd`` (per-sample SGD with a per-row AdaGrad step size,
    ``kernels.py``): one accumulator per row of each table, starting at ROWSGD_INITIAL. The
    steps are the family's fused epoch (``Family.fused_epoch``), not ``step``; being a torch
    optimiser, its state and learning rate go through ``state_dict`` and ``set_factor`` like
    the others."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    def accumulators(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "sum" not in state:
            state["sum"] = torch.full((p.shape[0],), ROWSGD_INITIAL, dtype=p.dtype,
                                      device=p.device)
        return state["sum"]

    def step(self, closure=None):
        raise RuntimeError("rowsgd steps a whole epoch at a time (Family.fused_epoch); "
                           "it has no per-batch step")


class Optimizers:
    """One or two torch optimisers behind one interface: the family's row-sparse tables
    (``Family.row_sparse_tables``) and its dense weights (towers, output layers)."""

    def __init__(self, model: torch.nn.Module, name: str, lr: float, momentum: float = 0.9):
        emb = model.row_sparse_tables()
        emb_ids = {id(p) for m in emb for p in m.parameters()}
        dense = [p for p in model.parameters() if id(p) not in emb_ids]
        emb_params = [p for m in emb for p in m.parameters()]
        fused = all(not m.sparse for m in emb)     # torch's fused Adam: off for sparse grads
        self.opts: list[torch.optim.Optimizer] = []
        if name == "adam":
            self.opts.append(torch.optim.Adam(list(model.parameters()), lr=lr, fused=fused))
        elif name == "sgd":
            self.opts.append(torch.optim.SGD(list(model.parameters()), lr=lr,
                                             momentum=momentum))
        elif name == "sparse_adam":
            self.opts.append(RowSparseAdam(emb_params, lr=lr))
            if dense:
                self.opts.append(torch.optim.Adam(dense, lr=lr))
        elif name == "rowsgd":
            if dense:
                raise ValueError("rowsgd trains embedding tables only; this model has "
                                 "dense weights (towers): use sparse_adam or adam")
            self.opts.append(RowAdaGrad(emb_params, lr=lr))
        elif name == "adagrad":
            self.opts.append(torch.optim.Adagrad(emb_params, lr=lr))
            if dense:
                self.opts.append(torch.optim.Adam(dense, lr=lr * 0.1))
        else:
            raise ValueError(f"unknown optimizer {name!r}; expected adam, sgd, sparse_adam, "
                             f"rowsgd or adagrad")
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

    def accumulators(self, p: torch.Tensor) -> torch.Tensor:
        """rowsgd's per-row state of table weight ``p`` (RowAdaGrad)."""
        return self.opts[0].accumulators(p)

    @property
    def lr(self) -> float:
        """The current learning rate of the first optimiser (rowsgd's epoch reads it)."""
        return float(self.opts[0].param_groups[0]["lr"])

    def set_factor(self, factor: float) -> None:
        for o, lrs in zip(self.opts, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * factor

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for o, s in zip(self.opts, states):
            o.load_state_dict(s)
