"""Stage 70: use a trained model. Top-k for a user, fold-in of a new user, similar items, batch.

``python 70_recommend.py --model NAME [--data-dir DIR] MODE`` with exactly one MODE:

- ``--user RAW_ID``: the top-k items the user did not rate in train (``--explain`` adds, per
  recommendation, the user's own liked train items nearest to it by cosine on the model's
  item vectors);
- ``--ratings FILE``: a new user given as ``raw item id, rating`` lines, folded into the model
  without retraining (biased MF: closed-form ridge regression for the user's factors and bias
  with the item side fixed; other models: a few hundred Adam steps on a fresh user row, item
  side frozen), then recommended for like a known user;
- ``--similar-to RAW_ITEM_ID``: nearest items by cosine on the model's item vectors;
- ``--batch USERS_FILE|all --out FILE``: top-k for many users at once (vectorised scoring of
  [chunk, n_items] with one masked top-k per chunk).

Everything that ranks is deterministic: equal scores are broken by the lower item index.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .artifacts import MANIFEST, read_manifest, read_parquet, stage_dir, write_parquet
from .cli import PipelineError, command_line, opt, parse_config, print_config, set_seed

log = logging.getLogger("recpipe")

PROG = "70_recommend.py"
DESCRIPTION = ("Use a trained model (stage 60): top-k recommendations for a known user "
               "(--user), for a new user from a ratings file without retraining (--ratings), "
               "items similar to an item (--similar-to), or top-k for many users written to a "
               "file (--batch ... --out).")
MODEL_NAMES = ["mf", "deepmf", "gmf", "mlp", "neumf"]
MODES = ("user", "ratings", "similar_to", "batch")
TITLE_WIDTH = 60


@dataclass
class RecommendConfig:
    model: str = opt("mf", "trained model to use: reads DATA_DIR/60_train/MODEL/model.pt",
                     choices=MODEL_NAMES)
    data_dir: Path = opt(Path("data"), "pipeline data folder (the --data-dir of stages 10-60)")
    user: Optional[str] = opt(None, "MODE: recommend for this raw user id (as in the source "
                                    "ratings file)")
    ratings: Optional[Path] = opt(None, "MODE: a new user's ratings file, one 'raw_item_id, "
                                        "rating' per line (CSV, TSV or whitespace; header "
                                        "optional); folded in without retraining")
    similar_to: Optional[str] = opt(None, "MODE: list the items most similar to this raw item "
                                          "id (cosine on the model's item vectors)")
    batch: Optional[str] = opt(None, "MODE: file of raw user ids (one per line, or the first "
                                     "column of a CSV/TSV; header optional), or 'all' for every "
                                     "user; needs --out")
    k: int = opt(10, "number of items to list", short="-k")
    out: Optional[Path] = opt(None, "also write the result to this .csv or .parquet file "
                                    "(required with --batch)")
    explain: bool = opt(False, "with --user/--ratings: show, per recommendation, the user's own "
                               "liked items nearest to it")
    fallback: bool = opt(True, "for an unknown user, show the most popular items instead, "
                               "labelled as a non-personalised fallback")
    device: str = opt("auto", "where to score: auto picks cuda when available",
                      choices=["auto", "cpu", "cuda"])
    foldin_steps: int = opt(300, "--ratings with models other than explicit mf: Adam steps on "
                                 "the new user's row")
    foldin_lr: float = opt(0.05, "--ratings: Adam learning rate of the fold-in")
    foldin_negatives: int = opt(4, "--ratings with implicit models: sampled negatives per given "
                                   "item, redrawn every step")
    chunk_users: int = opt(0, "users scored per chunk in --batch (0: automatic, sized to the "
                              "model and the number of items, as stage 60's evaluation)")
    seed: int = opt(0, "random seed (fold-in initial noise and negative sampling)")

    def validate(self) -> None:
        given = [m for m in MODES if getattr(self, m) is not None]
        flags = ", ".join("--" + m.replace("_", "-") for m in MODES)
        if len(given) != 1:
            what = "none" if not given else ", ".join("--" + m.replace("_", "-") for m in given)
            raise PipelineError(f"choose exactly one of {flags} (got {what})")
        if self.k < 1:
            raise PipelineError(f"-k must be at least 1, got {self.k}")
        if self.batch is not None and self.out is None:
            raise PipelineError("--batch needs --out FILE (.csv or .parquet)")
        if self.out is not None and self.out.suffix.lower() not in (".csv", ".parquet"):
            raise PipelineError(f"--out {self.out}: unsupported extension "
                                f"{self.out.suffix or '(none)'!r}; expected .csv or .parquet")
        if self.explain and self.user is None and self.ratings is None:
            raise PipelineError("--explain applies to --user and --ratings only")
        if self.foldin_steps < 1:
            raise PipelineError(f"--foldin-steps must be at least 1, got {self.foldin_steps}")
        if not self.foldin_lr > 0:
            raise PipelineError(f"--foldin-lr must be positive, got {self.foldin_lr}")
        if self.foldin_negatives < 1:
            raise PipelineError(f"--foldin-negatives must be at least 1, got "
                                f"{self.foldin_negatives}")
        if self.chunk_users < 0:
            raise PipelineError(f"--chunk-users must be 0 (auto) or positive, got "
                                f"{self.chunk_users}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclass
class Recommender:
    """A trained model with the id maps, titles and train interactions it needs to rank."""
    model: torch.nn.Module
    meta: dict[str, Any]
    name: str
    task: str                       # "explicit" | "implicit"
    rating_scale: tuple[float, float]
    device: torch.device
    users: pd.DataFrame             # user_idx, raw_user_id, n_ratings
    items: pd.DataFrame             # item_idx, raw_item_id, n_ratings, [title, year]
    train: sp.csr_matrix            # binary [n_users, n_items]: excluded from recommendations
    train_ratings: sp.csr_matrix | None   # explicit ratings (for --explain), when present
    data_dir: Path

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user_index(self) -> pd.Index:
        return pd.Index(self.users["raw_user_id"])

    def item_index(self) -> pd.Index:
        return pd.Index(self.items["raw_item_id"])


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available here; use --device cpu "
                            "or --device auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_command(model_name: str, data_dir: Path) -> str:
    return f"python 60_train.py --model {model_name} --data-dir {data_dir}"


def load_model(model_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in ``model_dir/model.pt`` (stage 60's loader: weights_only, eval mode) with
    every parameter frozen, and the checkpoint's metadata."""
    from .train import load_model as stage60_load
    model, meta = stage60_load(model_dir, device)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def load_recommender(data_dir: Path, model_name: str, device: torch.device) -> Recommender:
    """Check the upstream artifacts, then load the model, id maps, titles and train matrix."""
    data_dir = Path(data_dir)
    m40 = read_manifest(data_dir, "40_make_sparse_matrix", needed_by=PROG)
    model_dir = stage_dir(data_dir, "60_train") / model_name
    if not (model_dir / MANIFEST).exists() or not (model_dir / "model.pt").exists():
        missing = model_dir / ("model.pt" if (model_dir / MANIFEST).exists() else MANIFEST)
        raise PipelineError(f"{missing} not found (needed by {PROG}): model {model_name!r} has "
                            f"not been trained in {data_dir}; run "
                            f"`{train_command(model_name, data_dir)}` first")
    read_manifest(data_dir, f"60_train/{model_name}", needed_by=PROG)   # freshness of the chain
    model, meta = load_model(model_dir, device)

    ids = stage_dir(data_dir, "20_make_ids")
    users = read_parquet(ids / "users.parquet")
    items = read_parquet(ids / "items.parquet")
    train_path = stage_dir(data_dir, "40_make_sparse_matrix") / "train_implicit.npz"
    if not train_path.exists():
        raise PipelineError(f"{train_path} is missing although its manifest exists; rerun "
                            f"`python 40_make_sparse_matrix.py --data-dir {data_dir}`")
    train = sp.load_npz(train_path).tocsr()
    train.sort_indices()
    ratings_path = stage_dir(data_dir, "40_make_sparse_matrix") / "train.npz"
    train_ratings = sp.load_npz(ratings_path).tocsr() if ratings_path.exists() else None

    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    shapes = {"20_make_ids/users.parquet rows": len(users), "20_make_ids/items.parquet rows":
              len(items), "40 train matrix": train.shape, "40 manifest": (m40.get("n_users"),
                                                                          m40.get("n_items"))}
    if (len(users), len(items)) != (n_users, n_items) or train.shape != (n_users, n_items):
        raise PipelineError(f"{model_dir / 'model.pt'} was trained for {n_users} users x "
                            f"{n_items} items but the data in {data_dir} has {shapes}; retrain "
                            f"with `{train_command(model_name, data_dir)}`")
    task = str(meta.get("task", "explicit"))
    lo, hi = meta.get("rating_scale") or m40.get("rating_scale") or (float("nan"),) * 2
    return Recommender(model=model, meta=meta, name=model_name, task=task,
                       rating_scale=(float(lo), float(hi)), device=device, users=users,
                       items=items, train=train, train_ratings=train_ratings, data_dir=data_dir)


# --------------------------------------------------------------------------------------------
# Raw ids
# --------------------------------------------------------------------------------------------

def _ids_are_integers(series: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(series.dtype)


def _py(x: Any) -> Any:
    """A numpy scalar as the plain Python value (so messages show 101, not np.int64(101))."""
    return x.item() if isinstance(x, np.generic) else x


def parse_raw_id(text: str, series: pd.Series, what: str) -> Any:
    """``text`` in the dtype of the raw id column ``series`` (int64 ids or strings).

    Returns None when an integer id column is given a non-integer (it cannot be in the map).
    """
    text = text.strip()
    if _ids_are_integers(series):
        try:
            return int(text)
        except ValueError:
            return None
    return text


def lookup(index: pd.Index, raw_ids: Sequence[Any]) -> np.ndarray:
    """Positions of ``raw_ids`` in ``index``, -1 where absent (vectorised)."""
    if len(raw_ids) == 0:
        return np.empty(0, dtype=np.int64)
    values = pd.Index(pd.array(list(raw_ids), dtype=index.dtype)) if len(index) else pd.Index([])
    return index.get_indexer(values).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------

def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of ``scores`` [U, N], ties broken by the lower column index.

    Returns (values [U, k'], indices [U, k']) with k' = min(k, N), sorted best first. One
    ``topk``; rows where a tie straddles the cut are redone with a stable full sort.
    """
    if torch.isnan(scores).any():
        raise PipelineError("the model produced NaN scores; its weights are broken: retrain it "
                            "with 60_train.py")
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
def rank_items(model: torch.nn.Module, user_rows: np.ndarray, exclude: sp.csr_matrix, k: int,
               device: torch.device, chunk_users: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per user over all items, items in ``exclude`` rows masked with -inf.

    ``user_rows`` are rows of the model's user tables; ``exclude`` is a CSR [len(user_rows),
    n_items] of items to leave out. Returns (items int64 [U, k'], scores float32 [U, k']);
    items are -1 (score -inf) where a user has fewer than k items left.
    """
    n_items = exclude.shape[1]
    U = len(user_rows)
    k_eff = min(k, n_items)
    out_items = np.full((U, k_eff), -1, dtype=np.int64)
    out_scores = np.full((U, k_eff), -np.inf, dtype=np.float32)
    all_items = torch.arange(n_items, device=device).unsqueeze(0)
    from .train import users_per_block
    step = users_per_block(n_items, device, chunk_users, per_pair=hasattr(model, "tower"))
    for a in range(0, U, step):
        b = min(U, a + step)
        users = torch.as_tensor(user_rows[a:b], dtype=torch.long, device=device).unsqueeze(1)
        scores = model(users, all_items).float()
        sub = exclude[a:b]
        if sub.nnz:
            rows = np.repeat(np.arange(b - a), np.diff(sub.indptr))
            scores[torch.as_tensor(rows, device=device),
                   torch.as_tensor(sub.indices, dtype=torch.long, device=device)] = -torch.inf
        vals, idx = top_k(scores, k_eff)
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        idx[~np.isfinite(vals)] = -1
        out_items[a:b], out_scores[a:b] = idx, vals
    return out_items, out_scores


def popularity(rec: Recommender) -> np.ndarray:
    """Train interactions per item."""
    return np.asarray(rec.train.sum(axis=0)).ravel()


def popular_items(rec: Recommender, k: int, exclude: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The k items with the most train interactions (ties: lower item index), minus ``exclude``."""
    counts = popularity(rec).astype(np.float64)
    if exclude is not None and len(exclude):
        counts[exclude] = -np.inf
    order = np.lexsort((np.arange(len(counts)), -counts))[:k]
    order = order[np.isfinite(counts[order])]
    return order.astype(np.int64), counts[order]


@torch.inference_mode()
def item_unit_vectors(model: torch.nn.Module) -> torch.Tensor:
    v = model.item_vectors().float()
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def similar_items(model: torch.nn.Module, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k items nearest to ``item`` by cosine on the model's item vectors (itself excluded)."""
    v = item_unit_vectors(model)
    sims = (v @ v[item]).unsqueeze(0)
    sims[0, item] = -torch.inf
    vals, idx = top_k(sims, min(k, v.shape[0] - 1))
    return idx[0].cpu().numpy().astype(np.int64), vals[0].cpu().numpy()


@torch.inference_mode()
def explain(model: torch.nn.Module, recommended: np.ndarray, own_items: np.ndarray,
            own_ratings: np.ndarray | None, n: int = 3) -> list[list[tuple[int, float, float]]]:
    """Per recommended item, up to ``n`` of the user's liked items nearest to it by cosine.

    Liked = rated at or above the user's mean rating (all items when there are no ratings).
    Returns, per recommendation, [(own item index, its rating or NaN, cosine)], nearest first.
    """
    own_items = np.asarray(own_items, dtype=np.int64)
    if own_ratings is not None and len(own_ratings) and np.isfinite(own_ratings).any():
        r = np.asarray(own_ratings, dtype=np.float64)
        keep = np.isfinite(r) & (r >= np.nanmean(r))
        own_items, r = own_items[keep], r[keep]
    else:
        r = np.full(len(own_items), np.nan)
    out: list[list[tuple[int, float, float]]] = []
    if len(own_items) == 0:
        return [[] for _ in recommended]
    v = item_unit_vectors(model)
    rec_t = torch.as_tensor(np.maximum(recommended, 0), device=v.device)
    sims = v[rec_t] @ v[torch.as_tensor(own_items, device=v.device)].T      # [R, L]
    vals, idx = top_k(sims, min(n, len(own_items)))
    vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
    for row in range(len(recommended)):
        out.append([(int(own_items[j]), float(r[j]), float(s))
                    for j, s in zip(idx[row], vals[row])])
    return out


# --------------------------------------------------------------------------------------------
# Fold-in of new users
# --------------------------------------------------------------------------------------------

def user_embeddings(model: torch.nn.Module) -> dict[str, torch.nn.Embedding]:
    found = {n: m for n, m in model.named_children() if n.startswith("user_")}
    bad = [n for n, m in found.items() if not isinstance(m, torch.nn.Embedding)]
    if not found or bad:
        raise PipelineError(f"model {type(model).__name__} does not keep its user side in "
                            f"user_* embeddings (found {sorted(found)}); fold-in is not possible")
    return found


def training_l2(meta: dict[str, Any]) -> float:
    """The L2 weight the model was trained with: stage 60's ``reg`` (per sample, on the
    embedding rows the sample uses, in the model's standardised units)."""
    cfg = meta.get("config") or {}
    value = cfg.get("reg")
    if value is None:
        log.warning("the checkpoint's config has no 'reg'; folding in without L2")
        return 0.0
    return float(value)


def with_user_rows(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` (item side shared, frozen) whose user tables are ``rows``."""
    folded = copy.copy(model)            # shallow: shares every item-side module and buffer
    folded._modules = dict(model._modules)
    for name, w in rows.items():
        emb = torch.nn.Embedding(w.shape[0], w.shape[1], device=w.device)
        emb.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        folded._modules[name] = emb
    folded.n_users = next(iter(rows.values())).shape[0]
    folded.eval()
    return folded


@dataclass
class FoldIn:
    """New users folded into a trained model: rows 0..U-1 of ``model``'s user tables."""
    model: torch.nn.Module
    method: str        # a sentence for the output: what was done
    loss: float | None = None


def fold_in_mf_closed_form(model: torch.nn.Module, l2: float, users: np.ndarray,
                           items: np.ndarray, ratings: np.ndarray, n_users: int) -> FoldIn:
    """Biased MF, explicit: per new user, ridge regression for [p_u, b_u] with q_i, b_i fixed.

    The model predicts r = mu + s * (b_u + b_i + p_u.q_i) (s: the train ratings' std) and stage
    60 minimises, per sample, ((r - r_hat) / s)^2 + reg * (|p_u|^2 + b_u^2 + item rows). Kept
    to one user's terms, with z_i = (r_i - mu) / s - b_i and x_i = [q_i, 1], that is
    sum_i (z_i - x_i.theta)^2 + reg * n_u * |theta|^2, solved exactly (float64, all users at
    once): theta = (X'X + reg * n_u * I)^-1 X'z.
    """
    dev = model.item_factors.weight.device
    q = model.item_factors.weight.double()
    bi = model.item_bias.weight.double()[:, 0]
    mu = float(model.global_mean)
    scale = float(getattr(model, "scale", torch.tensor(1.0)))
    it = torch.tensor(np.asarray(items, dtype=np.int64), device=dev)
    us = torch.tensor(np.asarray(users, dtype=np.int64), device=dev)
    x = torch.cat([q[it], torch.ones(len(it), 1, dtype=torch.float64, device=dev)], dim=1)
    r = torch.tensor(np.asarray(ratings, dtype=np.float64), device=dev)
    z = (r - mu) / scale - bi[it]
    d = x.shape[1]
    A = torch.zeros(n_users, d, d, dtype=torch.float64, device=dev)
    A.index_add_(0, us, x.unsqueeze(2) * x.unsqueeze(1))
    rhs = torch.zeros(n_users, d, dtype=torch.float64, device=dev).index_add_(0, us, x * z[:, None])
    counts = torch.bincount(us, minlength=n_users).double()
    lam = (l2 * counts).clamp_min(1e-8)          # tiny floor keeps one-rating users solvable
    A = A + lam[:, None, None] * torch.eye(d, dtype=torch.float64, device=dev)
    theta = torch.linalg.solve(A, rhs)
    rows = {"user_factors": theta[:, :-1].float(), "user_bias": theta[:, -1:].float()}
    method = (f"biased MF fold-in: solved the new user's {d - 1} factors and bias in closed form "
              f"(ridge regression with the item factors and biases fixed; L2 {l2:g} per rating "
              f"as in training)")
    return FoldIn(with_user_rows(model, rows), method)


def fold_in_adam(model: torch.nn.Module, task: str, l2: float, users: np.ndarray,
                 items: np.ndarray, ratings: np.ndarray, n_users: int, steps: int, lr: float,
                 negatives: int, seed: int) -> FoldIn:
    """Any model: fresh user rows (started at the mean trained user), item side frozen, fitted
    by ``steps`` full-batch Adam steps on all new users at once.

    Explicit: MSE on the given ratings. Implicit: binary cross-entropy with the given items as
    positives and ``negatives`` items per positive drawn uniformly each step (draws that hit one
    of the user's given items are left out of the loss). L2 as in training: l2 * |row|^2 per
    fitted example, the squared error divided by the model's scale (the ratings' std) as in
    stage 60.
    """
    dev = next(model.parameters()).device
    scale = float(getattr(model, "scale", torch.tensor(1.0)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tables = user_embeddings(model)
    params = {}
    for name, emb in tables.items():
        w = emb.weight.detach()
        start = w.mean(0, keepdim=True).repeat(n_users, 1)
        noise = torch.randn(start.shape, generator=gen).to(dev) * 0.01 * w.std().clamp_min(1e-6)
        params[name] = torch.nn.Parameter(start + noise)
    folded = with_user_rows(model, {n: p.detach() for n, p in params.items()})
    for name, p in params.items():                    # train the very tensors the copy uses
        folded._modules[name].weight = p
    opt = torch.optim.Adam(params.values(), lr=lr)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    us = torch.tensor(np.asarray(users, dtype=np.int64), device=dev)
    it = torch.tensor(np.asarray(items, dtype=np.int64), device=dev)
    r = torch.tensor(np.asarray(ratings, dtype=np.float32), device=dev)
    n_items = int(model.item_vectors().shape[0])
    threads = torch.get_num_threads()
    try:
        for p, _ in frozen:                           # the item side and network stay fixed
            p.requires_grad_(False)
        if dev.type == "cpu":
            # a few thousand rows per step: thread start-up and sync cost more than they save
            # (40x slower with 2 threads on a busy 2-core machine)
            torch.set_num_threads(1)
        loss_v = _adam_steps(folded, params, opt, task, us, it, r, scale, l2, n_users, n_items,
                             steps, negatives, gen)
    finally:
        torch.set_num_threads(threads)
        for p, flag in frozen:
            p.requires_grad_(flag)
    if not np.isfinite(loss_v):
        raise PipelineError(f"fold-in diverged (loss {loss_v}); try a smaller --foldin-lr "
                            f"(now {lr:g})")
    folded = with_user_rows(model, {n: p.detach() for n, p in params.items()})
    what = ("the given items as positives plus "
            f"{negatives} sampled negatives each (binary cross-entropy)" if task == "implicit"
            else "squared error on the given ratings")
    method = (f"{type(model).__name__} fold-in: optimised a fresh user row "
              f"({', '.join(sorted(params))}) with the item side and network frozen: {steps} Adam "
              f"steps (lr {lr:g}) on {what}, L2 {l2:g} as in training; final loss {loss_v:.4f}")
    return FoldIn(folded, method, loss_v)


def _adam_steps(folded: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                opt: torch.optim.Optimizer, task: str, us: torch.Tensor, it: torch.Tensor,
                r: torch.Tensor, scale: float, l2: float, n_users: int, n_items: int,
                steps: int, negatives: int, gen: torch.Generator) -> float:
    """The optimisation loop of fold_in_adam; returns the last loss."""
    dev = us.device
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if task == "implicit":
        given = torch.zeros(n_users, n_items, dtype=torch.bool, device=dev)
        given[us, it] = True
    per_user = torch.bincount(us, minlength=n_users).float()
    if task == "implicit":
        per_user = per_user * (1 + negatives)     # the row is used by every pos and neg sample
    loss_v = float("nan")
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            if task == "explicit":               # stage 60's loss: standardised squared error
                loss = ((folded(us, it) - r) / scale).square().mean()
                n_fit = len(us)
            else:
                neg = torch.randint(0, n_items, (len(us), negatives), generator=gen).to(dev)
                neg_u = us[:, None].expand_as(neg)
                ok = ~given[neg_u, neg]
                logit_pos = folded(us, it)
                logit_neg = folded(neg_u, neg)
                lp = bce(logit_pos, torch.ones_like(logit_pos), reduction="none")
                ln = bce(logit_neg, torch.zeros_like(logit_neg), reduction="none") * ok
                n_fit = len(us) + ok.sum()
                loss = (lp.sum() + ln.sum()) / n_fit
            if l2 > 0:
                reg = sum((per_user * p.square().sum(1)).sum() for p in params.values())
                loss = loss + l2 * reg / n_fit
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
    return loss_v


def fold_in(rec: Recommender, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
            n_users: int, steps: int = 300, lr: float = 0.05, negatives: int = 4,
            seed: int = 0) -> FoldIn:
    """Fold ``n_users`` new users (``users`` in 0..n_users-1, one entry per given rating) into
    the trained model without retraining it; the closed form for explicit biased MF."""
    l2 = training_l2(rec.meta)
    if rec.name == "mf" and rec.task == "explicit":
        return fold_in_mf_closed_form(rec.model, l2, users, items, ratings, n_users)
    return fold_in_adam(rec.model, rec.task, l2, users, items, ratings, n_users, steps, lr,
                        negatives, seed)


def split_fields(line: str) -> list[str]:
    """The fields of a CSV (comma or semicolon), TSV or whitespace-separated line."""
    for sep in (",", "\t", ";"):
        if sep in line:
            return [f.strip().strip('"').strip("'").strip() for f in line.split(sep)]
    return line.split()


def read_ratings_file(path: Path, rec: Recommender) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """A new user's ``raw_item_id, rating`` lines (CSV, TSV or whitespace; header optional).

    Returns (known: DataFrame item_idx, raw_item_id, rating; unknown: [(line, raw id)]).
    Malformed lines raise PipelineError naming file:line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PipelineError(f"--ratings {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"--ratings {path}: cannot read ({e})") from None
    lo, hi = rec.rating_scale
    item_col = rec.items["raw_item_id"]
    raws, vals, lines = [], [], []
    seen_data = False
    for no, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = split_fields(s)
        if len(fields) != 2 or not all(fields):
            raise PipelineError(f"{path}:{no}: expected 2 fields 'raw_item_id, rating', got "
                                f"{len(fields)} in {s!r}" + ("" if all(fields) else
                                                             " (an empty field)"))
        raw, rating_text = fields
        try:
            rating = float(rating_text)
        except ValueError:
            header = not seen_data and (not _ids_are_integers(item_col)
                                        or parse_raw_id(raw, item_col, "item") is None)
            seen_data = True
            if header:               # e.g. 'item,rating' or 'movieId\trating'
                continue
            raise PipelineError(f"{path}:{no}: rating {rating_text!r} is not a number; expected "
                                f"a rating in [{lo:g}, {hi:g}]")
        seen_data = True
        if not np.isfinite(rating) or (np.isfinite(lo) and not lo <= rating <= hi):
            raise PipelineError(f"{path}:{no}: rating {rating_text!r} is outside this dataset's "
                                f"rating scale [{lo:g}, {hi:g}]")
        rid = parse_raw_id(raw, item_col, "item")
        if rid is None:
            raise PipelineError(f"{path}:{no}: item id {raw!r} is not an integer; this "
                                f"dataset's raw item ids are integers")
        raws.append(rid)
        vals.append(rating)
        lines.append(no)
    if not raws:
        raise PipelineError(f"{path}: no ratings found; expected lines 'raw_item_id, rating'")
    df = pd.DataFrame({"raw_item_id": pd.array(raws, dtype=item_col.dtype),
                       "rating": np.asarray(vals, dtype=np.float32),
                       "line": np.asarray(lines, dtype=np.int64)})
    dup = df["raw_item_id"].duplicated(keep=False)
    if dup.any():
        first = _py(df[dup].iloc[0]["raw_item_id"])
        at = df.loc[df["raw_item_id"] == first, "line"].tolist()
        raise PipelineError(f"{path}:{at[1]}: item {first!r} is rated more than once (lines "
                            f"{', '.join(map(str, at))}); keep one rating per item")
    df["item_idx"] = lookup(rec.item_index(), df["raw_item_id"].tolist())
    unknown = [(int(l), str(r)) for l, r in
               zip(df.loc[df.item_idx < 0, "line"], df.loc[df.item_idx < 0, "raw_item_id"])]
    known = df[df.item_idx >= 0].reset_index(drop=True)
    return known[["item_idx", "raw_item_id", "rating"]], unknown


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _take(col: pd.Series, positions: np.ndarray) -> pd.Series:
    """``col`` at ``positions``, dtype kept (nullable years stay Int32, ids int64/str)."""
    return col.iloc[np.asarray(positions, dtype=np.int64)].reset_index(drop=True)


def item_columns(rec: Recommender, items: np.ndarray) -> dict[str, pd.Series]:
    """raw_item_id and, where the data has them, title and year of ``items``."""
    return {c: _take(rec.items[c], items) for c in ("raw_item_id", "title", "year")
            if c in rec.items.columns}


def item_table(rec: Recommender, items: np.ndarray, scores: np.ndarray, score_name: str
               ) -> pd.DataFrame:
    """rank, raw_item_id, [title, year], score for valid (>= 0) ``items``."""
    keep = items >= 0
    items, scores = items[keep], scores[keep]
    df = pd.DataFrame({"rank": np.arange(1, len(items) + 1, dtype=np.int32),
                       **item_columns(rec, items)})
    df[score_name] = np.asarray(scores, dtype=np.float32)
    return df


def show(df: pd.DataFrame, title: str) -> None:
    """Print a heading and a readable table on stdout."""
    view = df.copy()
    if "title" in view.columns:
        view["title"] = view["title"].astype("string").fillna("").map(
            lambda t: t if len(t) <= TITLE_WIDTH else t[: TITLE_WIDTH - 3] + "...")
    if "year" in view.columns:
        view["year"] = view["year"].astype("string").fillna("")
    for c in view.columns:
        if pd.api.types.is_float_dtype(view[c].dtype):
            view[c] = view[c].map(lambda x: f"{x:.4f}")
    print(title)
    print(view.to_string(index=False) if len(view) else "(no items)")


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` as CSV or Parquet (by extension), atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if path.suffix.lower() == ".parquet":
            write_parquet(df, tmp)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except OSError as e:
        raise PipelineError(f"--out {path}: cannot write ({e.strerror or e})") from None
    log.info("wrote %d rows to %s", len(df), path)


def _score_label(rec: Recommender) -> tuple[str, str]:
    if rec.task == "explicit":
        lo, hi = rec.rating_scale
        return "score", f"score = predicted rating (scale {lo:g}-{hi:g}, not clipped)"
    return "score", "score = the model's logit for an interaction"


def _explain_column(rec: Recommender, reasons: list[list[tuple[int, float, float]]]) -> list[str]:
    col = "title" if "title" in rec.items.columns else "raw_item_id"
    names = rec.items[col].astype("string").fillna(rec.items["raw_item_id"].astype("string"))
    out = []
    for row in reasons:
        parts = []
        for j, r, c in row:
            nm = str(names.iloc[j])
            nm = nm if len(nm) <= 30 else nm[:27] + "..."
            parts.append(f"{nm} ({r:g}, cos {c:.2f})" if np.isfinite(r) else
                         f"{nm} (cos {c:.2f})")
        out.append("; ".join(parts))
    return out


def _user_train_ratings(rec: Recommender, u: int) -> tuple[np.ndarray, np.ndarray | None]:
    a, b = rec.train.indptr[u], rec.train.indptr[u + 1]
    items = rec.train.indices[a:b].astype(np.int64)
    if rec.train_ratings is None:
        return items, None
    row = rec.train_ratings[u]
    r = np.full(rec.n_items, np.nan)
    r[row.indices] = row.data
    return items, r[items]


def _fallback(rec: Recommender, cfg: RecommendConfig, why: str) -> pd.DataFrame | None:
    if not cfg.fallback:
        return None
    items, counts = popular_items(rec, cfg.k)
    df = item_table(rec, items, counts, "train_ratings")
    df["train_ratings"] = df["train_ratings"].astype(np.int64)
    show(df, f"POPULARITY FALLBACK (not personalised; {why}): the {len(df)} items with the most "
             f"train ratings")
    return df


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------

def recommend_user(rec: Recommender, cfg: RecommendConfig) -> pd.DataFrame | None:
    raw = parse_raw_id(cfg.user, rec.users["raw_user_id"], "user")
    u = int(lookup(rec.user_index(), [raw])[0]) if raw is not None else -1
    if u < 0:
        kind = "integers" if _ids_are_integers(rec.users["raw_user_id"]) else "strings"
        example = _py(rec.users["raw_user_id"].iloc[0])
        msg = (f"unknown user {cfg.user!r}: not among the {rec.n_users} users the model was "
               f"trained on (raw user ids here are {kind}, e.g. {example!r}). To recommend for a "
               f"new user without retraining, write their ratings as 'raw_item_id, rating' lines "
               f"and run `python {PROG} --model {rec.name} --data-dir {rec.data_dir} --ratings "
               f"FILE`")
        if not cfg.fallback:
            raise PipelineError(msg)
        print(f"note: {msg}")
        return _fallback(rec, cfg, f"user {cfg.user!r} is unknown")
    exclude = rec.train[[u]]
    items, scores = rank_items(rec.model, np.array([u]), exclude, cfg.k, rec.device)
    name, label = _score_label(rec)
    df = item_table(rec, items[0], scores[0], name)
    if cfg.explain:
        own, own_r = _user_train_ratings(rec, u)
        df["because_you_liked"] = _explain_column(
            rec, explain(rec.model, df_items(rec, df), own, own_r))
    cold = ("; this user has no train ratings (all of theirs went to valid/test), so the "
            "model never fitted their row: prefer --ratings" if exclude.nnz == 0 else "")
    show(df, f"Top {len(df)} for user {raw!r} (model {rec.name}, {rec.task}; {exclude.nnz} train "
             f"items excluded; {label}{cold})")
    return df


def df_items(rec: Recommender, df: pd.DataFrame) -> np.ndarray:
    return lookup(rec.item_index(), df["raw_item_id"].tolist())


def recommend_new_user(rec: Recommender, cfg: RecommendConfig) -> pd.DataFrame:
    known, unknown = read_ratings_file(cfg.ratings, rec)
    if unknown:
        shown = ", ".join(f"{r!r} (line {l})" for l, r in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        print(f"note: skipped {len(unknown)} item id(s) of {cfg.ratings} unknown to the model: "
              f"{shown}{more}")
    if known.empty:
        raise PipelineError(f"{cfg.ratings}: none of its {len(unknown)} item ids is known to the "
                            f"model; use raw item ids of this dataset (e.g. "
                            f"{_py(rec.items['raw_item_id'].iloc[0])!r})")
    items = known["item_idx"].to_numpy(np.int64)
    ratings = known["rating"].to_numpy(np.float32)
    t0 = time.perf_counter()
    fold = fold_in(rec, np.zeros(len(items), dtype=np.int64), items, ratings, 1,
                   steps=cfg.foldin_steps, lr=cfg.foldin_lr, negatives=cfg.foldin_negatives,
                   seed=cfg.seed)
    print(f"fold-in of {len(items)} rating(s) from {cfg.ratings} in "
          f"{time.perf_counter() - t0:.2f}s, model not retrained: {fold.method}")
    exclude = sp.csr_matrix((np.ones(len(items), dtype=np.float32),
                             (np.zeros(len(items), dtype=np.int64), items)),
                            shape=(1, rec.n_items))
    top, scores = rank_items(fold.model, np.array([0]), exclude, cfg.k, rec.device)
    name, label = _score_label(rec)
    df = item_table(rec, top[0], scores[0], name)
    if cfg.explain:
        df["because_you_liked"] = _explain_column(
            rec, explain(rec.model, df_items(rec, df), items, ratings.astype(np.float64)))
    show(df, f"Top {len(df)} for the new user of {cfg.ratings} (model {rec.name}, {rec.task}; "
             f"the {len(items)} given items excluded; {label})")
    return df


def recommend_similar(rec: Recommender, cfg: RecommendConfig) -> pd.DataFrame:
    raw = parse_raw_id(cfg.similar_to, rec.items["raw_item_id"], "item")
    i = int(lookup(rec.item_index(), [raw])[0]) if raw is not None else -1
    if i < 0:
        kind = "integers" if _ids_are_integers(rec.items["raw_item_id"]) else "strings"
        raise PipelineError(f"unknown item {cfg.similar_to!r}: not among the {rec.n_items} items "
                            f"the model was trained on (raw item ids here are {kind}, e.g. "
                            f"{_py(rec.items['raw_item_id'].iloc[0])!r}); items dropped by the "
                            f"filters of stage 20 or absent from the data have no vector")
    items, sims = similar_items(rec.model, i, cfg.k)
    df = item_table(rec, items, sims, "cosine")
    what = rec.items.iloc[i]
    name = f"{_py(what['raw_item_id'])!r}" + (f" ({what['title']})" if "title" in rec.items.columns
                                         and pd.notna(what["title"]) else "")
    show(df, f"{len(df)} items most similar to {name} (model {rec.name}: cosine of item vectors)")
    return df


def read_users_file(spec: str, rec: Recommender) -> tuple[list[Any], list[int]]:
    """Raw user ids from ``spec`` ('all' or a file: first field per line, header optional)."""
    col = rec.users["raw_user_id"]
    if spec == "all":
        return col.tolist(), []
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PipelineError(f"--batch {spec}: file not found; give a file of raw user ids or "
                            f"'all'") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"--batch {spec}: cannot read ({e})") from None
    raws: list[Any] = []
    lines: list[int] = []
    seen = False
    for no, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        first = split_fields(s)[0]
        rid = parse_raw_id(first, col, "user")
        if not seen and (rid is None or first.lower() in
                         ("raw_user_id", "user_id", "user", "userid")):
            seen = True          # header
            continue
        seen = True
        if rid is None:
            raise PipelineError(f"{path}:{no}: user id {first!r} is not an integer; this "
                                f"dataset's raw user ids are integers")
        raws.append(rid)
        lines.append(no)
    if not raws:
        raise PipelineError(f"{path}: no user ids found; expected one raw user id per line")
    return raws, lines


def recommend_batch(rec: Recommender, cfg: RecommendConfig) -> pd.DataFrame:
    raws, _ = read_users_file(cfg.batch, rec)
    raws = list(dict.fromkeys(raws))                         # first occurrence, order kept
    idx = lookup(rec.user_index(), raws)
    unknown = [r for r, i in zip(raws, idx) if i < 0]
    if unknown:
        shown = ", ".join(repr(r) for r in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        what = ("given the popularity fallback (source=popularity_fallback)" if cfg.fallback
                else "skipped (--no-fallback)")
        print(f"note: {len(unknown)} unknown user id(s) {what}: {shown}{more}; fold new users "
              f"in with --ratings")
    known = idx[idx >= 0]
    t0 = time.perf_counter()
    items, scores = rank_items(rec.model, known, rec.train[known], cfg.k, rec.device,
                               cfg.chunk_users)
    secs = time.perf_counter() - t0
    k_eff = items.shape[1]
    keep = (items >= 0).ravel()
    flat_items = items.ravel()[keep]
    name, label = _score_label(rec)
    df = pd.DataFrame({
        "raw_user_id": _take(rec.users["raw_user_id"], np.repeat(known, k_eff)[keep]),
        "rank": np.tile(np.arange(1, k_eff + 1, dtype=np.int32), len(known))[keep],
        **item_columns(rec, flat_items)})
    df[name] = scores.ravel()[keep].astype(np.float32)
    df["source"] = "model"
    if unknown and cfg.fallback:
        pop, _ = popular_items(rec, cfg.k)
        fb = pd.DataFrame({
            "raw_user_id": pd.Series(unknown, dtype=rec.users["raw_user_id"].dtype)
            .repeat(len(pop)).reset_index(drop=True),
            "rank": np.tile(np.arange(1, len(pop) + 1, dtype=np.int32), len(unknown)),
            **item_columns(rec, np.tile(pop, len(unknown)))})
        fb[name] = np.float32(np.nan)
        fb["source"] = "popularity_fallback"
        df = pd.concat([df, fb], ignore_index=True) if len(df) else fb
    show(df.head(min(len(df), 2 * cfg.k)),
         f"Top {cfg.k} for {len(known)} users (model {rec.name}, {rec.task}; scored in "
         f"{secs:.2f}s on {rec.device}; {label}); first rows:")
    return df


def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    cfg = parse_config(RecommendConfig, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    rec = load_recommender(cfg.data_dir, cfg.model, device)
    t0 = time.perf_counter()
    if cfg.user is not None:
        df = recommend_user(rec, cfg)
    elif cfg.ratings is not None:
        df = recommend_new_user(rec, cfg)
    elif cfg.similar_to is not None:
        df = recommend_similar(rec, cfg)
    else:
        df = recommend_batch(rec, cfg)
    if cfg.out is not None and df is not None:
        write_table(df, cfg.out)
    log.info("%s done in %.2fs (%s)", PROG, time.perf_counter() - t0, command_line(PROG, argv))
    return df
