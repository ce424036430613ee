"""Which metrics on which part, and the selection metric: stage 60's evaluation.

explicit: rmse, mae (predictions clipped to the rating scale) of every pair of the part; on
a leave-one-out split also hr@10 / ndcg@10 ranking the sampled candidates by predicted
rating. implicit: hr@10, ndcg@10 over the sampled candidates when stage 40 wrote them, and
(when ``full``, or when there are no candidates) full ranking over every item the user has
not interacted with: full_hr@10, full_ndcg@10, full_recall@20. Scoring goes through
``scoring.py``, the path stage 70 uses too. Metric definitions: ``metrics.py``. What is known
when a part is scored (``known_before``): train for valid, train + valid for test; row-input
families score from it, and rankings leave it out.

Every pair of the part is scored: pairs whose user or item got no training data are scored
by the model's baseline (global mean + the known side's bias, ``scoring.with_fallback``) and
counted, ``fallback_n``. ``full=True`` (stage 60's final evaluation of valid and test) also
reports each metric's count and 95% interval, ``<metric>_n`` and ``<metric>_ci`` = [lo, hi]
(``metrics.py`` says how), beside the metric, which stays a plain number; the per-epoch
validation (``full=False``) returns the metrics only. On a split with sampled candidates
(loo, ncf) the full ranking is an extra beside them and the costliest part of the
evaluation (every item for every user: about an hour for NeuMF's 480k Netflix users on two
cores), so it is computed on a fixed, seeded sample of ``--full-rank-users`` users (50,000)
when the part has more; the log says so and each such metric's ``_n`` is the sample's.

Under torchrun (``distributed.py``) every rank scores its shard of the pairs, candidate rows
or users, and the scores (or the full-ranking sums) are combined over the ranks: every rank
gets the metrics one process scoring the same model gets.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .dataset import Data, sample_users, weighted_history
from .distributed import current
from .metrics import (finish_full, full_rank_metrics, rating_intervals, rmse_mae,
                      sampled_rank_metrics)
from .scoring import (_wants_rows, fallback_mask, predict_pairs, score_blocks,
                      score_candidates)

log = logging.getLogger("recpipe")


def selection_metric(task: str, data: Data) -> tuple[str, bool]:
    """(metric key, higher is better) used for early stopping and model selection."""
    return _SELECTION[task](data)


_SELECTION = {
    "explicit": lambda data: ("rmse", False),
    # ranking: the sampled candidates when stage 40 wrote them, else full ranking
    "implicit": lambda data: ("hr@10", True) if "valid" in data.candidates
    else ("full_ndcg@10", True),
}


def _binary(users: torch.Tensor, items: torch.Tensor, shape: tuple[int, int]) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(users), dtype=np.float32),
                          (users.cpu().numpy(), items.cpu().numpy())), shape=shape)


def known_before(data: Data, part: str) -> sp.csr_matrix:
    """The binary interactions known when ``part`` is scored: train for valid; train + valid
    for test. They are the items a ranking leaves out, and the history row-input families
    (EASE, Mult-VAE) score from: the test is scored after the refit on train + valid, and a
    user's validation item (on a leave-one-out split, their latest) is part of what is known
    about them, as it is for the pair models' refitted user vectors."""
    if part != "test" or len(data.valid) == 0:
        return data.train_csr
    shape = (data.n_users, data.n_items)
    known = (data.train_csr + _binary(data.valid.users, data.valid.items, shape)).tocsr()
    known.data[:] = 1.0
    return known


def history_before(model: nn.Module, data: Data, part: str) -> sp.csr_matrix | None:
    """The rows a row-input family scores ``part`` from: ``known_before``, weighted by recency
    when the model has a half-life (EASE's ``--recency``, ``dataset.weighted_history``);
    None for the pair families, which score without them."""
    if not _wants_rows(model):
        return None
    half_life = model.history_half_life()
    if half_life > 0:
        return weighted_history(data, part, half_life)
    return known_before(data, part)


def fallback_count(model: nn.Module, data: Data, part: str) -> int:
    """Pairs of ``part`` whose user or item has no training data in ``model`` (scored by the
    fallback)."""
    p = getattr(data, part)
    miss = fallback_mask(model, p.users, p.items) if len(p) else None
    return 0 if miss is None else int(miss.sum())


@torch.inference_mode()
def full_ranking(model: nn.Module, data: Data, part: str, block_users: int = 0,
                 intervals: bool = False) -> dict[str, float]:
    """Full-ranking HR@10, NDCG@10, Recall@20 for the users of ``part``: candidates are all
    items not in train (for test, also not the validation items)."""
    p = getattr(data, part)
    if len(p) == 0:
        return {}
    shape = (data.n_users, data.n_items)
    rel_csr = _binary(p.users, p.items, shape)
    excl = known_before(data, part)
    users = np.unique(p.users.cpu().numpy())
    dist = current()
    users = users[dist.shard(len(users))]        # under torchrun: this rank's users
    rel_rows = rel_csr[users]
    sums = []
    hist = history_before(model, data, part)
    hist = None if hist is None else hist[users]
    for a, b, scores in score_blocks(model, users, excl[users], data.device, block_users,
                                     history=hist):
        sub = rel_rows[a:b].tocoo()
        rel = torch.zeros(scores.shape, dtype=torch.bool, device=data.device)
        rel[torch.from_numpy(sub.row.astype(np.int64)).to(data.device),
            torch.from_numpy(sub.col.astype(np.int64)).to(data.device)] = True
        sums.append(full_rank_metrics(scores, rel))
    if dist.world > 1:
        sums = [_summed_over_ranks(sums, data.n_items, data.device)]
    return finish_full(sums, intervals)


def _summed_over_ranks(sums: list[dict[str, torch.Tensor]], n_items: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """The per-block sums of ``full_rank_metrics`` of every rank's users, added up (float64;
    a rank without users contributes zeros under the same keys)."""
    keys = list(full_rank_metrics(torch.zeros(0, n_items, device=device),
                                  torch.zeros(0, n_items, dtype=torch.bool, device=device)))
    local = torch.tensor([float(sum(float(s[k]) for s in sums)) for k in keys],
                         dtype=torch.float64, device=device)
    total = current().all_reduce(local)
    return {k: total[j] for j, k in enumerate(keys)}


def _candidates(model: nn.Module, data: Data, part: str, intervals: bool = False
                ) -> dict[str, float]:
    if part not in data.candidates:
        return {}
    cu, ci = data.candidates[part]
    known = history_before(model, data, part)
    # under torchrun: every world-th user on each rank, combined
    scores = current().sharded(len(cu), lambda sl: score_candidates(
        model, cu[sl], ci[sl], known).float())
    return sampled_rank_metrics(scores, ci, intervals=intervals)


def _rating_metrics(model: nn.Module, data: Data, part: str, eval_batch: int, full: bool,
                    full_rank_users: int = 0, seed: int = 0) -> dict[str, float]:
    """explicit: RMSE/MAE of every pair, then the candidates ranked by predicted rating."""
    p = getattr(data, part)
    out = {}
    if len(p):
        # under torchrun: every world-th pair on each rank, combined
        known = history_before(model, data, part)
        pred = current().sharded(len(p), lambda sl: predict_pairs(
            model, p.users[sl], p.items[sl], known).float())
        out = rmse_mae(pred, p.ratings, data.rating_scale)
        if full:
            out.update(rating_intervals(pred, p.ratings, p.users, data.rating_scale))
    out.update(_candidates(model, data, part, intervals=full))
    if full:
        out["fallback_n"] = fallback_count(model, data, part)
    return out


def _ranking_metrics(model: nn.Module, data: Data, part: str, eval_batch: int, full: bool,
                     full_rank_users: int = 0, seed: int = 0) -> dict[str, float]:
    """implicit: the sampled candidates, and full ranking when asked or when there are none.
    Beside sampled candidates, the full ranking is an extra, on a fixed sample of
    ``full_rank_users`` users (0: all) drawn with ``seed`` when the part has more."""
    out = _candidates(model, data, part, intervals=full)
    if full or part not in data.candidates:
        ranked = data
        if part in data.candidates:
            ranked, kept, total = sample_users(data, part, full_rank_users, seed)
            if kept < total:
                log.info("%s: full-ranking metrics on a fixed sample of %d of its %d users "
                         "(--full-rank-users, seed %d; the sampled-candidate metrics use "
                         "all of them); their _n and _ci in metrics.json are the sample's",
                         part, kept, total, seed)
        out.update(full_ranking(model, ranked, part, eval_batch, intervals=full))
    if full:
        out["fallback_n"] = fallback_count(model, data, part)
    return out


_METRICS = {"explicit": _rating_metrics, "implicit": _ranking_metrics}


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, part: str, task: str, eval_batch: int = 0,
             full: bool = True, full_rank_users: int = 0, seed: int = 0) -> dict[str, float]:
    """Metrics of ``model`` on ``part`` ("valid" or "test"), see the module docstring;
    ``full_rank_users``, ``seed``: the sample the full-ranking extras of a split with
    sampled candidates are computed on (0: every user)."""
    model.eval()
    return _METRICS[task](model, data, part, eval_batch, full, full_rank_users, seed)


def metric_line(d: dict) -> str:
    """One log line: each metric with its 95% interval when it has one, then the count of
    pairs and how many of them the fallback scored."""
    extra = ("_n", "_ci")
    parts = []
    for k, v in d.items():
        if k == "fallback_n" or k.endswith(extra):
            continue
        ci = d.get(f"{k}_ci")
        parts.append(f"{k} {v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    line = "  ".join(parts)
    n = next((d[k] for k in d if k.endswith("_n") and k != "fallback_n"), None)
    if n is not None:
        line += f"  (n {n}"
        if "fallback_n" in d:
            line += (f"; {d['fallback_n']} pairs with a user or item unseen in training, "
                     f"scored by the fallback: global mean + known-side bias")
        line += ")"
    elif "fallback_n" in d:
        line += f"  ({d['fallback_n']} pairs scored by the fallback)"
    return line
