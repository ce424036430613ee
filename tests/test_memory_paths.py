"""Stage 60's memory paths hold the data they did before, without the copies: the parts are
filled from stage 40's CSRs in place, the refit's train + valid part is a view of the two,
the explicit task's binary train CSR is read on first use (once for every copy of the data),
and the rowsgd kernel permutes its one copy of the ratings in place, each epoch in its seed's
order whatever the epochs before. The parts' ids are int32; the keys user * n_items + item
that outgrow int32 (a 480k x 17,770 table has 8.5e9 of them) are formed in int64."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recpipe import dataset, kernels
from recpipe.cli import PipelineError
from recpipe.dataset import Part, load_data, sample_users, with_valid_in_train
from stage_fixtures import ml100k_stage40

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ml100k_random(tmp_path_factory):
    return ml100k_stage40(tmp_path_factory, "memory_paths", "--seed", "1", "--strategy", "random")


def _reference_part(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part as load_data built it before: the COO entries sorted by (user, item)."""
    m = sp.load_npz(path).tocsr()
    m.sum_duplicates()
    coo = m.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return (coo.row[order].astype(np.int64), coo.col[order].astype(np.int64),
            coo.data.astype(np.float32)[order])


@pytest.mark.parametrize("task", ["explicit", "implicit"])
def test_the_parts_are_the_csr_entries_in_user_item_order(ml100k_random, task):
    data = load_data(ml100k_random, task, CPU)
    suffix = "" if task == "explicit" else "_implicit"
    for name in ("train", "valid", "test"):
        p = getattr(data, name)
        u, i, r = _reference_part(ml100k_random / "40_make_sparse_matrix" / f"{name}{suffix}.npz")
        # int32 ids (dataset.id_dtype): 8 bytes a rating less than int64
        assert p.users.dtype == p.items.dtype == torch.int32 and p.ratings.dtype == torch.float32
        assert torch.equal(p.users.long(), torch.from_numpy(u)), name
        assert torch.equal(p.items.long(), torch.from_numpy(i)), name
        assert torch.equal(p.ratings, torch.from_numpy(r)), name


def test_the_refit_part_is_a_view_of_train_and_valid(ml100k_random):
    data = load_data(ml100k_random, "explicit", CPU)
    t, v = data.train, data.valid
    merged = with_valid_in_train(data, keys=False, csr=False).train
    for got, a, b in ((merged.users, t.users, v.users), (merged.items, t.items, v.items),
                      (merged.ratings, t.ratings, v.ratings)):
        assert torch.equal(got, torch.cat([a, b]))
        assert got.data_ptr() == a.data_ptr()                  # no copy
    # parts that do not lie one after the other are copied, to the same values
    apart = dataclasses.replace(data, train=Part(t.users.clone(), t.items.clone(),
                                                 t.ratings.clone()))
    copied = with_valid_in_train(apart, keys=False, csr=False).train
    assert torch.equal(copied.users, merged.users) and torch.equal(copied.ratings,
                                                                   merged.ratings)
    assert copied.users.data_ptr() != t.users.data_ptr()


def test_the_explicit_train_csr_is_read_on_first_use_and_once(ml100k_random, monkeypatch):
    reads = []
    real = dataset._load_npz
    monkeypatch.setattr(dataset, "_load_npz", lambda p: reads.append(p.name) or real(p))
    data = load_data(ml100k_random, "explicit", CPU)
    assert sorted(reads) == ["test.npz", "train.npz", "valid.npz"]
    sub, kept, total = sample_users(data, "valid", 50, seed=0)
    assert kept < total and len(reads) == 3            # copying the data reads nothing
    csr = sub.train_csr
    assert reads[3:] == ["train_implicit.npz"]
    assert data.train_csr is csr and len(reads) == 4   # the copies share the one read
    want = sp.load_npz(ml100k_random / "40_make_sparse_matrix" / "train_implicit.npz")
    assert (csr != want.tocsr()).nnz == 0 and csr.has_canonical_format
    # the implicit task reads its train matrix for the parts and keeps it
    reads.clear()
    imp = load_data(ml100k_random, "implicit", CPU)
    assert sorted(reads) == ["test_implicit.npz", "train_implicit.npz", "valid_implicit.npz"]
    assert imp.train_csr.nnz == len(imp.train) and len(reads) == 3


def test_a_train_csr_read_after_stage_40_was_rebuilt_is_refused(ml100k_random, monkeypatch):
    data = load_data(ml100k_random, "explicit", CPU)
    monkeypatch.setattr(dataset, "fingerprint", lambda path: "another build")
    with pytest.raises(PipelineError, match="rebuilt while this run was using it; rerun"):
        data.train_csr


needs_numba = pytest.mark.skipif(not kernels.available(),
                                 reason=kernels.missing_reason())


def _kernel_data(n_users=300, n_items=200, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n).astype(np.int64)
    items = rng.integers(0, n_items, n).astype(np.int64)
    z = rng.normal(size=n).astype(np.float32)
    tables = [np.full((rows, 4 + 3), 0.1, np.float32) for rows in (n_users, n_items)]
    return users, items, z, tables


@needs_numba
def test_each_epoch_is_in_its_seeds_order_whatever_the_epochs_before():
    users, items, z, tables = _kernel_data()
    walked = kernels.Ratings(users, items, z)
    for seed in (5, 9, 9, 3):
        walked.epoch(seed, *[t.copy() for t in tables], 0.05, 0.05, 2)
    fresh = kernels.Ratings(users, items, z)
    U, V = (t.copy() for t in tables)
    sq_fresh = fresh.epoch(3, U, V, 0.05, 0.05, 2)
    for a in ("ou", "oi", "oz"):
        assert np.array_equal(getattr(walked, a), getattr(fresh, a)), a
    # and the epoch itself gives the same result from either
    U2, V2 = (t.copy() for t in tables)
    assert walked.epoch(3, U2, V2, 0.05, 0.05, 2) == sq_fresh
    assert np.array_equal(U, U2) and np.array_equal(V, V2)


@needs_numba
def test_a_permutation_cut_short_is_not_trained_on(monkeypatch):
    users, items, z, tables = _kernel_data(n=2000)
    r = kernels.Ratings(users, items, z)
    r.epoch(1, *tables, 0.05, 0.05, 1)
    real = kernels._permute_blocks

    def cut(*a):
        real(*a)
        raise KeyboardInterrupt
    monkeypatch.setattr(kernels, "_permute_blocks", cut)
    with pytest.raises(KeyboardInterrupt):
        r.epoch(2, *tables, 0.05, 0.05, 1)
    monkeypatch.setattr(kernels, "_permute_blocks", real)
    with pytest.raises(RuntimeError, match="interrupted while it reordered.*new Ratings"):
        r.epoch(3, *tables, 0.05, 0.05, 1)


# 70,000 users x 40,000 items: 2.8e9 keys, past int32, in a table of a few hundred ratings
BIG_USERS, BIG_ITEMS = 70_000, 40_000


def test_the_keys_of_int32_ids_do_not_overflow():
    u = torch.tensor([BIG_USERS - 1, 1], dtype=torch.int32)
    i = torch.tensor([BIG_ITEMS - 1, 2], dtype=torch.int32)
    keys = dataset.pair_keys(u, i, BIG_ITEMS)
    assert keys.dtype == torch.int64
    assert keys.tolist() == [(BIG_USERS - 1) * BIG_ITEMS + BIG_ITEMS - 1, BIG_ITEMS + 2]
    assert dataset.id_dtype(BIG_USERS, BIG_ITEMS) == torch.int32
    assert dataset.id_dtype(2**31, 10) == torch.int64


def test_negatives_of_a_high_user_id_avoid_its_positives():
    """The last user rated every even item; with its keys formed in int32 (wrapped) the
    membership test would miss them and hand back even items as negatives."""
    user = BIG_USERS - 1
    even = torch.arange(0, BIG_ITEMS, 2)
    keys = torch.sort(user * BIG_ITEMS + even).values
    users = torch.full((256,), user, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    neg = dataset.sample_negatives(users, BIG_ITEMS, 8, keys, gen)
    assert neg.shape == (256, 8)
    assert bool((neg % 2 == 1).all()), "a train positive was drawn as a negative"


def test_the_refit_keys_of_int32_ids_are_int64():
    data = _tiny_big_data()
    merged = with_valid_in_train(data, keys=True, csr=False)
    t, v = data.train, data.valid
    want = np.unique(np.concatenate([t.users.numpy().astype(np.int64) * BIG_ITEMS + t.items.numpy(),
                                     v.users.numpy().astype(np.int64) * BIG_ITEMS + v.items.numpy()]))
    assert merged.train_keys.dtype == torch.int64
    assert np.array_equal(merged.train_keys.numpy(), want)


def test_a_device_csr_of_int32_rows_past_int32_keys():
    from recpipe.autoencoders import DeviceCSR
    rows = torch.tensor([BIG_USERS - 1, 1, BIG_USERS - 1], dtype=torch.int32)
    cols = torch.tensor([BIG_ITEMS - 1, 3, 0], dtype=torch.int32)
    m = DeviceCSR(rows, cols, torch.tensor([1.0, 2.0, 3.0]), BIG_USERS, BIG_ITEMS)
    dense, seen = m.rows(torch.tensor([BIG_USERS - 1, 1]))
    assert dense[0, BIG_ITEMS - 1] == 1.0 and dense[0, 0] == 3.0 and dense[1, 3] == 2.0
    assert int(seen.sum()) == 3


def _tiny_big_data() -> dataset.Data:
    """A Data of a few ratings on a 70,000 x 40,000 table, the parts as load_data builds them
    (int32 ids), train keys built from its CSR."""
    rng = np.random.default_rng(0)
    def part(n):
        u = np.sort(rng.choice(BIG_USERS, n, replace=False)).astype(np.int32)
        return Part(users=torch.from_numpy(u), items=torch.from_numpy(
            rng.integers(0, BIG_ITEMS, n).astype(np.int32)), ratings=torch.ones(n))
    train, valid = part(200), part(50)
    csr = sp.csr_matrix((np.ones(200, np.float32), (train.users.numpy(), train.items.numpy())),
                        shape=(BIG_USERS, BIG_ITEMS))
    return dataset.Data(manifest={}, n_users=BIG_USERS, n_items=BIG_ITEMS,
                        rating_scale=(1.0, 1.0), global_mean=0.0, rating_std=1.0,
                        task="implicit", train=train, valid=valid, test=part(10),
                        train_keys=None, candidates={}, device=CPU, train_csr=csr)


def test_train_keys_come_from_the_csr_without_a_sort():
    """csr_keys: the sorted, distinct keys of a CSR's entries, built in place; a CSR that is
    not canonical (unsorted rows, repeated entries) is canonicalised first."""
    rng = np.random.default_rng(3)
    rows, cols = rng.integers(0, 40, 500), rng.integers(0, 30, 500)     # repeats included
    messy = sp.csr_matrix((np.ones(500, np.float32), (rows, cols)), shape=(40, 30))
    messy.has_sorted_indices = False
    want = np.unique(rows.astype(np.int64) * 30 + cols)
    assert np.array_equal(dataset.csr_keys(messy, 30), want)
    tidy = messy.copy()
    tidy.sum_duplicates()
    assert tidy.has_canonical_format and np.array_equal(dataset.csr_keys(tidy, 30), want)


def test_the_refit_keys_are_the_sorted_union():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(np.unique(rng.integers(0, 10_000, 3_000)))
    more = torch.cat([a[::97], torch.from_numpy(rng.integers(0, 10_100, 400)),
                      torch.tensor([-0, 10_099, 10_099])])     # overlaps, repeats, both ends
    assert torch.equal(dataset.merged_keys(a, more), torch.unique(torch.cat([a, more])))
    assert torch.equal(dataset.merged_keys(a[:0], more), torch.unique(more))
    assert torch.equal(dataset.merged_keys(a, more[:0]), a)


def test_the_key_filter_is_the_same_built_chunk_by_chunk(monkeypatch):
    keys = torch.from_numpy(np.unique(np.random.default_rng(5).integers(0, 10**9, 50_000)))
    whole = dataset.KeySet(keys, 10**9, max_bytes=1 << 12)
    monkeypatch.setattr(dataset.KeySet, "CHUNK", 1000)
    chunked = dataset.KeySet(keys, 10**9, max_bytes=1 << 12)
    assert not whole.exact and torch.equal(whole.bits, chunked.bits)
    q = torch.cat([keys[::7], torch.randint(0, 10**9, (20_000,))])
    assert torch.equal(chunked.contains(q), torch.from_numpy(np.isin(q.numpy(), keys.numpy())))
