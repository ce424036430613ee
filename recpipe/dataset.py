"""Stage 40's artifact as device-resident tensors, and vectorised negative sampling.

Everything the training loop touches lives on the chosen device: (user, item, rating)
triples as int32 (``id_dtype``) / float32 tensors, the sorted train keys for membership tests, and the
evaluation candidates. Batches are slices of a ``torch.randperm``; negatives are drawn for a
whole epoch at once and redrawn every epoch. No per-sample Python, no DataLoader.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from .artifacts import (CORRUPT_FILE_ERRORS, MANIFEST, fingerprint, read_manifest,
                        rerun_command, stage_dir)
from .cli import PipelineError
from .holdout import in_sorted

STAGE40 = "40_make_sparse_matrix"


@dataclasses.dataclass
class Part:
    """One split part: parallel tensors of user, item and rating (float32)."""
    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor

    def __len__(self) -> int:
        return int(self.users.shape[0])


class _OnFirstUse:
    """A value read by ``load()`` when it is first asked for; the copies of a ``Data`` that
    ``_replace`` makes share it, so it is read once."""

    def __init__(self, load: Callable[[], Any]):
        self._load: Callable[[], Any] | None = load
        self._value = None

    def get(self) -> Any:
        if self._load is not None:
            self._value, self._load = self._load(), None
        return self._value


class _ReadOnFirstUse:
    """A ``Data`` field that may hold an ``_OnFirstUse``: reading the field reads the value.
    ``load_data`` defers the binary train CSR this way, since the explicit pair models never
    read it (8 bytes a train interaction: 0.65 GB at 81M)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None                   # the field's default (dataclasses asks the class)
        value = obj.__dict__.get(self.slot)
        return value.get() if isinstance(value, _OnFirstUse) else value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclasses.dataclass
class Data:
    manifest: dict[str, Any]
    n_users: int
    n_items: int
    rating_scale: tuple[float, float]
    global_mean: float
    rating_std: float
    task: str
    train: Part
    valid: Part
    test: Part
    # sorted user * n_items + item of the train interactions: None until ``keys()`` builds
    # them (only sampled negatives read them: 8 bytes an interaction, and a sort)
    train_keys: torch.Tensor | None
    candidates: dict[str, tuple[torch.Tensor, torch.Tensor]]   # part -> (users, items[U,1+N])
    device: torch.device
    # binary train interactions (exclusion, negatives, closed forms); load_data reads them
    # on first use (``_ReadOnFirstUse``)
    train_csr: sp.csr_matrix | None = _ReadOnFirstUse()
    fingerprint: str = ""             # of stage 40's manifest (what a checkpoint trained on)
    source: Path | None = None        # stage 40's folder (read lazily: the timestamps)
    # part -> (known interactions, recency rank of each entry): read and ranked once, shared
    # by the copies ``dataclasses.replace`` makes (the ranks depend on stage 40's files only)
    recency: dict[str, tuple[sp.csr_matrix, np.ndarray]] = dataclasses.field(
        default_factory=dict, repr=False)

    @property
    def has_candidates(self) -> bool:
        return bool(self.candidates)

    def keys(self) -> torch.Tensor:
        """The sorted train keys (``train_keys``), built from ``train_csr`` on first use."""
        if self.train_keys is None:
            if self.train_csr is None:
                raise RuntimeError("this Data copy was made without train keys or CSR "
                                   "(with_valid_in_train(keys=False, csr=False))")
            self.train_keys = torch.from_numpy(csr_keys(self.train_csr, self.n_items)).to(
                self.device)
        return self.train_keys


def csr_keys(csr: sp.csr_matrix, n_items: int) -> np.ndarray:
    """The sorted, distinct user * n_items + item keys (int64) of ``csr``'s entries, built in
    place in the output (8 bytes an entry; no COO copy): a canonical CSR lists them in order
    already, any other is canonicalised on a copy first."""
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    keys = np.repeat(np.arange(csr.shape[0], dtype=np.int64) * np.int64(n_items),
                     np.diff(csr.indptr))
    keys += csr.indices
    return keys


def merged_keys(sorted_keys: torch.Tensor, more: torch.Tensor) -> torch.Tensor:
    """The sorted union of the sorted, distinct ``sorted_keys`` and the keys ``more`` (a
    few, e.g. the validation pairs'): one insertion into a new array, no sort of the whole
    (``torch.unique`` of the concatenation sorts it, with temporaries twice its size)."""
    a = sorted_keys.cpu().numpy()
    b = np.unique(more.cpu().numpy())
    b = b[~in_sorted(b, a)]
    return torch.from_numpy(np.insert(a, np.searchsorted(a, b), b)).to(sorted_keys.device)


def _load_npz(path: Path) -> sp.csr_matrix:
    if not path.exists():
        raise PipelineError(f"{path} is missing although its manifest exists; rerun "
                            f"`{rerun_command(path.parent.parent, STAGE40)}`")
    try:
        m = sp.load_npz(path).tocsr()
    except CORRUPT_FILE_ERRORS as e:    # truncated or corrupt: BadZipFile, EOFError, ...
        raise PipelineError(f"{path} is unreadable ({type(e).__name__}: {e}); rerun "
                            f"`{rerun_command(path.parent.parent, STAGE40)}`") from None
    return m


def _read_part(d: Path, name: str, shape: tuple[int, int]) -> sp.csr_matrix:
    """Stage 40's ``name`` matrix, checked against the manifest's shape, in canonical form
    (duplicates summed, each row's items sorted)."""
    p = d / f"{name}.npz"
    m = _load_npz(p)
    if m.shape != shape:
        raise PipelineError(f"{p} has shape {m.shape}, the manifest says {shape}; rerun "
                            f"stage 40")
    m.sum_duplicates()
    return m


def _fill(m: sp.csr_matrix, path: Path, explicit: bool, users: np.ndarray, items: np.ndarray,
          ratings: np.ndarray) -> None:
    """Write the entries of the canonical CSR ``m`` into ``users`` / ``items`` (``id_dtype``) and
    ``ratings`` (float32), each of ``m.nnz``, in (user, item) order: the CSR's own order, so
    no sort and no temporary copy of the part."""
    vals = m.data.astype(np.float32, copy=False)
    bad = ~np.isfinite(vals)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        what = "explicit ratings" if explicit else "interaction values"
        row = int(np.searchsorted(m.indptr, j, side="right")) - 1
        raise PipelineError(
            f"{path}: {int(bad.sum())} non-finite value(s) among the {what} (first at user_idx "
            f"{row}, item_idx {int(m.indices[j])}: {vals[j]}); ratings must be "
            f"finite numbers. Interactions kept without a rating belong to the implicit task: "
            f"use --task implicit, or rerun stage 10 without keeping unrated rows")
    # each entry's row: the number of rows after the first that start at or before it
    users[:] = 0
    row_starts = m.indptr[1:-1]
    np.add.at(users, row_starts[row_starts < m.nnz], 1)
    np.cumsum(users, out=users)
    items[:] = m.indices
    ratings[:] = vals


def id_dtype(n_users: int, n_items: int) -> torch.dtype:
    """The parts' user and item ids: int32 while both counts fit (8 bytes a rating less at
    100M ratings than int64). Arithmetic that can leave int32 (the keys user * n_items +
    item) widens first: ``pair_keys``."""
    return torch.int32 if max(n_users, n_items) < 2**31 else torch.int64


def pair_keys(users: torch.Tensor, items: torch.Tensor, n_items: int) -> torch.Tensor:
    """user * n_items + item as int64, whatever the ids' dtype (int32 ids would overflow)."""
    return users.long() * int(n_items) + items.long()


def _parts(m: dict[str, sp.csr_matrix], names: tuple[str, ...], d: Path, suffix: str,
           explicit: bool, device: torch.device) -> dict[str, Part]:
    """The parts ``names`` as consecutive slices of one set of tensors (``with_valid_in_train``
    joins train and valid without a copy); each CSR is dropped from ``m`` once copied."""
    sizes = [m[name].nnz for name in names]
    ids = id_dtype(*m[names[0]].shape)
    users = torch.empty(sum(sizes), dtype=ids)
    items = torch.empty(sum(sizes), dtype=ids)
    ratings = torch.empty(sum(sizes), dtype=torch.float32)
    at = 0
    for name, n in zip(names, sizes):
        _fill(m.pop(name), d / f"{name}{suffix}.npz", explicit, users[at:at + n].numpy(),
              items[at:at + n].numpy(), ratings[at:at + n].numpy())
        at += n
    users, items, ratings = users.to(device), items.to(device), ratings.to(device)
    parts, at = {}, 0
    for name, n in zip(names, sizes):
        parts[name] = Part(users=users[at:at + n], items=items[at:at + n],
                           ratings=ratings[at:at + n])
        at += n
    return parts


def _train_binary(source: Path, name: str, shape: tuple[int, int], upstream: str
                  ) -> sp.csr_matrix:
    """The binary train view, read when first used; stage 40 must still be the build the
    parts were read from."""
    if fingerprint(source / MANIFEST) != upstream:
        raise PipelineError(f"{source} was rebuilt while this run was using it; rerun the "
                            f"command once stage 40 has finished")
    return _read_part(source, name, shape)


def load_data(data_dir: str | Path, task: str, device: torch.device,
              needed_by: str = "60_train.py") -> Data:
    """Read and check stage 40's artifact; everything ends up on ``device``."""
    data_dir = Path(data_dir)
    man = read_manifest(data_dir, STAGE40, needed_by=needed_by)
    d = stage_dir(data_dir, STAGE40)
    try:
        n_users, n_items = int(man["n_users"]), int(man["n_items"])
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{d / 'manifest.json'} lacks integer n_users/n_items; rerun "
                            f"`python 40_make_sparse_matrix.py --data-dir {data_dir}`")
    explicit = task == "explicit"
    suffix = "" if explicit else "_implicit"
    shape = (n_users, n_items)
    # one CSR in memory at a time beside the parts (valid's is small)
    mats = {name: _read_part(d, name + suffix, shape) for name in ("valid", "train")}
    if mats["train"].nnz == 0:
        raise PipelineError(f"{d / ('train' + suffix + '.npz')} holds no interactions; check the "
                            f"filters of stages 20-30")
    fp = fingerprint(d / MANIFEST)
    # the binary train view for exclusion and negatives (the implicit file holds unrated too):
    # the implicit task's is the train matrix itself; the explicit task's is read on first use
    bin_name = "train_implicit" if (d / "train_implicit.npz").exists() else "train"
    train_bin: Any = mats["train"] if not explicit else _OnFirstUse(
        lambda: _train_binary(d, bin_name, shape, fp))
    parts = _parts(mats, ("train", "valid"), d, suffix, explicit, device)
    mats["test"] = _read_part(d, "test" + suffix, shape)
    parts.update(_parts(mats, ("test",), d, suffix, explicit, device))
    tr = parts["train"].ratings
    scale = man.get("rating_scale") or [float(tr.min()), float(tr.max())]
    # the train ratings' mean and std standardise the explicit models' outputs; stage 40
    # computed the mean (older artifacts lack it: computed here the same way)
    gmean, std = 0.0, 1.0
    if explicit:
        gmean = man.get("global_mean")
        gmean = float(tr.double().mean()) if gmean is None else float(gmean)
        std = man.get("rating_std")
        if std is None:
            std = float(tr.double().std()) if len(tr) > 1 else 1.0
        std = float(std)
    if not np.isfinite(std) or std <= 0:
        std = 1.0
    cands = {}
    for name in ("valid", "test"):
        p = d / f"{name}_candidates.npz"
        if p.exists():
            try:
                with np.load(p) as z:
                    cu, ci = z["users"].astype(np.int64), z["items"].astype(np.int64)
            except CORRUPT_FILE_ERRORS as e:    # truncated or corrupt: BadZipFile, EOFError, ...
                raise PipelineError(f"{p} is unreadable or lacks users/items arrays "
                                    f"({type(e).__name__}: {e}); rerun "
                                    f"`{rerun_command(data_dir, STAGE40)}`") from None
            if ci.ndim != 2 or ci.shape[0] != cu.shape[0] or ci.shape[1] < 2:
                raise PipelineError(f"{p}: items must be [users, 1 + N] with N >= 1, got "
                                    f"{ci.shape} for {cu.shape[0]} users; rerun stage 40")
            if cu.size and (cu.min() < 0 or cu.max() >= n_users or ci.min() < 0
                            or ci.max() >= n_items):
                raise PipelineError(f"{p}: ids outside 0..n_users-1 / 0..n_items-1; rerun "
                                    f"stage 40")
            cands[name] = (torch.from_numpy(cu).to(device), torch.from_numpy(ci).to(device))
    return Data(manifest=man, n_users=n_users, n_items=n_items,
                rating_scale=(float(scale[0]), float(scale[1])), global_mean=gmean,
                rating_std=std, task=task, train=parts["train"], valid=parts["valid"],
                test=parts["test"], train_csr=train_bin,
                train_keys=None, candidates=cands, device=device, fingerprint=fp, source=d)


def has_times(data: Data) -> bool:
    """Whether stage 40 wrote the interactions' timestamps (``train_time.npy``)."""
    return data.source is not None and "train" in (data.manifest.get("times") or [])


def require_times(data: Data) -> None:
    """Stop with the fix when a history is to be weighted by recency without timestamps."""
    if not has_times(data):
        raise PipelineError(f"{data.source}: stage 40 wrote no timestamps (train_time.npy), "
                            f"so a history cannot be weighted by recency; rerun "
                            f"`python 40_make_sparse_matrix.py` on a split with timestamps, or "
                            f"use --recency 0")


_CHUNK = 1 << 22          # entries per step of the chunked passes below


def _narrow(x: np.ndarray) -> np.ndarray:
    """``x`` (integers) as int32 when its values fit, else int64."""
    if len(x) and (x.min() < -2**31 or x.max() >= 2**31):
        return x.astype(np.int64, copy=False)
    return x.astype(np.int32, copy=False)


def recency_ranks(csr: sp.csr_matrix, times: np.ndarray) -> np.ndarray:
    """For each entry of ``csr`` (aligned with ``times``), how many of its row's entries are
    later: 0 = the row's latest; equal timestamps: the higher item index counts as later.

    int32 where the values fit (the sort keys, the ranks): at Netflix's 100M entries the
    int64 keys and the gathered row starts of the first version took 4.7 GiB beside the
    loaded split, for the same ranks."""
    n = csr.nnz
    counts = np.diff(csr.indptr)
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int32), counts)
    t = np.asarray(times)
    t = _narrow(t - t.min()) if n else t.astype(np.int64)
    np.negative(t, out=t)                      # latest first (t >= 0: no overflow)
    # within each row, latest first; ties by the higher item index
    order = np.lexsort((np.negative(csr.indices.astype(np.int32)), t, rows))
    del t
    # the order keeps the rows' blocks where they are (rows is ascending), so the k-th
    # sorted entry is in row rows[k]: its rank is k minus that row's start
    idx = np.int32 if n < 2**31 else np.int64
    rank = np.empty(n, dtype=idx)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        rank[order[s:e]] = (np.arange(s, e, dtype=idx)
                            - csr.indptr[rows[s:e]].astype(idx))
    return rank


def _weighted(csr: sp.csr_matrix, rank: np.ndarray, half_life: float) -> sp.csr_matrix:
    """``csr``'s pattern weighted 0.5 ** (rank / half_life): computed in float64 and stored
    as float32, a chunk at a time (no float64 array of the entries' size)."""
    w = np.empty(len(rank), dtype=np.float32)
    for s in range(0, len(rank), _CHUNK):
        w[s:s + _CHUNK] = np.power(0.5, rank[s:s + _CHUNK] / float(half_life))
    return sp.csr_matrix((w, csr.indices, csr.indptr), shape=csr.shape)


def recency_weights(csr: sp.csr_matrix, times: np.ndarray, half_life: float) -> sp.csr_matrix:
    """``csr``'s pattern with each entry weighted 0.5 ** (r / half_life), r its
    ``recency_ranks`` (the row's latest weighs 1). ``times`` is aligned with ``csr.data``."""
    csr = csr.tocsr()
    return _weighted(csr, recency_ranks(csr, times), half_life)


def _timed_part(d: Path, name: str) -> tuple[sp.csr_matrix, np.ndarray]:
    m = _load_npz(d / f"{name}_implicit.npz").tocsr()
    t = np.load(d / f"{name}_time.npy", allow_pickle=False)
    if len(t) != m.nnz:
        raise PipelineError(f"{d / (name + '_time.npy')} has {len(t)} entries for the "
                            f"{m.nnz} of {name}_implicit.npz; rerun "
                            f"`{rerun_command(d.parent, STAGE40)}`")
    return m, t


def weighted_history(data: Data, part: str, half_life: float, keep: bool = True
                     ) -> sp.csr_matrix:
    """The interactions known when ``part`` is scored (train for valid; train + valid for
    test), weighted by recency (``recency_weights``) from stage 40's timestamps. The files
    are read and ranked once per part and kept (``data.recency``), so that each half-life
    only reweighs; ``keep=False`` (a one-off use) neither keeps them nor needs them kept."""
    require_times(data)
    key = "test" if part == "test" and len(data.valid) else "valid"
    hit = data.recency.get(key)
    if hit is None:
        timed = [_timed_part(data.source, n)
                 for n in (["train", "valid"] if key == "test" else ["train"])]
        if len(timed) == 1:
            csr, ts = timed[0]
        else:
            coos = [m.tocoo() for m, _ in timed]
            row = _narrow(np.concatenate([c.row for c in coos]))
            col = _narrow(np.concatenate([c.col for c in coos]))
            ts = np.concatenate([t for _, t in timed])
            del coos, timed
            order = np.lexsort((col, row))                # CSR order of the merged pairs
            row, col, ts = row[order], col[order], ts[order]
            del order
            indptr = np.zeros(data.n_users + 1, dtype=np.int64)
            np.cumsum(np.bincount(row, minlength=data.n_users), out=indptr[1:])
            del row
            csr = sp.csr_matrix((np.ones(len(col), np.float32), col, indptr),
                                shape=(data.n_users, data.n_items))
        hit = (csr, recency_ranks(csr, ts))
        del ts
        if keep:
            data.recency[key] = hit
    csr, rank = hit
    return _weighted(csr, rank, half_life)


def pair_recency_weights(data: Data, half_life: float, floor: float,
                         merged: bool = False) -> torch.Tensor:
    """One loss weight per row of ``data.train`` (float32, on its device) for the implicit
    pair objective (``--recency``): floor + (1 - floor) * 0.5 ** (r / half_life), r the
    user's train interactions later than this one (``recency_ranks``: the latest weighs 1).
    ``merged``: ``data.train`` is the refit's train + valid (``with_valid_in_train``), whose
    ranks count the validation interaction too. The weights are looked up by (user, item),
    so any row order of the part works."""
    require_times(data)
    # built once per trainer: not kept in data.recency (at 100M the kept pattern and ranks
    # of the selection's and the refit's histories held 1.9 GiB to the end of the stage)
    hist = weighted_history(data, "test" if merged else "valid", half_life, keep=False)
    if not hist.has_sorted_indices:          # keys in CSR order, aligned with the weights
        hist = hist.sorted_indices()         # (a copy: the cached pattern stays as it is)
    keys = torch.from_numpy(csr_keys(hist, data.n_items))
    w = torch.from_numpy(hist.data)
    del hist
    tr = data.train
    users, items = tr.users.cpu(), tr.items.cpu()
    out = torch.empty(len(users), dtype=torch.float32)
    for s in range(0, len(users), _CHUNK):   # chunks: no int64 temporaries of the part's size
        want = users[s:s + _CHUNK].long() * data.n_items + items[s:s + _CHUNK].long()
        pos = torch.searchsorted(keys, want).clamp_(max=max(len(keys) - 1, 0))
        if len(keys) == 0 or not bool((keys[pos] == want).all()):
            raise PipelineError(f"{data.source}: the train pairs and stage 40's timestamped "
                                f"interactions (train_implicit.npz, train_time.npy) disagree; "
                                f"rerun `{rerun_command(data.source.parent, STAGE40)}`")
        out[s:s + _CHUNK] = floor + (1.0 - floor) * w[pos]
    return out.to(tr.users.device)


def is_member(keys_sorted: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Bool mask: which ``keys`` occur in the sorted 1-D tensor ``keys_sorted``."""
    if keys_sorted.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(keys_sorted, keys).clamp(max=keys_sorted.numel() - 1)
    return keys_sorted[pos] == keys


class KeySet:
    """Membership of user * n_items + item keys in a fixed set (the train interactions).

    A bitmap on the keys' device answers each query with one byte lookup. When the key space
    fits in ``max_bytes`` bits (70k users x 10k items: 88 MB) the bitmap is exact. Otherwise
    (480k users x 17,770 items: 8.5e9 keys, 1.07 GB of bits) it is a filter over the key's
    low bits (``key & mask``), about 32 bits per set key up to ``max_bytes`` (71M Netflix
    train keys: 256 MB): a clear bit means "not in the set", and only the few queries whose
    bit is set (a positive, or a key that shares its low bits with one: about 3% of uniform
    negatives) go to the binary search in the sorted keys (``is_member``, about 23
    dependent, cache-missing reads per query), which costs 5-10x more per query than the
    bitmap. Every way gives the same answers."""

    CHUNK = 1 << 22              # keys per step while the bits are set

    def __init__(self, keys_sorted: torch.Tensor, n_keys: int, max_bytes: int = 1 << 28):
        self.keys = keys_sorted
        self.bits: torch.Tensor | None = None
        self.exact = True
        n_keys = int(n_keys)
        if keys_sorted.numel() == 0:
            return
        n_bits = 1 << max(3, (n_keys - 1).bit_length())       # the key space, a power of 2
        if n_bits > 8 * max_bytes:                             # too large: the filter
            want = 1 << max(3, (32 * keys_sorted.numel() - 1).bit_length())
            n_bits = min(want, 8 * max_bytes)
            self.exact = False
            if n_bits < 8:                                     # no room: binary search only
                return
        self.mask = n_bits - 1
        # built on the CPU, then moved: each key's bit or-ed in (``np.bitwise_or.at``, which
        # keeps repeated slots right), a chunk of keys at a time, so nothing of the keys'
        # size is allocated beside them (a unique of the slots took 2.6 GB at 99M keys)
        k = keys_sorted.cpu().numpy()
        bits = np.zeros(n_bits // 8, dtype=np.uint8)
        for s in range(0, len(k), self.CHUNK):
            slot = k[s:s + self.CHUNK] & self.mask
            np.bitwise_or.at(bits, slot >> 3, np.left_shift(1, slot & 7).astype(np.uint8))
        self.bits = torch.from_numpy(bits).to(keys_sorted.device)

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """Bool mask of ``keys``' shape: which of them are in the set."""
        if self.bits is None:
            return is_member(self.keys, keys)
        k = keys if self.exact else keys & self.mask
        byte = self.bits.index_select(0, (k >> 3).reshape(-1)).view(keys.shape)
        hit = ((byte >> (k & 7).to(torch.uint8)) & 1).bool()
        if self.exact:
            return hit
        flat = hit.reshape(-1)                                  # a view: written through
        maybe = flat.nonzero().squeeze(1)                       # the filter's candidates
        flat[maybe] = is_member(self.keys, keys.reshape(-1).index_select(0, maybe))
        return hit


def sample_negatives(users: torch.Tensor, n_items: int, n_neg: int,
                     train_keys: "torch.Tensor | KeySet", generator: torch.Generator,
                     max_rounds: int = 20) -> torch.Tensor:
    """[len(users), n_neg] uniform item ids the user has not interacted with in train.

    Drawn for all rows at once; collisions with train positives are redrawn (vectorised) for
    up to ``max_rounds`` rounds (users who rated almost everything may keep a few).
    ``train_keys``: the sorted keys, or a ``KeySet`` of them (faster; same draws).
    """
    dev = users.device
    member = train_keys.contains if isinstance(train_keys, KeySet) else (
        lambda q: is_member(train_keys, q))
    neg = torch.randint(0, n_items, (users.shape[0], n_neg), device=dev, generator=generator)
    u = users.unsqueeze(1)
    for _ in range(max_rounds):
        bad = member(pair_keys(u, neg, n_items))       # int64 whatever the ids' dtype
        nbad = int(bad.sum())
        if nbad == 0:
            break
        neg[bad] = torch.randint(0, n_items, (nbad,), device=dev, generator=generator)
    return neg


def exclusion_rows(csr: sp.csr_matrix, users: np.ndarray, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row positions, item ids) of the csr entries of ``users``, for masking a score block."""
    sub = csr[users].tocoo()
    return (torch.from_numpy(sub.row.astype(np.int64)).to(device),
            torch.from_numpy(sub.col.astype(np.int64)).to(device))


def with_valid_in_train(data: Data, keys: bool = True, csr: bool = True) -> Data:
    """``data`` whose train part also holds the validation interactions (for the refit).

    ``keys`` / ``csr``: build the merged ``train_keys`` (sampled negatives need them) and
    ``train_csr`` (closed-form fits); when not asked for they are None, so that nothing can
    read the train-only ones by mistake. At 100M ratings each is about 0.7 GB held: the keys
    one insertion of the validation keys into a new array (``merged_keys``), the CSR a sparse
    sum. The merged part is a view of
    train and valid where they lie one after the other in memory (``load_data`` puts them
    so), a copy otherwise."""
    t, v = data.train, data.valid
    train = Part(users=_joined(t.users, v.users), items=_joined(t.items, v.items),
                 ratings=_joined(t.ratings, v.ratings))
    merged = merged_csr = None
    if keys:
        merged = merged_keys(data.keys(), pair_keys(v.users, v.items, data.n_items))
    if csr:
        vcsr = sp.csr_matrix((np.ones(len(v), dtype=np.float32),
                              (v.users.cpu().numpy(), v.items.cpu().numpy())),
                             shape=(data.n_users, data.n_items))
        merged_csr = (data.train_csr + vcsr).tocsr()
        merged_csr.data[:] = 1.0
    return dataclasses.replace(data, train=train, train_keys=merged,
                               train_csr=merged_csr)


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b])`` of two 1-D tensors, as a view when ``b`` starts where ``a`` ends
    in the same storage."""
    if (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype
            and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()):
        return a.as_strided((a.numel() + b.numel(),), (1,))
    return torch.cat([a, b])


def _replace(data: Data, **changes: Any) -> Data:
    """``dataclasses.replace``, but a train CSR not read yet is handed on unread (and shared:
    read once for both copies), where ``replace`` would read it to copy it."""
    changes.setdefault("train_csr", data.__dict__.get("_train_csr"))
    return dataclasses.replace(data, **changes)


def sample_users(data: Data, part: str, n: int, seed: int) -> tuple[Data, int, int]:
    """``data`` whose ``part`` (its pairs and its candidates) is restricted to a fixed sample
    of ``n`` of its users, drawn with ``seed`` (NumPy, so the training RNG is untouched);
    returns (data, users kept, users in the part). ``n`` = 0 or more than the part has: the
    data as it is."""
    p = getattr(data, part)
    users = np.unique(p.users.cpu().numpy())
    if n <= 0 or len(users) <= n:
        return data, len(users), len(users)
    keep = np.sort(np.random.default_rng([seed, 7]).choice(users, n, replace=False))
    mask = torch.zeros(data.n_users, dtype=torch.bool, device=p.users.device)
    mask[torch.from_numpy(keep).to(p.users.device)] = True
    sel = mask[p.users]
    sub = Part(users=p.users[sel], items=p.items[sel], ratings=p.ratings[sel])
    cands = dict(data.candidates)
    if part in cands:
        cu, ci = cands[part]
        cs = mask[cu]
        cands[part] = (cu[cs], ci[cs])
    return _replace(data, **{part: sub}, candidates=cands), len(keep), len(users)
