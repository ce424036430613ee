"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): ``--model ease``.

An item-item weight matrix B, fitted in closed form on the binary train interactions X
(users x items): minimise ||X - X B||^2 + lambda ||B||^2 with diag(B) = 0, whose solution is

    G = X'X,  P = (G + lambda I)^-1,  B = I - P / diag(P)   (B_ij = -P_ij / P_jj, B_jj = 0).

A user's scores are their interaction row times B (``input = "rows"``): no user parameters,
so a new user needs no fold-in, only their items. Item vectors (similar items, explanations)
are B's columns: item j's column says which items predict it.

Numerics: float32 throughout. G holds integer co-occurrence counts, exact in float32 up to
2^24 = 16.7M users per item pair; the inverse is a Cholesky factorisation and
``cholesky_inverse`` of G + lambda I (symmetric positive definite for lambda > 0), whose
float32 error is measured against a float64 reference in tests/test_ease.py. G comes from
the scipy CSR as a sparse product, a block of item columns at a time (bounded sparse
intermediates), densified straight into the device tensor; the factorisation, the inverse
and B are on the data's device.

Memory: three dense n_items x n_items float32 matrices during a fit (G, kept for every
lambda of the grid; the Cholesky factor, turned into P in B's own storage; B, the model's
buffer), 12 * n_items^2 bytes: Netflix's 17,770 items take 1.26 GB per matrix, 3.79 GB in
all. Before allocating, the fit compares that with the memory available on the device
(CUDA: ``torch.cuda.mem_get_info`` plus what torch's cache holds unused; CPU:
MemAvailable of /proc/meminfo) and stops with one line naming the item count, the bytes
and the fix (stage 20's ``--min-item-ratings``). The limit is about sqrt(available / 12)
items: 36,500 on a machine with 16 GB free, 110,000 on a 139 GiB GPU. The work is ~n_items^3
flops per lambda (the Cholesky factor and the inverse): measured 0.13 s for ML-100K's 1,682
items on 2 CPU threads and 54 s for ml-latest-small's 9,724 on one thread of a busy CPU;
Netflix's 17,770 items cost about 6x the latter per lambda on a CPU (not measured, nor on a
GPU).

lambda: stage 60 fits one B per value of ``reg_grid`` (or the one ``--reg``), reusing the
one G (``closed_form_solver``), and keeps the best on validation (recpipe/train.py).

Recency (``--recency``, the buffer ``half_life``): B is fitted on the binary rows, but a
user's row can be weighted when it is scored, 0.5 ** (r / half_life) for the interaction
with r later ones (the latest weighs 1): the items a user took last say most about the next
one. Stage 40 writes the timestamps (``train_time.npy``, ``valid_time.npy``); stage 60 scores
every half-life of ``recency_grid`` for every lambda (scoring only, no extra fit) and keeps
the best pair on validation. The test is scored from train + valid, weighted the same way;
stage 70 weighs a known user's train items by their timestamps and a new user's ``--ratings``
file by its line order (the last line the latest). On ML-100K leave-one-out it took
validation HR@10 from 0.6776 to 0.7487 (docs/presets.md). Without timestamps the rows stay
binary.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .cli import PipelineError
from .family import Family, register

log = logging.getLogger("recpipe")

DTYPE = torch.float32
_BYTES = torch.finfo(DTYPE).bits // 8
_GRAM_BLOCK_FLOATS = 1 << 24     # dense G columns built per sparse product (64 MB)
_HEADROOM = 1 << 28              # evaluation's score and history blocks (<= 256 MB)


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device``; None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # what torch's caching allocator reserved but does not use is allocatable too
        return int(free + torch.cuda.memory_reserved(device)
                   - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_memory(n_items: int, device: torch.device, matrices: float, held: float = 0,
                 headroom: int = _HEADROOM, who: str = "EASE") -> None:
    """Refuse, with one line, to allocate ``matrices`` more n_items x n_items float32
    matrices on ``device`` when they do not fit (``held``: of them, how many are allocated
    already; a float16 matrix counts as half)."""
    per = n_items * n_items * _BYTES
    need = int((matrices - held) * per) + headroom
    have = available_bytes(device)
    if have is None or need <= have:
        return
    raise PipelineError(
        f"{who} on {n_items:,} items needs {matrices:g} dense {n_items:,} x {n_items:,} "
        f"float32 matrices of {_gb(per)} each ({_gb(need)} still to allocate on {device}, "
        f"evaluation blocks included) but {_gb(have)} is available; filter rare items in "
        f"stage 20 (`python 20_make_ids.py --data-dir DIR --min-item-ratings N`, then rerun "
        f"stages 30-40) or train on a device with more memory (--device)")


def gram(train: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """X'X of the binarised ``train`` (a scipy CSR, users x items) as a dense float32
    [n_items, n_items] tensor on ``device``: scipy's sparse product, a block of columns at a
    time, each densified into its slice."""
    x = sp.csr_matrix(train, dtype=np.float32, copy=True)
    x.sum_duplicates()
    x.data[:] = 1.0
    n = x.shape[1]
    xt = x.T.tocsr()
    xc = x.tocsc()
    g = torch.empty((n, n), dtype=DTYPE, device=device)
    step = max(1, _GRAM_BLOCK_FLOATS // max(1, n))
    for a in range(0, n, step):
        b = min(n, a + step)
        blk = (xt @ xc[:, a:b]).toarray()
        g[:, a:b].copy_(torch.from_numpy(np.ascontiguousarray(blk, dtype=np.float32)))
    return g


def solve_b(g: torch.Tensor, lam: float, out: torch.Tensor) -> torch.Tensor:
    """B = I - (G + lam I)^-1 / diag(...), diagonal 0, written into ``out`` (same shape,
    dtype and device as ``g``). Peak memory: ``g``, one work matrix and ``out``."""
    if not (lam > 0 and math.isfinite(lam)):
        raise PipelineError(f"EASE's ridge weight --reg must be a positive number (G + reg I "
                            f"must be positive definite), got {lam}")
    work = g.clone()
    work.diagonal().add_(lam)
    try:
        torch.linalg.cholesky(work, out=work)            # lower factor L, in place
    except torch.linalg.LinAlgError as e:
        raise PipelineError(f"EASE: the Cholesky factorisation of X'X + {lam:g} I failed in "
                            f"float32 ({str(e).splitlines()[0]}); try a larger --reg") from None
    torch.cholesky_inverse(work, out=out)                # P = (L L')^-1
    del work
    d = out.diagonal().clone()
    out.div_(d).neg_()                                   # B_ij = -P_ij / P_jj
    out.fill_diagonal_(0.0)
    return out


@register("ease")
class EASE(Family):
    """EASE: scores = (the user's interaction row) @ B, B fitted in closed form (see the
    module docstring); no user parameters."""

    default_task = "implicit"
    tasks = ("implicit",)
    input = "rows"
    fit_by = "closed_form"
    score_label = ("score = the user's train items (weighted by recency with --recency) "
                   "times EASE's item-item weights B")
    options = {"reg": "the ridge weight lambda of B; unset: chosen on validation from "
                      "EASE.reg_grid",
               "recency": "half-life (interactions) of the weights of a user's history at "
                          "scoring, the latest 1; unset: chosen on validation from "
                          "EASE.recency_grid when the split has timestamps, else 0"}
    # lambda candidates (absolute, in interaction counts as G's diagonal); Steck's best:
    # 500 (ML-20M), 1000 (Netflix), 200 (MSD). ML-100K / ml-latest-small: docs/presets.md
    reg_grid: ClassVar[tuple[float, ...]] = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                                             2000.0, 5000.0, 10000.0)
    # --recency candidates: the half-life, in interactions, of the weights of a user's row
    # at scoring time (0: the binary row). Tried for every lambda when stage 40 wrote the
    # timestamps; B itself is fitted on the binary rows either way (docs/presets.md)
    recency_grid: ClassVar[tuple[float, ...]] = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0)

    def __init__(self, n_users: int, n_items: int, global_mean: float = 0.0,
                 scale: float = 1.0, sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        check_memory(self.n_items, torch.device("cpu"), matrices=1, headroom=0)
        self.register_buffer("B", torch.zeros(self.n_items, self.n_items, dtype=DTYPE))
        self.register_buffer("lam", torch.tensor(0.0))     # the fitted lambda (0: unfitted)
        # the history's recency half-life (0: binary rows); scoring weighs the rows with it
        self.register_buffer("half_life", torch.tensor(0.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before --recency have no half_life: they scored binary rows
        state_dict.setdefault(prefix + "half_life", torch.tensor(0.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, hp: dict[str, Any], task: str, global_mean: float, scale: float,
                    sparse: bool) -> dict[str, Any]:
        return {}

    # -- fitting -------------------------------------------------------------------------
    @contextlib.contextmanager
    def closed_form_solver(self, train: sp.csr_matrix
                           ) -> Iterator[Callable[[dict[str, Any]], None]]:
        """Within the block: ``fit(hp)`` sets B for lambda = hp["reg"], all fits sharing one
        Gram matrix (computed on entry, freed on exit)."""
        if train.shape[1] != self.n_items:
            raise ValueError(f"train has {train.shape[1]} items, the model {self.n_items}")
        dev = self.B.device
        # G and the work matrix are still to allocate; B is already held
        check_memory(self.n_items, dev, matrices=3, held=1)
        g = gram(train, dev)

        @torch.no_grad()
        def fit(hp: dict[str, Any]) -> None:
            lam = hp.get("reg")
            if lam is None:
                raise ValueError("EASE needs hp['reg'] (lambda); stage 60 passes each grid "
                                 "value")
            solve_b(g, float(lam), self.B)
            self.lam.fill_(float(lam))

        try:
            yield fit
        finally:
            del g            # empties the closure's cell: G is freed even if fit outlives us

    def fit_closed_form(self, train: sp.csr_matrix, hp: dict[str, Any]) -> None:
        with self.closed_form_solver(train) as fit:
            fit(hp)

    # -- scoring -------------------------------------------------------------------------
    def score_all(self, users: torch.Tensor, history: torch.Tensor | None = None
                  ) -> torch.Tensor:
        if history is None:
            raise ValueError("EASE scores from the users' interaction rows: pass history")
        return history.to(DTYPE) @ self.B

    def item_vectors(self) -> torch.Tensor:
        return self.B.T

    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=0, lr=0.0,
                seed=0):
        return self, (f"EASE needs no fold-in: a user's scores are their given items' rows "
                      f"of B summed (lambda {float(self.lam):g}), the ratings' values unused")
