"""Any CSV/TSV ratings file: the separator sniffed, columns by header name or position."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..cli import PipelineError, log
from .text import (LineSpec, Segment, _assemble, _parse, _raise_at_row, _single_segment,
                   check_range, check_text, decode_text, load_bytes)

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
        check_range(r, scale[0], scale[1], [seg], expected)
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
