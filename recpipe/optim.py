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
from typing import Iterable

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
