"""Metrics against hand-computed values, ties and the NCF duplicate-positive quirk included."""
import math

import pytest
import torch

from recpipe.metrics import (finish_full, full_rank_metrics, rating_intervals, rmse_mae,
                             sampled_rank_metrics)

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


# ---- counts and 95% intervals ------------------------------------------------------------


def _errors(n_users: int, per_user: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(per_user)
    user_bias = torch.randn(n_users, generator=g)[users] * 0.5      # correlated within a user
    target = torch.full((len(users),), 3.0)
    pred = target + user_bias + torch.randn(len(users), generator=g)
    return pred, target, users


def test_rating_intervals_bracket_the_metric_and_shrink_with_n():
    widths = []
    for n_users in (50, 500, 5000):
        pred, target, users = _errors(n_users, 20)
        point = rmse_mae(pred, target, (1.0, 5.0))
        ci = rating_intervals(pred, target, users, (1.0, 5.0))
        assert ci["rmse_n"] == ci["mae_n"] == len(users)
        for key in ("rmse", "mae"):
            lo, hi = ci[f"{key}_ci"]
            assert lo < point[key] < hi
        widths.append(ci["rmse_ci"][1] - ci["rmse_ci"][0])
    assert widths[0] > widths[1] > widths[2]
    # about 1/sqrt(users): 100x the users, about a tenth of the width
    assert 0.05 < widths[2] / widths[0] < 0.2


def test_rating_interval_counts_users_as_the_units():
    # the same errors, all from one user or one per user: one user gives no interval, and
    # errors shared within users widen it against independent pairs
    pred, target, users = _errors(200, 50)
    clustered = rating_intervals(pred, target, users)
    independent = rating_intervals(pred, target, torch.arange(len(users)))
    assert (clustered["mae_ci"][1] - clustered["mae_ci"][0]
            > 1.5 * (independent["mae_ci"][1] - independent["mae_ci"][0]))
    assert rating_intervals(pred, target, torch.zeros_like(users))["rmse_ci"] is None


def test_mae_interval_is_the_delta_method_by_hand():
    pred = torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0])
    target = torch.tensor([2.0, 2.0, 2.0, 4.0, 3.0])
    users = torch.tensor([0, 0, 1, 1, 2])
    # |e| = 1 0 2 1 2; mae = 6 / 5; per-user (sum, n) = (1, 2), (3, 2), (2, 1)
    r = 6 / 5
    var = 3 / 2 * ((1 - 2 * r) ** 2 + (3 - 2 * r) ** 2 + (2 - r) ** 2) / 25
    got = rating_intervals(pred, target, users)["mae_ci"]
    h = 1.959963984540054 * math.sqrt(var)
    assert got == pytest.approx([r - h, r + h])


def test_rating_intervals_take_under_a_second_at_100k_pairs():
    import time
    pred, target, users = _errors(2000, 50)
    t0 = time.perf_counter()
    rating_intervals(pred, target, users, (1.0, 5.0))
    assert time.perf_counter() - t0 < 1.0


def test_ranking_intervals_are_mean_plus_minus_196_std_over_users():
    scores, items = _rows()
    got = sampled_rank_metrics(scores, items, ks=(2,), intervals=True)
    plain = sampled_rank_metrics(scores, items, ks=(2,))
    assert plain == {k: v for k, v in got.items() if not k.endswith(("_n", "_ci"))}
    hits = torch.tensor([float(v) for v in _per_row_hits(scores, items, 2)])
    m, sd = float(hits.mean()), float(hits.std())
    h = 1.959963984540054 * sd / math.sqrt(len(hits))
    assert got["hr@2_n"] == len(hits)
    assert got["hr@2_ci"] == pytest.approx([max(0.0, m - h), min(1.0, m + h)])
    # full ranking: the same rule over the users with held-out items
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.6, 0.7]])
    rel = torch.tensor([[True, False, False], [True, False, False], [True, False, False],
                        [False, False, False]])
    res = finish_full([full_rank_metrics(scores, rel, ks_hr=(1,), ks_recall=(1,))],
                      intervals=True)
    v = torch.tensor([1.0, 0.0, 1.0])
    h = 1.959963984540054 * float(v.std()) / math.sqrt(3)
    assert res["full_hr@1_n"] == 3
    assert res["full_hr@1_ci"] == pytest.approx([2 / 3 - h, 1.0])
    assert "full_hr@1_ci" not in finish_full([full_rank_metrics(scores, rel, (1,), (1,))])


def _per_row_hits(scores, items, k):
    out = []
    for r in range(scores.shape[0]):
        pos = scores[r, 0]
        neg = [scores[r, j] for j in range(1, scores.shape[1]) if items[r, j] != items[r, 0]]
        out.append(sum(float(x) >= float(pos) for x in neg) < k)
    return out
