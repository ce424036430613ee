"""NCF benchmark files (He et al. 2017): ``PREFIX.train.rating`` and the held-out
``PREFIX.test.rating`` / ``PREFIX.test.negative``."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ..cli import PipelineError
from .text import LineSpec, _assemble, _parse, _single_segment, check_text, load_bytes


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


# --------------------------------------------------------------------------- held-out test files

def _ncf_int_table(path: Path, min_cols: int, what: str) -> pd.DataFrame:
    if not path.exists():
        raise PipelineError(f"{path} not found; --ncf-test PREFIX expects PREFIX.test.rating "
                            f"and PREFIX.test.negative (e.g. --ncf-test data/ncf/ml-1m)")
    try:
        df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                         na_filter=False, quoting=csv.QUOTE_NONE, engine="c")
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path} is empty; expected {what}") from None
    except pd.errors.ParserError as e:
        raise PipelineError(f"{path}: {e}; expected {what}") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not a text file ({e.reason}); expected {what}") from None
    # a trailing tab gives an empty last column
    while df.shape[1] > min_cols and (df.iloc[:, -1] == "").all():
        df = df.iloc[:, :-1]
    if df.shape[1] < min_cols:
        raise PipelineError(f"{path}:1: {df.shape[1]} tab-separated fields; expected {what}")
    return df


def _ncf_ints(df: pd.DataFrame, path: Path, what: str, cols: Sequence[int]) -> np.ndarray:
    sub = df.iloc[:, list(cols)]
    ok = sub.apply(lambda c: c.str.fullmatch(r"-?\d+")).to_numpy(dtype=bool)
    if not ok.all():
        row, col = (int(x[0]) for x in np.nonzero(~ok))
        raise PipelineError(f"{path}:{row + 1}: field {cols[col] + 1} is {sub.iat[row, col]!r}; "
                            f"expected an integer ({what})")
    return sub.astype(np.int64).to_numpy()


def read_ncf_test(prefix: str) -> tuple[pd.DataFrame, np.ndarray]:
    """PREFIX.test.rating (user, item, rating, timestamp) and PREFIX.test.negative rows
    ``(user,item)`` + N negatives, checked line by line against each other."""
    rp, npath = Path(f"{prefix}.test.rating"), Path(f"{prefix}.test.negative")
    what_r = "user<TAB>item<TAB>rating<TAB>timestamp per line"
    tr = _ncf_int_table(rp, 3, what_r)
    ids = _ncf_ints(tr, rp, what_r, [0, 1])
    rating = pd.to_numeric(tr.iloc[:, 2], errors="coerce").to_numpy(np.float32)
    if np.isnan(rating).any():
        j = int(np.flatnonzero(np.isnan(rating))[0])
        raise PipelineError(f"{rp}:{j + 1}: rating {tr.iat[j, 2]!r} is not a number; "
                            f"expected {what_r}")
    ts = _ncf_ints(tr, rp, what_r, [3])[:, 0] if tr.shape[1] >= 4 else None
    what_n = "`(user,item)` then the negative item ids, tab-separated"
    tn = _ncf_int_table(npath, 2, what_n)
    head = tn.iloc[:, 0].str.extract(r"^\((-?\d+),(-?\d+)\)$")
    bad = head.isna().any(axis=1).to_numpy()
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{npath}:{j + 1}: {tn.iat[j, 0]!r}; expected {what_n}")
    empty = (tn.iloc[:, 1:] == "").to_numpy()
    if empty.any():
        row, col = (int(x[0]) for x in np.nonzero(empty))
        raise PipelineError(f"{npath}:{row + 1}: {int((~empty[row]).sum())} negatives where "
                            f"line 1 has {tn.shape[1] - 1}; expected the same count on every "
                            f"line")
    negs = _ncf_ints(tn, npath, what_n, range(1, tn.shape[1]))
    pairs = head.astype(np.int64).to_numpy()
    if len(pairs) != len(ids):
        raise PipelineError(f"{npath} has {len(pairs)} lines but {rp} has {len(ids)}; expected "
                            f"one negatives line per test rating")
    mism = (pairs != ids).any(axis=1)
    if mism.any():
        j = int(np.flatnonzero(mism)[0])
        raise PipelineError(f"{npath}:{j + 1}: {tn.iat[j, 0]!r} but {rp}:{j + 1} is "
                            f"({ids[j, 0]},{ids[j, 1]}); expected the same pair on the same line")
    test = pd.DataFrame({"raw_user_id": ids[:, 0], "raw_item_id": ids[:, 1], "rating": rating,
                         "line": np.arange(1, len(ids) + 1)})
    if ts is not None:
        test["timestamp"] = ts
    return test, negs
