"""Metrics against hand-computed values, ties and the NCF duplicate-positive quirk included."""
import math

import pytest
import torch

from recpipe.metrics import finish_full, full_rank_metrics, rmse_mae, sampled_rank_metrics

INF = float("-inf")


def test_rmse_mae_clips_to_rating_scale():
    pred = torch.tensor([6.0, 0.0, 3.0])
    target = torch.tensor([5.0, 1.0, 4.0])
    got = rmse_mae(pred, target, (1.0, 5.0))
    # clipped predictions 5, 1, 3 -> errors 0, 0, -1
    assert got["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert got["mae"] == pytest.approx(1 / 3)
    unclipped = rmse_mae(pred, target)
    assert unclipped["rmse"] == pytest.approx(math.sqrt((1 + 1 + 1) / 3))


def _rows():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],   # positive first: rank 0
        [0.5, 0.6, 0.5, 0.1],   # one higher, one tie -> pessimistic rank 2
        [0.5, 0.7, 0.1, 0.2],   # one higher -> rank 1
        [0.5, 0.5, 0.1, 0.2],   # ties the column that repeats its own item (see items)
    ])
    items = torch.tensor([
        [1, 2, 3, 4],
        [1, 2, 3, 4],
        [1, 2, 3, 4],
        [7, 7, 3, 4],           # the positive 7 appears again among the "negatives"
    ])
    return scores, items


def test_sampled_hr_ndcg_hand_computed_with_ties_and_duplicate_positive():
    scores, items = _rows()
    got = sampled_rank_metrics(scores, items, ks=(1, 2, 3))
    # ranks: 0, 2, 1, 0 (duplicate of the positive dropped)
    assert got["hr@1"] == pytest.approx(2 / 4)
    assert got["hr@2"] == pytest.approx(3 / 4)
    assert got["hr@3"] == pytest.approx(4 / 4)
    assert got["ndcg@1"] == pytest.approx((1 + 1) / 4)
    assert got["ndcg@2"] == pytest.approx((1 + 0 + 1 / math.log2(3) + 1) / 4)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3) + 1) / 4)


def test_sampled_without_item_ids_counts_the_duplicate_as_a_tie():
    scores, _ = _rows()
    got = sampled_rank_metrics(scores, None, ks=(1, 2))
    # ranks: 0, 2, 1, 1 (the duplicate's equal score is a tie, counted against the positive)
    assert got["hr@1"] == pytest.approx(1 / 4)
    assert got["hr@2"] == pytest.approx(3 / 4)
    assert got["ndcg@2"] == pytest.approx((1 + 0 + 2 / math.log2(3)) / 4)


def test_all_equal_scores_are_a_miss_at_k_smaller_than_candidates():
    scores = torch.zeros(3, 101)                 # an untrained constant model
    got = sampled_rank_metrics(scores, ks=(10,))
    assert got["hr@10"] == 0.0 and got["ndcg@10"] == 0.0


def test_sampled_rejects_bad_shape():
    with pytest.raises(ValueError):
        sampled_rank_metrics(torch.zeros(5))


def test_full_ranking_hand_computed():
    scores = torch.tensor([
        [0.9, 0.1, INF, 0.5, 0.3],   # item 2 excluded (train)
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.5, 0.4, 0.3, 0.2, 0.1],   # no held-out items: skipped
    ])
    rel = torch.tensor([
        [False, False, False, True, True],   # ranks: item3 at 1, item4 at 2
        [True, False, False, False, False],  # rank 4 (of 5)
        [False, False, False, False, False],
    ])
    sums = full_rank_metrics(scores, rel, ks_hr=(2,), ks_recall=(3,))
    got = finish_full([sums])
    assert got["full_hr@2"] == pytest.approx((1 + 0) / 2)
    # user 0: dcg = 1/log2(3) (position 1 of 0..1), idcg(2 relevant, k=2) = 1 + 1/log2(3)
    d0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert got["full_ndcg@2"] == pytest.approx((d0 + 0) / 2)
    # recall@3: user 0 has both in top 3 -> 1; user 1 none -> 0
    assert got["full_recall@3"] == pytest.approx(0.5)
