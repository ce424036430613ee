"""MovieLens (100K ``u.data``, 1M/10M ``ratings.dat``, 20M/25M/latest ``ratings.csv``) and
their item files (``u.item``, ``movies.dat``, ``movies.csv``): titles and release years."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..cli import PipelineError
from .text import (LineSpec, _assemble, _items_frame, _parse, _read_headed_csv, _single_segment,
                   check_range, check_text, decode_text, load_bytes, text_lines)

_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


def _years_from_titles(titles: pd.Series) -> pd.Series:
    return titles.str.extract(_YEAR_RE, expand=False).astype("Int32")


def read_ml100k(u_data: Path) -> pa.Table:
    """u.data: user item rating timestamp, tab-separated, rating 1-5."""
    expected = "user<TAB>item<TAB>rating<TAB>timestamp with integers and rating 1-5"
    data = load_bytes(u_data)
    check_text(data, u_data, expected)
    buf, seg = _single_segment(u_data, data, 0)
    spec = LineSpec("\t", 4, [(0, "user", "int"), (1, "item", "int"), (2, "rating", "rating_int"),
                              (3, "timestamp", "int")], expected, scale=(1, 5))
    t = _parse(buf, ["u", "i", "r", "t"], {"u": pa.int64(), "i": pa.int64(), "r": pa.int8(),
                                          "t": pa.int64()}, "\t", [seg], spec)
    r = t.column("r").to_numpy()
    check_range(r, 1, 5, [seg], expected)
    return _assemble(t.column("u").combine_chunks(), t.column("i").combine_chunks(),
                     r.astype(np.float32), t.column("t").combine_chunks())


def read_ml100k_items(u_item: Path) -> pd.DataFrame:
    """u.item: ``movie id|title|release date|...`` (ISO-8859-1); the year from the title."""
    raw = load_bytes(u_item)
    check_text(raw, u_item, "movie id|title|release date|... lines")
    ids, titles, years = [], [], []
    for k, line in text_lines(raw):
        f = line.split("|")
        if len(f) < 3 or not f[0].isdigit():
            raise PipelineError(f"{u_item}:{k}: {line[:120]!r}: expected `movie id|title|release "
                                f"date|...` with an integer movie id")
        ids.append(int(f[0]))
        titles.append(f[1])
        m = _YEAR_RE.search(f[1]) or re.search(r"(\d{4})$", f[2])
        years.append(int(m.group(1)) if m else None)
    return _items_frame(ids, titles, years)


def read_ml_dat(ratings: Path, scale: tuple[float, float]) -> pa.Table:
    """ml-1m / ml-10m ratings.dat: ``UserID::MovieID::Rating::Timestamp``."""
    expected = f"UserID::MovieID::Rating::Timestamp with rating {scale[0]:g}-{scale[1]:g}"
    data = load_bytes(ratings)
    check_text(data, ratings, expected)
    data = data.replace(b"::", b"\t")  # pyarrow wants a one-character delimiter
    buf, seg = _single_segment(ratings, data, 0)
    spec = LineSpec("::", 4, [(0, "UserID", "int"), (1, "MovieID", "int"), (2, "rating", "num"),
                              (3, "timestamp", "int")], expected, scale=scale)
    t = _parse(buf, ["u", "i", "r", "t"], {"u": pa.int64(), "i": pa.int64(), "r": pa.float32(),
                                          "t": pa.int64()}, "\t", [seg], spec)
    del buf
    r = t.column("r").to_numpy()
    check_range(r, scale[0], scale[1], [seg], expected)
    return _assemble(t.column("u").combine_chunks(), t.column("i").combine_chunks(), r,
                     t.column("t").combine_chunks())


def read_ml_dat_movies(movies: Path) -> pd.DataFrame:
    """movies.dat: ``MovieID::Title::Genres`` (ISO-8859-1); the year from the title."""
    raw = load_bytes(movies)
    check_text(raw, movies, "MovieID::Title::Genres lines")
    ids, titles = [], []
    for k, line in text_lines(raw):
        f = line.split("::")
        if len(f) < 2 or not f[0].isdigit():
            raise PipelineError(f"{movies}:{k}: {line[:120]!r}: expected MovieID::Title::Genres")
        ids.append(int(f[0]))
        titles.append(f[1])
    titles_s = pd.Series(titles, dtype="string")
    return _items_frame(ids, titles_s, _years_from_titles(titles_s))


def read_ml_csv(ratings: Path) -> pa.Table:
    """ml-20m / ml-25m / ml-latest ratings.csv: userId,movieId,rating,timestamp."""
    expected = "userId,movieId,rating,timestamp with rating 0.5-5"
    t, seg = _read_headed_csv(
        ratings, {"user": ["userid"], "item": ["movieid"], "rating": ["rating"],
                  "timestamp": ["timestamp"]}, {"timestamp"}, expected,
        {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
        (0.5, 5.0))
    r = t.column("rating").to_numpy()
    check_range(r, 0.5, 5.0, [seg], expected)
    return _assemble(t.column("user").combine_chunks(), t.column("item").combine_chunks(), r,
                     t.column("timestamp").combine_chunks() if "timestamp" in t.column_names else None)


def read_ml_csv_movies(movies: Path) -> pd.DataFrame:
    """movies.csv: a header movieId,title,genres, quoted titles; the year from the title."""
    raw = load_bytes(movies)
    check_text(raw, movies, "a header movieId,title,genres")
    try:
        df = pd.read_csv(io.StringIO(decode_text(raw)), dtype={"movieId": "int64"})
    except (ValueError, pd.errors.ParserError) as e:
        raise PipelineError(f"{movies}: cannot parse ({str(e).splitlines()[0]}); expected a "
                            f"header movieId,title,genres and quoted titles") from None
    if "movieId" not in df.columns or "title" not in df.columns:
        raise PipelineError(f"{movies}:1: header {list(df.columns)}: expected movieId,title,genres")
    titles = df["title"].astype("string")
    return _items_frame(df["movieId"].to_numpy(), titles, _years_from_titles(titles))
