"""Stage 10: raw rating files -> one merged ratings table (+ item titles) in Parquet.

Detects the source format from the path and its content (``--format`` overrides) with the
registry of :mod:`recpipe.formats`, reads it with that entry's reader, and writes
``DATA_DIR/10_preprocessing/`` atomically: ``ratings.parquet``, ``items.parquet`` (when the
source has titles) and ``manifest.json`` last.
"""
from __future__ import annotations

import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import formats, readers
from .artifacts import StageOutput, write_parquet
from .download import download, extract_zip
from .formats import Source
from .cli import PipelineError, command_line, config_dict, log, opt, parse_config, print_config

STAGE = "10_preprocessing"
ROW_GROUP = 1 << 20
PROG = "10_preprocessing.py"
DESCRIPTION = ("Read raw rating files (Netflix Prize, MovieLens 100K/1M/10M/20M/25M/latest, Kaggle "
               "anime, NCF .train.rating, any CSV/TSV; .gz and .zip too) and write one merged "
               "ratings table plus item titles to DATA_DIR/10_preprocessing/. "
               "`--input demo` generates a deterministic demo dataset; `--download NAME` fetches a "
               "MovieLens archive first.")

FORMATS = ["auto", *formats.FORMAT_NAMES, "demo"]
EXPECTED_FOLDER = formats.EXPECTED


@dataclass
class Config:
    input: str = opt("", "ratings file or folder, or `demo` for the generated demo dataset")
    format: str = opt("auto", "source format; auto detects it from the path and content",
                      choices=FORMATS)
    data_dir: Path = opt(Path("data"), "pipeline data folder; writes DATA_DIR/10_preprocessing/")
    titles: str = opt("", "Netflix movie_titles.txt; empty: looked up next to the input")
    columns: str = opt("", "csv: user,item,rating[,timestamp] columns as header names or 0-based "
                           "positions, e.g. userId,movieId,rating or 0,1,2,3")
    sep: str = opt("", "csv: column separator (a character, or tab/comma/semicolon/pipe/space/::); "
                       "sniffed when empty")
    header: Optional[bool] = opt(None, "csv: the first line is a header (--header) or data "
                                       "(--no-header); detected when not given")
    rating_scale: list[float] = opt([], "csv/ncf: the valid rating range LO HI; ratings outside "
                                        "it are errors; empty: the observed range")
    keep_unrated: bool = opt(False, "anime: keep rating -1 (watched, not rated) rows with rating "
                                    "NaN as implicit interactions instead of dropping them")
    download: str = opt("", "fetch a MovieLens archive by name (ml-100k, ml-1m, ml-10m, "
                            "ml-latest-small, ml-20m, ml-25m, ml-latest) into DATA_DIR/raw/ and "
                            "preprocess it")
    base_url: str = opt("https://files.grouplens.org/datasets/movielens",
                        "where --download fetches NAME.zip and NAME.zip.md5 from")
    seed: int = opt(42, "demo: random seed of the generated dataset")
    demo_users: int = opt(6000, "demo: number of users")
    demo_items: int = opt(1500, "demo: number of movies")
    demo_ratings: int = opt(600_000, "demo: approximate number of ratings")

    def validate(self) -> None:
        if not self.input and not self.download and self.format != "demo":
            raise PipelineError("give --input PATH (a ratings file or folder, or `demo`) or "
                                "--download NAME")
        if self.input and self.download:
            raise PipelineError("give either --input or --download, not both")
        if self.rating_scale and (len(self.rating_scale) != 2
                                  or self.rating_scale[0] > self.rating_scale[1]):
            raise PipelineError(f"--rating-scale {self.rating_scale}: expected two numbers LO HI "
                                f"with LO <= HI")
        if self.demo_users < 10 or self.demo_items < 10 or self.demo_ratings < 100:
            raise PipelineError("--demo-users/--demo-items must be >= 10 and --demo-ratings >= 100")


# --------------------------------------------------------------------------- detection

def _sniff_file(path: Path, fmt: str) -> formats.Format:
    """The entry that reads a single file: by its name, then by its first line."""
    name = formats.strip_gz(path.name).lower()
    entries = [f for f in formats.REGISTRY.values() if fmt == "auto" or fmt in f.formats]
    by_name = next((f for f in entries if f.file_name and re.fullmatch(f.file_name, name)), None)
    if by_name is not None or fmt != "auto":
        return by_name or entries[0]
    data = readers.head_bytes(path)
    readers.check_text(data, path, EXPECTED_FOLDER)
    first = readers.first_line(data).strip()
    return next(f for f in entries if f.sniff and f.sniff(path, data, first))


def detect(path: Path, fmt: str, titles: str) -> Source:
    """What to read, from the path (file or folder), its content and --format."""
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder; expected {EXPECTED_FOLDER} "
                            f"(or `--input demo`)")
    titles_path = Path(titles) if titles else None
    if titles_path is not None and not titles_path.is_file():
        raise PipelineError(f"--titles {titles_path}: no such file; expected movie_titles.txt")
    if not path.is_dir():
        return formats.source(_sniff_file(path, fmt), [path], fmt, titles_path)
    for entry in formats.REGISTRY.values():
        if (fmt == "auto" or fmt in entry.formats) and entry.find is not None:
            files = entry.find(path)
            if files:
                return formats.source(entry, files, fmt, titles_path)
    found = sorted(p.name for p in path.iterdir())[:12]
    want = EXPECTED_FOLDER if fmt == "auto" else f"the files of format {fmt}"
    raise PipelineError(f"{path}: cannot find ratings in this folder (it holds {found}); "
                        f"expected {want}; point --input at the ratings file, or pass "
                        f"--format csv --columns U,I,R[,T] for your own CSV")


def _extract_zip(path: Path, into: Path) -> Path:
    """Extract a .zip input into a temporary folder; the folder to read from."""
    extract_zip(path, into, path, "download the archive again")
    entries = [p for p in into.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1:
        return entries[0]
    return into


# --------------------------------------------------------------------------- main

class _Stats:
    """Row count, distinct users/items and rating mean, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.n = 0
        self.users: list = []
        self.items: list = []
        self.rating_sum = 0.0
        self.n_rated = 0
        self.schema: pa.Schema | None = None

    def add(self, t: pa.Table) -> None:
        self.n += t.num_rows
        self.users.append(pc.unique(t.column("raw_user_id")))
        self.items.append(pc.unique(t.column("raw_item_id")))
        r = t.column("rating")
        self.rating_sum += pc.sum(r).as_py() or 0.0
        self.n_rated += len(r) - r.null_count - int(pc.sum(pc.is_nan(r)).as_py() or 0)
        self.schema = t.schema

    def finish(self) -> dict:
        def distinct(parts: list) -> int:
            return pc.count_distinct(pa.chunked_array(parts)).as_py() if parts else 0
        return {"n_ratings": self.n, "n_users": distinct(self.users), "n_items": distinct(self.items),
                "mean": self.rating_sum / self.n_rated if self.n_rated else None,
                "schema": self.schema}


class _StreamWriter:
    """Writes ratings.parquet chunk by chunk in a background thread while the reader parses."""

    def __init__(self, path: Path):
        from concurrent.futures import ThreadPoolExecutor
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="parquet-write")
        self.futures: list = []
        self.stats = _Stats()

    def __call__(self, table: pa.Table) -> None:
        self.futures.append(self.pool.submit(self._write, table))

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.stats.add(table)

    @property
    def used(self) -> bool:
        return bool(self.futures)

    def close(self, ok: bool) -> None:
        try:
            if ok:
                for f in self.futures:
                    f.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=not ok)
            if self.writer is not None:
                self.writer.close()


def _read_input(cfg: Config, sink) -> readers.RawRatings:
    data_dir = Path(cfg.data_dir)
    fmt = cfg.format
    inp = cfg.input
    if cfg.download:
        inp = str(download(cfg.download, data_dir / "raw", cfg.base_url))
    if inp == "demo" or fmt == "demo":
        from .demo import DemoSpec, ensure_demo
        folder = ensure_demo(data_dir / "raw" / "demo",
                             DemoSpec(cfg.seed, cfg.demo_users, cfg.demo_items, cfg.demo_ratings))
        src = Source("netflix", "demo", formats.glob(folder / "training_set", "mv_*.txt"),
                     folder / "movie_titles.txt")
        return formats.read(src, cfg, sink)
    path = Path(inp)
    if path.is_file() and path.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix="recpipe-zip-") as tmp:
            root = _extract_zip(path, Path(tmp))
            try:
                src = detect(root, fmt, cfg.titles)
                raw = formats.read(src, cfg, sink)
            except PipelineError as e:
                raise PipelineError(str(e).replace(tmp, f"{path}:")) from None
            raw.inputs = [s.replace(tmp, f"{path}:") for s in raw.inputs]
            return raw
    src = detect(path, fmt, cfg.titles)
    return formats.read(src, cfg, sink)


def run(cfg: Config, argv: Sequence[str] | None) -> Path:
    t0 = time.time()
    with StageOutput(cfg.data_dir, STAGE) as out:
        stream = _StreamWriter(out.path("ratings.parquet"))
        ok = False
        try:
            raw = _read_input(cfg, stream)
            ok = True
        finally:
            stream.close(ok)
        return write_artifact(raw, cfg, argv, out, t0, time.time() - t0, streamed=stream.used,
                              stats=stream.stats)


def write_artifact(raw: readers.RawRatings, cfg: Config, argv, out: StageOutput, t0: float,
                   t_read: float, streamed: bool = False, stats: _Stats | None = None) -> Path:
    if streamed:
        st = stats.finish()
    else:
        st = _Stats()
        if raw.table.num_rows:
            st.add(raw.table)
        st = st.finish()
        st["schema"] = raw.table.schema
    n, n_users, n_items, mean = st["n_ratings"], st["n_users"], st["n_items"], st["mean"]
    if n == 0:
        raise PipelineError(f"{', '.join(raw.inputs[:2])}: no ratings left to write "
                            f"(dropped {raw.dropped}); expected at least one rating")
    has_ts = "timestamp" in st["schema"].names
    schema = {f.name: str(f.type) for f in st["schema"]}
    if not streamed:
        pq.write_table(raw.table, out.path("ratings.parquet"), compression="zstd",
                       row_group_size=ROW_GROUP)
    if raw.items is not None:
        write_parquet(raw.items, out.path("items.parquet"))
    manifest = {
        "dataset": raw.dataset, "format": raw.fmt, "inputs": raw.inputs,
        "n_ratings": n, "n_users": n_users, "n_items": n_items,
        "n_titles": 0 if raw.items is None else len(raw.items),
        "rating_scale": list(raw.rating_scale),
        "rating_mean": None if mean is None else round(float(mean), 6),
        "has_timestamp": has_ts, "has_titles": raw.items is not None,
        "n_unrated": raw.n_unrated, "dropped": raw.dropped,
        "dtypes": schema, "config": config_dict(cfg), "command": command_line(PROG, argv),
        "read_write_seconds": round(t_read, 3),
    }
    final = out.commit(manifest)
    secs = time.time() - t0
    log.info("%s: %s ratings, %s users, %s items (%s, %s) in %.1fs (%.2fM ratings/s) -> %s",
             STAGE, f"{n:,}", f"{n_users:,}", f"{n_items:,}", raw.dataset, raw.fmt,
             secs, n / max(secs, 1e-9) / 1e6, final)
    if raw.n_unrated:
        log.info("%s rows had no rating (-1): %s", f"{raw.n_unrated:,}",
                 "kept with rating NaN" if cfg.keep_unrated else "dropped (--keep-unrated keeps them)")
    log.info("next: python 20_make_ids.py --data-dir %s", shlex.quote(str(cfg.data_dir)))
    return final


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(Config, argv, PROG, DESCRIPTION)
    print_config(cfg, PROG)
    return run(cfg, argv)
