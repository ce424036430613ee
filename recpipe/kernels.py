"""Fused CPU kernels (numba) for the per-sample SGD solver of explicit biased MF
(``--optimizer rowsgd``), for the NCF towers' first layer in row-compact training
(``gather_add_relu``: ``relu(A[iu] + B[ii])`` and its gradient in one pass each, see
``family.tower_input``), for GMF's score there (``gather_dot``: ``sum(A[iu] * w * B[ii])``,
``family.pair_dot``), for dropout (``dropout``: a counter-based mask, ``family.Dropout``),
and for item kNN's scoring (``knn_terms``: each pair's k nearest rated items by a bounded
heap).

One epoch is one SGD step per training rating, on the same objective as every other path
(``BiasedMF``: per rating ``e^2 + reg (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)`` in standardised
units, ``e = p_u.q_i + b_u + b_i - (r - mean) / std``), with a per-row AdaGrad step size, as
LIBMF does: each factor row and each bias has one accumulator ``G`` (starting at
``optim.ROWSGD_INITIAL``, 0.1) of its squared gradients (the factor row's averaged over its k
entries), and moves by ``lr / sqrt(G)`` times its gradient. No moment vectors: the optimiser
state is one float per row and table.

Why a kernel: a mini-batch step on a 480k-row user table is bound by the random row reads of
the batch (a factor row plus its two Adam moments, each 512 bytes at k = 128) and by the
per-step overhead of a few dozen tensor operations. Here a rating's update reads and writes
two rows once, and the user side's row, bias and accumulators sit in one packed row (one
cache miss instead of four).

Threads and determinism. The ratings are cut into BLOCKS x BLOCKS blocks by user id and item
id (mod BLOCKS); an epoch runs BLOCKS strata, and stratum s processes the blocks (t, t + s)
for t = 0..BLOCKS-1 in parallel. Blocks of a stratum share no user and no item, so threads
never write the same row. Within a block the ratings come in a random order drawn afresh
every epoch from a seed (the trainer draws it from its seeded generator) plus the block's
number, so the order, and the result, depend on neither the number of threads nor the epochs
before (DSGD, Gemulla et al. 2011; LIBMF's scheduler is the lock-free variant of the same
idea). BLOCKS is fixed, so ``--resume`` and a rerun are exact whatever ``--threads`` is.

Memory: one copy of the ratings (int32 user, int32 item, float32 standardised rating: 12
bytes a rating), grouped by block once and then permuted in place: each epoch first undoes
the previous epoch's permutation (replaying its swaps backwards), then applies its own, so
every epoch starts from the same grouped order without a second copy of it; and, during an
epoch, the packed tables (k + 3 floats a row: a copy of the model's tables, dropped after
the epoch, so that it is not held beside the evaluation's work between epochs).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

try:                         # numba is in requirements.txt; without it rowsgd is unavailable
    import numba
    from numba import njit, prange
except ImportError:          # pragma: no cover - exercised only where numba is missing
    numba = None

BLOCKS = 8                   # user blocks = item blocks (see the module docstring)
_UNKNOWN = -1                # Ratings.order_seed while a permutation is under way


def available() -> bool:
    return numba is not None


def missing_reason() -> str:
    return ("--optimizer rowsgd needs the numba package (in requirements.txt): "
            "`pip install -r requirements.txt`")


if numba is not None:
    _CACHE = os.environ.get("RECPIPE_NUMBA_CACHE", "1") != "0"

    @njit(cache=_CACHE)
    def _by_block(users, items, z, nb, starts, cu, ci, cz):
        """The ratings grouped by block (a stable counting sort): block b = s*nb + t, the
        block (t, (t + s) % nb) of stratum s (s = (item block - user block) mod nb), at
        [starts[b], starts[b + 1]) of cu / ci / cz (the ids narrowed to int32, the values
        to cz's dtype)."""
        n = users.shape[0]
        counts = np.zeros(nb * nb, np.int64)
        for x in range(n):
            ub = users[x] % nb
            counts[((items[x] % nb - ub) % nb) * nb + ub] += 1
        starts[0] = 0
        for b in range(nb * nb):
            starts[b + 1] = starts[b] + counts[b]
        pos = starts[:-1].copy()
        for x in range(n):
            ub = users[x] % nb
            b = ((items[x] % nb - ub) % nb) * nb + ub
            p = pos[b]
            pos[b] = p + 1
            cu[p] = users[x]
            ci[p] = items[x]
            cz[p] = z[x]

    @njit(cache=_CACHE, parallel=True)
    def _permute_blocks(seed, undo, starts, cu, ci, cz):
        """Each block's ratings permuted in place by the Fisher-Yates swaps drawn from a
        generator seeded with seed + block (so the order depends on the seed only, not on
        the threads or on earlier epochs); ``undo`` applies the inverse, the same swaps in
        reverse order, which brings the block back to the order it had before."""
        nblocks = starts.shape[0] - 1
        for b in prange(nblocks):
            lo, hi = starts[b], starts[b + 1]
            np.random.seed(seed + b)
            if undo:                 # the swaps are drawn last to first: kept to be replayed
                draws = np.empty(hi - lo, np.int64)
                for j in range(hi - lo - 1, 0, -1):
                    draws[j] = np.random.randint(0, j + 1)
                for j in range(1, hi - lo):
                    _swap(lo + j, lo + draws[j], cu, ci, cz)
            else:
                for j in range(hi - lo - 1, 0, -1):
                    _swap(lo + j, lo + np.random.randint(0, j + 1), cu, ci, cz)

    @njit(cache=_CACHE, inline="always")
    def _swap(a, b, cu, ci, cz):
        """Entries a and b exchanged in each of three parallel arrays."""
        cu[a], cu[b] = cu[b], cu[a]
        ci[a], ci[b] = ci[b], ci[a]
        cz[a], cz[b] = cz[b], cz[a]

    @njit(cache=_CACHE, fastmath=True, error_model="numpy")     # no division checks
    def _block(lo, hi, users, items, z, U, V, lr, reg, RU, RV):
        """SGD over ratings lo..hi-1. Packed rows: [factors (k), bias, G factors, G bias].
        RU / RV: each user's / item's multiplier of ``reg``."""
        k = U.shape[1] - 3
        sq = 0.0
        for s in range(lo, hi):
            u = users[s]
            i = items[s]
            ru = reg * RU[u]
            ri = reg * RV[i]
            acc = np.float32(0.0)
            for f in range(k):
                acc += U[u, f] * V[i, f]
            e = acc + U[u, k] + V[i, k] - z[s]
            sq += e * e
            gu = np.float32(0.0)
            gi = np.float32(0.0)
            for f in range(k):
                a = e * V[i, f] + ru * U[u, f]
                b = e * U[u, f] + ri * V[i, f]
                gu += a * a
                gi += b * b
            U[u, k + 1] += gu / k
            V[i, k + 1] += gi / k
            su = lr / np.sqrt(U[u, k + 1])
            si = lr / np.sqrt(V[i, k + 1])
            for f in range(k):
                p = U[u, f]
                q = V[i, f]
                U[u, f] = p - su * (e * q + ru * p)
                V[i, f] = q - si * (e * p + ri * q)
            gb = e + ru * U[u, k]
            U[u, k + 2] += gb * gb
            U[u, k] -= lr / np.sqrt(U[u, k + 2]) * gb
            gb = e + ri * V[i, k]
            V[i, k + 2] += gb * gb
            V[i, k] -= lr / np.sqrt(V[i, k + 2]) * gb
        return sq

    @njit(cache=_CACHE, parallel=True)
    def _stratum(s, starts, nb, users, items, z, U, V, lr, reg, RU, RV):
        """Stratum s: its nb blocks in parallel (they share no user and no item)."""
        part = np.zeros(nb)
        for t in prange(nb):
            b = s * nb + t
            part[t] = _block(starts[b], starts[b + 1], users, items, z, U, V, lr, reg, RU, RV)
        sq = 0.0
        for t in range(nb):              # fixed order: the sum does not depend on threads
            sq += part[t]
        return sq


    @njit(cache=_CACHE, fastmath=True)
    def _gather_add_relu(A, iu, B, ii, H):
        """H[s] = relu(A[iu[s]] + B[ii[s]])."""
        h = H.shape[1]
        for s in range(H.shape[0]):
            a, b = iu[s], ii[s]
            for f in range(h):
                x = A[a, f] + B[b, f]
                H[s, f] = max(x, np.float32(0.0))

    @njit(cache=_CACHE, fastmath=True)
    def _gather_add_relu_backward(G, H, iu, ii, gA, gB):
        """gA[iu[s]] += G[s] * (H[s] > 0), gB likewise, in sample order."""
        h = H.shape[1]
        m = np.empty(h, np.float32)
        for s in range(H.shape[0]):
            a, b = iu[s], ii[s]
            for f in range(h):
                m[f] = G[s, f] if H[s, f] > 0 else np.float32(0.0)
            for f in range(h):
                gA[a, f] += m[f]
            for f in range(h):
                gB[b, f] += m[f]

    @njit(cache=_CACHE, fastmath=True)
    def _gather_dot(A, iu, B, ii, w, out):
        """out[s] = sum_f A[iu[s], f] * w[f] * B[ii[s], f]."""
        h = A.shape[1]
        for s in range(out.shape[0]):
            a, b = iu[s], ii[s]
            acc = np.float32(0.0)
            for f in range(h):
                acc += A[a, f] * w[f] * B[b, f]
            out[s] = acc

    @njit(cache=_CACHE, fastmath=True)
    def _gather_dot_backward(G, A, iu, B, ii, w, gA, gB, gw):
        """gA[iu[s]] += G[s] w B[ii[s]], gB[ii[s]] += G[s] w A[iu[s]] and gw += G[s] A[iu[s]]
        B[ii[s]], in sample order (gw summed in float64)."""
        h = A.shape[1]
        acc = np.zeros(h, np.float64)
        for s in range(G.shape[0]):
            a, b, g = iu[s], ii[s], G[s]
            for f in range(h):
                x, y = A[a, f], B[b, f]
                gA[a, f] += g * w[f] * y
                gB[b, f] += g * w[f] * x
                acc[f] += g * x * y
        for f in range(h):
            gw[f] = acc[f]

    @njit(cache=_CACHE, inline="always")
    def _below(hw, hp, a, b):
        """Heap entry a ranks below b: a smaller weight, or the same weight at a later
        position."""
        return hw[a] < hw[b] or (hw[a] == hw[b] and hp[a] > hp[b])

    @njit(cache=_CACHE, inline="always")
    def _sift_up(hw, hz, hp, i):
        while i > 0 and _below(hw, hp, i, (i - 1) // 2):
            _swap(i, (i - 1) // 2, hw, hz, hp)
            i = (i - 1) // 2

    @njit(cache=_CACHE, inline="always")
    def _sift_down(hw, hz, hp, m):
        i = 0
        while True:
            lo, c = i, 2 * i + 1
            if c < m and _below(hw, hp, c, lo):
                lo = c
            if c + 1 < m and _below(hw, hp, c + 1, lo):
                lo = c + 1
            if lo == i:
                return
            _swap(i, lo, hw, hz, hp)
            i = lo

    @njit(cache=_CACHE, parallel=True)
    def _knn_terms(users, items, indptr, rated, resid, sim, k, out):
        chunk = 256
        for c in prange((users.shape[0] + chunk - 1) // chunk):
            hw = np.empty(k, np.float64)
            hz = np.empty(k, np.float64)
            hp = np.empty(k, np.int64)
            word = np.zeros(1, np.uint32)          # a bfloat16's bits, shifted: its float32
            as_float = word.view(np.float32)
            for p in range(c * chunk, min(users.shape[0], (c + 1) * chunk)):
                u, row = users[p], sim[items[p]]
                m = 0
                for x in range(indptr[u], indptr[u + 1]):
                    bits = row[rated[x]]
                    if bits == 0:
                        continue
                    word[0] = np.uint32(bits) << 16
                    w = np.float64(as_float[0])
                    if m < k:                         # fill: push, sift up
                        hw[m], hz[m], hp[m] = w, resid[x], x
                        _sift_up(hw, hz, hp, m)
                        m += 1
                    elif w > hw[0]:       # an equal weight comes later: it never displaces
                        hw[0], hz[0], hp[0] = w, resid[x], x
                        _sift_down(hw, hz, hp, m)
                num = 0.0
                den = 0.0
                for i in range(m):
                    num += hw[i] * hz[i]
                    den += hw[i]
                out[p] = num / den if den > 0 else 0.0

    @njit(cache=_CACHE, inline="always")
    def _mix64(x):
        """splitmix64's finaliser: a uint64 -> a uint64 whose bits are all well mixed."""
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    @njit(cache=_CACHE, fastmath=True)
    def _dropout(x, out, threshold, scale, seed):
        """out[j] = x[j] * scale where the j-th 16-bit draw is >= threshold, else 0; the
        draws are the four 16-bit words of mix64(seed + (j // 4 + 1) * golden)."""
        n = x.shape[0]
        golden = np.uint64(0x9E3779B97F4A7C15)
        s = np.uint64(seed)
        zero = np.float32(0.0)
        for w in range(n // 4):                     # whole words: no bounds test
            bits = _mix64(s + np.uint64(w + 1) * golden)
            j = 4 * w
            out[j] = x[j] * (scale if (bits & np.uint64(0xFFFF)) >= threshold else zero)
            out[j + 1] = x[j + 1] * (scale if ((bits >> np.uint64(16)) & np.uint64(0xFFFF))
                                     >= threshold else zero)
            out[j + 2] = x[j + 2] * (scale if ((bits >> np.uint64(32)) & np.uint64(0xFFFF))
                                     >= threshold else zero)
            out[j + 3] = x[j + 3] * (scale if (bits >> np.uint64(48)) >= threshold else zero)
        w = n // 4
        bits = _mix64(s + np.uint64(w + 1) * golden)
        for j in range(4 * w, n):                   # the last, partial word
            draw = (bits >> np.uint64(16 * (j - 4 * w))) & np.uint64(0xFFFF)
            out[j] = x[j] * (scale if draw >= threshold else zero)


def gather_add_relu(A: np.ndarray, iu: np.ndarray, B: np.ndarray, ii: np.ndarray,
                    H: np.ndarray) -> None:
    """``H`` [S, h] float32 = ``relu(A[iu] + B[ii])`` in one pass (no [S, h] gathers, no
    sum). One thread: a parallel numba region between torch's would leave its pool spinning
    against torch's threads at every step. The caller allocates ``H`` (torch's allocator
    aligns it for the matrix products that read it next; numpy's does not, and those
    products ran 1.5x slower on it)."""
    _gather_add_relu(A, iu, B, ii, H)


def gather_add_relu_backward(G: np.ndarray, H: np.ndarray, iu: np.ndarray, ii: np.ndarray,
                             gA: np.ndarray, gB: np.ndarray) -> None:
    """Adds the gradients of ``gather_add_relu``'s A and B from G = dL/dH into ``gA`` and
    ``gB`` (zeroed by the caller): scattered straight into the rows, without the [S, h]
    masked copy and the index expansion of torch's index_add; each row's sum runs in sample
    order."""
    _gather_add_relu_backward(G, H, iu, ii, gA, gB)


def gather_dot(A: np.ndarray, iu: np.ndarray, B: np.ndarray, ii: np.ndarray,
               w: np.ndarray, out: np.ndarray) -> None:
    """``out`` [S] float32 = ``(A[iu] * w * B[ii]).sum(1)`` in one pass: GMF's score on the
    rows a batch looked up, without the two [S, d] gathers, the products and the sum (and
    their gradients' [S, d] blocks). One thread, as gather_add_relu."""
    _gather_dot(A, iu, B, ii, w, out)


def gather_dot_backward(G: np.ndarray, A: np.ndarray, iu: np.ndarray, B: np.ndarray,
                        ii: np.ndarray, w: np.ndarray, gA: np.ndarray, gB: np.ndarray,
                        gw: np.ndarray) -> None:
    """The gradients of ``gather_dot`` from G = dL/dout: added into ``gA`` and ``gB``
    (zeroed by the caller) row by row in sample order, and written into ``gw``."""
    _gather_dot_backward(G, A, iu, B, ii, w, gA, gB, gw)


def dropout(x: np.ndarray, out: np.ndarray, p: float, seed: int) -> None:
    """Inverted dropout of the flat float32 ``x`` into ``out``: each entry kept with
    probability 1 - p (to 1/65536: the draws are 16-bit) and then scaled by 1 / (1 - p).
    The mask is a function of ``seed`` and the position alone (a counter-based hash, four
    draws per 64-bit word), so the backward pass recomputes it from the seed instead of
    storing it, and it does not depend on the threads. One thread, as gather_add_relu."""
    threshold = min(65536, int(round(float(p) * 65536)))
    _dropout(x, out, np.uint64(threshold), np.float32(1.0 / (1.0 - p)),
             np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))


def knn_terms(users: np.ndarray, items: np.ndarray, indptr: np.ndarray, rated: np.ndarray,
              resid: np.ndarray, sim_bits: np.ndarray, k: int, threads: int) -> np.ndarray:
    """``knn.ItemKNN``'s neighbour term of each pair (users[p], items[p]), float32: over the
    items j that the user rated (``rated[indptr[u]:indptr[u + 1]]``, residuals ``resid``),
    the k largest positive similarities ``sim_bits[items[p], j]`` (bfloat16 bits as uint16),
    of equal ones the earlier j, averaged as sum(s z) / sum(s); 0 without a positive one.
    A bounded heap per pair, one pass over the user's ratings, no [pairs, history] blocks;
    pairs split over ``threads`` threads (each pair's result is independent of them)."""
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    out = np.empty(users.shape[0], np.float32)
    _knn_terms(users, items, indptr, rated, resid, sim_bits, max(1, int(k)), out)
    return out


def pack(factors: np.ndarray, bias: np.ndarray, g_factors: np.ndarray,
         g_bias: np.ndarray) -> np.ndarray:
    """[rows, k + 3] float32: factors, bias, the two AdaGrad accumulators."""
    k = factors.shape[1]
    out = np.empty((factors.shape[0], k + 3), np.float32)
    out[:, :k] = factors
    out[:, k] = bias.reshape(-1)
    out[:, k + 1] = g_factors.reshape(-1)
    out[:, k + 2] = g_bias.reshape(-1)
    return out


def unpack(packed: np.ndarray, factors: np.ndarray, bias: np.ndarray, g_factors: np.ndarray,
           g_bias: np.ndarray) -> None:
    """Write a packed table back into the model's arrays (in place)."""
    k = factors.shape[1]
    factors[...] = packed[:, :k]
    bias.reshape(-1)[...] = packed[:, k]
    g_factors.reshape(-1)[...] = packed[:, k + 1]
    g_bias.reshape(-1)[...] = packed[:, k + 2]


class Ratings:
    """The train ratings as the kernel reads them, in one copy: int32 ids and the
    standardised rating (12 bytes a rating) in ``ou`` / ``oi`` / ``oz``, grouped by block
    (``starts``) and, after ``epoch(seed, ...)``, each block in the order drawn from
    ``seed``. ``standardise`` maps a float32 array of ratings to the kernel's units in place
    (None: ``ratings`` are in them already)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                 standardise: Callable[[np.ndarray], None] | None = None):
        if numba is None:
            raise RuntimeError(missing_reason())
        n = users.shape[0]
        self.starts = np.zeros(BLOCKS * BLOCKS + 1, np.int64)
        self.ou, self.oi = np.empty(n, np.int32), np.empty(n, np.int32)
        self.oz = np.empty(n, np.float32)
        _by_block(users, items, ratings, BLOCKS, self.starts, self.ou, self.oi, self.oz)
        if standardise is not None:    # elementwise, so the same values in grouped order
            standardise(self.oz)
        self.order_seed: int | None = None     # the permutation the arrays hold (None: none)

    def _order(self, seed: int) -> None:
        """Permute the blocks into ``seed``'s order, from the one the arrays hold now."""
        if self.order_seed == seed:
            return
        if self.order_seed == _UNKNOWN:
            raise RuntimeError("kernels.Ratings: an earlier epoch was interrupted while it "
                               "reordered the ratings, so their order is unknown; build a "
                               "new Ratings from the train part")
        prev, self.order_seed = self.order_seed, _UNKNOWN
        if prev is not None:
            _permute_blocks(int(prev), True, self.starts, self.ou, self.oi, self.oz)
        _permute_blocks(int(seed), False, self.starts, self.ou, self.oi, self.oz)
        self.order_seed = seed

    def epoch(self, seed: int, U: np.ndarray, V: np.ndarray, lr: float, reg: float,
              threads: int, reg_rows: tuple[np.ndarray, np.ndarray] | None = None) -> float:
        """One epoch: every block in the order drawn from ``seed``, the strata one after the
        other; U / V the packed user / item tables (updated in place). ``reg_rows``: float32
        multipliers of ``reg`` per user and per item (None: 1 for every row). Returns the
        sum of the squared errors seen before each update."""
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        self._order(int(seed))
        if reg_rows is None:
            reg_rows = (np.ones(U.shape[0], np.float32), np.ones(V.shape[0], np.float32))
        RU, RV = reg_rows
        sq = 0.0
        for s in range(BLOCKS):   # one call per stratum: Ctrl-C is seen between strata
            sq += _stratum(s, self.starts, BLOCKS, self.ou, self.oi, self.oz, U, V,
                           np.float32(lr), np.float32(reg), RU, RV)
        return sq


def warm_up() -> None:
    """Load (or compile, the first time after an install) the kernels on a toy problem, so
    that a benchmark can keep this one-time cost out of its timing."""
    for ids in (np.int32, np.int64):     # stage 60's parts hold int32 ids; others int64
        users = np.arange(BLOCKS, dtype=ids)
        z = np.zeros(BLOCKS, np.float32)
        tables = [np.full((BLOCKS, 4), 0.1, np.float32) for _ in range(2)]
        ratings = Ratings(users, users.copy(), z)
        for seed in (0, 1):      # the second epoch also undoes the first one's order
            ratings.epoch(seed, *tables, 0.1, 0.1, 1)
