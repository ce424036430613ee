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

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import models as _models  # noqa: F401 - registers the built-in families
from .artifacts import MANIFEST, read_manifest, read_parquet, stage_dir
from .checkpoint import load_model as _load_checkpoint, resolve_device
from .dataset import recency_weights
from .cli import (PipelineError, command_line, opt, parse_config, print_config, set_seed,
                  training_numerics)
from .family import REGISTRY, Family
from .objectives import for_task
from .presets import DEFAULT_MODEL
from .rawio import (TITLE_WIDTH, _ids_are_integers, _py, _take,  # noqa: F401 (re-exports)
                    item_columns, item_table, lookup, parse_raw_id, read_ratings_file,
                    read_users_file, show, split_fields, write_table)
from .scoring import rank_items as _rank_items, top_k as _top_k

log = logging.getLogger("recpipe")

PROG = "70_recommend.py"
DESCRIPTION = ("Use a trained model (stage 60): top-k recommendations for a known user "
               "(--user), for a new user from a ratings file without retraining (--ratings), "
               "items similar to an item (--similar-to), or top-k for many users written to a "
               "file (--batch ... --out).")
MODES = ("user", "ratings", "similar_to", "batch")


@dataclass
class RecommendConfig:
    model: str = opt(DEFAULT_MODEL, "trained model to use: reads DATA_DIR/60_train/MODEL/model.pt",
                     choices=REGISTRY)
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
    foldin_steps: int = opt(300, "--ratings with models folded in by Adam (the default fold-in; "
                                 "explicit mf solves in closed form): steps on the new user's "
                                 "row")
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
    # the rows a row-input family scores from, when they are not ``train`` itself: weighted
    # by recency for a model with a half-life (EASE's --recency)
    history: sp.csr_matrix | None = None

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


def train_command(model_name: str, data_dir: Path) -> str:
    return f"python 60_train.py --model {model_name} --data-dir {data_dir}"


def load_model(model_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in ``model_dir/model.pt`` (weights_only, eval mode) with every parameter
    frozen, and the checkpoint's metadata."""
    model, meta = _load_checkpoint(model_dir, device)
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
    history = None
    half_life = model.history_half_life()
    if half_life > 0:
        time_path = stage_dir(data_dir, "40_make_sparse_matrix") / "train_time.npy"
        if not time_path.exists():
            raise PipelineError(f"{time_path} is missing, and {model_name} weighs a user's "
                                f"history by recency (half-life {half_life:g}); rerun "
                                f"`python 40_make_sparse_matrix.py --data-dir {data_dir}` and "
                                f"`{train_command(model_name, data_dir)}`")
        history = recency_weights(train, np.load(time_path, allow_pickle=False), half_life)
    return Recommender(model=model, meta=meta, name=model_name, task=task,
                       rating_scale=(float(lo), float(hi)), device=device, users=users,
                       items=items, train=train, train_ratings=train_ratings, data_dir=data_dir,
                       history=history)


def history_rows(rec: Recommender, users: np.ndarray) -> sp.csr_matrix | None:
    """The rows of ``users`` that a row-input family scores from (None: their train rows)."""
    return None if rec.history is None else rec.history[users]


# --------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------

def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scoring.top_k`` (ties: the lower item index); NaN scores are a user-level error."""
    try:
        return _top_k(scores, k)
    except FloatingPointError:
        raise PipelineError("the model produced NaN scores; its weights are broken: retrain it "
                            "with 60_train.py") from None


def rank_items(model: torch.nn.Module, user_rows: np.ndarray, exclude: sp.csr_matrix, k: int,
               device: torch.device, chunk_users: int = 0,
               history: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per user over all items, the items in ``exclude`` rows left out
    (``scoring.rank_items``, the loop stage 60's evaluation uses). ``history`` (aligned with
    ``user_rows``) feeds row-input families; by default the excluded items are it."""
    try:
        return _rank_items(model, user_rows, exclude, k, device, chunk_users,
                           exclude if history is None else history)
    except FloatingPointError:
        raise PipelineError("the model produced NaN scores; its weights are broken: retrain it "
                            "with 60_train.py") from None


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
    if not getattr(model, "has_item_vectors", True):
        raise PipelineError(f"model family {getattr(model, 'name', type(model).__name__)!r} has "
                            f"no item vectors: --similar-to and --explain need a model that has "
                            f"them")
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
    """The user tables the family declares (what a fold-in replaces)."""
    found = model.user_tables()
    if not found:
        raise PipelineError(f"model {type(model).__name__} declares no user tables; fold-in "
                            f"is not possible")
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


@dataclass
class FoldIn:
    """New users folded into a trained model: rows 0..U-1 of ``model``'s user side."""
    model: torch.nn.Module
    method: str        # a sentence for the output: what was done
    loss: float | None = None


def _objective(model: torch.nn.Module, task: str, negatives: int):
    return for_task(task, scale=float(getattr(model, "scale", torch.tensor(1.0))),
                    n_negatives=negatives)


def fold_in_adam(model: torch.nn.Module, task: str, l2: float, users: np.ndarray,
                 items: np.ndarray, ratings: np.ndarray, n_users: int, steps: int, lr: float,
                 negatives: int, seed: int) -> FoldIn:
    """The default fold-in (``Family.fold_in``: Adam steps on fresh user rows, the rest
    frozen, on the training objective), whatever the family's own fold-in is."""
    try:
        folded, method = Family.fold_in(model, _objective(model, task, negatives), l2, users,
                                        items, ratings, n_users, steps, lr, seed)
    except FloatingPointError as e:
        raise PipelineError(str(e)) from None
    return FoldIn(folded, method)


def fold_in(rec: Recommender, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
            n_users: int, steps: int = 300, lr: float = 0.05, negatives: int = 4,
            seed: int = 0) -> FoldIn:
    """Fold ``n_users`` new users (``users`` in 0..n_users-1, one entry per given rating) into
    the trained model without retraining it: the family's own ``fold_in``."""
    objective = _objective(rec.model, rec.task, negatives)
    try:
        folded, method = rec.model.fold_in(objective, training_l2(rec.meta), users, items,
                                           ratings, n_users, steps, lr, seed)
    except FloatingPointError as e:
        raise PipelineError(str(e)) from None
    return FoldIn(folded, method)


def _score_label(rec: Recommender) -> tuple[str, str]:
    return "score", (getattr(rec.model, "score_label", None)    # a family's, or a model's
                     or for_task(rec.task).score_label(rec.rating_scale))


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
    if raw is None:                     # not even of the id type: a typo, not a new user
        raise PipelineError(f"unknown user {cfg.user!r}: the id is not an integer, and this "
                            f"dataset's raw user ids are integers (e.g. "
                            f"{_py(rec.users['raw_user_id'].iloc[0])!r}); check the id, or fold "
                            f"a new user in with `python {PROG} --model {rec.name} --data-dir "
                            f"{shlex.quote(str(rec.data_dir))} --ratings FILE`")
    u = int(lookup(rec.user_index(), [raw])[0])
    if u < 0:
        kind = "integers" if _ids_are_integers(rec.users["raw_user_id"]) else "strings"
        example = _py(rec.users["raw_user_id"].iloc[0])
        msg = (f"unknown user {cfg.user!r}: not among the {rec.n_users} users the model was "
               f"trained on (raw user ids here are {kind}, e.g. {example!r}). To recommend for a "
               f"new user without retraining, write their ratings as 'raw_item_id, rating' lines "
               f"and run `python {PROG} --model {rec.name} --data-dir "
               f"{shlex.quote(str(rec.data_dir))} --ratings FILE`")
        if not cfg.fallback:
            raise PipelineError(msg)
        print(f"note: {msg}")
        return _fallback(rec, cfg, f"user {cfg.user!r} is unknown")
    exclude = rec.train[[u]]
    items, scores = rank_items(rec.model, np.array([u]), exclude, cfg.k, rec.device,
                               history=history_rows(rec, np.array([u])))
    name, label = _score_label(rec)
    df = item_table(rec, items[0], scores[0], name)
    if cfg.explain:
        own, own_r = _user_train_ratings(rec, u)
        df["because_you_liked"] = _explain_column(
            rec, explain(rec.model, df_items(rec, df), own, own_r))
    cold = ("; this user has no train ratings (all of theirs went to valid/test), so the "
            "ranking is the model's baseline for unknown users (global mean + item bias, or "
            "item popularity): prefer --ratings" if exclude.nnz == 0 else "")
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
    history = None
    half_life = fold.model.history_half_life()
    if half_life > 0:           # the file's order is the history's: its last line the latest
        exclude.sum_duplicates()
        line = np.full(rec.n_items, -1, dtype=np.int64)
        line[items] = np.arange(len(items))           # an item given twice: its last line
        history = recency_weights(exclude, line[exclude.indices], half_life)
        print(f"note: {rec.name} weighs a history by recency (half-life {half_life:g} "
              f"interactions): the last line of {cfg.ratings} counts as the latest")
    top, scores = rank_items(fold.model, np.array([0]), exclude, cfg.k, rec.device,
                             history=history)
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
    if len(known) == 0 and not cfg.fallback:
        raise PipelineError(f"--batch {cfg.batch}: none of its {len(raws)} user ids is known to "
                            f"the model and --no-fallback leaves nothing to write; fold new "
                            f"users in with --ratings, or drop --no-fallback")
    t0 = time.perf_counter()
    items, scores = rank_items(rec.model, known, rec.train[known], cfg.k, rec.device,
                               cfg.chunk_users, history=history_rows(rec, known))
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
    # stage 60's numerics (train.run), so that a model ranks here as it was evaluated there
    training_numerics()
    device = resolve_device(cfg.device)
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
