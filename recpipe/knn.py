"""Item-based k nearest neighbours on baseline residuals (Koren 2008, "Factorization meets the
neighborhood", section 2.2; Surprise's ``KNNBaseline`` with ``pearson_baseline``):
``--model knn``, explicit ratings.

    r(u, i) = mu + b_u + b_i + sum_j s_ij (r_uj - mu - b_u - b_j) / sum_j s_ij

over the ``k`` items j that user u rated (in the data the model was fitted on) with the
largest positive similarity s_ij to i; without such a neighbour the prediction is the
baseline mu + b_u + b_i. The baseline is the regularised one every family without bias
tables stores for its fallback (``family.regularised_baseline``: Surprise's ALS baseline),
so an unseen user or item falls back to the same formula without its neighbour term.

The similarity is the Pearson correlation of the two items' residuals z_uj = r_uj - mu - b_u
- b_j over the users who rated both, shrunk toward 0 by their number n_ij:

    s_ij = (n_ij - 1) / (n_ij - 1 + lambda) * sum_u z_ui z_uj / sqrt(sum_u z_ui^2 sum_u z_uj^2)

(sums over the co-raters; s_ij = 0 below two of them, and negative values are kept at 0,
since the formula never uses them). ``--reg`` is lambda, ``inf`` its limit (s_ij
proportional to the correlation times n_ij - 1; on ML-100K and ml-latest-small it scores
within 3e-5 of 6400, which they choose); unset, stage 60 chooses it on validation from
``reg_grid``, the correlations computed once for the whole grid (``closed_form_solver``).
``--dim`` is k.

Numerics and memory: the four co-rater sums are sparse products of the train ratings (scipy,
float32, a block of item columns at a time, densified into float32 blocks), their cost the sum
over users of (ratings per user)^2. The products read the model's own float32 residuals and
their transpose (8 bytes a rating each, with the index), the squares and the ones 4 bytes a
rating each; float64 products gave the same validation RMSE to the last digit on ML-100K and
ml-latest-small and the same similarities to 6 digits at 10M ratings (the similarities are
stored in bfloat16, 3 digits). The model holds S as a dense n_items x n_items bfloat16
matrix (3 significant digits and float32's range, since a large lambda makes every s_ij
small; Netflix's 17,770 items: 0.63 GB, ml-latest-small's 9,724: 0.19 GB; the fit also
holds two float32 matrices of that shape) and the residuals of the ratings it was fitted
on, a CSR by user (12 bytes a rating); the fit refuses with one line when that does not fit
in memory. Scoring reads, for each pair asked, the entries of S between its item and the
items its user rated, and keeps the k largest (ties to the lower item id; on the CPU a
compiled pass with a bounded heap per pair, ``kernels.knn_terms``; elsewhere vectorised
blocks of pairs, ``_neighbour_terms``): the cost is the sum over the pairs of their user's
ratings.
A new user (stage 70 ``--ratings``) needs no training: their bias is the regularised mean of
their residuals against the item biases, and their ratings become their neighbours.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .ease import check_memory
from .family import BASELINE_REG_U, Family, register

_BLOCK_FLOATS = 1 << 24           # float32 entries of one dense block (fit and scoring)


def correlations(z: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, n): the co-rater Pearson correlation of the item columns of the residuals
    ``z`` and their co-rater counts, dense [n_items, n_items] float32, a block of columns at a
    time (module docstring); the diagonal and pairs with fewer than two co-raters are 0."""
    n_items = z.shape[1]
    zt = z.T.tocsr()
    # the ones and the squares share the index arrays of z and of its transpose, and one
    # array of ones serves both sides (the same products as separate copies: 24 bytes a
    # rating less, 1.9 GB at 81M train ratings)
    one = np.ones(z.nnz, dtype=z.dtype)
    ones = sp.csr_matrix((one, z.indices, z.indptr), shape=z.shape)
    sq = sp.csr_matrix((np.square(z.data), z.indices, z.indptr), shape=z.shape)
    ot = sp.csr_matrix((one, zt.indices, zt.indptr), shape=zt.shape)
    st = sp.csr_matrix((np.square(zt.data), zt.indices, zt.indptr), shape=zt.shape)
    rho = torch.empty((n_items, n_items), dtype=torch.float32)
    cnt = torch.empty((n_items, n_items), dtype=torch.float32)
    step = max(1, _BLOCK_FLOATS // max(1, n_items))
    for a in range(0, n_items, step):
        b = min(n_items, a + step)
        num = (zt[a:b] @ z).toarray()
        n = (ot[a:b] @ ones).toarray()
        si = (st[a:b] @ ones).toarray()           # sum of z_ui^2 over the co-raters of i, j
        sj = (ot[a:b] @ sq).toarray()             # sum of z_uj^2 over the same users
        den = np.sqrt(si * sj)
        r = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        r[n < 2] = 0.0
        r[np.arange(b - a), np.arange(a, b)] = 0.0
        rho[a:b] = torch.from_numpy(r)
        cnt[a:b] = torch.from_numpy(n)
    return rho, cnt


@register("knn")
class ItemKNN(Family):
    """Item-based kNN on baseline residuals (module docstring); no trained tables."""

    default_task = "explicit"
    tasks = ("explicit",)
    fit_by = "closed_form"
    closed_form_input = "pairs"          # fit_closed_form gets the train ratings (a Part)
    has_item_vectors = False
    score_label = ("score = baseline + the similarity-weighted mean of the user's residuals "
                   "on the k most similar items they rated")
    options = {"dim": "k: the most similar rated items each prediction averages over",
               "reg": "shrinkage lambda of the similarities, (n - 1) / (n - 1 + lambda) for "
                      "n co-raters, inf its limit (weights proportional to the correlation "
                      "times n - 1); unset: chosen on validation from ItemKNN.reg_grid"}
    reg_grid: ClassVar[tuple[float, ...]] = (25.0, 100.0, 400.0, 1600.0, 6400.0, math.inf)

    def __init__(self, n_users: int, n_items: int, dim: int = 40, global_mean: float = 0.0,
                 scale: float = 1.0, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        self.k = int(dim)
        check_memory(self.n_items, torch.device("cpu"), matrices=0.5, headroom=0, who="knn")
        self.register_buffer("sim", torch.zeros(self.n_items, self.n_items,
                                                dtype=torch.bfloat16))
        self.register_buffer("lam", torch.tensor(0.0))          # the fitted lambda
        # the residuals of the ratings the model was fitted on, a CSR by user
        self.register_buffer("indptr", torch.zeros(self.n_users + 1, dtype=torch.int64))
        self.register_buffer("rated", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("resid", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("rated", "resid"):              # their length is the data's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, hp: dict[str, Any], task: str, global_mean: float, scale: float,
                    sparse: bool) -> dict[str, Any]:
        return {"dim": int(hp.get("dim") or 40), "global_mean": global_mean, "scale": scale}

    # -- fitting -------------------------------------------------------------------------
    def _store_residuals(self, users: np.ndarray, items: np.ndarray, z: np.ndarray
                         ) -> sp.csr_matrix:
        """Keeps the residuals ``z`` of the pairs (users, items) as the model's CSR by user
        (float32) and returns them as a float32 scipy CSR on the same arrays (on the CPU; no
        copy of the ratings beside the model's)."""
        dev = self.sim.device
        order = np.lexsort((items, users))
        counts = np.bincount(users, minlength=self.n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        rated = items[order].astype(np.int32 if len(order) < 2**31 else np.int64)
        zs = z[order].astype(np.float32, copy=False)
        del order
        self.indptr = torch.from_numpy(indptr).to(dev)
        self.rated = torch.from_numpy(rated).to(dev)
        self.resid = torch.from_numpy(zs).to(dev)
        return sp.csr_matrix((zs, rated, indptr.astype(rated.dtype)),
                             shape=(len(counts), self.n_items))

    def _residuals(self, train) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = train.users.cpu().numpy()
        i = train.items.cpu().numpy()
        bu, bi = self.base_user.cpu().numpy(), self.base_item.cpu().numpy()
        z = train.ratings.cpu().numpy().astype(np.float64) - float(self.global_mean) \
            - bu[u] - bi[i]
        return u, i, z

    @contextlib.contextmanager
    def closed_form_solver(self, train) -> Iterator[Callable[[dict[str, Any]], None]]:
        """Within the block: ``fit(hp)`` sets the similarities for lambda = hp["reg"], all
        fits sharing one set of correlations (computed on entry, freed on exit). The
        baseline is the one ``learn_fallback`` stored from the same ratings."""
        # the correlations and counts (float32) beside the bfloat16 similarities
        check_memory(self.n_items, torch.device("cpu"), matrices=2.5, held=0.5, who="knn")
        rho, cnt = correlations(self._store_residuals(*self._residuals(train)))
        cnt.sub_(1.0).clamp_(min=0.0)

        @torch.no_grad()
        def fit(hp: dict[str, Any]) -> None:
            lam = hp.get("reg")
            if lam is None or not float(lam) >= 0:
                raise ValueError("knn needs hp['reg'] >= 0 (the shrinkage lambda)")
            lam = float(lam)
            step = max(1, _BLOCK_FLOATS // self.n_items)
            for a in range(0, self.n_items, step):
                c = cnt[a:a + step]
                # lambda = inf: the limit up to a constant factor, which the weighted mean
                # cancels: s_ij proportional to rho_ij (n_ij - 1)
                s = rho[a:a + step] * (c if math.isinf(lam) else c / (c + lam).clamp_min(1e-12))
                self.sim[a:a + step] = s.clamp_min_(0.0).to(self.sim.device, torch.bfloat16)
            self.lam.fill_(lam)

        try:
            yield fit
        finally:
            del rho, cnt

    def fit_closed_form(self, train, hp: dict[str, Any]) -> None:
        with self.closed_form_solver(train) as fit:
            fit(hp)

    # -- scoring -------------------------------------------------------------------------
    def _neighbour_terms(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The neighbour term of each pair (users[p], items[p]), 1-d: 0 without a positive
        neighbour. Of equal weights (bfloat16 similarities tie often) the lower item ids are
        kept (a user's rated items are in id order). On the CPU one compiled pass per pair
        (``kernels.knn_terms``); elsewhere blocks of pairs of similar history length (sorted
        by the user's ratings, longest first): a block gathers, for each pair, s(item, j)
        and z_uj over the j its user rated, padded with zeros to the block's longest history
        (a zero weight adds nothing to either sum), and keeps the k largest weights per row
        by a top-k on (weight bits, -position), which has no ties."""
        from . import kernels              # numba: imported by the runs that score
        if users.device.type == "cpu" and kernels.available():
            return torch.from_numpy(kernels.knn_terms(
                users.numpy(), items.numpy(), self.indptr.numpy(), self.rated.numpy(),
                self.resid.numpy(), self.sim.view(torch.int16).numpy().view(np.uint16),
                self.k, torch.get_num_threads()))
        start = self.indptr[users]
        length = self.indptr[users + 1] - start
        out = torch.zeros(users.shape[0], device=users.device)
        order = torch.argsort(length, descending=True, stable=True)
        order = order[length[order] > 0]
        lengths = length[order].tolist()
        last = max(0, self.rated.shape[0] - 1)
        bits_of = self.sim.view(-1).view(torch.int16)       # w >= 0: the sign bit is 0
        s = 0
        while s < len(lengths):
            e = min(len(lengths), s + max(1, _BLOCK_FLOATS // lengths[s]))
            sel = order[s:e]
            n = lengths[s]
            at = torch.arange(n, device=users.device)
            pos = start[sel, None] + at
            valid = pos < (start[sel] + length[sel])[:, None]
            pos.clamp_(max=last)
            cell = items[sel, None] * self.n_items + self.rated[pos]
            bits = bits_of[cell.view(-1)].view(cell.shape).to(torch.int64).mul_(valid)
            z = self.resid[pos].mul_(valid)
            if self.k < n:
                idx = torch.topk((bits << 32) - at, self.k, dim=1).indices
                bits, z = bits.gather(1, idx), z.gather(1, idx)
            w = (bits.to(torch.int32) << 16).view(torch.float32)    # bfloat16 -> float32
            den = w.sum(1)
            out[sel] = torch.where(den > 0, (w * z).sum(1) / den.clamp_min(1e-12),
                                   torch.zeros_like(den))
            s = e
        return out

    @torch.no_grad()
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        users, items = torch.broadcast_tensors(users, items)
        shape = users.shape
        users, items = users.reshape(-1), items.reshape(-1)
        out = self.global_mean + self.base_user[users] + self.base_item[items]
        return (out + self._neighbour_terms(users, items)).view(shape)

    # -- new users -----------------------------------------------------------------------
    @torch.no_grad()
    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=0, lr=0.0,
                seed=0):
        """New users 0..n_users-1: their bias b_u = sum(r - mu - b_i) / (BASELINE_REG_U + n)
        with the item biases fixed (the baseline's own user step), their residuals their
        neighbours; ``reg``, ``steps`` and ``lr`` are not used (nothing is optimised)."""
        dev = self.sim.device
        u = np.asarray(users, dtype=np.int64)
        i = np.asarray(items, dtype=np.int64)
        r = np.asarray(ratings, dtype=np.float64)
        bi = self.base_item.cpu().numpy().astype(np.float64)
        dev_r = r - float(self.global_mean) - bi[i]
        bu = np.bincount(u, dev_r, n_users) / (BASELINE_REG_U + np.bincount(u, minlength=n_users))
        folded = self.with_user_rows({}, n_users)
        folded._buffers["base_user"] = torch.from_numpy(bu.astype(np.float32)).to(dev)
        folded._store_residuals(u, i, dev_r - bu[u])
        return folded, (f"item kNN fold-in: the new user's bias from their {len(r)} ratings "
                        f"against the item biases (weight {BASELINE_REG_U:g}), and those "
                        f"ratings as the neighbours (k {self.k}, lambda {float(self.lam):g}); "
                        f"nothing was optimised")
