"""The model families: biased MF (and bpmf, the same model fitted by Gibbs sampling in
recpipe/bayes.py), the deep MF, and the NCF family (GMF, MLP, NeuMF).

Each family is one class: the network plus what it declares to the stages through
``recpipe.family.Family`` (its default task, the options it reads, how it is scored and
fitted, its row-sparse user and item tables, its item vectors, how a new user is folded
in, and optionally an analytic gradient). ``@register("name")`` makes it ``--model name``;
its presets are its rows in ``recpipe/presets.py``. No I/O, no argument parsing.

Conventions every pair-scoring family follows: ``forward(users, items)`` takes LongTensors of
broadcastable shapes (``[B]`` and ``[B]``; ``[U, 1]`` and ``[U, C]``; ``[U, 1]`` and
``[1, n_items]``) and returns scores of the broadcast shape: the predicted rating for the
explicit task (``global_mean + scale * network``, both buffers: the network works in
standardised rating units so initialisation and regularisation carry over between rating
scales), a logit for implicit (global_mean 0, scale 1).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from recpipe.family import (REGISTRY, Dropout, Family, distinct_rows, family, look, look_side,
                            pair_dot, register, tower_input)
from recpipe.objectives import ExplicitMSE, Objective

__all__ = ["BiasedMF", "BayesianMF", "DeepMF", "GMF", "MLP", "NeuMF", "MODELS", "build_model"]

_look = look


def _pair_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of a * b, broadcasting the leading axes.

    The score-all-items case ([U, 1, d] with [1, N, d]) and the candidate case ([U, 1, d] with
    [U, C, d]) become matrix products instead of materialising a [U, N, d] tensor.
    """
    if a.dim() == 3 and b.dim() == 3 and a.shape[1] == 1:
        if b.shape[0] == 1:                         # [U,1,d] x [1,N,d] -> [U,N]
            return a[:, 0, :] @ b[0].transpose(0, 1)
        if b.shape[0] == a.shape[0]:                # [U,1,d] x [U,C,d] -> [U,C]
            return torch.bmm(b, a.transpose(1, 2)).squeeze(-1)
    if a.dim() == 3 and b.dim() == 3 and b.shape[1] == 1 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b.transpose(1, 2)).squeeze(-1)
    return (a * b).sum(-1)


def _gmf(user_emb: nn.Embedding, users: torch.Tensor, item_emb: nn.Embedding,
         items: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """GMF's score sum(p_u * w * q_i): pairs of one shape (training) by ``family.pair_dot``
    (a fused kernel in row-compact CPU training), the broadcast shapes of scoring by
    ``_pair_dot``'s matrix products."""
    if users.shape == items.shape:
        return pair_dot(user_emb, users, item_emb, items, w)
    return _pair_dot(_look(user_emb, users) * w, _look(item_emb, items))


def _common(hp: dict[str, Any], global_mean: float, scale: float, sparse: bool
            ) -> dict[str, Any]:
    return {"init_std": float(hp["init_std"]), "sparse": bool(sparse),
            "global_mean": float(global_mean), "scale": float(scale)}


class _Base(Family):
    def _add_bias(self, use_bias: bool, sparse: bool) -> None:
        """Optional per-user and per-item biases (user_bias, item_bias); the NCF models use
        them for the explicit task, where they carry much of the signal."""
        self.use_bias = bool(use_bias)
        if self.use_bias:
            self.table("user", "user_bias", 1, None, sparse)
            self.table("item", "item_bias", 1, None, sparse)

    def _bias(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor | float:
        if not getattr(self, "use_bias", False):
            return 0.0
        return _look(self.user_bias, users).squeeze(-1) + _look(self.item_bias, items).squeeze(-1)


@register("mf")
class BiasedMF(_Base):
    """r = mu + b_u + b_i + p_u . q_i (Funk / Koren biased matrix factorization).

    The L2 of the explicit objective weighs each sample's rows by ``reg`` times a per-row
    factor (n / n_mean) ** -reg_power, n the row's train ratings and n_mean the mean over the
    rows of its side that have any (``user_reg``, ``item_reg``: set from the train part by
    ``learn_fallback`` in every run, not saved; the saved ``reg_mean_count`` keeps n_mean for
    the fold-in). reg_power 0: every row's factor is 1 and a
    row's total penalty grows with its ratings (Funk, ALS-WR's weighted lambda); 1: every row
    gets the same total penalty (a plain Gaussian prior, weight decay). Between them, heavy
    users and popular items are shrunk less per rating than light ones."""

    default_task = "explicit"
    options = {"dim": "factors per side", "init_std": "std of the factor initialisation",
               "reg_power": "the L2's per-row scaling by train count"}
    analytic_tasks = ("explicit",)
    fused_tasks = ("explicit",)
    reg_power_tasks = ("explicit",)
    added_buffers = ("reg_mean_count",)

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        args = {**_common(hp, global_mean, scale, sparse), "dim": int(hp["dim"])}
        if "reg_power" in cls.options:
            args["reg_power"] = float(hp.get("reg_power") or 0.0)
        return args

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.05,
                 global_mean: float = 0.0, scale: float = 1.0, sparse: bool = False,
                 reg_power: float = 0.0):
        super().__init__(n_users, n_items, global_mean, scale)
        self.table("user", "user_factors", dim, init_std, sparse)
        self.table("item", "item_factors", dim, init_std, sparse)
        self.table("user", "user_bias", 1, None, sparse)
        self.table("item", "item_bias", 1, None, sparse)
        self.reg_power = float(reg_power)
        # training state only, recomputed from the train part by every run (not saved)
        self.register_buffer("user_reg", torch.ones(self.n_users), persistent=False)
        self.register_buffer("item_reg", torch.ones(self.n_items), persistent=False)
        # the mean train ratings per user and per item with any (the fold-in's n_mean)
        self.register_buffer("reg_mean_count", torch.ones(2, dtype=torch.float64))
        if self.reg_power:        # the autograd path's row L2 (family.look) weighs rows too
            for name, buf in (("user_factors", "user_reg"), ("user_bias", "user_reg"),
                              ("item_factors", "item_reg"), ("item_bias", "item_reg")):
                getattr(self, name).l2_weight = functools.partial(self._l2_weight, buf)

    @torch.no_grad()
    def learn_row_counts(self, user_counts: torch.Tensor, item_counts: torch.Tensor) -> None:
        """The L2's per-row factors from the train counts (class docstring)."""
        for j, (counts, buf) in enumerate(((user_counts, self.user_reg),
                                           (item_counts, self.item_reg))):
            counts = counts.double()
            seen = counts > 0
            mean = float(counts[seen].mean()) if bool(seen.any()) else 1.0
            self.reg_mean_count[j] = mean
            buf.copy_(self.count_factor(counts, mean))

    def _l2_weight(self, buf: str, idx: torch.Tensor) -> torch.Tensor:
        return getattr(self, buf)[idx]

    def count_factor(self, counts: torch.Tensor, mean: float) -> torch.Tensor:
        """The L2's factor of rows with ``counts`` train ratings, (n / mean) ** -reg_power
        (a row without ratings gets the factor of one rating: it is never trained)."""
        if not self.reg_power:
            return torch.ones_like(counts)
        return (counts.clamp_min(1.0) / mean).pow(-self.reg_power)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p = _look(self.user_factors, users)
        q = _look(self.item_factors, items)
        dot = _pair_dot(p, q)
        bias = _look(self.user_bias, users).squeeze(-1) + _look(self.item_bias, items).squeeze(-1)
        return self._out(dot + bias)

    def item_vectors(self) -> torch.Tensor:
        return self.item_factors.weight.detach()

    # -- the trainer's fast path for the explicit objective (no autograd) ----------------
    # Objective: mean(((forward(u, i) - r) / scale) ** 2) plus reg / B times the sum of
    # squares of the four embedding rows each sample uses (factors and biases). With
    # e = p.q + b_u + b_i - (r - mean) / scale its gradient is, per sample, 2/B (e q_i + reg p_u)
    # for p_u, the same with p and q swapped for q_i, and 2/B (e + reg b) for the biases;
    # rows used by several samples sum their terms. Tests check both forms against autograd.

    # samples per pass: the [chunk, d] work tensors stay in cache (d = 64 on 2 cores: the
    # gradient of a 65,536 batch took 15.3 ms in chunks of 16,384 against 17.9 ms in one)
    CHUNK = 16384

    def _residual_chunks(self, users: torch.Tensor, items: torch.Tensor,
                         ratings: torch.Tensor, scratch: dict):
        """For each chunk of the batch: (slice, p, q, e) with the gathered factor rows p, q
        [m, d] and the residual e [m, 1]. ``scratch`` (kept by the caller between batches)
        holds the work tensors, so steps do not allocate (and page-fault) fresh memory; p
        and q are overwritten by the next chunk."""
        n = int(users.shape[0])
        P, Q = self.user_factors.weight.detach(), self.item_factors.weight.detach()
        shape = (min(max(n, 1), self.CHUNK), P.shape[1])
        key = (shape, P.dtype, P.device)
        if scratch.get("key") != key:
            scratch.clear()
            scratch.update(key=key, p=P.new_empty(shape), q=P.new_empty(shape),
                           t=P.new_empty(shape))
        BU, BI = self.user_bias.weight.detach(), self.item_bias.weight.detach()
        for s in range(0, n, self.CHUNK):
            sl = slice(s, min(n, s + self.CHUNK))
            u, i = users[sl], items[sl]
            m = int(u.shape[0])
            p, q = scratch["p"][:m], scratch["q"][:m]
            torch.index_select(P, 0, u, out=p)
            torch.index_select(Q, 0, i, out=q)
            e = torch.bmm(p.unsqueeze(1), q.unsqueeze(2)).view(m, 1)        # p.q, one pass
            e.add_(BU.index_select(0, u)).add_(BI.index_select(0, i))
            e.sub_((ratings[sl].to(e.dtype).unsqueeze(1) - self.global_mean) / self.scale)
            yield sl, p, q, e

    @torch.no_grad()
    def mse_backward(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                     reg: float, scratch: dict | None = None) -> torch.Tensor:
        """One batch of the explicit objective (above) without autograd; returns the
        (detached) MSE. The gradient is written into the ``.grad`` of the four embedding
        weights, dense (replacing what was there), ready for a dense optimiser's step. About
        3x faster than autograd on CPU."""
        scratch = {} if scratch is None else scratch
        n = max(1, int(users.shape[0]))
        c = 2.0 * float(reg) / n
        sides = ((self.user_factors.weight, self.user_bias.weight, users, self.user_reg),
                 (self.item_factors.weight, self.item_bias.weight, items, self.item_reg))
        for w, b, idx, factor in sides:
            # the L2 term summed over a batch is c * (uses of the row) * row: one pass over
            # each table plus a bincount (cheaper than adding c * row per sample, and than
            # index_add_ with alpha, which takes a slow path on CPU)
            # each row's uses times its L2 factor (1 without reg_power)
            uses = (torch.bincount(idx, minlength=w.shape[0]).to(w.dtype)
                    .mul_(factor.to(w.dtype)).mul_(c).unsqueeze(1) if c else None)
            for x in (w, b):
                if x.grad is None or x.grad.is_sparse:
                    x.grad = torch.empty_like(x)
                if c:
                    torch.mul(x.detach(), uses, out=x.grad)
                else:
                    x.grad.zero_()
        sq = self.user_factors.weight.new_zeros(())
        for sl, p, q, e in self._residual_chunks(users, items, ratings, scratch):
            sq += e.square().sum()
            g = e.mul_(2.0 / n)                                         # dMSE/de, [m, 1]
            t = scratch["t"][:g.shape[0]]
            for (w, b, idx, _), other in zip(sides, (q, p)):
                w.grad.index_add_(0, idx[sl], torch.mul(other, g, out=t))
                b.grad.index_add_(0, idx[sl], g)
        return sq / n

    @torch.no_grad()
    def mse_backward_rows(self, users: torch.Tensor, items: torch.Tensor,
                          ratings: torch.Tensor, reg: float, scratch: dict | None = None
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]]]:
        """The same objective and gradient as ``mse_backward``, returned row-compact for a
        row-wise (lazy) optimiser: ``(loss, [(weight, rows, grad_rows), ...])`` for the four
        tables, ``rows`` the distinct rows the batch used in ascending order. Costs scale with
        the batch, not with the tables (no pass over all users or items)."""
        scratch = {} if scratch is None else scratch
        n = max(1, int(users.shape[0]))
        c = 2.0 * float(reg) / n
        sides = []
        for w, b, idx, factor in (
                (self.user_factors.weight, self.user_bias.weight, users, self.user_reg),
                (self.item_factors.weight, self.item_bias.weight, items, self.item_reg)):
            rows, inv = distinct_rows(idx, w.shape[0], ascending=True)
            sides.append((w, b, rows, inv, w.new_zeros((rows.shape[0], w.shape[1])),
                          b.new_zeros((rows.shape[0], 1)), factor))
        sq = self.user_factors.weight.new_zeros(())
        for sl, p, q, e in self._residual_chunks(users, items, ratings, scratch):
            sq += e.square().sum()
            g = e.mul_(2.0 / n)
            t = scratch["t"][:g.shape[0]]
            for (w, b, rows, inv, gw, gb, _), other in zip(sides, (q, p)):
                gw.index_add_(0, inv[sl], torch.mul(other, g, out=t))
                gb.index_add_(0, inv[sl], g)
        out = []
        for w, b, rows, inv, gw, gb, factor in sides:
            if c:
                uses = torch.bincount(inv, minlength=rows.shape[0]).to(w.dtype)
                uses = uses.mul_(factor.index_select(0, rows).to(w.dtype)).mul_(c).unsqueeze(1)
                gw.addcmul_(w.detach().index_select(0, rows), uses)
                gb.addcmul_(b.detach().index_select(0, rows), uses)
            out += [(w, rows, gw), (b, rows, gb)]
        return sq / n, out

    def analytic_grad(self, users, items, ratings, reg, scratch, rows):
        """The explicit objective's loss and gradient: dense ``.grad`` (``rows=False``) or
        row-compact updates for ``optim.RowSparseAdam`` (``rows=True``)."""
        if rows:
            return self.mse_backward_rows(users, items, ratings, reg, scratch)
        return self.mse_backward(users, items, ratings, reg, scratch), None

    @torch.no_grad()
    def fused_epoch(self, users, items, ratings, seed, accumulators, lr, reg, threads,
                    scratch):
        """One epoch of ``--optimizer rowsgd`` (recpipe/kernels.py): per rating, an SGD step
        on the objective above (the same per-sample L2 on the four rows), each row with its
        AdaGrad step size. CPU only: the tables are packed for the kernel (a copy held for
        the epoch only) and written back."""
        from recpipe import kernels      # numba: imported by the runs that use it only
        sides = ((self.user_factors.weight, self.user_bias.weight),
                 (self.item_factors.weight, self.item_bias.weight))
        arrays = [(w.detach().numpy(), b.detach().numpy(), accumulators(w).numpy(),
                   accumulators(b).numpy()) for w, b in sides]
        if scratch.get("ratings") is not ratings:     # once per train part
            scratch.clear()                           # the previous part's copy first
            scratch.update(ratings=ratings, kernel=kernels.Ratings(
                users.numpy(), items.numpy(), ratings.to(torch.float32).numpy(),
                self._standardise))
        U, V = (kernels.pack(*a) for a in arrays)
        # the L2's row factors (all 1 without reg_power)
        sq = scratch["kernel"].epoch(seed, U, V, lr, reg, threads,
                                     (self.user_reg.numpy(), self.item_reg.numpy()))
        for packed, a in zip((U, V), arrays):
            kernels.unpack(packed, *a)
        return sq

    def _standardise(self, z: np.ndarray) -> None:
        """Ratings (float32, in place) to the kernel's units: the ``(r - mean) / scale`` of
        ``_residual_chunks``, elementwise, so the kernel's copy needs no temporary."""
        torch.from_numpy(z).sub_(self.global_mean).div_(self.scale)

    def fold_in(self, objective: Objective, reg: float, users: np.ndarray, items: np.ndarray,
                ratings: np.ndarray, n_users: int, steps: int = 300, lr: float = 0.05,
                seed: int = 0) -> tuple[Family, str]:
        """Explicit: per new user, the exact minimiser of the training objective over
        [p_u, b_u] with q_i, b_i fixed (ridge regression); implicit: the default fold-in.

        The model predicts r = mu + s * (b_u + b_i + p_u.q_i) (s: the train ratings' std) and
        stage 60 minimises, per sample, ((r - r_hat) / s)^2 + reg * (|p_u|^2 + b_u^2 + item
        rows). Kept to one user's terms, with z_i = (r_i - mu) / s - b_i and x_i = [q_i, 1],
        that is sum_i (z_i - x_i.theta)^2 + lam_u * |theta|^2 with lam_u = reg * n_u times the
        row factor of n_u ratings (class docstring), solved exactly (float64, all users at
        once): theta = (X'X + lam_u * I)^-1 X'z."""
        if not isinstance(objective, ExplicitMSE):
            return super().fold_in(objective, reg, users, items, ratings, n_users, steps, lr,
                                   seed)
        us, sums, rhs = self._user_normal_equations(users, items, ratings, n_users)
        d = rhs.shape[1]
        counts = torch.bincount(us, minlength=n_users).double()
        # the training L2 of a user with n ratings: reg * n * (n / n_mean) ** -reg_power
        factor = self.count_factor(counts, float(self.reg_mean_count[0]))
        lam = (reg * counts * factor).clamp_min(1e-8)   # the floor: one-rating users solvable
        eye = torch.eye(d, dtype=torch.float64, device=rhs.device)
        theta = torch.linalg.solve(sums + lam[:, None, None] * eye, rhs)
        rows = {"user_factors": theta[:, :-1].float(), "user_bias": theta[:, -1:].float()}
        per = (f"{reg:g} per rating" if not self.reg_power else
               f"{reg:g} x (ratings / {float(self.reg_mean_count[0]):.3g}) ** -{self.reg_power:g}"
               f" per rating")
        method = (f"biased MF fold-in: solved the new user's {d - 1} factors and bias in "
                  f"closed form (ridge regression with the item factors and biases fixed; L2 "
                  f"{per} as in training)")
        return self.with_user_rows(rows), method

    @torch.no_grad()
    def _user_normal_equations(self, users: np.ndarray, items: np.ndarray,
                               ratings: np.ndarray, n_users: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fold-in's least-squares terms for theta_u = [p_u, b_u] with the item side
        fixed: x_i = [q_i, 1] and z_i = (r_i - mu) / s - b_i give, per new user, X'X
        [n_users, d, d] and X'z [n_users, d] (float64, all users at once), beside the users
        as a tensor on the model's device."""
        dev = self.item_factors.weight.device
        it = torch.tensor(np.asarray(items, dtype=np.int64), device=dev)
        us = torch.tensor(np.asarray(users, dtype=np.int64), device=dev)
        x = torch.cat([self.item_factors.weight.double()[it],
                       torch.ones(len(it), 1, dtype=torch.float64, device=dev)], dim=1)
        r = torch.tensor(np.asarray(ratings, dtype=np.float64), device=dev)
        bi = self.item_bias.weight.double()[:, 0]
        z = (r - float(self.global_mean)) / float(self.scale) - bi[it]
        d = x.shape[1]
        sums = torch.zeros(n_users, d, d, dtype=torch.float64, device=dev)
        sums.index_add_(0, us, x.unsqueeze(2) * x.unsqueeze(1))
        rhs = torch.zeros(n_users, d, dtype=torch.float64, device=dev).index_add_(
            0, us, x * z[:, None])
        return us, sums, rhs


@register("bpmf")
class BayesianMF(BiasedMF):
    """mf's model with Bayesian inference (recpipe/bayes.py): a Gibbs chain over the factors,
    biases and every precision, no learning rate and no L2 weight to tune. The stored tables
    hold the posterior mean of the predictions (the average over the sweeps after burn-in) in
    factored form, rank ``KEEP * dim``, so scoring, the fallback and stage 70 are mf's."""

    default_task = "explicit"
    tasks = ("explicit",)
    fit_by = "closed_form"
    closed_form_input = "pairs"          # fit_closed_form gets the train ratings (a Part)
    analytic_tasks = ()
    fused_tasks = ()
    options = {"dim": "rank of each Gibbs sample (the stored posterior mean: 4x that)",
               "init_std": "std of the chain's starting factor rows",
               "epochs": "Gibbs sweeps, the first quarter burn-in (bpmf)"}

    def __init__(self, n_users: int, n_items: int, dim: int = 32, init_std: float = 0.1,
                 global_mean: float = 0.0, scale: float = 1.0, sparse: bool = False):
        from recpipe.bayes import KEEP
        super().__init__(n_users, n_items, KEEP * dim, 0.0, global_mean, scale, sparse)
        self.rank, self.init_std = int(dim), float(init_std)
        # the chain's noise precision (standardised units), averaged over the kept sweeps:
        # the fold-in's likelihood weight
        self.register_buffer("noise_precision", torch.tensor(1.0, dtype=torch.float64))

    @torch.no_grad()
    def fit_closed_form(self, train, hp: dict[str, Any]) -> None:
        """Run the chain on the train ratings ``train`` (users, items, ratings tensors)."""
        from recpipe.bayes import gibbs
        dev = self.user_factors.weight.device
        z = (train.ratings.to(dev).double() - float(self.global_mean)) / float(self.scale)
        out = gibbs(train.users.to(dev), train.items.to(dev), z, self.n_users, self.n_items,
                    self.rank, int(hp["epochs"]), int(hp.get("seed") or 0), self.init_std)
        self.user_factors.weight.copy_(out["user"])
        self.item_factors.weight.copy_(out["item"])
        self.user_bias.weight.copy_(out["user_bias"][:, None])
        self.item_bias.weight.copy_(out["item_bias"][:, None])
        self.noise_precision.fill_(out["alpha_mean"])

    @torch.no_grad()
    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=300, lr=0.05,
                seed=0):
        """Per new user, the posterior mean of [p_u, b_u] with the item side fixed, under an
        empirical-Bayes prior: the Gaussian of the trained users' rows (their mean and
        covariance), and the chain's noise precision alpha. With x_i = [q_i, 1] and z_i =
        (r_i - mu) / s - b_i: theta = (C^-1 + alpha X'X)^-1 (C^-1 m + alpha X'z), all users at
        once in float64; a user without ratings gets the mean row. ``reg`` is not used (the
        chain has none)."""
        known = self.known_user
        rows = torch.cat([self.user_factors.weight[known], self.user_bias.weight[known]],
                         1).double()
        d = rows.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=rows.device)
        m = rows.mean(0)
        cov = (rows - m).T @ (rows - m) / max(1, rows.shape[0] - 1)
        prior = torch.linalg.inv(cov + 1e-6 * (cov.diagonal().mean() + 1e-12) * eye)
        alpha = float(self.noise_precision)
        _, sums, rhs = self._user_normal_equations(users, items, ratings, n_users)
        theta = torch.linalg.solve(sums * alpha + prior, rhs * alpha + prior @ m)
        out = {"user_factors": theta[:, :-1].float(), "user_bias": theta[:, -1:].float()}
        method = (f"Bayesian MF fold-in: the posterior mean of the new user's {d - 1} factors "
                  f"and bias with the item side fixed, under the Gaussian of the trained "
                  f"users' rows as prior and the chain's noise precision {alpha:.3g}")
        return self.with_user_rows(out), method


@register("deepmf")
class DeepMF(_Base):
    """Deep MF (the Netflix tutorial): per side Embedding -> Linear -> ReLU, element-wise
    product, Linear output; plus optional user/item biases (on by default: they carry most of
    the signal in explicit ratings and make the tower's job easier)."""

    default_task = "explicit"
    options = {"dim": "embedding size", "hidden": "tower output size",
               "dropout": "dropout on the embeddings", "init_std": "std of the embeddings"}

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {**_common(hp, global_mean, scale, sparse), "emb_dim": int(hp["dim"]),
                "hidden": int(hp["hidden"]), "dropout": float(hp["dropout"])}

    def __init__(self, n_users: int, n_items: int, emb_dim: int = 128, hidden: int = 64,
                 init_std: float = 0.05, global_mean: float = 0.0, scale: float = 1.0,
                 use_bias: bool = True,
                 dropout: float = 0.0, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.table("user", "user_embedding", emb_dim, init_std, sparse)
        self.table("item", "item_embedding", emb_dim, init_std, sparse)
        self.tower_user = nn.Linear(emb_dim, hidden)
        self.tower_item = nn.Linear(emb_dim, hidden)
        self.drop = Dropout(dropout)
        self.output = nn.Linear(hidden, 1)
        self._add_bias(use_bias, sparse)
        nn.init.normal_(self.output.weight, 0.0, 0.1)
        nn.init.zeros_(self.output.bias)

    def _user_side(self, users: torch.Tensor) -> torch.Tensor:
        return self._side(self.user_embedding, users, self.tower_user)

    def _item_side(self, items: torch.Tensor) -> torch.Tensor:
        return self._side(self.item_embedding, items, self.tower_item)

    def _side(self, emb: nn.Embedding, idx: torch.Tensor, tower: nn.Linear) -> torch.Tensor:
        if self.drop.p > 0 and self.training:     # a dropout mask per sample, not per row
            return torch.relu(tower(self.drop(_look(emb, idx))))
        return look_side(emb, idx, lambda e: torch.relu(tower(e)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        hu = self._user_side(users) * self.output.weight[0]
        hi = self._item_side(items)
        return self._out(_pair_dot(hu, hi) + self.output.bias[0] + self._bias(users, items))

    def item_vectors(self) -> torch.Tensor:
        with torch.no_grad():
            return self._item_side(torch.arange(self.n_items, device=self.global_mean.device))


@register("gmf")
class GMF(_Base):
    """Generalized MF (He et al. 2017): h^T (p_u * q_i)."""

    default_task = "implicit"
    options = {"dim": "factors per side", "init_std": "std of the factors"}

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {**_common(hp, global_mean, scale, sparse), "dim": int(hp["dim"]),
                "use_bias": task == "explicit"}

    def __init__(self, n_users: int, n_items: int, dim: int = 16, init_std: float = 0.01,
                 global_mean: float = 0.0, scale: float = 1.0, use_bias: bool = False,
                 sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.table("user", "user_gmf", dim, init_std, sparse)
        self.table("item", "item_gmf", dim, init_std, sparse)
        self._add_bias(use_bias, sparse)
        self.predict = nn.Linear(dim, 1)
        nn.init.uniform_(self.predict.weight, 0.0, 1.0)   # positive start: p.q ranks sensibly
        nn.init.zeros_(self.predict.bias)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._out(_gmf(self.user_gmf, users, self.item_gmf, items,
                              self.predict.weight[0]) + self.predict.bias[0]
                         + self._bias(users, items))

    def item_vectors(self) -> torch.Tensor:
        return self.item_gmf.weight.detach()


class _Tower(nn.Module):
    """The NCF MLP on concat(p_u, q_i), with the first layer split per side so that the
    broadcast case computes each side once ([U,1,h] + [1,N,h]).

    Initialised as the NCF reference code (Keras Dense defaults): Glorot-uniform weights and
    zero biases. torch's default biases (uniform +-1/sqrt(fan_in)) dwarf the 0.01-scale
    embeddings, so each unit's sign is fixed by its bias for every input; a tower could
    start (or fall within a few steps) with a whole layer dead and a constant output, which
    early stopping then keeps (seen on ML-100K: all 8 units of the last layer dead)."""

    def __init__(self, emb_dim: int, layers: Sequence[int], dropout: float):
        super().__init__()
        if not layers:
            raise ValueError("MLP needs at least one hidden layer size")
        self.first_user = nn.Linear(emb_dim, layers[0])
        self.first_item = nn.Linear(emb_dim, layers[0], bias=False)
        rest = []
        for a, b in zip(layers[:-1], layers[1:]):
            rest += [Dropout(dropout), nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.rest = nn.Sequential(*rest)
        self.out_dim = layers[-1]
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, pu: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
        return self.rest((self.first_user(pu) + self.first_item(qi)).relu_())

    def forward_looked(self, user_emb: nn.Embedding, users: torch.Tensor,
                       item_emb: nn.Embedding, items: torch.Tensor) -> torch.Tensor:
        """``forward`` on the rows ``users`` and ``items`` of the two tables, with each
        side's first layer applied once per distinct row in row-compact training
        (``family.look_side``)."""
        return self.rest(tower_input(user_emb, users, self.first_user, item_emb, items,
                                     self.first_item))

    def forward_items(self, pu: torch.Tensor, items: torch.Tensor, table: torch.Tensor
                      ) -> torch.Tensor:
        """Like forward(pu, table[items]) but projects the item table once and gathers the
        projections: cheaper when many candidates repeat the same items (evaluation)."""
        proj = self.first_item(table)                       # [n_items, h]
        h = nn.functional.embedding(items, proj)
        h.add_(self.first_user(pu)).relu_()                # in place: no extra [U, C, h] copies
        return self.rest(h)


@register("mlp")
class MLP(_Base):
    """NCF MLP: a ReLU tower on concat(p_u, q_i). ``layers`` are the hidden sizes; the
    embeddings are layers[0] // 2 wide (the paper's convention)."""

    default_task = "implicit"
    per_pair_scoring = True
    options = {"layers": "tower sizes, the first = 2 x the embedding size",
               "dropout": "dropout between tower layers", "init_std": "std of the embeddings"}

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {**_common(hp, global_mean, scale, sparse),
                "layers": [int(x) for x in hp["layers"]], "dropout": float(hp["dropout"]),
                "use_bias": task == "explicit"}

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int] = (64, 32, 16, 8),
                 init_std: float = 0.01, dropout: float = 0.0, global_mean: float = 0.0,
                 scale: float = 1.0, use_bias: bool = False, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        layers = [int(x) for x in layers]
        emb_dim = max(1, layers[0] // 2)
        self.table("user", "user_mlp", emb_dim, init_std, sparse)
        self.table("item", "item_mlp", emb_dim, init_std, sparse)
        self._add_bias(use_bias, sparse)
        self.tower = _Tower(emb_dim, layers, dropout)
        self.predict = nn.Linear(layers[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._out(self.predict(self._mlp(users, items)).squeeze(-1)
                         + self._bias(users, items))

    def _mlp(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if not self.training and items.numel() > 4 * self.n_items:
            return self.tower.forward_items(_look(self.user_mlp, users), items,
                                            self.item_mlp.weight)
        return self.tower.forward_looked(self.user_mlp, users, self.item_mlp, items)

    def item_vectors(self) -> torch.Tensor:
        return self.item_mlp.weight.detach()


@register("neumf")
class NeuMF(_Base):
    """NeuMF: GMF and MLP branches with separate embeddings, concatenated into one output
    layer. ``load_pretrained(gmf, mlp, alpha)`` is the paper's pretraining initialisation."""

    default_task = "implicit"
    per_pair_scoring = True
    options = {"dim": "GMF branch size", "layers": "MLP branch tower sizes (first = 2 x its "
               "embedding size)", "dropout": "dropout between tower layers",
               "init_std": "std of the embeddings",
               "pretrained": "initialise from the trained gmf and mlp models"}
    pretrain_from = ("gmf", "mlp")

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {**_common(hp, global_mean, scale, sparse), "gmf_dim": int(hp["dim"]),
                "layers": [int(x) for x in hp["layers"]], "dropout": float(hp["dropout"]),
                "use_bias": task == "explicit"}

    def init_from(self, parts: dict[str, nn.Module], alpha: float) -> None:
        self.load_pretrained(parts["gmf"], parts["mlp"], alpha)

    def __init__(self, n_users: int, n_items: int, gmf_dim: int = 16,
                 layers: Sequence[int] = (64, 32, 16, 8), init_std: float = 0.01,
                 dropout: float = 0.0, global_mean: float = 0.0, scale: float = 1.0,
                 use_bias: bool = False, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        layers = [int(x) for x in layers]
        emb_dim = max(1, layers[0] // 2)
        self.table("user", "user_gmf", gmf_dim, init_std, sparse)
        self.table("item", "item_gmf", gmf_dim, init_std, sparse)
        self.table("user", "user_mlp", emb_dim, init_std, sparse)
        self.table("item", "item_mlp", emb_dim, init_std, sparse)
        self._add_bias(use_bias, sparse)
        self.tower = _Tower(emb_dim, layers, dropout)
        self.gmf_dim = int(gmf_dim)
        self.predict = nn.Linear(gmf_dim + layers[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        w = self.predict.weight[0]
        g = _gmf(self.user_gmf, users, self.item_gmf, items, w[: self.gmf_dim])
        if not self.training and items.numel() > 4 * self.n_items:
            h = self.tower.forward_items(_look(self.user_mlp, users), items,
                                         self.item_mlp.weight)
        else:
            h = self.tower.forward_looked(self.user_mlp, users, self.item_mlp, items)
        m = h @ w[self.gmf_dim:]
        return self._out(g + m + self.predict.bias[0] + self._bias(users, items))

    @torch.no_grad()
    def load_pretrained(self, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> None:
        """Initialise from trained GMF and MLP models (He et al. 2017, section 3.4.1)."""
        if gmf.user_gmf.weight.shape != self.user_gmf.weight.shape:
            raise ValueError(f"GMF embedding shape {tuple(gmf.user_gmf.weight.shape)} does not "
                             f"match NeuMF's {tuple(self.user_gmf.weight.shape)}")
        if mlp.user_mlp.weight.shape != self.user_mlp.weight.shape:
            raise ValueError(f"MLP embedding shape {tuple(mlp.user_mlp.weight.shape)} does not "
                             f"match NeuMF's {tuple(self.user_mlp.weight.shape)}")
        for name in ("user_gmf", "item_gmf"):
            getattr(self, name).weight.copy_(getattr(gmf, name).weight)
        for name in ("user_mlp", "item_mlp"):
            getattr(self, name).weight.copy_(getattr(mlp, name).weight)
        self.tower.load_state_dict(mlp.tower.state_dict())
        self.predict.weight.copy_(torch.cat([alpha * gmf.predict.weight,
                                             (1 - alpha) * mlp.predict.weight], dim=1))
        self.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)
        if self.use_bias and gmf.use_bias and mlp.use_bias:
            for name in ("user_bias", "item_bias"):
                getattr(self, name).weight.copy_(alpha * getattr(gmf, name).weight
                                                 + (1 - alpha) * getattr(mlp, name).weight)

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([self.item_gmf.weight, self.item_mlp.weight], dim=1).detach()


MODELS: dict[str, type[Family]] = REGISTRY     # name -> family, filled by @register


def build_model(name: str, n_users: int, n_items: int, **model_args) -> Family:
    """The model called ``name`` (a registered family) with its constructor arguments."""
    return family(name)(n_users, n_items, **model_args)


import recpipe.ease  # noqa: E402,F401 - registers --model ease (EASE, closed form)
import recpipe.knn  # noqa: E402,F401 - registers --model knn (item kNN, closed form)
import recpipe.autoencoders  # noqa: E402,F401 - registers --model autorec and multvae
import recpipe.blend  # noqa: E402,F401 - registers --model blend (a stack of trained models)
