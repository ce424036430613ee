"""Array primitives of the split strategies (stage 30): pair keys and sorted membership,
per-user hold-out from the end of an ordering, random hold-out, and vectorised sampling of
negatives a user has not rated (for the leave-one-out candidates). NumPy only, int64 keys
``user * n_items + item``."""
from __future__ import annotations

import numpy as np

from .cli import PipelineError

TRAIN, VALID, TEST, DROPPED = 0, 1, 2, -1     # part labels of a split
# the strategies that hold out each user's latest interactions (by timestamp, when the
# ratings have them): what stage 60's recency-weighted presets are for
LATEST_HELD_OUT = ("temporal-user", "loo", "ncf")

def pair_keys(u: np.ndarray, i: np.ndarray, n_items: int) -> np.ndarray:
    """user * n_items + item as int64: one sortable key per (user, item) pair, built in its
    own new array (no temporaries of the keys' size)."""
    k = np.array(u, dtype=np.int64)                      # a copy: u itself is never written
    k *= np.int64(n_items)
    k += np.asarray(i)
    return k


def sorted_keys(u: np.ndarray, i: np.ndarray, n_items: int) -> np.ndarray:
    k = pair_keys(u, i, n_items)
    if len(k) > 1 and not (k[1:] >= k[:-1]).all():
        k = np.sort(k)
    return k


def in_sorted(keys: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` in the sorted array ``sorted_ref`` (any shape)."""
    if len(sorted_ref) == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    pos = np.searchsorted(sorted_ref, keys)
    np.minimum(pos, len(sorted_ref) - 1, out=pos)
    return sorted_ref[pos] == keys


def _order_by(u: np.ndarray, primary: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Row order by (u, primary, tiebreak), with a single stable argsort when possible."""
    n = len(u)
    if n > 1 and primary.dtype.kind in "iu":
        lo, hi = int(primary.min()), int(primary.max())
        span = hi - lo + 1
        rows_in_tb_order = bool(np.all((u[1:] > u[:-1])
                                       | ((u[1:] == u[:-1]) & (tiebreak[1:] >= tiebreak[:-1]))))
        if rows_in_tb_order and (int(u.max()) + 1) * span < 2**62:
            key = u.astype(np.int64) * np.int64(span) + (primary.astype(np.int64) - lo)
            return np.argsort(key, kind="stable")  # ties keep row order = tiebreak order
    return np.lexsort((tiebreak, primary, u))


def rank_from_end(u: np.ndarray, primary: np.ndarray, tiebreak: np.ndarray, n_users: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, how many of the user's rows come after it in (primary, tiebreak) order.

    0 marks the user's last (latest) row. Returns (ranks, ratings per user); the ranks are
    int32 while the rows fit (``_index_dtype``), built with one temporary of that width.
    """
    order = _order_by(u, primary, tiebreak)
    counts = np.bincount(u, minlength=n_users)
    dt = _index_dtype(len(u))
    last = (np.cumsum(counts) - 1).astype(dt)       # each user's last position in ``order``
    behind = last[u[order]]                         # the row at position p: last[its user] - p
    behind -= np.arange(len(u), dtype=dt)
    ranks = np.empty(len(u), dtype=dt)
    ranks[order] = behind
    return ranks, counts


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def per_user_holdout(u: np.ndarray, primary: np.ndarray, tiebreak: np.ndarray, n_users: int,
                     test_ratio: float, valid_ratio: float) -> np.ndarray:
    """Part labels: each user's last round(ratio * n_u) rows (in primary order) are test,
    the next round(valid_ratio * rest) valid; at least one row per user stays in train."""
    ranks, counts = rank_from_end(u, primary, tiebreak, n_users)
    n_test = np.minimum(_round_half_up(counts * test_ratio), np.maximum(counts - 1, 0))
    rest = counts - n_test
    n_valid = np.minimum(_round_half_up(rest * valid_ratio), np.maximum(rest - 1, 0))
    part = np.full(len(u), TRAIN, dtype=np.int8)
    nt = n_test[u]
    part[ranks < nt] = TEST
    part[(ranks >= nt) & (ranks < nt + n_valid[u])] = VALID
    return part


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def flatnonzero_compact(mask: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """np.flatnonzero(mask) as int32 when the positions fit (int64 otherwise), built chunk by
    chunk: half the memory of flatnonzero's int64 result and no full-size temporary."""
    mask = np.asarray(mask, dtype=bool).ravel()
    dt = _index_dtype(len(mask))
    if dt is np.int64:
        return np.flatnonzero(mask)
    out = np.empty(int(np.count_nonzero(mask)), dtype=dt)
    at = 0
    for a in range(0, len(mask), chunk):
        pos = np.flatnonzero(mask[a:a + chunk])
        pos += a
        out[at:at + len(pos)] = pos
        at += len(pos)
    return out


def random_holdout(n: int, ratio: float, rng: np.random.Generator,
                   among: np.ndarray | None = None) -> np.ndarray:
    """Indices (int64, ascending) of round(ratio * len) rows drawn without replacement (from
    ``among``).

    The draw is ``rng.permutation(len(pool))[:k]``; the permutation is made by shuffling an
    int32 range in place (the same draws as ``permutation``, half its memory).
    """
    m = n if among is None else len(among)
    k = int(_round_half_up(np.array(m * ratio)))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    perm = np.arange(m, dtype=_index_dtype(m))
    rng.shuffle(perm)
    pick = perm[:k].copy()
    del perm
    pick.sort()
    if among is not None:
        pick = np.asarray(among)[pick]
        if len(pick) > 1 and not (pick[1:] >= pick[:-1]).all():  # a pool not in row order
            pick.sort()
    return pick.astype(np.int64, copy=False)


def sample_negatives(users: np.ndarray, n_neg: int, n_items: int, rated_keys: np.ndarray,
                     rng: np.random.Generator, chunk_entries: int = 2_000_000,
                     max_rounds: int = 64) -> np.ndarray:
    """``n_neg`` distinct items per row of ``users`` that the user never rated.

    ``rated_keys``: sorted user * n_items + item keys of everything each user interacted
    with. Returns int32 [len(users), n_neg], each row a uniform draw without replacement
    from the user's unrated items (seeded by ``rng``), in ascending item order.

    Per chunk of rows: draw the whole [rows, N] block, sort each row, reject entries equal
    to their left neighbour (repeats) or found among the rated keys (searchsorted into the
    chunk's slice of ``rated_keys``), redraw only those, repeat. Rows still rejected after
    ``max_rounds`` (users who rated nearly every item) take an exact draw from their
    complement. Memory is bounded by the chunk size.
    """
    users = np.asarray(users, dtype=np.int64)
    m = len(users)
    out = np.empty((m, n_neg), dtype=np.int32)
    if m == 0 or n_neg == 0:
        return out
    n_rated = (np.searchsorted(rated_keys, (users + 1) * n_items)
               - np.searchsorted(rated_keys, users * n_items))
    short = n_items - n_rated < n_neg
    if short.any():
        j = int(np.flatnonzero(short)[0])
        raise PipelineError(
            f"{int(short.sum())} users have fewer than {n_neg} items they never rated (e.g. "
            f"user_idx {int(users[j])} rated {int(n_rated[j])} of {n_items} items), so "
            f"{n_neg} distinct negatives cannot be drawn; lower --negatives")
    step = max(1, chunk_entries // n_neg)
    for a in range(0, m, step):
        out[a:a + step] = _sample_chunk(users[a:a + step], n_neg, n_items, rated_keys, rng,
                                        max_rounds)
    return out


def _sample_chunk(cu: np.ndarray, n_neg: int, n_items: int, rated_keys: np.ndarray,
                  rng: np.random.Generator, max_rounds: int) -> np.ndarray:
    ref = rated_keys
    if len(cu) > 1 and (cu[1:] >= cu[:-1]).all():  # sorted users: a contiguous slice
        ref = rated_keys[np.searchsorted(rated_keys, cu[0] * n_items):
                         np.searchsorted(rated_keys, (cu[-1] + 1) * n_items)]
    cand = rng.integers(0, n_items, size=(len(cu), n_neg), dtype=np.int64)
    cand.sort(axis=1)
    todo = np.arange(len(cu))
    rounds = 0
    while len(todo):
        sub = cand[todo]
        bad = np.zeros(sub.shape, dtype=bool)
        bad[:, 1:] = sub[:, 1:] == sub[:, :-1]
        bad |= in_sorted(sub + cu[todo, None] * n_items, ref)
        rows = bad.any(axis=1)
        todo, sub, bad = todo[rows], sub[rows], bad[rows]
        if not len(todo):
            break
        rounds += 1
        if rounds > max_rounds:
            for r in todo:  # rare: users who rated nearly every item
                lo = np.searchsorted(rated_keys, cu[r] * n_items)
                hi = np.searchsorted(rated_keys, (cu[r] + 1) * n_items)
                allowed = np.setdiff1d(np.arange(n_items), rated_keys[lo:hi] - cu[r] * n_items)
                cand[r] = np.sort(rng.choice(allowed, n_neg, replace=False))
            break
        sub[bad] = rng.integers(0, n_items, size=int(bad.sum()), dtype=np.int64)
        sub.sort(axis=1)
        cand[todo] = sub
    return cand.astype(np.int32)


# ---------------------------------------------------------------------------------------
# strategies: one signature, fn(ratings, cfg, ctx) -> SplitOutcome (part labels over the
# stage-20 ratings rows + details); STRATEGIES maps each --strategy name to its function
