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

Counts and 95% intervals (``intervals=True``, stage 60's final evaluation): each metric
``m`` gets ``m_n`` (the units it averages: pairs for RMSE/MAE, held-out rows or users for
the ranking metrics) and ``m_ci`` = [lo, hi]. RMSE/MAE: an analytic delta-method interval
that treats users as the independent units (a cluster-robust linearisation of the ratio
sum(errors) / sum(pairs) over users, so a user's correlated errors are not counted as
independent evidence); RMSE's is the square root of MSE's interval (no randomness, O(pairs)).
HR/NDCG/Recall: per-user (per-row) values, mean +- 1.96 std / sqrt(n), clipped to [0, 1].
An interval needs at least two units (else null).
"""
from __future__ import annotations

import math
from typing import Any

import torch

NEG_INF = float("-inf")
Z95 = 1.959963984540054


def _clip_ci(lo: float, hi: float, floor: float = -math.inf, ceil: float = math.inf
             ) -> list[float]:
    return [max(floor, lo), min(ceil, hi)]


def mean_interval(values: torch.Tensor, lo: float = 0.0, hi: float = 1.0
                  ) -> tuple[int, list[float] | None]:
    """(n, 95% interval mean +- 1.96 std / sqrt(n), clipped to [lo, hi]) of per-unit values."""
    v = values.double().reshape(-1)
    n = int(v.numel())
    if n < 2:
        return n, None
    m, sd = float(v.mean()), float(v.std())
    h = Z95 * sd / math.sqrt(n)
    return n, _clip_ci(m - h, m + h, lo, hi)


def ratio_interval(num: torch.Tensor, den: torch.Tensor, groups: torch.Tensor
                   ) -> tuple[float, float]:
    """(R, its standard error) for R = sum(num) / sum(den) with the terms grouped by
    ``groups`` (users) as the independent units: the delta method (linearisation) of a ratio
    estimator, var(R) = G / (G - 1) * sum_g (num_g - R den_g)^2 / (sum den)^2 over the G
    groups present."""
    g = torch.unique(groups, return_inverse=True)[1]
    G = int(g.max()) + 1 if g.numel() else 0
    num_g = torch.zeros(G, dtype=torch.float64, device=num.device).index_add_(0, g, num.double())
    den_g = torch.zeros(G, dtype=torch.float64, device=num.device).index_add_(0, g, den.double())
    total = float(den_g.sum())
    r = float(num_g.sum()) / total if total else math.nan
    if G < 2:
        return r, math.nan
    var = G / (G - 1) * float((num_g - r * den_g).square().sum()) / total ** 2
    return r, math.sqrt(var)


def rating_intervals(pred: torch.Tensor, target: torch.Tensor, users: torch.Tensor,
                     scale: tuple[float, float] | None = None) -> dict[str, Any]:
    """``rmse_n``, ``rmse_ci``, ``mae_n``, ``mae_ci`` (see the module docstring): users are
    the units of the delta-method intervals; predictions clipped as in ``rmse_mae``."""
    pred = pred.float()
    if scale is not None:
        pred = pred.clamp(float(scale[0]), float(scale[1]))
    err = (pred - target.float()).double()
    n = int(err.numel())
    ones = torch.ones_like(err)
    mse, se_mse = ratio_interval(err.square(), ones, users)
    mae, se_mae = ratio_interval(err.abs(), ones, users)
    if not math.isfinite(se_mse):
        return {"rmse_n": n, "rmse_ci": None, "mae_n": n, "mae_ci": None}
    lo, hi = max(0.0, mse - Z95 * se_mse), mse + Z95 * se_mse
    return {"rmse_n": n, "rmse_ci": [math.sqrt(lo), math.sqrt(hi)],
            "mae_n": n, "mae_ci": _clip_ci(mae - Z95 * se_mae, mae + Z95 * se_mae, 0.0)}


def rmse_mae(pred: torch.Tensor, target: torch.Tensor, scale: tuple[float, float] | None = None
             ) -> dict[str, float]:
    """RMSE and MAE of predictions (clipped to ``scale`` = (lo, hi) when given)."""
    pred = pred.float()
    if scale is not None:
        pred = pred.clamp(float(scale[0]), float(scale[1]))
    err = pred - target.float()
    return {"rmse": float(err.square().mean().sqrt()), "mae": float(err.abs().mean())}


def sampled_rank_rows(scores: torch.Tensor, items: torch.Tensor | None = None,
                      ks: tuple[int, ...] = (10,)) -> dict[str, torch.Tensor]:
    """Per-row HR@k and NDCG@k (float [users] tensors, keys ``hr@k`` / ``ndcg@k``) of a
    [users, 1 + N] candidate score matrix (column 0 the positive); ``items`` ([users, 1 + N]
    item ids) lets columns that repeat the positive's item be dropped (see the module
    docstring for the tie rule). ``sampled_rank_metrics`` averages these rows."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [users, 1 + N] with N >= 1, got {tuple(scores.shape)}")
    scores = scores.float()
    pos = scores[:, :1]
    neg = scores[:, 1:]
    if items is not None:
        neg = neg.masked_fill(items[:, 1:] == items[:, :1], NEG_INF)
    out: dict[str, torch.Tensor] = {}
    kmax = min(max(ks), neg.shape[1])
    top = neg.topk(kmax, dim=1).values                       # [U, kmax], descending
    for k in ks:
        kk = min(k, neg.shape[1])
        ahead = (top[:, :kk] >= pos).sum(1)                  # negatives ranked at or above
        hit = ahead < k
        out[f"hr@{k}"] = hit.float()
        out[f"ndcg@{k}"] = hit.float() / torch.log2(ahead.float() + 2)
    return out


def sampled_rank_metrics(scores: torch.Tensor, items: torch.Tensor | None = None,
                         ks: tuple[int, ...] = (10,), intervals: bool = False
                         ) -> dict[str, Any]:
    """HR@k and NDCG@k over a [users, 1 + N] candidate score matrix (column 0 the positive):
    the means of ``sampled_rank_rows``. ``intervals``: also each metric's ``_n`` (rows) and
    ``_ci`` (95%, over the rows).
    """
    out: dict[str, Any] = {}
    for key, v in sampled_rank_rows(scores, items, ks).items():
        out[key] = float(v.mean())
        if intervals:
            out[f"{key}_n"], out[f"{key}_ci"] = mean_interval(v)
    return out


def full_rank_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks_hr: tuple[int, ...] = (10,),
                      ks_recall: tuple[int, ...] = (20,)) -> dict[str, torch.Tensor]:
    """Per-batch sums for full ranking: ``scores`` [U, n_items] with excluded items already
    set to -inf, ``relevant`` a bool [U, n_items] of held-out items. Returns sums over users
    (call ``finish_full`` on accumulated sums), and for each metric the sum of its squares
    (key ``<metric>/sq``, for the intervals)."""
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
        hr = (hits[:, :kk].sum(1) > 0).float()
        dcg = (hits[:, :kk] * disc[:kk]).sum(1)
        ideal_n = n_rel.clamp(max=kk)
        cum = torch.cumsum(disc[:kk], 0)
        idcg = cum[ideal_n - 1]
        _put(out, f"full_hr@{k}", hr)
        _put(out, f"full_ndcg@{k}", dcg / idcg)
    for k in ks_recall:
        kk = min(k, kmax)
        _put(out, f"full_recall@{k}", hits[:, :kk].sum(1) / n_rel.float())
    return out


def _put(out: dict[str, torch.Tensor], key: str, per_user: torch.Tensor) -> None:
    out[key] = per_user.sum()
    out[key + "/sq"] = per_user.double().square().sum()


def finish_full(sums: list[dict[str, torch.Tensor]], intervals: bool = False
                ) -> dict[str, Any]:
    """Average the per-batch sums of ``full_rank_metrics``; ``intervals``: also each
    metric's ``_n`` (users) and ``_ci`` (95%, mean +- 1.96 std / sqrt(users))."""
    if not sums:
        return {}
    users = float(sum(s["users"] for s in sums))
    res: dict[str, Any] = {}
    for key in sums[0]:
        if key == "users" or key.endswith("/sq"):
            continue
        total = float(sum(s[key] for s in sums))
        res[key] = total / users if users else math.nan
        if intervals:
            n = int(users)
            res[f"{key}_n"], res[f"{key}_ci"] = n, None
            if n >= 2:
                sq = float(sum(s[key + "/sq"] for s in sums))
                var = max(0.0, (sq - total * total / n) / (n - 1))
                h = Z95 * math.sqrt(var / n)
                res[f"{key}_ci"] = _clip_ci(res[key] - h, res[key] + h, 0.0, 1.0)
    return res
