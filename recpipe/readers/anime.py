"""Kaggle "Anime Recommendations Database": rating.csv (-1 = watched, not rated) + anime.csv."""
from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..cli import PipelineError
from .text import _assemble, _items_frame, _read_headed_csv, check_range, check_text, decode_text, \
    load_bytes


def read_anime(ratings: Path) -> pa.Table:
    """rating.csv: user_id,anime_id,rating; rating -1 (watched, not rated) becomes NaN."""
    expected = "user_id,anime_id,rating with rating 1-10, or -1 for watched but not rated"
    t, seg = _read_headed_csv(
        ratings, {"user": ["user_id"], "item": ["anime_id"], "rating": ["rating"]}, set(), expected,
        {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32()}, (1, 10), (-1.0,))
    r = t.column("rating").to_numpy()
    check_range(r, 1, 10, [seg], expected, allowed=(-1.0,))
    unrated = r == -1
    return _assemble(t.column("user").combine_chunks(), t.column("item").combine_chunks(),
                     np.where(unrated, np.float32(np.nan), r).astype(np.float32))


def read_anime_items(anime: Path) -> pd.DataFrame:
    """anime.csv: anime_id,name,...; HTML entities in the names unescaped, no year."""
    raw = load_bytes(anime)
    check_text(raw, anime, "a header anime_id,name,...")
    try:
        df = pd.read_csv(io.StringIO(decode_text(raw)), usecols=["anime_id", "name"],
                         dtype={"anime_id": "int64", "name": "string"})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PipelineError(f"{anime}: cannot parse ({str(e).splitlines()[0]}); expected a "
                            f"header anime_id,name,genre,type,episodes,rating,members") from None
    names = df["name"].map(html.unescape, na_action="ignore").astype("string")
    return _items_frame(df["anime_id"].to_numpy(), names, [None] * len(df))
