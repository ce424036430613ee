"""Fused CPU kernels (numba) for the per-sample SGD solver of explicit biased MF
(``--optimizer rowsgd``).

One epoch is one SGD step per training rating, on the same objective as every other path
(``BiasedMF``: per rating ``e^2 + reg (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)`` in standardised
units, ``e = p_u.q_i + b_u + b_i - (r - mean) / std``), with a per-row AdaGrad step size, as
LIBMF does: each factor row and each bias has one accumulator ``G`` (starting at 1) of its
squared gradients (the factor row's averaged over its k entries), and moves by
``lr / sqrt(G)`` times its gradient. No moment vectors: the optimiser state is one float per
row and table.

Why a kernel: a mini-batch step on a 480k-row user table is bound by the random row reads of
the batch (a factor row plus its two Adam moments, each 512 bytes at k = 128) and by the
per-step overhead of a few dozen tensor operations. Here a rating's update reads and writes
two rows once, and the user side's row, bias and accumulators sit in one packed row (one
cache miss instead of four).

Threads and determinism. The ratings are cut into BLOCKS x BLOCKS blocks by user id and item
id (mod BLOCKS); an epoch runs BLOCKS strata, and stratum s processes the blocks (t, t + s)
for t = 0..BLOCKS-1 in parallel. Blocks of a stratum share no user and no item, so threads
never write the same row, and within a block the ratings keep the epoch's shuffled order:
the result does not depend on the number of threads (DSGD, Gemulla et al. 2011; LIBMF's
scheduler is the lock-free variant of the same idea). BLOCKS is fixed, so ``--resume`` and a
rerun are exact whatever ``--threads`` is.
"""
from __future__ import annotations

import os

import numpy as np

try:                         # numba is in requirements.txt; without it rowsgd is unavailable
    import numba
    from numba import njit, prange
except ImportError:          # pragma: no cover - exercised only where numba is missing
    numba = None

BLOCKS = 8                   # user blocks = item blocks (see the module docstring)


def available() -> bool:
    return numba is not None


def missing_reason() -> str:
    return ("--optimizer rowsgd needs the numba package (in requirements.txt): "
            "`pip install -r requirements.txt`")


if numba is not None:
    _CACHE = os.environ.get("RECPIPE_NUMBA_CACHE", "1") != "0"

    @njit(cache=_CACHE)
    def _block_keys(users, items, nb, keys, counts):
        """Each rating's block: stratum s = (item block - user block) mod nb, key s*nb + user
        block (block (t, (t + s) % nb) of stratum s has key s*nb + t); counts per key."""
        for x in range(users.shape[0]):
            ub = users[x] % nb
            b = ((items[x] % nb - ub) % nb) * nb + ub
            keys[x] = b
            counts[b] += 1

    @njit(cache=_CACHE)
    def _arrange(perm, keys, starts, users, items, z, ou, oi, oz):
        """The ratings in ``perm`` order, grouped by block (a stable counting sort): block b
        at [starts[b], starts[b + 1]) of ou / oi / oz."""
        pos = starts[:-1].copy()
        for j in range(perm.shape[0]):
            x = perm[j]
            p = pos[keys[x]]
            pos[keys[x]] = p + 1
            ou[p] = users[x]
            oi[p] = items[x]
            oz[p] = z[x]

    @njit(cache=_CACHE, fastmath=True)
    def _block(lo, hi, users, items, z, U, V, lr, reg):
        """SGD over ratings lo..hi-1. Packed rows: [factors (k), bias, G factors, G bias]."""
        k = U.shape[1] - 3
        sq = 0.0
        for s in range(lo, hi):
            u = users[s]
            i = items[s]
            acc = np.float32(0.0)
            for f in range(k):
                acc += U[u, f] * V[i, f]
            e = acc + U[u, k] + V[i, k] - z[s]
            sq += e * e
            gu = np.float32(0.0)
            gi = np.float32(0.0)
            for f in range(k):
                a = e * V[i, f] + reg * U[u, f]
                b = e * U[u, f] + reg * V[i, f]
                gu += a * a
                gi += b * b
            U[u, k + 1] += gu / k
            V[i, k + 1] += gi / k
            su = lr / np.sqrt(U[u, k + 1])
            si = lr / np.sqrt(V[i, k + 1])
            for f in range(k):
                p = U[u, f]
                q = V[i, f]
                U[u, f] = p - su * (e * q + reg * p)
                V[i, f] = q - si * (e * p + reg * q)
            gb = e + reg * U[u, k]
            U[u, k + 2] += gb * gb
            U[u, k] -= lr / np.sqrt(U[u, k + 2]) * gb
            gb = e + reg * V[i, k]
            V[i, k + 2] += gb * gb
            V[i, k] -= lr / np.sqrt(V[i, k + 2]) * gb
        return sq

    @njit(cache=_CACHE, parallel=True)
    def _stratum(s, starts, nb, users, items, z, U, V, lr, reg):
        """Stratum s: its nb blocks in parallel (they share no user and no item)."""
        part = np.zeros(nb)
        for t in prange(nb):
            b = s * nb + t
            part[t] = _block(starts[b], starts[b + 1], users, items, z, U, V, lr, reg)
        sq = 0.0
        for t in range(nb):              # fixed order: the sum does not depend on threads
            sq += part[t]
        return sq


def pack(factors: np.ndarray, bias: np.ndarray, g_factors: np.ndarray,
         g_bias: np.ndarray) -> np.ndarray:
    """[rows, k + 3] float32: factors, bias, the two AdaGrad accumulators."""
    return np.concatenate([factors, bias.reshape(-1, 1), g_factors.reshape(-1, 1),
                           g_bias.reshape(-1, 1)], axis=1).astype(np.float32, copy=False)


def unpack(packed: np.ndarray, factors: np.ndarray, bias: np.ndarray, g_factors: np.ndarray,
           g_bias: np.ndarray) -> None:
    """Write a packed table back into the model's arrays (in place)."""
    k = factors.shape[1]
    factors[...] = packed[:, :k]
    bias.reshape(-1)[...] = packed[:, k]
    g_factors.reshape(-1)[...] = packed[:, k + 1]
    g_bias.reshape(-1)[...] = packed[:, k + 2]


class Ratings:
    """The train ratings as the kernel reads them: per rating its block key (computed once),
    the block sizes, and per-epoch buffers of (user, item, standardised rating) in block
    order (12 bytes a rating, int32 ids)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, z: np.ndarray):
        if numba is None:
            raise RuntimeError(missing_reason())
        self.users, self.items, self.z = users, items, z.astype(np.float32, copy=False)
        n = users.shape[0]
        self.keys = np.empty(n, np.uint8)
        counts = np.zeros(BLOCKS * BLOCKS, np.int64)
        _block_keys(users, items, BLOCKS, self.keys, counts)
        self.starts = np.zeros(BLOCKS * BLOCKS + 1, np.int64)
        np.cumsum(counts, out=self.starts[1:])
        self.ou = np.empty(n, np.int32)
        self.oi = np.empty(n, np.int32)
        self.oz = np.empty(n, np.float32)

    def epoch(self, perm: np.ndarray, U: np.ndarray, V: np.ndarray, lr: float, reg: float,
              threads: int) -> float:
        """One epoch over the ratings in ``perm`` order (within each block, see above); U / V
        the packed user / item tables (updated in place). Returns the sum of the squared
        errors seen before each update."""
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        _arrange(perm, self.keys, self.starts, self.users, self.items, self.z, self.ou,
                 self.oi, self.oz)
        sq = 0.0
        for s in range(BLOCKS):   # one call per stratum: Ctrl-C is seen between strata
            sq += _stratum(s, self.starts, BLOCKS, self.ou, self.oi, self.oz, U, V,
                           np.float32(lr), np.float32(reg))
        return sq
