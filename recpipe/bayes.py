"""Bayesian biased MF by Gibbs sampling (``--model bpmf``): BPMF (Salakhutdinov & Mnih 2008,
"Bayesian Probabilistic Matrix Factorization using MCMC") with user and item biases.

The model is mf's, in the same standardised units (z = (r - mean) / std of the train ratings):

    z_ui ~ N(b_u + c_i + p_u . q_i, 1 / alpha)
    p_u ~ N(mu_U, Lambda_U^-1),  q_i ~ N(mu_V, Lambda_V^-1)   (Normal-Wishart hyperpriors:
                                 mu_0 = 0, beta_0 = 2, W_0 = I, nu_0 = rank)
    b_u ~ N(0, 1 / lambda_b),  c_i ~ N(0, 1 / lambda_c)       (Gamma(1, 1) hyperpriors)
    alpha ~ Gamma(1, 1)

No learning rate and no regularisation weight: every precision is sampled from its posterior.
One sweep draws, in turn, the hyperparameters given the rows, the biases, every user row
given the item rows (its posterior is Gaussian: precision Lambda_U + alpha sum_i q_i q_i',
mean by a Cholesky solve), every item row given the user rows, and alpha. The prediction is
the posterior mean, the average of b_u + c_i + p_u . q_i over the sweeps after the burn-in
(the first quarter of ``--epochs`` sweeps): averaging is where the gain over a single fitted
MF comes from (docs/presets.md).

The average of S rank-k products is a matrix of rank up to S * k. It is kept in factored
form, A B' with A [n_users, R], B [n_items, R], R = ``KEEP * rank``, and re-compressed after
each sweep by an exact thin SVD of [A, P] [B, Q]' (two QR factorisations and the SVD of an
(R + k)-square matrix), truncated to rank R. The model stores A / sqrt(S) and B / sqrt(S)
as mf's factor tables (singular values split evenly), and the averaged biases as its bias
tables: scoring, the fallback for rows without training data, item vectors and stage 70 are
mf's. On ML-100K (k = 32, 200 sweeps) the average kept at rank 128 scored validation RMSE
0.8956 against 0.8954 at rank 900, nearly the full 943 (docs/presets.md).

Cost per sweep: nnz * k^2 multiply-adds for the two sides' precision matrices (a sparse
product with the other side's outer products, in blocks of at most ``BLOCK_BYTES``), plus a
k x k Cholesky factorisation per row; float64 throughout. On one CPU thread at the preset's
k = 16: 0.04 s a sweep on ML-100K (81k ratings), 0.12 s on ml-latest-small (81k ratings,
9.7k items); k = 32 costs about 3x that. It grows with nnz * k^2 and the number of sweeps, so
at Netflix's 100M ratings it is hours where mf (per-sample SGD) takes minutes: bpmf is for
the small and medium tables where its accuracy pays. At 100M synthetic ratings of Netflix's
shape (81.0M train, 2 threads) one sweep took 156 s, so the preset's 200 sweeps, twice
(selection and refit), would take about 17 hours.

Memory: the chain holds per training rating the standardised rating and the sweep's residuals
(float64), the two sides' orders (int64) and sorted ids; the products p_u . q_i are taken in
chunks of ratings (``pair_dots``), never as two gathered [nnz, k] float64 copies (21 GB at
81M ratings and k = 16). The whole stage peaked at 1.39 GiB at 10M synthetic ratings (3.86
GiB with the gathers) and 8.63 GiB at 100M.

Randomness: the row draws use a torch generator on the data's device seeded by ``--seed``;
the small hyperparameter draws (Wishart by the Bartlett decomposition, Gamma) use numpy's
generator with the same seed. A run is reproducible on one device.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from .cli import PipelineError


log = logging.getLogger("recpipe.train")

DT = torch.float64
KEEP = 4                    # stored rank of the posterior mean = KEEP * sampled rank
BLOCK_BYTES = 1 << 28       # work tensors of outer products / precision matrices
BETA0 = 2.0                 # Normal-Wishart prior strength on the hyper mean
A0 = B0 = 1.0               # Gamma(A0, B0) hyperpriors on the bias and noise precisions


class _Side:
    """One side's ratings as a CSR (rows: this side's index, columns: the other side's),
    sorted once; ``order`` maps CSR positions to rating positions."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n: int):
        self.n = n
        self.order = torch.argsort(rows, stable=True)
        self.cols = cols[self.order]
        counts = torch.bincount(rows, minlength=n)
        self.count = counts.to(DT)
        self.crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
        self.rows_sorted = rows[self.order]

    def blocks(self, per_row_bytes: int):
        """Row ranges whose work tensors stay under BLOCK_BYTES."""
        step = max(1, BLOCK_BYTES // max(1, per_row_bytes))
        for s in range(0, self.n, step):
            yield s, min(self.n, s + step)

    def csr(self, s: int, e: int, values: torch.Tensor, n_cols: int) -> torch.Tensor:
        lo, hi = int(self.crow[s]), int(self.crow[e])
        with warnings.catch_warnings():     # "sparse CSR support is in beta": it is used
            warnings.simplefilter("ignore", UserWarning)     # for one product, checked here
            return torch.sparse_csr_tensor(self.crow[s:e + 1] - lo, self.cols[lo:hi],
                                           values[lo:hi], size=(e - s, n_cols),
                                           check_invariants=False)


def precision_sums(side: _Side, other: torch.Tensor) -> torch.Tensor:
    """[side.n, k, k]: per row, the sum of q q' over the other side's rows it rated."""
    n_other, k = other.shape
    out = torch.empty(side.n, k, k, dtype=DT, device=other.device)
    if n_other * k * k * 8 <= BLOCK_BYTES:          # a sparse product with all outer products
        oo = (other[:, :, None] * other[:, None, :]).reshape(n_other, k * k)
        ones = torch.ones(len(side.cols), dtype=DT, device=other.device)
        for s, e in side.blocks(k * k * 8):
            out[s:e] = (side.csr(s, e, ones, n_other) @ oo).reshape(e - s, k, k)
        return out
    out.zero_()                                     # too many other rows: chunks of ratings
    step = max(1, BLOCK_BYTES // (k * k * 8))
    for s in range(0, len(side.cols), step):
        q = other[side.cols[s:s + step]]
        out.index_add_(0, side.rows_sorted[s:s + step], q[:, :, None] * q[:, None, :])
    return out


def weighted_sums(side: _Side, other: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[side.n, k]: per row, sum of value * q over its ratings (values in CSR order)."""
    n_other, k = other.shape
    out = torch.empty(side.n, k, dtype=DT, device=other.device)
    for s, e in side.blocks(k * 64):
        out[s:e] = side.csr(s, e, values, n_other) @ other
    return out


def pair_dots(P: torch.Tensor, Q: torch.Tensor, users: torch.Tensor, items: torch.Tensor
              ) -> torch.Tensor:
    """[nnz]: p_u . q_i of every rating, in chunks of ratings whose gathered rows stay under
    BLOCK_BYTES (gathering all at once holds two [nnz, k] float64 copies: 21 GB at 81M
    ratings and k = 16)."""
    out = torch.empty(len(users), dtype=P.dtype, device=P.device)
    step = max(1, BLOCK_BYTES // (2 * P.shape[1] * P.element_size()))
    for s in range(0, len(users), step):
        e = min(len(users), s + step)
        out[s:e] = (P[users[s:e]] * Q[items[s:e]]).sum(1)
    return out


def sample_rows(prec_sum: torch.Tensor, lin: torch.Tensor, alpha: float, lam: torch.Tensor,
                mean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draw every row from its Gaussian posterior: precision Lambda + alpha * prec_sum, mean
    its inverse times (Lambda mu + alpha * lin). Rows are factorised in blocks; ``prec_sum``
    is overwritten (it is the sweep's work tensor)."""
    n, k = lin.shape
    out = torch.empty_like(lin)
    prior = lam @ mean
    step = max(1, BLOCK_BYTES // (k * k * 8 * 2))
    for s in range(0, n, step):
        e = min(n, s + step)
        p = prec_sum[s:e].mul_(alpha).add_(lam)
        chol = torch.linalg.cholesky(p)
        m = torch.cholesky_solve((lin[s:e] * alpha + prior)[:, :, None], chol)[:, :, 0]
        z = torch.randn(e - s, k, 1, generator=gen, dtype=DT, device=lin.device)
        noise = torch.linalg.solve_triangular(chol.transpose(1, 2), z, upper=True)[:, :, 0]
        out[s:e] = m + noise
    return out


def sample_normal_wishart(x: torch.Tensor, rng: np.random.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Lambda, mu) from the Normal-Wishart posterior given the rows ``x`` [n, k] (prior
    mu_0 = 0, beta_0 = BETA0, W_0 = I, nu_0 = k): Lambda by the Bartlett decomposition."""
    n, k = x.shape
    xm = x.mean(0)
    xc = x - xm
    w_inv = (torch.eye(k, dtype=DT, device=x.device) + xc.T @ xc
             + (BETA0 * n / (BETA0 + n)) * torch.outer(xm, xm))
    w_inv = w_inv.cpu().numpy()
    w = np.linalg.inv((w_inv + w_inv.T) / 2)
    chol_w = np.linalg.cholesky((w + w.T) / 2)
    df = k + n
    bart = np.tril(rng.standard_normal((k, k)), -1)
    bart[np.diag_indices(k)] = np.sqrt(rng.chisquare(df - np.arange(k)))
    la = chol_w @ bart
    lam = la @ la.T
    beta = BETA0 + n
    mstar = (n / beta) * xm.cpu().numpy()
    # mu ~ N(mstar, (beta Lambda)^-1): mstar + L^-T z with beta Lambda = L L'
    lb = np.linalg.cholesky(beta * lam)
    mu = mstar + np.linalg.solve(lb.T, rng.standard_normal(k))
    dev = x.device
    return torch.as_tensor(lam, dtype=DT, device=dev), torch.as_tensor(mu, dtype=DT, device=dev)


def sample_bias(side: _Side, resid: torch.Tensor, alpha: float, lam: float,
                gen: torch.Generator) -> torch.Tensor:
    """Per row: b ~ N(alpha sum(resid) / prec, 1 / prec), prec = lam + alpha * count (resid in
    CSR order of this side)."""
    s = torch.zeros(side.n, dtype=DT, device=resid.device).index_add_(0, side.rows_sorted,
                                                                       resid)
    prec = side.count * alpha + lam
    z = torch.randn(side.n, generator=gen, dtype=DT, device=resid.device)
    return s * alpha / prec + z / prec.sqrt()


def compress(a: torch.Tensor | None, b: torch.Tensor | None, p: torch.Tensor,
             q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2, B2) with A2 B2' the best rank-``rank`` approximation of A B' + P Q' (exact when
    that sum's rank is at most ``rank``), singular values split evenly between the sides."""
    if a is not None:
        p, q = torch.cat([a, p], 1), torch.cat([b, q], 1)
    qa, ra = torch.linalg.qr(p)
    qb, rb = torch.linalg.qr(q)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return qa @ (u[:, :r] * root), qb @ (vh[:r].T * root)


@torch.no_grad()
def gibbs(users: torch.Tensor, items: torch.Tensor, z: torch.Tensor, n_users: int,
          n_items: int, rank: int, sweeps: int, seed: int, init_std: float = 0.1,
          keep: int | None = None) -> dict[str, Any]:
    """Run the chain on ratings ``z`` (standardised) and return the posterior-mean model:
    ``user``, ``item`` [n, keep] factors, ``user_bias``, ``item_bias`` [n], plus ``samples``
    (sweeps averaged), ``alpha`` (the last noise precision), ``alpha_mean`` (its average over
    the averaged sweeps) and ``train_rmse`` (of the last sample)."""
    if sweeps < 2:
        raise PipelineError(f"--model bpmf: --epochs is the number of Gibbs sweeps and must "
                            f"be at least 2 (a quarter is burn-in), got {sweeps}; the preset "
                            f"runs 200")
    keep = keep or KEEP * rank
    dev = z.device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    z = z.to(DT)
    us, it = _Side(users, items, n_users), _Side(items, users, n_items)
    P = torch.randn(n_users, rank, generator=gen, dtype=DT, device=dev) * init_std
    Q = torch.randn(n_items, rank, generator=gen, dtype=DT, device=dev) * init_std
    bu = torch.zeros(n_users, dtype=DT, device=dev)
    bi = torch.zeros(n_items, dtype=DT, device=dev)
    alpha = 1.0
    burn = sweeps // 4
    A = B = None
    sum_bu, sum_bi = torch.zeros_like(bu), torch.zeros_like(bi)
    n_avg, sse, alpha_sum, t0 = 0, float("nan"), 0.0, time.perf_counter()
    for sweep in range(1, sweeps + 1):
        lam_u, mu_u = sample_normal_wishart(P, rng)
        lam_v, mu_v = sample_normal_wishart(Q, rng)
        lb_u = rng.gamma(A0 + n_users / 2, 1.0 / (B0 + 0.5 * float(bu.square().sum())))
        lb_i = rng.gamma(A0 + n_items / 2, 1.0 / (B0 + 0.5 * float(bi.square().sum())))
        dot = pair_dots(P, Q, users, items)
        bu = sample_bias(us, (z - bi[items] - dot)[us.order], alpha, lb_u, gen)
        bi = sample_bias(it, (z - bu[users] - dot)[it.order], alpha, lb_i, gen)
        target = z - bu[users] - bi[items]
        P = sample_rows(precision_sums(us, Q), weighted_sums(us, Q, target[us.order]), alpha,
                        lam_u, mu_u, gen)
        Q = sample_rows(precision_sums(it, P), weighted_sums(it, P, target[it.order]), alpha,
                        lam_v, mu_v, gen)
        sse = float((target - pair_dots(P, Q, users, items)).square_().sum())
        alpha = rng.gamma(A0 + len(z) / 2, 1.0 / (B0 + 0.5 * sse))
        if sweep > burn:
            A, B = compress(A, B, P, Q, keep)
            sum_bu += bu
            sum_bi += bi
            alpha_sum += alpha
            n_avg += 1
        if sweep % 10 == 0 or sweep == sweeps:
            log.info("bpmf sweep %4d/%d  train RMSE of the sample %.4f (standardised)  "
                     "noise precision %.3f  %.1fs", sweep, sweeps, math.sqrt(sse / len(z)),
                     alpha, time.perf_counter() - t0)
    root = math.sqrt(n_avg)
    pad = keep - A.shape[1]               # fewer directions than KEEP * rank: zero columns
    if pad > 0:
        A = torch.cat([A, A.new_zeros(n_users, pad)], 1)
        B = torch.cat([B, B.new_zeros(n_items, pad)], 1)
    return {"user": A / root, "item": B / root, "user_bias": sum_bu / n_avg,
            "item_bias": sum_bi / n_avg, "samples": n_avg, "alpha": float(alpha),
            "alpha_mean": alpha_sum / n_avg,
            "train_rmse": math.sqrt(sse / len(z))}
