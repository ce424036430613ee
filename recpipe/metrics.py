"""Vectorised evaluation metrics (torch, any device).

Explicit: RMSE and MAE with predictions clipped to the rating scale.

Implicit, sampled candidates (NCF protocol): a [users, 1 + N] score matrix whose column 0 is
the held-out positive. Tie rule (pessimistic): the positive's rank is the number of other
candidates scoring strictly higher PLUS the number of other candidates scoring exactly the
same; so a tie always counts against the positive. A column holding the positive's own item
id again (the NCF ml-1m files contain 156 such users) is not a negative: it is dropped
(masked to -inf) before ranking. HR@k = [rank < k]; NDCG@k = [rank < k] / log2(rank + 2).
Computed with one ``topk`` over the negatives: the positive is in the top k iff it beats the
k-th best negative strictly, and then its rank is the number of top-k negatives >= it.

Implicit, full ranking: every item the user has not interacted with in the excluded (train)
set is a candidate; HR@k = 1 if any held-out item is in the top k; NDCG@k = DCG / ideal DCG
with binary relevance; Recall@k = hits / number of held-out items of the user. Users without
held-out items are skipped. Ties in full ranking follow ``torch.topk`` (float scores rarely
tie).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def rmse_mae(pred: torch.Tensor, target: torch.Tensor, scale: tuple[float, float] | None = None
             ) -> dict[str, float]:
    """RMSE and MAE of predictions (clipped to ``scale`` = (lo, hi) when given)."""
    pred = pred.float()
    if scale is not None:
        pred = pred.clamp(float(scale[0]), float(scale[1]))
    err = pred - target.float()
    return {"rmse": float(err.square().mean().sqrt()), "mae": float(err.abs().mean())}


def sampled_rank_metrics(scores: torch.Tensor, items: torch.Tensor | None = None,
                         ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """HR@k and NDCG@k over a [users, 1 + N] candidate score matrix (column 0 the positive).

    ``items`` ([users, 1 + N] item ids) lets columns that repeat the positive's item be
    dropped (see the module docstring for the tie rule).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [users, 1 + N] with N >= 1, got {tuple(scores.shape)}")
    scores = scores.float()
    pos = scores[:, :1]
    neg = scores[:, 1:]
    if items is not None:
        neg = neg.masked_fill(items[:, 1:] == items[:, :1], NEG_INF)
    out: dict[str, float] = {}
    kmax = min(max(ks), neg.shape[1])
    top = neg.topk(kmax, dim=1).values                       # [U, kmax], descending
    for k in ks:
        kk = min(k, neg.shape[1])
        ahead = (top[:, :kk] >= pos).sum(1)                  # negatives ranked at or above
        hit = ahead < k
        out[f"hr@{k}"] = float(hit.float().mean())
        out[f"ndcg@{k}"] = float((hit.float() / torch.log2(ahead.float() + 2)).mean())
    return out


def full_rank_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks_hr: tuple[int, ...] = (10,),
                      ks_recall: tuple[int, ...] = (20,)) -> dict[str, torch.Tensor]:
    """Per-batch sums for full ranking: ``scores`` [U, n_items] with excluded items already
    set to -inf, ``relevant`` a bool [U, n_items] of held-out items. Returns sums over users
    (call ``finish_full`` on accumulated sums)."""
    n_rel = relevant.sum(1)
    keep = n_rel > 0
    scores, relevant, n_rel = scores[keep], relevant[keep], n_rel[keep]
    kmax = min(max(ks_hr + ks_recall), scores.shape[1])
    idx = scores.topk(kmax, dim=1).indices
    hits = relevant.gather(1, idx).float()                   # [U, kmax]
    # items the model could not rank (score -inf) never count as hits
    disc = 1.0 / torch.log2(torch.arange(kmax, device=scores.device, dtype=torch.float32) + 2)
    out: dict[str, torch.Tensor] = {"users": keep.sum().float()}
    for k in ks_hr:
        kk = min(k, kmax)
        out[f"full_hr@{k}"] = (hits[:, :kk].sum(1) > 0).float().sum()
        dcg = (hits[:, :kk] * disc[:kk]).sum(1)
        ideal_n = n_rel.clamp(max=kk)
        cum = torch.cumsum(disc[:kk], 0)
        idcg = cum[ideal_n - 1]
        out[f"full_ndcg@{k}"] = (dcg / idcg).sum()
    for k in ks_recall:
        kk = min(k, kmax)
        out[f"full_recall@{k}"] = (hits[:, :kk].sum(1) / n_rel.float()).sum()
    return out


def finish_full(sums: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average the per-batch sums of ``full_rank_metrics``."""
    if not sums:
        return {}
    users = float(sum(s["users"] for s in sums))
    res = {}
    for key in sums[0]:
        if key == "users":
            continue
        res[key] = float(sum(s[key] for s in sums)) / users if users else math.nan
    return res
