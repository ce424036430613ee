"""Stage 70's raw ids and files: a new user's ratings file and a file of user ids in
(parsed to the dataset's raw id dtype, malformed lines named by file:line), and the
recommendation tables out (printed, or written atomically as CSV / Parquet)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from .artifacts import atomic_write, write_parquet
from .cli import PipelineError

if TYPE_CHECKING:
    from .recommend import Recommender

log = logging.getLogger("recpipe")
TITLE_WIDTH = 60

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
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise PipelineError(f"--out {path}: {blocker} is a file, not a folder; choose another "
                            f"--out path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            if path.suffix.lower() == ".parquet":
                write_parquet(df, tmp)
            else:
                df.to_csv(tmp, index=False)
    except OSError as e:
        raise PipelineError(f"--out {path}: cannot write ({e.strerror or e})") from None
    log.info("wrote %d rows to %s", len(df), path)


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
