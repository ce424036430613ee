"""Netflix Prize files: per-movie ``mv_*.txt``, ``combined_data_*.txt``, titles, probe.txt.

Rating files are read as bytes, concatenated and parsed in big chunks by ``pyarrow.csv``;
item ids come from the ``MovieID:`` headers and per-file row counts.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from ..cli import PipelineError
from .text import (LineSpec, Segment, _assemble, _end_of_text, _items_frame, _line_text, _parse,
                   check_range, check_text, load_bytes, text_lines)

NETFLIX_LINE = "CustomerID,Rating,YYYY-MM-DD with Rating an integer 1-5"


def read_netflix_titles(path: Path) -> pd.DataFrame:
    """movie_titles.txt: MovieID,YearOfRelease,Title (ISO-8859-1, titles with commas, NULL years)."""
    data = load_bytes(path, "movie_titles.txt (MovieID,YearOfRelease,Title)")
    check_text(data, path, "MovieID,YearOfRelease,Title lines")
    ids, years, titles = [], [], []
    for k, line in text_lines(data):
        parts = line.split(",", 2)
        if len(parts) < 3 or not parts[0].strip().isdigit():
            raise PipelineError(f"{path}:{k}: {line[:120]!r}: expected MovieID,YearOfRelease,Title "
                                f"(MovieID an integer, YearOfRelease a year or NULL)")
        y = parts[1].strip()
        if y.upper() in ("NULL", ""):
            years.append(None)
        elif y.isdigit():
            years.append(int(y))
        else:
            raise PipelineError(f"{path}:{k}: {line[:120]!r}: year {y!r} is not a year or NULL; "
                                f"expected MovieID,YearOfRelease,Title")
        ids.append(int(parts[0]))
        titles.append(parts[2])
    return _items_frame(ids, titles, years)


def _netflix_spec() -> LineSpec:
    return LineSpec(",", 3, [(0, "CustomerID", "int"), (1, "rating", "rating_int"), (2, "date", "date")],
                    NETFLIX_LINE, scale=(1, 5))


_HEADER_RE = re.compile(rb"[ \t]*(\d+)[ \t]*:[ \t]*\r?")


def _netflix_table(buf, segments: list[Segment], movie_ids: np.ndarray) -> pa.Table:
    spec = _netflix_spec()
    # YYYY-MM-DD parsed straight to seconds at midnight UTC
    t = _parse(buf, ["u", "r", "d"], {"u": pa.int64(), "r": pa.int8(), "d": pa.timestamp("s")},
               ",", segments, spec)
    r = t.column("r").to_numpy()
    check_range(r, 1, 5, segments, spec.expected)
    counts = np.fromiter((s.n_rows for s in segments), np.int64, len(segments))
    item = np.repeat(movie_ids.astype(np.int64), counts)
    secs = t.column("d").combine_chunks().cast(pa.int64())
    return _assemble(t.column("u").combine_chunks(), pa.array(item), r.astype(np.float32), secs)


def _pipeline(pieces, sink: Callable[[pa.Table], None] | None, chunk_bytes: int) -> pa.Table | None:
    """Parse (segment, movie id, body bytes) pieces in chunks of about chunk_bytes.

    While a worker thread parses chunk k with pyarrow (multi-threaded, GIL released) and hands
    it to ``sink`` (e.g. a Parquet writer), this thread reads the pieces of chunk k+1. With a
    sink the chunks are not kept (memory O(chunk) at Netflix scale) and None is returned;
    without one the whole table is.
    """
    from concurrent.futures import ThreadPoolExecutor

    def parse(parts: list, segments: list[Segment], ids: list[int]) -> pa.Table | None:
        buf = b"".join(parts)
        parts.clear()
        t = _netflix_table(buf, segments, np.array(ids, np.int64))
        if sink is not None:
            sink(t)
            return None
        return t

    futures: list = []
    parts: list = []
    segments: list[Segment] = []
    ids: list[int] = []
    size = 0
    with ThreadPoolExecutor(1, thread_name_prefix="netflix-parse") as pool:
        try:
            for seg, movie_id, body in pieces:
                if seg.n_rows == 0:
                    continue
                ids.append(movie_id)
                segments.append(seg)
                parts.append(body)
                parts.append(b"\n")
                size += len(body)
                if size >= chunk_bytes:
                    for f in futures:  # stop at the first failed chunk
                        if f.done() and f.exception() is not None:
                            f.result()
                    futures.append(pool.submit(parse, parts, segments, ids))
                    parts, segments, ids, size = [], [], [], 0
            if parts:
                futures.append(pool.submit(parse, parts, segments, ids))
            tables = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
    if sink is not None:
        return None
    if not tables:
        return _assemble(pa.array([], pa.int64()), pa.array([], pa.int64()),
                         np.array([], np.float32), pa.array([], pa.int64()))
    return pa.concat_tables(tables) if len(tables) != 1 else tables[0]


def read_netflix_files(files: list[Path], progress: Callable | None = None,
                       sink: Callable[[pa.Table], None] | None = None,
                       chunk_bytes: int = 1 << 25) -> pa.Table | None:
    """Per-movie files (first line ``MovieID:``): read bytes, concatenate, parse in big chunks.

    Item ids come from the ``MovieID:`` headers and per-file row counts (see :func:`_pipeline`).
    """
    def pieces():
        for path in (progress(files) if progress else files):
            data = load_bytes(path, "a Netflix per-movie file")
            if _end_of_text(data) == 0:
                raise PipelineError(f"{path}: empty file; expected a `MovieID:` line, then "
                                    f"{NETFLIX_LINE}")
            if b"\x00" in data:
                check_text(data, path, f"a `MovieID:` line, then {NETFLIX_LINE}")
            nl = data.find(b"\n")
            head = data[: nl if nl >= 0 else len(data)]
            m = _HEADER_RE.fullmatch(head)
            if m is None:
                check_text(data, path, f"a `MovieID:` line, then {NETFLIX_LINE}")
                raise PipelineError(f"{path}:1: {_line_text(head)!r}: missing the `MovieID:` "
                                    f"header line; expected the movie id and a colon (e.g. "
                                    f"`1:`) on the first line, then {NETFLIX_LINE}")
            start = len(data) if nl < 0 else nl + 1
            end = _end_of_text(data, start)
            if end <= start:
                raise PipelineError(f"{path}: has the header {_line_text(head)!r} but no rating "
                                    f"lines; expected {NETFLIX_LINE} after it")
            yield (Segment(path, 2, data.count(b"\n", start, end) + 1), int(m.group(1)),
                   memoryview(data)[start:end])

    return _pipeline(pieces(), sink, chunk_bytes)


def read_netflix_combined(files: list[Path], sink: Callable[[pa.Table], None] | None = None,
                          chunk_bytes: int = 1 << 25) -> pa.Table | None:
    """combined_data_*.txt: many movies per file, each block led by a ``MovieID:`` line.

    Data lines never contain ':', so the header lines are found with ``bytes.find`` (C speed,
    no per-line work and no extra memory); row counts per block with ``bytes.count``.
    """
    expected = f"`MovieID:` lines, each followed by {NETFLIX_LINE}"

    def pieces():
        for path in files:
            data = load_bytes(path, "a Netflix combined_data file")
            check_text(data, path, expected)
            end = _end_of_text(data)
            mv = memoryview(data)
            heads = []  # (line start, line end) of every header line
            pos = 0
            while True:
                c = data.find(b":", pos, end)
                if c < 0:
                    break
                ls = data.rfind(b"\n", 0, c) + 1
                le = data.find(b"\n", c, end)
                le = end if le < 0 else le
                heads.append((ls, le))
                pos = le
            if not heads or heads[0][0] != 0:
                nl = data.find(b"\n")
                raise PipelineError(f"{path}:1: {_line_text(data[: nl if nl >= 0 else end])!r}: "
                                    f"missing the `MovieID:` header line; expected {expected}")
            line_no = 1  # line number of the current header
            for k, (ls, le) in enumerate(heads):
                m = _HEADER_RE.fullmatch(data[ls:le])
                if m is None:
                    lineno = data.count(b"\n", 0, ls) + 1
                    raise PipelineError(f"{path}:{lineno}: "
                                        f"{_line_text(data[ls:le])!r}: bad `MovieID:` header "
                                        f"(a data line cannot contain ':'); expected {expected}")
                body_start = min(le + 1, end)
                body_end = heads[k + 1][0] - 1 if k + 1 < len(heads) else end  # before its \n
                n = data.count(b"\n", body_start, body_end) + 1 if body_end > body_start else 0
                yield Segment(path, line_no + 1, n), int(m.group(1)), mv[body_start:body_end]
                line_no += 1 + n

    return _pipeline(pieces(), sink, chunk_bytes)


# --------------------------------------------------------------------------- probe.txt

def _read_lines(path: Path, what: str) -> pd.Series:
    """One string per line (Arrow-backed, no Python object per line), blank lines kept."""
    if not path.exists():
        raise PipelineError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise PipelineError(f"{what} {path} is a folder; expected a file")
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["line"], dtype="string[pyarrow]",
                         skip_blank_lines=False, quoting=csv.QUOTE_NONE, engine="c",
                         keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path} is empty; expected {what} lines") from None
    except pd.errors.ParserError as e:
        raise PipelineError(f"{path}: {e}; expected one value per line ({what})") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not a text file ({e.reason} at byte {e.start}); "
                            f"expected {what}") from None
    return df["line"].str.strip()


def read_probe(path: Path) -> pd.DataFrame:
    """Parse a Netflix probe.txt: ``MovieID:`` lines, each followed by CustomerID lines.

    Returns raw_item_id, raw_user_id (strings of digits) and line (1-based) per pair.
    """
    s = _read_lines(path, "probe (`MovieID:` lines, then one CustomerID per line)")
    blank = (s == "").to_numpy(dtype=bool)
    if blank.all():
        raise PipelineError(f"{path} is empty; expected `MovieID:` lines, each followed by "
                            f"CustomerID lines (the Netflix probe.txt format)")
    ok = s.str.fullmatch(r"\d+:?").fillna(False).to_numpy(dtype=bool) | blank
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        raise PipelineError(
            f"{path}:{j + 1}: {s.iat[j]!r} is not a `MovieID:` or CustomerID line; expected "
            f"digits (a movie header ends with ':'), as in the Netflix probe.txt")
    header = s.str.endswith(":").to_numpy(dtype=bool)
    first = int(np.flatnonzero(~blank)[0])
    if not header[first]:
        raise PipelineError(f"{path}:{first + 1}: {s.iat[first]!r} is not a `MovieID:` header; "
                            f"expected the file to start with one (e.g. `1:`)")
    movie = s.str.rstrip(":").where(pd.Series(header, index=s.index)).ffill()
    rows = ~header & ~blank
    return pd.DataFrame({"raw_item_id": movie[rows].to_numpy(),
                         "raw_user_id": s[rows].to_numpy(),
                         "line": np.flatnonzero(rows) + 1})
