"""Shared pieces of the readers: bytes and text, the fast parse, the slow line checks.

Fast path first: bytes are read whole and parsed once by ``pyarrow.csv`` (many threads,
typed columns); range checks are vectorised. Only when the fast parse fails does a slow
line-by-line pass run, to name the file, the line, the offending text and what was expected.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ..cli import PipelineError

_WS = b" \t\r\n"


@dataclass
class RawRatings:
    """What stage 10 read from one source: the record every format's reader returns.

    ``table`` has the columns of the stage-10 contract (``raw_user_id``, ``raw_item_id``,
    ``rating`` float32, optional ``timestamp`` int64 Unix seconds); ``items`` the titles
    (``raw_item_id``, ``title``, ``year``) when the source has them.
    """
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
    """UTF-8 when the bytes are valid UTF-8, else Windows-1252, else ISO-8859-1 (Netflix
    titles, u.item, movies.dat). Windows-1252 equals ISO-8859-1 except in 0x80-0x9F, where
    ISO-8859-1 has control characters and Windows-1252 the curly quotes, dashes and euro
    sign that files saved on Windows carry; five bytes there are undefined in it, and a file
    with those falls back to ISO-8859-1."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
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


def check_range(values: np.ndarray, lo: float, hi: float, segments: list[Segment], expected: str,
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


def first_line(data: bytes) -> str:
    nl = data.find(b"\n")
    return decode_text(data[: nl if nl >= 0 else len(data)]).strip("\r\n\ufeff")


# --------------------------------------------------------------------------- shared by formats

def _items_frame(ids, titles, years) -> pd.DataFrame:
    """The titles table every title reader returns: raw_item_id, title, year."""
    return pd.DataFrame({"raw_item_id": pd.array(ids, dtype="int64"),
                         "title": pd.array(titles, dtype="string"),
                         "year": pd.array(years, dtype="Int32")})


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
    header = next(csv.reader([first_line(data)]))
    pos = _header_positions(path, header, wanted, optional, expected)
    buf, seg = _single_segment(path, data, 1)
    if seg.n_rows == 0:
        raise PipelineError(f"{path}: has only a header ({first_line(data)[:120]!r}) and no data "
                            f"rows; expected one rating per line after it")
    names = [f"c{k}" for k in range(len(header))]
    kinds = {"user": "int", "item": "int", "rating": "num", "timestamp": "int"}
    spec = LineSpec(",", len(header), [(p, r, kinds[r]) for r, p in pos.items()],
                    expected, scale=scale, also_allowed=also_allowed, quoted=True)
    t = _parse(buf, names, {names[p]: types[r] for r, p in pos.items()}, ",", [seg], spec,
               include=[names[p] for p in pos.values()], quoted=True)
    return t.rename_columns([r for r in pos]), seg
