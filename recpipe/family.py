"""The seam between a model family (``models.py``) and the stages that train (60) and use
(70) it. A family is one ``Family`` subclass registered with ``@register``; it declares:

- ``default_task`` and ``tasks``: the tasks it can be trained on;
- ``options``: the stage-60 hyperparameters it reads (``--dim``, ``--layers``...), each with
  what it means for this family (``60_train.py --help`` is built from them), and
  ``from_config``: its constructor arguments from those values. Its presets are its rows in
  ``recpipe/presets.py``;
- ``input``: ``"pairs"`` (it scores (user, item) pairs from its own user rows: MF, NCF) or
  ``"rows"`` (it scores from a user's interaction row, the train CSR: EASE, autoencoders);
  ``per_pair_scoring``: scoring all items holds a vector per (user, item) pair (MLP towers)
  rather than being one matrix product, which sizes the scoring blocks;
- ``fit_by``: ``"epochs"`` of mini-batches (stage 60's loop) or ``"closed_form"``
  (``fit_closed_form``, once, on the binary train CSR or, with ``closed_form_input =
  "pairs"``, the train ratings: bpmf's Gibbs chain, or with ``"data"`` the whole split:
  blend, which fits on the validation part; the fit's ``hp["is_refit"]`` says whether it is
  the refit on train + valid); ``batches``: what an epoch iterates,
  ``"pairs"`` (through ``forward`` and the task's objective) or ``"rows"`` (``row_data`` /
  ``row_loss`` / ``rows_done``: the autoencoders);
- its row-sparse tables: ``user_tables()`` and ``item_tables()`` (created with
  ``self.table``), for the lazy optimisers, the row L2 and the fold-in;
- ``has_item_vectors`` and ``item_vectors()`` for similar items and explanations;
- ``fold_in``: how new users join without retraining (default: a few hundred Adam steps on
  fresh user rows with the rest frozen, on the training objective);
- optionally ``analytic_tasks`` and ``analytic_grad``: a hand-written gradient of the same
  objective, which the trainer uses instead of autograd when it pays off;
- optionally ``fused_tasks`` and ``fused_epoch``: a whole epoch of per-sample SGD on the same
  objective in a compiled CPU kernel (``--optimizer rowsgd``, ``kernels.py``: explicit MF).

Rows without training data (every family, in this base class): the trainer calls
``learn_fallback`` once on the data it fits, which records which user and item rows received
a training signal (``known_user``, ``known_item``: explicit, a train rating; implicit, a user
with a train interaction, and every item when the objective samples negatives, since items
without positives are still fitted as negatives) and saves them with the model (buffers).
``scoring.py`` then scores every pair with an unknown side by the baseline
``fallback_scores``: global mean + the known side's bias, never the row's random
initialisation. The bias is the family's own bias tables when it has them (``user_bias``,
``item_bias``, times ``scale``: mf; deepmf/gmf/mlp/neumf on explicit); otherwise a baseline
estimated from train and stored with the model (``base_user``, ``base_item``): explicit,
Surprise's regularised ALS baseline (``regularised_baseline``); implicit, the item's log
popularity (so a user without train interactions gets the popularity ranking). A checkpoint
written before these buffers existed loads with every row known (the old behaviour).

Stage 60 and 70 call only these; they never branch on a family's name or class.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .objectives import Objective, RowL2

REGISTRY: dict[str, type["Family"]] = {}
FALLBACK_BUFFERS = ("known_user", "known_item", "base_user", "base_item")
BASELINE_REG_U, BASELINE_REG_I = 15.0, 10.0     # regularised_baseline's weights (Surprise's)


def register(name: str):
    """Class decorator: make a family available as ``--model name``."""
    def deco(cls: type["Family"]) -> type["Family"]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice "
                             f"({REGISTRY[name].__name__} and {cls.__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def unregister(name: str) -> None:
    """Remove a family (tests register toy families and take them away again)."""
    REGISTRY.pop(name, None)


def family(name: str) -> type["Family"]:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def distinct_rows(idx: torch.Tensor, n: int, owner: object | None = None,
                  ascending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of ``idx`` (1-d, ids in [0, n)) and each element's position among
    them: ``rows[inv] == idx``, like ``torch.unique(idx, return_inverse=True)`` without its
    sort, which was most of the cost of deduplicating a batch's rows. Deterministic:

    - a table not much larger than the batch (n <= 2 len(idx): an item table): mark the ids
      in a bool array of n and take a cumulative sum; rows come out ascending;
    - a larger one (a user table): each id's slot in a scratch array of n ints takes the
      last position that holds the id (a scatter-max, deterministic), and an element stands
      for its row when its slot points back to it; rows come in the order of those last
      occurrences. The work is O(len(idx)): the scratch array is read and written only at
      the batch's ids, and kept on ``owner`` (a table module) between steps, since its old
      contents never matter.

    The order of ``rows`` changes no per-row result (gradients are summed per row, optimiser
    steps are per row). ``ascending=True`` asks for ascending rows: the mark up to n = 64
    len(idx) (a sort of the batch costs about what 50 marks do), a sort beyond."""
    b = idx.numel()
    if ascending and n > 64 * b:
        return torch.unique(idx, sorted=True, return_inverse=True)
    if b == 0 or n <= (64 if ascending else 2) * b:
        mark = torch.zeros(n, dtype=torch.bool, device=idx.device)
        mark[idx] = True
        rows = mark.nonzero().squeeze(1)
        return rows, mark.cumsum(0).sub_(1).index_select(0, idx)
    slots = getattr(owner, "_row_slots", None)
    if slots is None or slots.shape[0] != n or slots.device != idx.device:
        slots = torch.empty(n, dtype=torch.int64, device=idx.device)
        if owner is not None:
            owner._row_slots = slots
    pos = torch.arange(b, device=idx.device)
    slots.scatter_reduce_(0, idx, pos, "amax", include_self=False)
    last = slots.index_select(0, idx)
    first = last == pos                      # the element its row's slot points to
    rows = idx[first]
    return rows, first.cumsum(0).sub_(1).index_select(0, last)


def _compact_leaf(emb: nn.Embedding, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-compact lookup (``emb.compact`` set): the distinct rows of ``idx`` gathered into a
    leaf tensor of their own, recorded as ``(rows, leaf)`` in ``emb.compact``; returns the
    leaf and each element's row in it."""
    # tables looked up with the same index tensor in one forward (NeuMF's GMF and MLP user
    # tables, its two item tables) share one unique: the trainer hands every table the same
    # ``compact_keys`` dict for the step
    keys = getattr(emb, "compact_keys", None)
    hit = keys.get(id(idx)) if keys is not None else None
    if hit is not None and hit[0] is idx:
        rows, inv = hit[1], hit[2]
    else:
        rows, inv = distinct_rows(idx.reshape(-1), emb.weight.shape[0], emb)
        if keys is not None:
            keys[id(idx)] = (idx, rows, inv)       # idx kept alive: its id stays its own
    leaf = emb.weight.detach().index_select(0, rows).requires_grad_()
    emb.compact.append((rows, leaf))
    return leaf, inv


def look(emb: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (any shape) of an embedding table.

    When the trainer sets ``emb.compact`` to a list (sparse_adam with autograd), the table's
    distinct looked-up rows are gathered into a leaf tensor and ``(rows, leaf)`` appended to
    the list: backward then gives the rows' gradients directly, for ``RowSparseAdam.step_rows``.

    Dense tables use ``index_select``, whose backward (an ``index_add``) is about 3x faster on
    CPU than ``nn.Embedding``'s; sparse tables go through the module (sparse gradients). When
    the trainer sets ``emb.captured`` to a list, the looked-up rows are appended to it (the
    row L2 on the rows a batch used), scaled by the root of ``emb.l2_weight(idx)`` when the
    family gives the table per-row L2 weights."""
    if getattr(emb, "compact", None) is not None:
        # row-compact training (the trainer's sparse_adam path): the distinct rows become a
        # leaf of their own, so backward yields [rows, dim] gradients for step_rows, with no
        # sparse tensor to coalesce and no pass over the table
        leaf, inv = _compact_leaf(emb, idx)
        out = leaf.index_select(0, inv).view(*idx.shape, emb.embedding_dim)
    elif emb.sparse:
        out = emb(idx)
    else:
        out = emb.weight.index_select(0, idx.reshape(-1)).view(*idx.shape, emb.embedding_dim)
    cap = getattr(emb, "captured", None)
    if cap is not None:
        # a table with per-row L2 weights (``l2_weight(idx)``: mf's reg_power) adds each
        # row's square times its weight: the captured row is scaled by the weight's root
        weight = getattr(emb, "l2_weight", None)
        cap.append(out if weight is None
                   else out * weight(idx).to(out.dtype).sqrt().unsqueeze(-1))
    return out


def _side_rows(emb: nn.Embedding, idx: torch.Tensor, side
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-compact ``side``: (side of each distinct row of ``idx``, each element's row)."""
    leaf, inv = _compact_leaf(emb, idx)
    cap = getattr(emb, "captured", None)
    if cap is not None:                   # the row L2 is per sample: the gathered rows
        cap.append(leaf.index_select(0, inv).view(*idx.shape, emb.embedding_dim))
    return side(leaf), inv


def look_side(emb: nn.Embedding, idx: torch.Tensor, side) -> torch.Tensor:
    """``side(look(emb, idx))`` for a ``side`` that transforms each row on its own (a
    tower's first layer, no dropout). In row-compact training ``side`` runs once per
    distinct row and its outputs are gathered: with sampled negatives every user of a batch
    repeats 1 + n_negatives times, and a batch of 32k samples holds far fewer distinct
    items than samples, so most of the layer's work goes. Elsewhere (dense tables,
    evaluation) it is exactly ``side(look(emb, idx))``."""
    if getattr(emb, "compact", None) is None:
        return side(look(emb, idx))
    out, inv = _side_rows(emb, idx, side)
    return out.index_select(0, inv).view(*idx.shape, out.shape[-1])


class _GatherAddRelu(torch.autograd.Function):
    """relu(a[iu] + b[ii]) by the fused CPU kernels (kernels.gather_add_relu)."""

    @staticmethod
    def forward(ctx, a, iu, b, ii):
        from . import kernels
        iu32, ii32 = iu.to(torch.int32).numpy(), ii.to(torch.int32).numpy()
        h = a.new_empty((iu.shape[0], a.shape[1]))
        kernels.gather_add_relu(a.detach().contiguous().numpy(), iu32,
                                b.detach().contiguous().numpy(), ii32, h.numpy())
        ctx.save_for_backward(h)
        ctx.rows = (iu32, ii32, a.shape[0], b.shape[0])
        return h

    @staticmethod
    def backward(ctx, grad):
        from . import kernels
        (h,) = ctx.saved_tensors
        iu32, ii32, n_a, n_b = ctx.rows
        ga, gb = h.new_zeros((n_a, h.shape[1])), h.new_zeros((n_b, h.shape[1]))
        kernels.gather_add_relu_backward(grad.contiguous().numpy(), h.numpy(), iu32, ii32,
                                         ga.numpy(), gb.numpy())
        return ga, None, gb, None


class _GatherDot(torch.autograd.Function):
    """(a[iu] * w * b[ii]).sum(1) by the fused CPU kernels (kernels.gather_dot)."""

    @staticmethod
    def forward(ctx, a, iu, b, ii, w):
        from . import kernels
        iu32, ii32 = iu.to(torch.int32).numpy(), ii.to(torch.int32).numpy()
        a, b, w = a.detach().contiguous(), b.detach().contiguous(), w.detach().contiguous()
        out = a.new_empty(iu.shape[0])
        kernels.gather_dot(a.numpy(), iu32, b.numpy(), ii32, w.numpy(), out.numpy())
        ctx.save_for_backward(a, b, w)
        ctx.rows = (iu32, ii32)
        return out

    @staticmethod
    def backward(ctx, grad):
        from . import kernels
        a, b, w = ctx.saved_tensors
        iu32, ii32 = ctx.rows
        ga, gb, gw = torch.zeros_like(a), torch.zeros_like(b), torch.empty_like(w)
        kernels.gather_dot_backward(grad.contiguous().numpy(), a.numpy(), iu32, b.numpy(),
                                    ii32, w.numpy(), ga.numpy(), gb.numpy(), gw.numpy())
        return ga, None, gb, None, gw


class _KernelDropout(torch.autograd.Function):
    """Inverted dropout by the compiled CPU kernel (kernels.dropout): the mask is a function
    of ``seed`` and the position, so the backward pass recomputes it instead of storing it."""

    @staticmethod
    def forward(ctx, x, p, seed):
        from . import kernels
        x = x.detach().contiguous()
        out = torch.empty_like(x)
        kernels.dropout(x.view(-1).numpy(), out.view(-1).numpy(), p, seed)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        from . import kernels
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        kernels.dropout(grad.view(-1).numpy(), out.view(-1).numpy(), ctx.p, ctx.seed)
        return out, None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose training pass on the CPU (float32) runs the compiled kernel: each
    entry kept with probability 1 - p (to 1/65536) and scaled by 1 / (1 - p), as torch's. Its
    mask comes from one draw of torch's global generator per call (so ``torch.manual_seed``
    and each rank's seed fix it, as they fix torch's own dropout), not from a Bernoulli draw
    per entry: torch's CPU dropout spent 41 ms on a [32768, 128] block where the kernel
    spends 3.4 ms (one thread each), and was 80% of mlp's training step at Netflix's size.
    Elsewhere (CUDA, float64, p of 0 or 1, no numba) it is torch's dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu"
                and x.dtype == torch.float32 and _kernels_ok()):
            seed = int(torch.randint(0, 2 ** 62, (1,)))
            return _KernelDropout.apply(x, self.p, seed)
        return super().forward(x)


def tower_input(user_emb: nn.Embedding, users: torch.Tensor, user_side,
                item_emb: nn.Embedding, items: torch.Tensor, item_side) -> torch.Tensor:
    """``relu(user_side(look(user_emb, users)) + item_side(look(item_emb, items)))``, the NCF
    tower's first layer on pairs. In row-compact training each side runs once per distinct
    row (``look_side``), and on the CPU the gather, the sum and the relu are one pass of a
    compiled kernel, and so is their gradient (``kernels.gather_add_relu``): the torch ops
    gather two [samples, h] blocks, add them and mask, and scatter the gradient back through
    an index expanded to [samples, h]."""
    if getattr(user_emb, "compact", None) is None or getattr(item_emb, "compact", None) is None:
        return (look_side(user_emb, users, user_side)
                + look_side(item_emb, items, item_side)).relu_()
    a, iu = _side_rows(user_emb, users, user_side)
    b, ii = _side_rows(item_emb, items, item_side)
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and _kernels_ok():
        out = _GatherAddRelu.apply(a, iu, b, ii)
    else:
        out = (a.index_select(0, iu) + b.index_select(0, ii)).relu_()
    return out.view(*users.shape, out.shape[-1])


def pair_dot(user_emb: nn.Embedding, users: torch.Tensor, item_emb: nn.Embedding,
             items: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(look(user_emb, users) * w * look(item_emb, items)).sum(-1)`` for pairs of the same
    shape (GMF's score). In row-compact training on the CPU the gathers, the products and
    the sum are one pass of a compiled kernel over the batch's distinct rows, and so is
    their gradient (``kernels.gather_dot``): the torch ops gather two [samples, d] blocks,
    multiply them twice, and scatter two [samples, d] gradients back through index_add."""
    a = getattr(user_emb, "compact", None) is not None
    b = getattr(item_emb, "compact", None) is not None
    if not (a and b and w.dim() == 1 and user_emb.weight.device.type == "cpu" and _kernels_ok()
            and user_emb.weight.dtype == item_emb.weight.dtype == w.dtype == torch.float32):
        return (look(user_emb, users) * w * look(item_emb, items)).sum(-1)
    ua, iu = _side_rows(user_emb, users, lambda leaf: leaf)
    ib, ii = _side_rows(item_emb, items, lambda leaf: leaf)
    return _GatherDot.apply(ua, iu, ib, ii, w).view(users.shape)


# the fused CPU kernels above (Dropout, tower_input, pair_dot); bench/bench_train.py
# --kernel-paths turns them off to time torch's ops beside them
USE_KERNELS = True


def _kernels_ok() -> bool:
    from . import kernels
    return USE_KERNELS and kernels.available()


class Family(nn.Module):
    """Base class of every model family (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    default_task: ClassVar[str] = "explicit"
    tasks: ClassVar[tuple[str, ...]] = ("explicit", "implicit")
    options: ClassVar[dict[str, str]] = {}
    input: ClassVar[str] = "pairs"
    per_pair_scoring: ClassVar[bool] = False
    fit_by: ClassVar[str] = "epochs"
    # what fit_closed_form reads: the binary train CSR ("csr"), the train ratings ("pairs") or
    # the whole Data ("data": blend)
    closed_form_input: ClassVar[str] = "csr"
    # what an epoch iterates: "pairs" (batches of (user, item) samples through forward and
    # the objective) or "rows" (batches of CSR rows through row_data / row_loss / rows_done)
    batches: ClassVar[str] = "pairs"
    has_item_vectors: ClassVar[bool] = True
    analytic_tasks: ClassVar[tuple[str, ...]] = ()
    fused_tasks: ClassVar[tuple[str, ...]] = ()         # tasks fused_epoch (rowsgd) trains
    pretrain_from: ClassVar[tuple[str, ...]] = ()      # families whose models init this one
    reg_power_tasks: ClassVar[tuple[str, ...]] = ()    # tasks whose L2 --reg-power scales
    # buffers a family added after checkpoints existed: an older checkpoint without them
    # loads with the model's current values (besides FALLBACK_BUFFERS, every family's)
    added_buffers: ClassVar[tuple[str, ...]] = ()
    score_label: ClassVar[str | None] = None   # what stage 70's score means (None: the objective's)

    def __init__(self, n_users: int, n_items: int, global_mean: float = 0.0,
                 scale: float = 1.0):
        super().__init__()
        if n_users <= 0 or n_items <= 0:
            raise ValueError(f"n_users and n_items must be positive, got {n_users}, {n_items}")
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self._user_names: list[str] = []
        self._item_names: list[str] = []
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        # rows with training data, and the fallback baseline (see the module docstring)
        self.register_buffer("known_user", torch.ones(self.n_users, dtype=torch.bool))
        self.register_buffer("known_item", torch.ones(self.n_items, dtype=torch.bool))
        self.register_buffer("base_user", torch.zeros(self.n_users))
        self.register_buffer("base_item", torch.zeros(self.n_items))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the fallback buffers: keep the current values (all known)
        for name in FALLBACK_BUFFERS + self.added_buffers:
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, hp: dict[str, Any], task: str, global_mean: float, scale: float,
                    sparse: bool) -> dict[str, Any]:
        """Constructor keyword arguments (plain types) from stage 60's resolved options
        ``hp`` (the names in ``options``, plus ``init_std``)."""
        raise NotImplementedError

    def table(self, side: str, name: str, dim: int, std: float | None, sparse: bool
              ) -> nn.Embedding:
        """A per-user (``side="user"``) or per-item row table, registered as a row-sparse
        table of that side; ``std=None`` starts it at zero."""
        n = self.n_users if side == "user" else self.n_items
        e = nn.Embedding(n, dim, sparse=sparse)
        if std is None:
            nn.init.zeros_(e.weight)
        else:
            nn.init.normal_(e.weight, 0.0, std)
        setattr(self, name, e)
        (self._user_names if side == "user" else self._item_names).append(name)
        return e

    def user_tables(self) -> dict[str, nn.Embedding]:
        return {n: getattr(self, n) for n in self._user_names}

    def item_tables(self) -> dict[str, nn.Embedding]:
        return {n: getattr(self, n) for n in self._item_names}

    def row_sparse_tables(self) -> list[nn.Embedding]:
        """Every per-user and per-item table, in registration order."""
        names = set(self._user_names) | set(self._item_names)
        return [m for n, m in self.named_children() if n in names]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        # the network works in standardised units; scale and global_mean map to the ratings
        return x.float() * self.scale + self.global_mean

    # -- scoring (``history``: the users' interaction rows, dense [U, n_items] on the
    # model's device, given to row-input families; pair families ignore it) -------------
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor,
                    history: torch.Tensor | None = None) -> torch.Tensor:
        """[B] scores of the pairs (users[b], items[b])."""
        return self(users, items)

    def score_candidates(self, users: torch.Tensor, items: torch.Tensor,
                         history: torch.Tensor | None = None) -> torch.Tensor:
        """[U, C] scores of users [U] against candidate items [U, C]."""
        return self(users[:, None], items)

    def score_all(self, users: torch.Tensor, history: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """[U, n_items] scores of users [U] against every item."""
        return self(users[:, None], torch.arange(self.n_items, device=users.device)[None, :])

    def history_half_life(self) -> float:
        """The recency half-life the history rows are weighted by when this model scores
        them (stages 60 and 70 weigh the rows they pass: ``evaluation.history_before``); 0 =
        binary rows. A family with a ``half_life`` buffer (EASE's ``--recency``) has it."""
        return float(getattr(self, "half_life", 0.0))

    def item_vectors(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no item vectors")

    # -- fitting -------------------------------------------------------------------------
    def fit_closed_form(self, train: "torch.Tensor", hp: dict[str, Any]) -> None:
        """Closed-form families: fit to the dense-able train interactions (a scipy CSR)."""
        raise NotImplementedError

    def analytic_grad(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                      reg: float, scratch: dict, rows: bool):
        """Optional: the objective's loss and gradient without autograd (see BiasedMF)."""
        raise NotImplementedError

    def fused_epoch(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                    seed: int, accumulators, lr: float, reg: float, threads: int,
                    scratch: dict) -> float:
        """Optional (``fused_tasks``): one epoch of per-sample SGD over the train ratings in
        an order drawn from ``seed``, in place; ``accumulators(param)`` gives the optimiser's
        per-row state, ``scratch`` is kept by the trainer between epochs. Returns the sum of
        the squared errors seen before each update."""
        raise NotImplementedError

    def init_from(self, parts: dict[str, nn.Module], alpha: float) -> None:
        """Optional: initialise from trained models of the ``pretrain_from`` families."""
        raise NotImplementedError

    # -- training on rows (batches = "rows") ----------------------------------------------
    def row_data(self, data: Any) -> Any:
        """The training rows an epoch permutes (``.n_rows``), kept on the device."""
        raise NotImplementedError

    def row_loss(self, idx: torch.Tensor, rows: Any, reg: float) -> torch.Tensor:
        """The loss of the training rows ``idx`` of ``rows``."""
        raise NotImplementedError

    def rows_done(self, rows: Any) -> None:
        """After an epoch over rows (e.g. refresh cached codes); nothing by default."""

    # -- rows without training data --------------------------------------------------------
    @torch.no_grad()
    def learn_fallback(self, train: Any, explicit: bool, negatives: bool) -> dict[str, int]:
        """Record the rows the training pairs ``train`` (``users``, ``items``, ``ratings``
        tensors: ``dataset.Part``) give a signal to and the baseline of rows without one
        (module docstring). ``negatives``: the objective draws sampled negatives (every item
        row is fitted). Returns the counts of unknown rows."""
        dev = self.known_user.device
        users, items, ratings = train.users.to(dev), train.items.to(dev), train.ratings
        cu = torch.bincount(users, minlength=self.n_users)
        ci = torch.bincount(items, minlength=self.n_items)
        self.known_user.copy_(cu > 0)
        self.known_item.copy_(ci > 0 if explicit or not negatives
                              else torch.ones_like(self.known_item))
        self.learn_row_counts(cu, ci)
        self.base_user.zero_()
        self.base_item.zero_()
        if not self._has_bias_tables():
            if explicit:
                bu, bi = regularised_baseline(users, items,
                                              ratings.to(dev).double() - float(self.global_mean),
                                              self.n_users, self.n_items)
                self.base_user.copy_(bu)
                self.base_item.copy_(bi)
            else:
                self.base_item.copy_(torch.log((ci.double() + 1) / (float(ci.max()) + 1)))
        return {"unknown_users": int((~self.known_user).sum()),
                "unknown_items": int((~self.known_item).sum())}

    def learn_row_counts(self, user_counts: torch.Tensor, item_counts: torch.Tensor) -> None:
        """Optional: state a family derives from each row's train count (``learn_fallback``
        calls it with the counts it computed, in every run)."""

    def _has_bias_tables(self) -> bool:
        return "user_bias" in self._user_names and "item_bias" in self._item_names

    def side_baselines(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_u [n_users], b_i [n_items]) in output units, zero on unknown rows: the family's
        bias tables times ``scale`` when it has them, else the stored baseline."""
        if self._has_bias_tables():
            bu = self.user_bias.weight[:, 0].float() * self.scale
            bi = self.item_bias.weight[:, 0].float() * self.scale
        else:
            bu, bi = self.base_user, self.base_item
        return bu * self.known_user, bi * self.known_item

    def fallback_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of the baseline, global mean + b_u + b_i (known sides only), for broadcastable
        ``users`` and ``items``."""
        bu, bi = self.side_baselines()
        return self.global_mean + bu[users] + bi[items]

    # -- new users -----------------------------------------------------------------------
    def with_user_rows(self, rows: dict[str, torch.Tensor], n_users: int | None = None
                       ) -> "Family":
        """A copy (item side shared, frozen) whose user tables are ``rows``; a family without
        user tables (knn, blend) passes ``{}`` and the number of new users, and sets its own
        per-user buffers on the copy (its ``_modules`` and ``_buffers`` are its own dicts)."""
        folded = copy.copy(self)            # shallow: shares every item-side module, buffer
        folded._modules = dict(self._modules)
        for name, w in rows.items():
            emb = nn.Embedding(w.shape[0], w.shape[1], device=w.device)
            emb.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            folded._modules[name] = emb
        folded.n_users = n = next(iter(rows.values())).shape[0] if rows else int(n_users)
        dev = next(iter(rows.values())).device if rows else self.global_mean.device
        folded._buffers = dict(self._buffers)        # the new users' rows are all fitted
        folded._buffers["known_user"] = torch.ones(n, dtype=torch.bool, device=dev)
        folded._buffers["base_user"] = torch.zeros(n, device=dev)
        folded.eval()
        return folded

    def fold_in(self, objective: Objective, reg: float, users: np.ndarray, items: np.ndarray,
                ratings: np.ndarray, n_users: int, steps: int = 300, lr: float = 0.05,
                seed: int = 0) -> tuple["Family", str]:
        """New users 0..n_users-1 from their given (item, rating) pairs, without retraining:
        returns (a model whose user rows are theirs, a sentence saying what was done).

        Default: fresh user rows (started at the mean trained user plus small noise), the
        item side and network frozen, fitted by ``steps`` full-batch Adam steps on the
        training objective with the training row L2 on the user rows."""
        from .dataset import KeySet
        dev = self.global_mean.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        params = {}
        for name, emb in self.user_tables().items():
            w = emb.weight.detach()
            start = w.mean(0, keepdim=True).repeat(n_users, 1)
            noise = torch.randn(start.shape, generator=gen).to(dev) * 0.01 * w.std().clamp_min(1e-6)
            params[name] = nn.Parameter(start + noise)
        if not params:
            raise ValueError(f"{type(self).__name__} has no user tables to fold in")
        folded = self.with_user_rows({n: p.detach() for n, p in params.items()})
        for name, p in params.items():                  # train the very tensors the copy uses
            folded._modules[name].weight = p
        frozen = [(p, p.requires_grad) for p in self.parameters()]
        us = torch.tensor(np.asarray(users, dtype=np.int64), device=dev)
        it = torch.tensor(np.asarray(items, dtype=np.int64), device=dev)
        r = torch.tensor(np.asarray(ratings, dtype=np.float32), device=dev)
        keys = torch.unique(us * self.n_items + it)
        keyset = KeySet(keys, n_users * self.n_items)
        neg_gen = torch.Generator(device=dev).manual_seed(seed)
        l2 = RowL2([folded._modules[n] for n in params])
        opt = torch.optim.Adam(params.values(), lr=lr)
        threads = torch.get_num_threads()
        loss_v = float("nan")
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            if dev.type == "cpu":
                # a few thousand rows per step: thread start-up and sync cost more than they
                # save (40x slower with 2 threads on a busy 2-core machine)
                torch.set_num_threads(1)
            with torch.enable_grad():
                for _ in range(steps):
                    uu, ii, y = objective.expand(us, it, r, keyset, self.n_items, neg_gen)
                    l2.active = reg > 0
                    loss = objective.loss(folded(uu, ii).float(), y)
                    total = loss + reg * l2.take(uu.shape[0]) if reg > 0 else loss
                    l2.active = False
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    loss_v = float(total.detach())
        finally:
            l2.close()
            torch.set_num_threads(threads)
            for p, flag in frozen:
                p.requires_grad_(flag)
        if not np.isfinite(loss_v):
            raise FloatingPointError(f"fold-in diverged (loss {loss_v}); try a smaller "
                                     f"--foldin-lr (now {lr:g})")
        out = self.with_user_rows({n: p.detach() for n, p in params.items()})
        method = (f"{type(self).__name__} fold-in: optimised a fresh user row "
                  f"({', '.join(sorted(params))}) with the item side and network frozen: "
                  f"{steps} Adam steps (lr {lr:g}) on {objective.describe()}, L2 {reg:g} as in "
                  f"training; final loss {loss_v:.4f}")
        return out, method


@torch.no_grad()
def regularised_baseline(users: torch.Tensor, items: torch.Tensor, dev: torch.Tensor,
                         n_users: int, n_items: int, reg_u: float = BASELINE_REG_U,
                         reg_i: float = BASELINE_REG_I,
                         epochs: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Surprise's ``BaselineOnly`` (ALS, its defaults): ``dev`` = rating - global mean; per
    epoch b_i = sum_u(dev - b_u) / (reg_i + n_i), then b_u = sum_i(dev - b_i) / (reg_u + n_u).
    Vectorised (two index_adds per epoch); float64; rows without ratings get 0."""
    d = users.device
    cu = torch.bincount(users, minlength=n_users).double()
    ci = torch.bincount(items, minlength=n_items).double()
    bu = torch.zeros(n_users, dtype=torch.float64, device=d)
    bi = torch.zeros(n_items, dtype=torch.float64, device=d)
    for _ in range(epochs):
        bi = torch.zeros_like(bi).index_add_(0, items, dev - bu[users]) / (reg_i + ci)
        bu = torch.zeros_like(bu).index_add_(0, users, dev - bi[items]) / (reg_u + cu)
    return bu.float(), bi.float()
