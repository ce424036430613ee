"""Autoencoder families over stage 40's interaction rows: ``--model autorec`` (explicit) and
``--model multvae`` (implicit).

Both are trained by epochs over ROWS, not (user, item) pairs: stage 60's ``train_epoch``
sees ``batches = "rows"`` and iterates a seeded permutation
of the rows those give, ``batch_size`` rows per step (``recpipe/train.py``). The rows stay
on the device as a CSR (``DeviceCSR``: row pointers, columns, values as tensors); a batch is
densified there by one scatter, so a step costs batch x n_cols floats, never the table.

**I-AutoRec** (Sedhain et al. 2015, "AutoRec: Autoencoders Meet Collaborative Filtering"):
each ITEM's vector of train ratings over the users (the train matrix transposed, in the
standardised units (r - mean) / std, 0 where unobserved) -> sigmoid hidden layer (``dim``
units) -> identity output over the users; the loss is the squared error on the OBSERVED
entries only (``masked_mse``), plus ``reg`` / 2 * (||V||^2 + ||W||^2) / N (the paper's lambda,
the objective divided by N, the number of train ratings). The prediction for (u, i) is the
reconstruction of item i's vector at user u: W[u] . code(i) + b[u]. The item codes
code(i) = sigmoid(V r(i) + mu) are recomputed from the train ratings after every epoch and
kept as a buffer (``codes``), so scoring (stage 60's evaluation, stage 70) needs no ratings:
it is the "pairs" path, a dot product of a user's output row with the item's code.

Fold-in of a new user in an item-based model: the item vectors the encoder reads are over
the TRAINING users, and do not contain the new user, so their ratings cannot enter the
codes without retraining. What can be fitted is the new user's own output row (W[u], b[u]):
the codes stay as trained and the default fold-in (``Family.fold_in``: Adam on a fresh user
row, everything else frozen) fits it on the given ratings, i.e. a ridge regression of the
given ratings on the items' codes. It is weaker than for a training user (whose ratings are
in the codes), and stage 70 says so.

**Mult-VAE** (Liang et al. 2018, "Variational Autoencoders for Collaborative Filtering"):
a USER's binary train row -> L2 normalisation -> dropout -> encoder (n_items -> ``hidden``
(600) tanh -> 2 x ``dim`` (200): mean and log-variance) -> a sample z (the mean when not
training) -> decoder (``dim`` -> ``hidden`` tanh -> n_items logits); the loss is the
multinomial log-likelihood of the row (log_softmax over the items) plus beta * KL, beta
annealed linearly from 0 to ``beta_max`` = 0.2 over ``anneal_steps`` optimiser steps (a
buffer, so ``--resume`` continues the schedule), plus ``reg`` * sum of the squared weights.
Scores of every item for a user are the decoder's logits from their train row (``input =
"rows"``, like EASE: ``score_all(users, history)``). A new user needs no fold-in: their given
items are their row.
"""
from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .dataset import pair_keys
from .family import Family, look, register


class DeviceCSR:
    """A sparse matrix kept on the device as CSR tensors; ``rows(idx)`` densifies rows."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                 n_rows: int, n_cols: int):
        order = torch.argsort(pair_keys(rows, cols, n_cols))  # int64 keys (int32 parts)
        self.cols = cols[order]
        self.vals = vals[order].float()
        counts = torch.bincount(rows, minlength=n_rows)
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        self.crow[1:] = torch.cumsum(counts, 0)
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.nnz = int(rows.shape[0])

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, n_cols] float32, observed [B, n_cols] bool) of rows ``idx`` [B]."""
        start = self.crow[idx]
        lens = self.crow[idx + 1] - start
        b = idx.shape[0]
        r = torch.repeat_interleave(torch.arange(b, device=idx.device), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = start[r] + torch.arange(r.shape[0], device=idx.device) - first[r]
        c = self.cols[pos]
        dense = torch.zeros(b, self.n_cols, device=idx.device)
        dense[r, c] = self.vals[pos]
        mask = torch.zeros(b, self.n_cols, dtype=torch.bool, device=idx.device)
        mask[r, c] = True
        return dense, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, observed: torch.Tensor
               ) -> torch.Tensor:
    """Mean squared error over the ``observed`` entries only (unobserved ones contribute
    neither to the loss nor to its gradient, whatever their values)."""
    diff = torch.where(observed, pred.float() - target.float(),
                       torch.zeros((), device=pred.device))
    return diff.square().sum() / observed.sum().clamp_min(1)


@register("autorec")
class AutoRec(Family):
    """I-AutoRec (see the module docstring): item rating vectors over users -> sigmoid
    hidden -> identity output; predictions W[u] . code(i) + b[u]."""

    default_task = "explicit"
    tasks = ("explicit",)
    input = "pairs"
    batches = "rows"
    options = {"dim": "hidden units of the item autoencoder (the paper: 500)",
               "init_std": "std of the weights' initialisation"}

    def __init__(self, n_users: int, n_items: int, global_mean: float = 0.0,
                 scale: float = 1.0, dim: int = 500, init_std: float = 0.03,
                 sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.dim = int(dim)
        self.encoder = nn.Linear(self.n_users, self.dim)        # V, mu
        nn.init.normal_(self.encoder.weight, 0.0, init_std)
        nn.init.zeros_(self.encoder.bias)
        # the output layer's rows are per user: user tables (the fold-in fits a new one)
        self.table("user", "out_w", self.dim, init_std, False)   # W
        self.table("user", "out_b", 1, None, False)              # b
        self.register_buffer("codes", torch.zeros(self.n_items, self.dim))
        self.register_buffer("n_obs", torch.tensor(1.0))        # N of the L2 term

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        # the output rows get dense gradients from the row batches: sparse tables unused
        return {"global_mean": global_mean, "scale": scale, "dim": int(hp.get("dim") or 500),
                "init_std": float(hp.get("init_std") or 0.03)}

    # -- training over item rows (recpipe/train.py) --------------------------------------
    def row_data(self, data) -> DeviceCSR:
        """Items x users, the standardised train ratings."""
        tr = data.train
        self.n_obs.fill_(float(max(1, len(tr))))
        x = (tr.ratings.float() - self.global_mean) / self.scale
        return DeviceCSR(tr.items, tr.users, x, self.n_items, self.n_users)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.encoder(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_users] reconstruction (standardised units) of item vectors ``x``."""
        return self.encode(x) @ self.out_w.weight.T + self.out_b.weight[:, 0]

    def row_loss(self, idx: torch.Tensor, rows: DeviceCSR, reg: float) -> torch.Tensor:
        x, observed = rows.rows(idx)
        loss = masked_mse(self.reconstruct(x), x, observed)
        if reg > 0:
            l2 = self.encoder.weight.square().sum() + self.out_w.weight.square().sum()
            # the paper's sum objective with lambda / 2 * ||.||^2, divided by N
            loss = loss + 0.5 * reg * l2 / self.n_obs
        return loss

    @torch.no_grad()
    def rows_done(self, rows: DeviceCSR) -> None:
        """Recompute every item's code from the train ratings (after each epoch), in blocks
        of about 2^26 dense floats (256 MB)."""
        block = max(1, min(self.n_items, (1 << 26) // max(1, rows.n_cols)))
        for a in range(0, self.n_items, block):
            idx = torch.arange(a, min(self.n_items, a + block), device=self.codes.device)
            self.codes[a:a + block] = self.encode(rows.rows(idx)[0])

    # -- scoring -----------------------------------------------------------------------
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        w = look(self.out_w, users)
        b = look(self.out_b, users)[..., 0]
        return self._out((w * self.codes[items]).sum(-1) + b)

    def score_all(self, users, history=None):
        return self._out(self.out_w.weight[users] @ self.codes.T
                         + self.out_b.weight[users, 0][:, None])

    def item_vectors(self) -> torch.Tensor:
        return self.codes.detach()

    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=300, lr=0.05,
                seed=0):
        # the training L2 on W is reg / 2 / N per user row summed over N ratings: per given
        # rating of a user with n of them, reg / (2 n) on their row
        n = max(1, int(np.bincount(np.asarray(users, dtype=np.int64)).max()))
        folded, how = super().fold_in(objective, reg / (2 * n), users, items, ratings,
                                      n_users, steps, lr, seed)
        return folded, ("I-AutoRec is item-based: its item vectors hold the training users' "
                        "ratings, not the new user's, so the item codes stay as trained and "
                        "only the user's output row is fitted (weaker than for a training "
                        "user). " + how)


@register("multvae")
class MultVAE(Family):
    """Mult-VAE (see the module docstring): binary user row -> encoder -> z -> decoder
    logits over items; multinomial likelihood + annealed KL."""

    default_task = "implicit"
    tasks = ("implicit",)
    input = "rows"
    batches = "rows"
    score_label = "score = Mult-VAE's decoder logit for the item from the user's train items"
    options = {"dim": "latent size of Mult-VAE (the paper: 200)",
               "hidden": "encoder/decoder hidden layer of Mult-VAE (the paper: 600)",
               "dropout": "input dropout on the user's row (the paper: 0.5)"}
    beta_max: ClassVar[float] = 0.2
    anneal_steps: ClassVar[int] = 2000     # optimiser steps until beta = beta_max

    def __init__(self, n_users: int, n_items: int, global_mean: float = 0.0,
                 scale: float = 1.0, dim: int = 200, hidden: int = 600,
                 dropout: float = 0.5, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.dim, self.hidden, self.dropout = int(dim), int(hidden), float(dropout)
        self.enc1 = nn.Linear(self.n_items, self.hidden)
        self.enc2 = nn.Linear(self.hidden, 2 * self.dim)
        self.dec1 = nn.Linear(self.dim, self.hidden)
        self.dec2 = nn.Linear(self.hidden, self.n_items)
        for m in (self.enc1, self.enc2, self.dec1, self.dec2):     # the paper's init
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, 0.0, 0.001)
        self.register_buffer("kl_step", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        return {"dim": int(hp.get("dim") or 200), "hidden": int(hp.get("hidden") or 600),
                "dropout": float(0.5 if hp.get("dropout") is None else hp["dropout"])}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.normalize(x, dim=1)
        x = F.dropout(x, self.dropout, training=self.training)
        h = self.enc2(torch.tanh(self.enc1(x)))
        return h[:, :self.dim], h[:, self.dim:]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec2(torch.tanh(self.dec1(z)))

    def beta(self) -> float:
        return self.beta_max * min(1.0, float(self.kl_step) / max(1, self.anneal_steps))

    # -- training over user rows (recpipe/train.py) --------------------------------------
    def row_data(self, data) -> DeviceCSR:
        """Users x items, the binary train interactions."""
        tr = data.train
        return DeviceCSR(tr.users, tr.items, torch.ones_like(tr.ratings, dtype=torch.float32),
                         self.n_users, self.n_items)

    def row_loss(self, idx: torch.Tensor, rows: DeviceCSR, reg: float) -> torch.Tensor:
        x, _ = rows.rows(idx)
        x = (x > 0).float()
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        nll = -(F.log_softmax(self.decode(z), dim=1) * x).sum(1).mean()
        kl = 0.5 * (logvar.exp() + mu.square() - 1 - logvar).sum(1).mean()
        loss = nll + self.beta() * kl
        if self.training:
            self.kl_step += 1
        if reg > 0:
            loss = loss + reg * sum(m.weight.square().sum()
                                    for m in (self.enc1, self.enc2, self.dec1, self.dec2))
        return loss

    # -- scoring -----------------------------------------------------------------------
    def score_all(self, users, history=None):
        if history is None:
            raise ValueError("Mult-VAE scores from the users' interaction rows: pass history")
        mu, _ = self.encode((history > 0).float())
        return self.decode(mu)

    def score_pairs(self, users, items, history=None):
        return self.score_all(users, history).gather(1, items[:, None])[:, 0]

    def score_candidates(self, users, items, history=None):
        return self.score_all(users, history).gather(1, items)

    def item_vectors(self) -> torch.Tensor:
        return self.dec2.weight.detach()

    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=0, lr=0.0,
                seed=0):
        folded = copy.copy(self)                     # shares every module
        folded._buffers = dict(self._buffers)
        dev = self.known_user.device
        folded._buffers["known_user"] = torch.ones(n_users, dtype=torch.bool, device=dev)
        folded._buffers["base_user"] = torch.zeros(n_users, device=dev)
        folded.n_users = int(n_users)
        folded.eval()
        return folded, ("Mult-VAE needs no fold-in: a user's scores are the decoder's logits "
                        "from their encoded items (the given items, ratings' values unused)")
