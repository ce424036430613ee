"""A deterministic, realistic demo dataset in the Netflix Prize ``training_set/`` layout.

Ratings come from a latent-factor model with user and item biases: a continuous score
``b_u + b_i + p_u . q_i + noise`` is cut into integer stars 1-5 at the quantiles of the
Netflix Prize rating distribution (mean about 3.6). Item popularity is long-tailed (Zipf-like)
and user activity log-normal; which items a user rates is drawn by popularity, and slightly by
how much the user likes them (ratings are missing not at random, as in real data). Dates span
the Netflix period 1999-11-11 .. 2005-12-31. Everything is vectorised and seeded: the same
spec gives byte-identical files.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .artifacts import swap_folder, temp_name
from .cli import PipelineError, log

VERSION = 1
# Netflix Prize training-set share of 1..5 stars (mean about 3.60)
STAR_SHARES = np.array([0.046, 0.101, 0.287, 0.336, 0.230])
FIRST_DAY = 10906   # 1999-11-11 in days since 1970-01-01
LAST_DAY = 13148    # 2005-12-31
N_FACTORS = 8

_ADJ = ["Silent", "Broken", "Golden", "Last", "Hidden", "Crimson", "Lonely", "Wild", "Frozen",
        "Electric", "Secret", "Midnight", "Burning", "Distant", "Savage", "Little", "Dark",
        "Endless", "Quiet", "Lucky", "Iron", "Velvet", "Paper", "Northern"]
_NOUN = ["River", "Kingdom", "Summer", "Detective", "Garden", "Empire", "Horizon", "Voyage",
         "Island", "Promise", "Station", "Mirror", "Harbor", "Orchestra", "Frontier", "Letter",
         "Circus", "Machine", "Winter", "Café", "Señor", "Highway", "Planet", "Sister"]
_TAIL = ["", "", "", "", ", The", ": Season 2", ": Part II", ", Vol. 1", " Returns",
         ": Lights, Camera, Action!"]


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 42
    n_users: int = 6000
    n_items: int = 1500
    n_ratings: int = 600_000


def _activity(rng: np.random.Generator, spec: DemoSpec) -> np.ndarray:
    """Ratings per user: log-normal, clipped, scaled to the target total."""
    raw = rng.lognormal(0.0, 1.0, spec.n_users)
    lo, hi = 5, max(6, int(0.6 * spec.n_items))
    n = np.full(spec.n_users, lo, np.int64)
    scale = spec.n_ratings / raw.sum()
    for _ in range(20):  # clipping moves the total: rescale until it settles
        n = np.clip(np.rint(raw * scale), lo, hi).astype(np.int64)
        total = n.sum()
        if abs(total - spec.n_ratings) <= spec.n_ratings * 0.002:
            break
        scale *= spec.n_ratings / total
    return n


def generate(spec: DemoSpec) -> dict[str, np.ndarray]:
    """The demo ratings as arrays (user ids, movie ids 1..n_items, stars, days), plus titles."""
    if spec.n_ratings > 0.6 * spec.n_users * spec.n_items:
        raise PipelineError(f"--demo-ratings {spec.n_ratings} is too many for {spec.n_users} users x "
                            f"{spec.n_items} items; expected at most 60% density")
    rng = np.random.default_rng(spec.seed)
    U, I, k = spec.n_users, spec.n_items, N_FACTORS
    # long-tailed item popularity (Zipf-like), popular items randomly placed among the ids
    pop = 1.0 / (np.arange(I) + 10.0) ** 1.3
    pop = pop[rng.permutation(I)]
    log_pop = np.log(pop / pop.sum()).astype(np.float32)
    n_per_user = _activity(rng, spec)
    # latent structure: biases, factors, noise; popular items are a little better liked
    b_u = rng.normal(0.0, 0.40, U).astype(np.float32)
    b_i = (rng.normal(0.0, 0.45, I) + 0.15 * (log_pop - log_pop.mean()) / log_pop.std()).astype(np.float32)
    P = rng.normal(0.0, 0.75 / np.sqrt(k) ** 0.5, (U, k)).astype(np.float32)
    Q = rng.normal(0.0, 0.75 / np.sqrt(k) ** 0.5, (I, k)).astype(np.float32)
    users, items, scores = [], [], []
    step = max(1, 20_000_000 // I)  # users per chunk: bounded memory for big specs
    for a in range(0, U, step):
        b = min(U, a + step)
        affinity = P[a:b] @ Q.T                                   # [chunk, I]
        # Gumbel top-k: each user's n_u distinct items, drawn by popularity and (mildly) taste
        keys = log_pop[None, :] + 0.5 * affinity + rng.gumbel(size=(b - a, I)).astype(np.float32)
        order = np.argsort(-keys, axis=1)
        take = np.arange(I)[None, :] < n_per_user[a:b, None]
        it = order[take]
        us = np.repeat(np.arange(a, b), n_per_user[a:b])
        users.append(us)
        items.append(it)
        scores.append(affinity[us - a, it] + b_u[us] + b_i[it])
    user = np.concatenate(users)
    item = np.concatenate(items)
    score = np.concatenate(scores) + rng.normal(0.0, 0.75, len(user)).astype(np.float32)
    cuts = np.quantile(score, np.cumsum(STAR_SHARES)[:-1])
    stars = (np.searchsorted(cuts, score) + 1).astype(np.int8)
    # dates: users join over the period (more later, as Netflix grew) and rate for a while
    span = LAST_DAY - FIRST_DAY
    first = FIRST_DAY + (span * rng.beta(2.5, 1.0, U)).astype(np.int64)
    active = rng.exponential(300.0, U)
    day = first[user] + (rng.random(len(user)) * active[user]).astype(np.int64)
    day = np.minimum(day, LAST_DAY).astype(np.int32)
    # sparse, Netflix-like customer ids
    raw_user = np.sort(rng.choice(2_649_429, U, replace=False) + 1)[rng.permutation(U)]
    years = np.clip(np.rint(2005 - rng.exponential(12.0, I)), 1920, 2005).astype(np.int64)
    null_year = rng.random(I) < 0.005
    adj = rng.integers(0, len(_ADJ), I)
    noun = rng.integers(0, len(_NOUN), I)
    tail = rng.integers(0, len(_TAIL), I)
    titles = [f"{_ADJ[x]} {_NOUN[y]}{_TAIL[z]}" for x, y, z in zip(adj, noun, tail)]
    return {"user": raw_user[user], "item": item.astype(np.int64) + 1, "stars": stars, "day": day,
            "years": years, "null_year": null_year, "titles": np.array(titles, dtype=object)}


def write_training_set(d: dict[str, np.ndarray], folder: Path, seed: int) -> int:
    """mv_0000001.txt ... (``N:`` then ``CustomerID,Rating,YYYY-MM-DD``) + movie_titles.txt."""
    rng = np.random.default_rng(seed + 1)
    order = np.lexsort((rng.random(len(d["item"])), d["item"]))
    table = pa.table({"u": pa.array(d["user"][order]), "r": pa.array(d["stars"][order]),
                      "d": pa.array(d["day"][order], pa.int32()).cast(pa.date32())})
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    buf = sink.getvalue()
    nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
    n_items = len(d["titles"])
    counts = np.bincount(d["item"], minlength=n_items + 1)[1:]
    ends = np.cumsum(counts)
    ts = folder / "training_set"
    ts.mkdir(parents=True)
    n_files = 0
    for m in range(n_items):
        if counts[m] == 0:
            continue
        lo = 0 if ends[m] == counts[m] else int(nl[ends[m] - counts[m] - 1]) + 1
        hi = int(nl[ends[m] - 1]) + 1
        with open(ts / f"mv_{m + 1:07d}.txt", "wb") as f:
            f.write(f"{m + 1}:\n".encode())
            f.write(buf[lo:hi])
        n_files += 1
    lines = [f"{m + 1},{'NULL' if d['null_year'][m] else d['years'][m]},{d['titles'][m]}\n"
             for m in range(n_items)]
    (folder / "movie_titles.txt").write_bytes("".join(lines).encode("iso-8859-1"))
    return n_files


def ensure_demo(folder: Path, spec: DemoSpec) -> Path:
    """Generate the demo dataset into ``folder`` unless the same spec is already there."""
    folder = Path(folder)
    marker = folder / "demo.json"
    want = {"version": VERSION, **asdict(spec)}
    if marker.exists():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = {}
        if {k: have.get(k) for k in want} == want:
            log.info("demo dataset already in %s (seed %d)", folder, spec.seed)
            return folder
    t0 = time.time()
    d = generate(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        n_files = write_training_set(d, tmp, spec.seed)
        info = {**want, "n_ratings_written": int(len(d["item"])), "n_files": n_files,
                "rating_mean": round(float(d["stars"].mean()), 4)}
        (tmp / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
        swap_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo dataset: %s ratings, %d users, %d movie files (mean %.2f) generated in %.1fs -> %s",
             f"{len(d['item']):,}", spec.n_users, n_files, d["stars"].mean(), time.time() - t0, folder)
    return folder
