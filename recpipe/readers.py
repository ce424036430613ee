"""Raw rating readers: one fast reader per source format.

Every reader returns a :class:`RawRatings`: a pyarrow Table with the columns of the stage-10
contract (``raw_user_id``, ``raw_item_id``, ``rating`` float32, optional ``timestamp`` int64
Unix seconds), the item titles when the source has them, and what was dropped.

Fast path first: bytes are read whole, concatenated and parsed once by ``pyarrow.csv`` (many
threads, typed columns); item ids of per-movie files come from per-file row counts, range
checks are vectorised. Only when the fast parse fails does a slow line-by-line pass run, to
name the file, the line, the offending text and what was expected.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import html
import io
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .cli import PipelineError, log

NETFLIX_LINE = "CustomerID,Rating,YYYY-MM-DD with Rating an integer 1-5"
_WS = b" \t\r\n"


@dataclass
class RawRatings:
    """What a reader found: the ratings table and everything the manifest reports."""

    table: pa.Table | None  # None when the reader streamed its chunks to a sink
    items: pd.DataFrame | None
    fmt: str
    dataset: str
    inputs: list[str]
    rating_scale: tuple[float, float]
    n_unrated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Segment:
    """A run of data rows inside one file, for mapping a row back to file:line."""

    path: Path
    first_line: int  # 1-based line number of the segment's first data row
    n_rows: int


# --------------------------------------------------------------------------- bytes and text

def head_bytes(path: Path, n: int = 65536) -> bytes:
    """The first n bytes (decompressed for .gz), for sniffing the format."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read(n)
        with open(path, "rb") as f:
            return f.read(n)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        return load_bytes(path)  # raises the clear message
    except OSError:
        return load_bytes(path)


def load_bytes(path: Path, what: str = "a ratings file") -> bytes:
    """The file's bytes (a .gz is decompressed); user-facing errors as PipelineError."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file; expected {what}") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder; expected {what}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PipelineError(f"{path}: truncated or corrupt gzip file ({e}); expected a complete "
                            f".gz archive of {what}: download or compress it again") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror}); expected {what}") from None
    return data


def check_text(data: bytes, path: Path, expected: str) -> None:
    """Reject empty and binary files with a message that says what was expected."""
    if not data or data.isspace():  # no copy, unlike data.strip()
        raise PipelineError(f"{path}: empty file; expected {expected}")
    nul = data.find(b"\x00")
    head = data[:4096]
    ctrl = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 13))
    if nul >= 0 or ctrl > len(head) // 10:
        off = nul if nul >= 0 else next(i for i, c in enumerate(head) if c < 32 and c not in (9, 10, 13))
        line = data.count(b"\n", 0, off) + 1
        raise PipelineError(f"{path}:{line}: binary data, not text (byte {data[off]:#04x} at offset "
                            f"{off}); expected {expected}")


def decode_text(data: bytes) -> str:
    """UTF-8 when the bytes are valid UTF-8, else ISO-8859-1 (Netflix titles, u.item, movies.dat)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("iso-8859-1")


def text_lines(data: bytes):
    """(1-based line number, line) for every non-blank line of a small text file (titles)."""
    for k, line in enumerate(decode_text(data).split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield k, line


def _line_text(line: bytes) -> str:
    s = decode_text(line.rstrip(b"\r"))
    return s if len(s) <= 120 else s[:117] + "..."


def _end_of_text(data: bytes, start: int = 0) -> int:
    end = len(data)
    while end > start and data[end - 1] in _WS:
        end -= 1
    return end


# --------------------------------------------------------------------------- slow line checks

@dataclass
class LineSpec:
    """How one data line must look; used only on the error path to find the bad line."""

    sep: str
    n_fields: int                      # exact number of fields (0: at least max(position)+1)
    checks: list[tuple[int, str, str]]  # (position, name, kind) kind: int | num | date | any
    expected: str                      # e.g. "CustomerID,Rating,YYYY-MM-DD"
    scale: tuple[float, float] | None = None
    also_allowed: tuple[float, ...] = ()
    quoted: bool = False

    def problem(self, raw: bytes) -> str | None:
        line = decode_text(raw.rstrip(b"\r"))
        if not line.strip():
            return "empty line"
        if self.quoted:
            parts = next(csv.reader([line], delimiter=self.sep))
        else:
            parts = line.split(self.sep)
        need = self.n_fields or (max(p for p, _, _ in self.checks) + 1)
        if len(parts) < need:
            missing = [n for p, n, _ in self.checks if p >= len(parts)]
            what = f" ({', '.join(missing)})" if missing else ""
            return f"missing field{what}: found {len(parts)} fields, expected {need}"
        if self.n_fields and len(parts) > self.n_fields:
            return f"too many fields: found {len(parts)}, expected {self.n_fields}"
        for pos, name, kind in self.checks:
            v = parts[pos]
            if kind == "int":
                if not re.fullmatch(r"[+-]?\d+", v):
                    return f"{name} {v!r} is not an integer"
            elif kind == "num":
                try:
                    x = float(v)
                except ValueError:
                    return f"{name} {v!r} is not a number"
                if x != x:
                    return f"{name} {v!r} is not a number"
                if name == "rating" and self.scale is not None and x not in self.also_allowed \
                        and not (self.scale[0] <= x <= self.scale[1]):
                    return f"rating {v} is outside the scale [{self.scale[0]:g}, {self.scale[1]:g}]"
            elif kind == "rating_int":
                if not re.fullmatch(r"[+-]?\d+", v):
                    return f"rating {v!r} is not an integer"
                if self.scale is not None and not (self.scale[0] <= int(v) <= self.scale[1]):
                    return f"rating {v} is outside the scale [{self.scale[0]:g}, {self.scale[1]:g}]"
            elif kind == "date":
                try:
                    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
                        raise ValueError
                    _dt.date.fromisoformat(v)
                except ValueError:
                    return f"{name} {v!r} is not a date YYYY-MM-DD"
        return None


def _find_bad_line(segments: list[Segment], spec: LineSpec, cause: str) -> PipelineError:
    """Scan the segments line by line and describe the first bad line (error path only)."""
    cache: dict[Path, list[bytes]] = {}
    for seg in segments:
        if seg.path not in cache:
            cache.clear()
            cache[seg.path] = load_bytes(seg.path).split(b"\n")
        lines = cache[seg.path]
        lo = seg.first_line - 1
        for k in range(lo, min(lo + seg.n_rows, len(lines))):
            why = spec.problem(lines[k])
            if why:
                return PipelineError(f"{seg.path}:{k + 1}: {_line_text(lines[k])!r}: {why}; "
                                     f"expected {spec.expected}")
    where = segments[0].path if len(segments) == 1 else f"{segments[0].path} ..."
    return PipelineError(f"{where}: cannot parse ({cause}); expected lines like {spec.expected}")


def _raise_at_row(segments: list[Segment], row: int, why: str, expected: str) -> None:
    counts = np.fromiter((s.n_rows for s in segments), np.int64, len(segments))
    ends = np.cumsum(counts)
    k = int(np.searchsorted(ends, row, side="right"))
    seg = segments[k]
    lineno = seg.first_line + row - int(ends[k] - counts[k])
    lines = load_bytes(seg.path).split(b"\n")
    text = _line_text(lines[lineno - 1]) if lineno - 1 < len(lines) else ""
    raise PipelineError(f"{seg.path}:{lineno}: {text!r}: {why}; expected {expected}")


def _parse(buf, names: list[str], types: dict[str, pa.DataType], sep: str,
           segments: list[Segment], spec: LineSpec, include: list[str] | None = None,
           skip_rows: int = 0, quoted: bool = False) -> pa.Table:
    """pyarrow.csv over the whole buffer; on failure, find and name the first bad line."""
    try:
        table = pacsv.read_csv(
            pa.py_buffer(buf),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows,
                                           block_size=1 << 24, use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter=sep, quote_char='"' if quoted else False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=include,
                                                 null_values=[], strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _find_bad_line(segments, spec, str(e).splitlines()[0]) from None
    expected_rows = sum(s.n_rows for s in segments)
    if table.num_rows != expected_rows:
        raise _find_bad_line(segments, spec, f"parsed {table.num_rows} rows from {expected_rows} lines")
    return table


def _check_range(values: np.ndarray, lo: float, hi: float, segments: list[Segment], expected: str,
                 allowed: tuple[float, ...] = ()) -> None:
    bad = (values < lo) | (values > hi)
    if values.dtype.kind == "f":
        bad |= np.isnan(values)
    for a in allowed:
        bad &= values != a
    if bad.any():
        row = int(np.argmax(bad))
        _raise_at_row(segments, row, f"rating {values[row]:g} is outside the scale [{lo:g}, {hi:g}]",
                      expected)


def _assemble(user, item, rating, timestamp=None) -> pa.Table:
    cols = {"raw_user_id": user, "raw_item_id": item,
            "rating": pa.array(np.asarray(rating, dtype=np.float32)) if not isinstance(rating, pa.Array)
            else rating}
    if timestamp is not None:
        cols["timestamp"] = timestamp
    return pa.table(cols)


def _single_segment(path: Path, data: bytes, header_lines: int) -> tuple[memoryview, Segment]:
    """The data part of a one-table file: trailing blank lines dropped, row count known."""
    start = 0
    for _ in range(header_lines):
        nl = data.find(b"\n", start)
        start = len(data) if nl < 0 else nl + 1
    end = _end_of_text(data, start)
    n = data.count(b"\n", start, end) + 1 if end > start else 0
    return memoryview(data)[start:end], Segment(path, header_lines + 1, n)


def _first_line(data: bytes) -> str:
    nl = data.find(b"\n")
    return decode_text(data[: nl if nl >= 0 else len(data)]).strip("\r\n\ufeff")


# --------------------------------------------------------------------------- Netflix

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


def _items_frame(ids, titles, years) -> pd.DataFrame:
    return pd.DataFrame({"raw_item_id": pd.array(ids, dtype="int64"),
                         "title": pd.array(titles, dtype="string"),
                         "year": pd.array(years, dtype="Int32")})


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
    _check_range(r, 1, 5, segments, spec.expected)
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


# --------------------------------------------------------------------------- MovieLens

_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


def _years_from_titles(titles: pd.Series) -> pd.Series:
    return titles.str.extract(_YEAR_RE, expand=False).astype("Int32")


def read_ml100k(u_data: Path, u_item: Path | None) -> tuple[pa.Table, pd.DataFrame | None]:
    """u.data (user item rating timestamp, tabs) and u.item (``|``, ISO-8859-1)."""
    expected = "user<TAB>item<TAB>rating<TAB>timestamp with integers and rating 1-5"
    data = load_bytes(u_data)
    check_text(data, u_data, expected)
    buf, seg = _single_segment(u_data, data, 0)
    spec = LineSpec("\t", 4, [(0, "user", "int"), (1, "item", "int"), (2, "rating", "rating_int"),
                              (3, "timestamp", "int")], expected, scale=(1, 5))
    t = _parse(buf, ["u", "i", "r", "t"], {"u": pa.int64(), "i": pa.int64(), "r": pa.int8(),
                                          "t": pa.int64()}, "\t", [seg], spec)
    r = t.column("r").to_numpy()
    _check_range(r, 1, 5, [seg], expected)
    table = _assemble(t.column("u").combine_chunks(), t.column("i").combine_chunks(),
                      r.astype(np.float32), t.column("t").combine_chunks())
    items = None
    if u_item is not None and u_item.exists():
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
        items = _items_frame(ids, titles, years)
    return table, items


def read_ml_dat(ratings: Path, movies: Path | None, scale: tuple[float, float]) -> tuple[pa.Table, pd.DataFrame | None]:
    """ml-1m / ml-10m ratings.dat (``UserID::MovieID::Rating::Timestamp``) + movies.dat."""
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
    _check_range(r, scale[0], scale[1], [seg], expected)
    table = _assemble(t.column("u").combine_chunks(), t.column("i").combine_chunks(), r,
                      t.column("t").combine_chunks())
    items = None
    if movies is not None and movies.exists():
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
        items = _items_frame(ids, titles_s, _years_from_titles(titles_s))
    return table, items


def _header_positions(path: Path, header: list[str], wanted: dict[str, list[str]],
                      optional: set[str], expected: str) -> dict[str, int]:
    low = [h.strip().lower() for h in header]
    pos = {}
    for role, names in wanted.items():
        hit = next((low.index(n) for n in names if n in low), None)
        if hit is None:
            if role in optional:
                continue
            raise PipelineError(f"{path}:1: {','.join(header)[:120]!r}: no {role} column "
                                f"(looked for {', '.join(names)}); expected a header {expected}")
        pos[role] = hit
    return pos


def _read_headed_csv(path: Path, wanted: dict[str, list[str]], optional: set[str], expected: str,
                     types: dict[str, pa.DataType], scale: tuple[float, float] | None,
                     also_allowed: tuple[float, ...] = ()) -> tuple[pa.Table, Segment]:
    """A comma-separated ratings file with a header naming its columns."""
    data = load_bytes(path)
    check_text(data, path, f"a header {expected}, then one rating per line")
    header = next(csv.reader([_first_line(data)]))
    pos = _header_positions(path, header, wanted, optional, expected)
    buf, seg = _single_segment(path, data, 1)
    if seg.n_rows == 0:
        raise PipelineError(f"{path}: has only a header ({_first_line(data)[:120]!r}) and no data "
                            f"rows; expected one rating per line after it")
    names = [f"c{k}" for k in range(len(header))]
    kinds = {"user": "int", "item": "int", "rating": "num", "timestamp": "int"}
    spec = LineSpec(",", len(header), [(p, r, kinds[r]) for r, p in pos.items()],
                    expected, scale=scale, also_allowed=also_allowed, quoted=True)
    t = _parse(buf, names, {names[p]: types[r] for r, p in pos.items()}, ",", [seg], spec,
               include=[names[p] for p in pos.values()], quoted=True)
    return t.rename_columns([r for r in pos]), seg


def read_ml_csv(ratings: Path, movies: Path | None) -> tuple[pa.Table, pd.DataFrame | None]:
    """ml-20m / ml-25m / ml-latest ratings.csv (userId,movieId,rating,timestamp) + movies.csv."""
    expected = "userId,movieId,rating,timestamp with rating 0.5-5"
    t, seg = _read_headed_csv(
        ratings, {"user": ["userid"], "item": ["movieid"], "rating": ["rating"],
                  "timestamp": ["timestamp"]}, {"timestamp"}, expected,
        {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
        (0.5, 5.0))
    r = t.column("rating").to_numpy()
    _check_range(r, 0.5, 5.0, [seg], expected)
    table = _assemble(t.column("user").combine_chunks(), t.column("item").combine_chunks(), r,
                      t.column("timestamp").combine_chunks() if "timestamp" in t.column_names else None)
    items = None
    if movies is not None and movies.exists():
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
        items = _items_frame(df["movieId"].to_numpy(), titles, _years_from_titles(titles))
    return table, items


# --------------------------------------------------------------------------- anime

def read_anime(ratings: Path, anime: Path | None, keep_unrated: bool) -> tuple[pa.Table, pd.DataFrame | None, int]:
    """Kaggle rating.csv (user_id,anime_id,rating; -1 = watched, not rated) + anime.csv."""
    expected = "user_id,anime_id,rating with rating 1-10, or -1 for watched but not rated"
    t, seg = _read_headed_csv(
        ratings, {"user": ["user_id"], "item": ["anime_id"], "rating": ["rating"]}, set(), expected,
        {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32()}, (1, 10), (-1.0,))
    r = t.column("rating").to_numpy()
    _check_range(r, 1, 10, [seg], expected, allowed=(-1.0,))
    unrated = r == -1
    n_unrated = int(unrated.sum())
    table = _assemble(t.column("user").combine_chunks(), t.column("item").combine_chunks(),
                      np.where(unrated, np.float32(np.nan), r).astype(np.float32))
    if n_unrated and not keep_unrated:
        table = table.filter(pa.array(~unrated))
    items = None
    if anime is not None and anime.exists():
        raw = load_bytes(anime)
        check_text(raw, anime, "a header anime_id,name,...")
        try:
            df = pd.read_csv(io.StringIO(decode_text(raw)), usecols=["anime_id", "name"],
                             dtype={"anime_id": "int64", "name": "string"})
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise PipelineError(f"{anime}: cannot parse ({str(e).splitlines()[0]}); expected a "
                                f"header anime_id,name,genre,type,episodes,rating,members") from None
        names = df["name"].map(html.unescape, na_action="ignore").astype("string")
        items = _items_frame(df["anime_id"].to_numpy(), names, [None] * len(df))
    return table, items, n_unrated


# --------------------------------------------------------------------------- NCF

def read_ncf(path: Path) -> pa.Table:
    """NCF benchmark ``*.train.rating``: user<TAB>item<TAB>rating<TAB>timestamp, no header."""
    expected = "user<TAB>item<TAB>rating<TAB>timestamp (the NCF .train.rating layout)"
    data = load_bytes(path)
    check_text(data, path, expected)
    buf, seg = _single_segment(path, data, 0)
    spec = LineSpec("\t", 4, [(0, "user", "int"), (1, "item", "int"), (2, "rating", "num"),
                              (3, "timestamp", "int")], expected)
    t = _parse(buf, ["u", "i", "r", "t"], {"u": pa.int64(), "i": pa.int64(), "r": pa.float32(),
                                          "t": pa.int64()}, "\t", [seg], spec)
    return _assemble(t.column("u").combine_chunks(), t.column("i").combine_chunks(),
                     t.column("r").to_numpy(), t.column("t").combine_chunks())


# --------------------------------------------------------------------------- generic CSV/TSV

_SEP_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
_ROLE_NAMES = {
    "user": ["user", "userid", "user_id", "customerid", "customer_id", "uid", "reviewerid", "u"],
    "item": ["item", "itemid", "item_id", "movieid", "movie_id", "anime_id", "product_id",
             "productid", "asin", "iid", "song_id", "book_id", "isbn", "i"],
    "rating": ["rating", "ratings", "score", "stars", "overall", "value", "r"],
    "timestamp": ["timestamp", "time", "date", "datetime", "ts", "unixreviewtime", "t"],
}


def sniff_sep(path: Path, data: bytes) -> str:
    """The delimiter whose field count is the same (and > 1) on the first lines."""
    sample = [decode_text(l).rstrip("\r") for l in data[:65536].split(b"\n")[:20] if l.strip()]
    sample = sample[:-1] if len(sample) > 1 else sample  # last one may be cut
    if any("::" in l for l in sample[:1]):
        return "::"
    for sep in ["\t", ",", ";", "|", " "]:
        counts = {len(next(csv.reader([l], delimiter=sep))) for l in sample}
        if len(counts) == 1 and counts.pop() > 1:
            return sep
    raise PipelineError(f"{path}:1: {sample[0][:120]!r}: cannot tell the column separator (tried tab, "
                        f"comma, semicolon, pipe, space); pass --sep")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_generic(path: Path, columns: str, sep: str, header: bool | None,
                 scale: tuple[float, float] | None) -> tuple[pa.Table, tuple[float, float]]:
    """Any CSV/TSV: --columns U,I,R[,T] by header name or 0-based position."""
    data = load_bytes(path)
    check_text(data, path, "one rating per line: user, item, rating[, timestamp]")
    sep = _SEP_NAMES.get(sep.lower(), sep) if sep else sniff_sep(path, data)
    if sep == "::":
        data = data.replace(b"::", b"\t")
        shown_sep, sep = "::", "\t"
    else:
        shown_sep = sep
    if len(sep) != 1:
        raise PipelineError(f"--sep {sep!r}: expected one character (or tab, comma, semicolon, "
                            f"pipe, space, ::)")
    lines = [l for l in data[:65536].split(b"\n")[:3]]
    first = next(csv.reader([decode_text(lines[0]).rstrip("\r").lstrip("\ufeff")], delimiter=sep))
    spec_cols = [c.strip() for c in columns.split(",")] if columns else []
    if spec_cols and not (3 <= len(spec_cols) <= 4):
        raise PipelineError(f"--columns {columns!r}: expected U,I,R or U,I,R,T (names or 0-based "
                            f"positions)")
    by_name = any(not c.isdigit() for c in spec_cols)
    if header is None:
        if by_name:
            header = True
        elif len(lines) > 1 and lines[1].strip():
            second = next(csv.reader([decode_text(lines[1]).rstrip("\r")], delimiter=sep))
            # a header when some field is not a number on line 1 but is on line 2
            header = any(not _is_number(a) and _is_number(b) for a, b in zip(first, second))
        else:
            header = not all(_is_number(a) for a in first[:3])
    roles = ["user", "item", "rating", "timestamp"]
    low = [h.strip().lower() for h in first]
    pos: dict[str, int] = {}
    if spec_cols:
        for role, c in zip(roles, spec_cols):
            if c.isdigit():
                pos[role] = int(c)
            elif header and c.lower() in low:
                pos[role] = low.index(c.lower())
            else:
                raise PipelineError(f"{path}:1: --columns names {c!r}, which is not in the header "
                                    f"{first[:20]}; expected header names or 0-based positions")
    elif header:
        for role in roles:
            hit = next((low.index(n) for n in _ROLE_NAMES[role] if n in low), None)
            if hit is not None:
                pos[role] = hit
        if not {"user", "item", "rating"} <= set(pos):
            raise PipelineError(f"{path}:1: header {first[:20]}: cannot tell the user, item and "
                                f"rating columns; pass --columns U,I,R[,T] (names or 0-based positions)")
    else:
        pos = dict(zip(roles, range(min(len(first), 4))))
        if len(pos) < 3:
            raise PipelineError(f"{path}:1: {decode_text(lines[0])[:120]!r}: found {len(first)} "
                                f"field(s); expected user, item, rating[, timestamp] "
                                f"(pass --sep and --columns)")
    n_fields = len(first)
    for role, p in pos.items():
        if p >= n_fields:
            raise PipelineError(f"{path}:1: column {p} ({role}) does not exist: the file has "
                                f"{n_fields} columns separated by {shown_sep!r}")
    view, seg = _single_segment(path, data, 1 if header else 0)
    if seg.n_rows == 0:
        raise PipelineError(f"{path}: has only a header ({decode_text(lines[0])[:120]!r}) and no data "
                            f"rows; expected one rating per line after it")
    names = [f"c{k}" for k in range(n_fields)]
    expected = (f"{n_fields} fields separated by {shown_sep!r} with "
                + ", ".join(f"{r} in column {p}" for r, p in pos.items())
                + (f" and rating within [{scale[0]:g}, {scale[1]:g}]" if scale else ""))
    checks = [(pos["rating"], "rating", "num")]
    spec = LineSpec(sep if shown_sep != "::" else "::", n_fields, checks, expected, scale=scale,
                    quoted=True)
    types = {names[pos["rating"]]: pa.float64(), names[pos["user"]]: pa.string(),
             names[pos["item"]]: pa.string()}
    t = _parse(view, names, types, sep, [seg], spec, include=[names[p] for p in pos.values()],
               quoted=True)
    t = t.rename_columns(list(pos))
    r = t.column("rating").to_numpy()
    if scale is None:
        scale = (float(np.min(r)), float(np.max(r)))
    else:
        _check_range(r, scale[0], scale[1], [seg], expected)
    cols = {role: _raw_ids(t.column(role).combine_chunks()) for role in ("user", "item")}
    ts = None
    if "timestamp" in t.column_names:
        ts = _to_unix_seconds(t.column("timestamp").combine_chunks(), seg, expected)
    return _assemble(cols["user"], cols["item"], r.astype(np.float32), ts), scale


def _raw_ids(col: pa.Array) -> pa.Array:
    """int64 when every id is a plain integer (no leading zeros, fits int64), else string."""
    if len(col) and pc.all(pc.match_substring_regex(col, r"^-?[1-9][0-9]{0,17}$|^0$")).as_py():
        return col.cast(pa.int64())
    return col


def _to_unix_seconds(col: pa.Array, seg: Segment, expected: str) -> pa.Array:
    """Integers (seconds; milliseconds are scaled down), floats, dates or ISO date-times."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        v = col.to_numpy(zero_copy_only=False)
        v = np.floor(v).astype(np.int64) if v.dtype.kind == "f" else v.astype(np.int64)
        if len(v) and np.abs(v).max() > 10**11:   # milliseconds since the epoch
            log.info("timestamps look like milliseconds; dividing by 1000")
            v = v // 1000
        return pa.array(v)
    if pa.types.is_date(col.type):
        return pa.array(col.cast(pa.int32()).to_numpy().astype(np.int64) * 86400)
    if pa.types.is_timestamp(col.type):
        return pc.cast(col.cast(pa.timestamp("s", tz=col.type.tz)), pa.int64())
    s = col.cast(pa.string()).to_pandas()
    parsed = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        _raise_at_row([seg], row, f"timestamp {s.iloc[row]!r} is not a date or Unix time", expected)
    secs = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return pa.array(secs.to_numpy(dtype=np.int64))
