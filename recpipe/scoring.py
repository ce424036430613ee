"""One scoring path, shared by stage 60's evaluation and stage 70's recommendations.

The model is asked through its family interface (``score_pairs``, ``score_candidates``,
``score_all``); row-input families also get the users' interaction rows (``history``,
densified a block at a time). ``score_blocks`` is the masked loop both stages use: score a
block of users against every item, set the items to leave out to -inf, hand the block on.
``top_k`` is the deterministic top-k (ties: the lower item index).

Every path scores a pair whose user or item row got no training data (``known_user`` /
``known_item`` of ``recpipe.family``) by the family's baseline, ``fallback_scores`` (global
mean + the known side's bias), instead of the model: an explicit test pair with a new item
gets mu + b_u, a user without train interactions is ranked by b_i (explicit: the item
biases; implicit without bias tables: item popularity). ``fallback_mask`` says which pairs.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


def users_per_block(n_items: int, device: torch.device, want: int, per_pair: bool) -> int:
    """Users per scoring block when each user is scored against ``n_items`` items. A
    dot-product model scoring all items does a block as one matrix product, so big blocks
    pay. Scoring that holds a vector per (user, item) pair (MLP towers; gathered candidate
    vectors, ``per_pair``) is fastest on CPU while that stays in cache: about 2^16 pairs,
    2-3x faster than 2^20 on 2 cores (bench_train.py's sampled evaluation). ``want`` > 0
    overrides."""
    if want > 0:
        return want
    if per_pair:
        budget = 2**16 if device.type == "cpu" else 2**20      # (user, item) pairs per block
    else:
        budget = 2**25 if device.type == "cpu" else 2**27      # floats per score block
    return max(1, min(65536, budget // max(1, n_items)))


def dense_rows(csr: sp.csr_matrix | None, a: int, b: int, device: torch.device
               ) -> torch.Tensor | None:
    """Rows a..b-1 of ``csr`` as a dense float32 tensor on ``device`` (None stays None)."""
    if csr is None:
        return None
    return torch.from_numpy(np.asarray(csr[a:b].toarray(), dtype=np.float32)).to(device)


def _wants_rows(model: nn.Module) -> bool:
    return getattr(model, "input", "pairs") == "rows"


def fallback_mask(model: nn.Module, users: torch.Tensor, items: torch.Tensor
                  ) -> torch.Tensor | None:
    """Bool (broadcast shape of ``users`` and ``items``): the pairs scored by the fallback;
    None when the model records no known rows or every pair is known."""
    ku, ki = getattr(model, "known_user", None), getattr(model, "known_item", None)
    if ku is None or ki is None:
        return None
    miss = ~(ku[users] & ki[items])
    return miss if bool(miss.any()) else None


def with_fallback(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                  scores: torch.Tensor) -> torch.Tensor:
    """``scores`` of pairs (users, items) (broadcastable) with the pairs of an unknown side
    replaced by the model's ``fallback_scores``."""
    miss = fallback_mask(model, users, items)
    if miss is None:
        return scores
    return torch.where(miss, model.fallback_scores(users, items).to(scores.dtype), scores)


def _fallback_all(model: nn.Module, users: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``with_fallback`` for a [U, n_items] block against every item, in place: the columns of
    unknown items, then the rows of unknown users."""
    ku, ki = getattr(model, "known_user", None), getattr(model, "known_item", None)
    if ku is None or ki is None:
        return scores
    new_u, new_i = ~ku[users], ~ki
    if not bool(new_u.any()) and not bool(new_i.any()):
        return scores
    bu, bi = model.side_baselines()
    base_u = (model.global_mean + bu[users]).to(scores.dtype)          # [U]
    if bool(new_i.any()):
        scores[:, new_i] = base_u[:, None]
    if bool(new_u.any()):
        scores[new_u] = base_u[new_u][:, None] + bi.to(scores.dtype)[None, :]
    return scores


@torch.inference_mode()
def predict_pairs(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                  history: sp.csr_matrix | None = None, block: int = 1 << 18) -> torch.Tensor:
    """[B] scores of the pairs (users[b], items[b]). ``history``: the interaction rows of
    every user (indexed by user), for row-input families."""
    if len(users) == 0:
        return torch.zeros(0, device=users.device)
    if _wants_rows(model):
        uniq, inv = torch.unique(users, return_inverse=True)
        ub = uniq.cpu().numpy()
        step = users_per_block(model.n_items, users.device, 0, False)
        out = torch.empty(users.shape[0], device=users.device)
        for s in range(0, len(ub), step):
            rows = history[ub[s:s + step]]
            scores = model.score_all(uniq[s:s + step], dense_rows(rows, 0, rows.shape[0],
                                                                   users.device)).float()
            sel = (inv >= s) & (inv < s + step)
            out[sel] = scores[inv[sel] - s, items[sel]]
        return with_fallback(model, users, items, out)
    outs = [model.score_pairs(users[s:s + block].long(), items[s:s + block].long()).float()
            for s in range(0, users.shape[0], block)]          # int64 per block (int32 parts)
    return with_fallback(model, users, items, torch.cat(outs))


@torch.inference_mode()
def score_candidates(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                     history: sp.csr_matrix | None = None, block: int = 0) -> torch.Tensor:
    """[U, C] scores for users [U] and candidate items [U, C], ``block`` users at a time
    (0: automatic, see ``users_per_block``)."""
    if _wants_rows(model):
        block = users_per_block(model.n_items, items.device, block, per_pair=False)
        ub = users.cpu().numpy()
        outs = []
        for s in range(0, len(ub), block):
            rows = history[ub[s:s + block]]
            full = model.score_all(users[s:s + block],
                                   dense_rows(rows, 0, rows.shape[0], items.device)).float()
            outs.append(full.gather(1, items[s:s + block]))
        return with_fallback(model, users[:, None], items, torch.cat(outs))
    block = users_per_block(int(items.shape[-1]), items.device, block, per_pair=True)
    outs = [model.score_candidates(users[s:s + block], items[s:s + block]).float()
            for s in range(0, users.shape[0], block)]
    return with_fallback(model, users[:, None], items, torch.cat(outs))


@torch.inference_mode()
def score_blocks(model: nn.Module, user_rows: np.ndarray, exclude: sp.csr_matrix,
                 device: torch.device, block_users: int = 0,
                 history: sp.csr_matrix | None = None
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For blocks of ``user_rows`` (rows of the model's user side): ``(a, b, scores)`` with
    ``scores`` [b - a, n_items] against every item and the items of ``exclude`` (a CSR with
    one row per entry of ``user_rows``) set to -inf. ``history`` (also aligned with
    ``user_rows``) feeds row-input families."""
    n_items = exclude.shape[1]
    step = users_per_block(n_items, device, block_users,
                           per_pair=bool(getattr(model, "per_pair_scoring", False)))
    rows_input = _wants_rows(model)
    for a in range(0, len(user_rows), step):
        b = min(len(user_rows), a + step)
        users = torch.as_tensor(user_rows[a:b], dtype=torch.long, device=device)
        hist = dense_rows(history, a, b, device) if rows_input else None
        scores = _fallback_all(model, users, model.score_all(users, hist).float())
        sub = exclude[a:b]
        if sub.nnz:
            r = np.repeat(np.arange(b - a), np.diff(sub.indptr))
            scores[torch.as_tensor(r, device=device),
                   torch.as_tensor(sub.indices, dtype=torch.long, device=device)] = -torch.inf
        yield a, b, scores


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of ``scores`` [U, N], ties broken by the lower column index.

    Returns (values [U, k'], indices [U, k']) with k' = min(k, N), sorted best first. One
    ``topk``; rows where a tie straddles the cut are redone with a stable full sort.
    """
    if torch.isnan(scores).any():
        raise FloatingPointError("the model produced NaN scores")
    k = min(k, scores.shape[1])
    vals, idx = torch.topk(scores, k, dim=1, sorted=True)
    # within the selection: order by (score desc, index asc) regardless of topk's tie order
    o = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, o), vals.gather(1, o)
    o = torch.sort(vals, dim=1, descending=True, stable=True).indices
    idx, vals = idx.gather(1, o), vals.gather(1, o)
    # a tie across the cut: topk may have kept a higher index than an equal one it dropped
    straddle = (scores >= vals[:, -1:]).sum(1) > k
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        s = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = s.values[:, :k], s.indices[:, :k]
    return vals, idx


@torch.inference_mode()
def rank_items(model: nn.Module, user_rows: np.ndarray, exclude: sp.csr_matrix, k: int,
               device: torch.device, chunk_users: int = 0,
               history: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per user over all items, the items of ``exclude`` left out.

    Returns (items int64 [U, k'], scores float32 [U, k']); items are -1 (score -inf) where a
    user has fewer than k items left."""
    U, n_items = len(user_rows), exclude.shape[1]
    k_eff = min(k, n_items)
    out_items = np.full((U, k_eff), -1, dtype=np.int64)
    out_scores = np.full((U, k_eff), -np.inf, dtype=np.float32)
    for a, b, scores in score_blocks(model, user_rows, exclude, device, chunk_users, history):
        vals, idx = top_k(scores, k_eff)
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        idx[~np.isfinite(vals)] = -1
        out_items[a:b], out_scores[a:b] = idx, vals
    return out_items, out_scores
