"""The source formats of stage 10: one registry entry per format.

An entry says how its files are recognised (``file_name``: a name that alone decides,
``sniff``: the first line of a file, ``find``: the rating files inside a folder), how they
are read (``read``, which returns a :class:`readers.RawRatings` for every format) and where
the item titles are (``titles``, or None). :func:`recpipe.preprocess.detect` loops over
``REGISTRY`` in order and :func:`read` looks the entry up by name: adding a format is one
entry here plus its parser in :mod:`recpipe.readers`.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import readers
from .cli import PipelineError, log, progress_disabled
from .readers import RawRatings

if TYPE_CHECKING:  # stage 10's Config: columns, sep, header, rating_scale, keep_unrated
    import pandas as pd

    from .preprocess import Config


@dataclass
class Source:
    fmt: str                 # the REGISTRY entry that reads it
    dataset: str
    files: list[Path]        # rating files
    extra: Path | None = None  # titles / item file


@dataclass(frozen=True)
class Titles:
    """Where a format keeps its item titles and how to read them."""

    find: Callable[[Path], Path | None]  # the titles file for a rating file, or None
    read: Callable[[Path], pd.DataFrame]  # raw_item_id, title, year
    option: bool = False   # --titles may name the file instead
    missing: str = ""      # logged when no titles file is found


@dataclass(frozen=True)
class Format:
    name: str
    formats: tuple[str, ...]   # the --format names that select this entry
    read: Callable[[Source, Config, Callable | None], RawRatings]
    dataset: Callable[[Path, str], str]  # (first rating file, --format) -> dataset name
    titles: Titles | None = None
    file_name: str | None = None  # a file name (regex, .gz stripped) that alone decides
    sniff: Callable[[Path, bytes, str], bool] | None = None  # (path, head bytes, first line)
    find: Callable[[Path], list[Path]] | None = None  # the rating files inside a folder
    describe: str = ""  # for "expected ...": what to point --input at (one per dataset family)


# --------------------------------------------------------------------------- paths

def strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def glob(folder: Path, pattern: str) -> list[Path]:
    """Files matching pattern, sorted by name (string sort: 17,770 Paths sort slowly)."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if fnmatch.fnmatchcase(e.name, pattern) and e.is_file())
    return [folder / n for n in names]


def _ml_dataset(folder: Path, default: str) -> str:
    name = folder.name.lower()
    for known in ["ml-latest-small", "ml-100k", "ml-10m", "ml-1m", "ml-20m", "ml-25m", "ml-32m",
                  "ml-latest"]:
        if name.startswith(known):
            return known
    return default


def _find_titles(start: Path) -> Path | None:
    for folder in [start, start.parent, start.parent.parent]:
        for name in ["movie_titles.txt", "movie_titles.csv", "movie_titles.txt.gz"]:
            if (folder / name).is_file():
                return folder / name
    return None


def _sibling(path: Path, *names: str) -> Path | None:
    for n in names:
        for cand in (path.parent / n, path.parent / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


def _next_to(name: str) -> Callable[[Path], Path | None]:
    return lambda path: _sibling(path, name)


def _in_folder(name: str) -> Callable[[Path], list[Path]]:
    def find(folder: Path) -> list[Path]:
        hit = _sibling(folder / "x", name)
        return [hit] if hit else []
    return find


# --------------------------------------------------------------------------- read: one record

def _record(src: Source, table: pa.Table | None, fmt: str, scale: tuple[float, float],
            n_unrated: int = 0, dropped_unrated: int = 0) -> RawRatings:
    return RawRatings(table=table, items=None, fmt=fmt, dataset=src.dataset, inputs=inputs(src),
                      rating_scale=scale, n_unrated=n_unrated,
                      dropped={"unrated": dropped_unrated})


def inputs(src: Source) -> list[str]:
    """The input files for the manifest; thousands of per-movie files are summarised."""
    files = [str(p) for p in src.files]
    if len(files) > 10:
        files = [f"{src.files[0].parent}/{src.files[0].name} .. {src.files[-1].name} "
                 f"({len(files)} files)"]
    return files + ([str(src.extra)] if src.extra else [])


def _read_netflix(src: Source, cfg: Config, sink) -> RawRatings:
    from tqdm import tqdm
    prog = (lambda it: tqdm(it, desc="netflix files", unit="file",
                            disable=progress_disabled() or len(src.files) < 200))
    return _record(src, readers.read_netflix_files(src.files, prog, sink), "netflix", (1.0, 5.0))


def _read_netflix_combined(src: Source, cfg: Config, sink) -> RawRatings:
    return _record(src, readers.read_netflix_combined(src.files, sink), "netflix", (1.0, 5.0))


def _read_ml100k(src: Source, cfg: Config, sink) -> RawRatings:
    return _record(src, readers.read_ml100k(src.files[0]), "ml-100k", (1.0, 5.0))


def _read_ml_dat(src: Source, cfg: Config, sink) -> RawRatings:
    scale = (1.0, 5.0) if src.dataset == "ml-1m" else (0.5, 5.0)
    return _record(src, readers.read_ml_dat(src.files[0], scale), "movielens-dat", scale)


def _read_ml_csv(src: Source, cfg: Config, sink) -> RawRatings:
    return _record(src, readers.read_ml_csv(src.files[0]), "movielens-csv", (0.5, 5.0))


def _read_anime(src: Source, cfg: Config, sink) -> RawRatings:
    """Rating -1 (watched, not rated) is NaN; such rows are dropped unless --keep-unrated."""
    table = readers.read_anime(src.files[0])
    unrated = np.isnan(table.column("rating").to_numpy())
    n_unrated = int(unrated.sum())
    if n_unrated and not cfg.keep_unrated:
        table = table.filter(pa.array(~unrated))
    return _record(src, table, "anime", (1.0, 10.0), n_unrated,
                   n_unrated if not cfg.keep_unrated else 0)


def _read_ncf(src: Source, cfg: Config, sink) -> RawRatings:
    table = readers.read_ncf(src.files[0])
    r = table.column("rating")
    scale = tuple(cfg.rating_scale) if cfg.rating_scale else (
        float(pc.min(r).as_py()), float(pc.max(r).as_py()))
    if cfg.rating_scale:
        seg = readers.Segment(src.files[0], 1, table.num_rows)
        readers.check_range(r.to_numpy(), scale[0], scale[1], [seg],
                            f"ratings within [{scale[0]:g}, {scale[1]:g}] (--rating-scale)")
    return _record(src, table, "ncf", scale)


def _read_csv(src: Source, cfg: Config, sink) -> RawRatings:
    table, scale = readers.read_generic(src.files[0], cfg.columns, cfg.sep, cfg.header,
                                        tuple(cfg.rating_scale) if cfg.rating_scale else None)
    return _record(src, table, "csv", scale)


# --------------------------------------------------------------------------- sniffing

def _netflix_head(first: str, head: bytes, combined: bool) -> bool:
    """``MovieID:`` on line 1; combined_data when another header line follows."""
    if not re.fullmatch(r"\d+:", first):
        return False
    nl = [l for l in head.split(b"\n")[1:-1] if l.strip()]
    return any(l.rstrip(b"\r").endswith(b":") for l in nl) == combined


def _header_starts(prefix: str) -> Callable[[Path, bytes, str], bool]:
    return lambda path, head, first: first.lower().replace(" ", "").startswith(prefix)


def _netflix_files(folder: Path) -> list[Path]:
    """mv_*.txt in the folder, else in its training_set/."""
    mv = glob(folder, "mv_*.txt") + glob(folder, "mv_*.txt.gz")
    ts = folder / "training_set"
    if not mv and ts.is_dir():
        mv = glob(ts, "mv_*.txt") + glob(ts, "mv_*.txt.gz")
    return mv


def _ncf_files(folder: Path) -> list[Path]:
    ncf = glob(folder, "*.train.rating") + glob(folder, "*.train.rating.gz")
    if len(ncf) > 1:
        raise PipelineError(f"{folder}: several NCF files {[p.name for p in ncf]}; point "
                            f"--input at one *.train.rating file")
    return ncf


def _ml_dat_head(path: Path, head: bytes, first: str) -> bool:
    return (strip_gz(path.name).lower() == "ratings.dat"
            or re.fullmatch(r"\d+::\d+::[\d.]+::\d+", first) is not None)


def _glob_folder(pattern: str) -> Callable[[Path], list[Path]]:
    return lambda folder: glob(folder, pattern) + glob(folder, pattern + ".gz")


def _named(dataset: str) -> Callable[[Path, str], str]:
    return lambda path, fmt: dataset


def _movielens(default: str) -> Callable[[Path, str], str]:
    """--format when it names the dataset, else the folder name (ml-1m, ...), else default."""
    return lambda path, fmt: fmt if fmt != "auto" else _ml_dataset(path.parent, default)


def _ncf_dataset(path: Path, fmt: str) -> str:
    return "ncf-" + strip_gz(path.name).split(".train.rating")[0]


# --------------------------------------------------------------------------- the registry

_NETFLIX_TITLES = Titles(
    lambda path: _find_titles(path.parent), readers.read_netflix_titles, option=True,
    missing="no movie_titles.txt found next to the input (pass --titles): no items.parquet")

# In detection order: a folder is read by the first entry that finds files in it; a file by
# the first whose file_name matches, else the first whose sniff accepts its first line.
REGISTRY: dict[str, Format] = {f.name: f for f in [
    Format("netflix", formats=("netflix",), read=_read_netflix, dataset=_named("netflix"),
           titles=_NETFLIX_TITLES, file_name=r"mv_\d+\.txt",
           sniff=lambda path, head, first: _netflix_head(first, head, combined=False),
           find=_netflix_files,
           describe="a Netflix training_set/ (mv_*.txt) or combined_data_*.txt"),
    Format("netflix-combined", formats=("netflix",), read=_read_netflix_combined,
           dataset=_named("netflix"), titles=_NETFLIX_TITLES, file_name=r"combined_data_\d+\.txt",
           sniff=lambda path, head, first: _netflix_head(first, head, combined=True),
           find=_glob_folder("combined_data_*.txt")),
    Format("ml-100k", formats=("ml-100k",), read=_read_ml100k, dataset=_named("ml-100k"),
           titles=Titles(_next_to("u.item"), readers.read_ml100k_items), file_name=r"u\.data",
           find=_in_folder("u.data"), describe="MovieLens u.data, ratings.dat or ratings.csv"),
    Format("ml-dat", formats=("ml-1m", "ml-10m"), read=_read_ml_dat,
           dataset=_movielens("ml-1m"),
           titles=Titles(_next_to("movies.dat"), readers.read_ml_dat_movies),
           sniff=_ml_dat_head, find=_in_folder("ratings.dat")),
    Format("ml-csv", formats=("ml-20m", "ml-25m", "ml-latest", "ml-latest-small"),
           read=_read_ml_csv, dataset=_movielens("ml-latest"),
           titles=Titles(_next_to("movies.csv"), readers.read_ml_csv_movies),
           sniff=_header_starts("userid,movieid,rating"), find=_in_folder("ratings.csv")),
    Format("anime", formats=("anime",), read=_read_anime, dataset=_named("anime"),
           titles=Titles(_next_to("anime.csv"), readers.read_anime_items),
           sniff=_header_starts("user_id,anime_id,rating"), find=_in_folder("rating.csv"),
           describe="Kaggle anime rating.csv"),
    Format("ncf", formats=("ncf",), read=_read_ncf, dataset=_ncf_dataset,
           file_name=r".*\.train\.rating", find=_ncf_files, describe="an NCF *.train.rating"),
    Format("csv", formats=("csv",), read=_read_csv, dataset=_named("csv"),
           sniff=lambda path, head, first: True, describe="a CSV/TSV file"),
]}

# every --format name, in registry order (stage 10 adds auto and demo)
FORMAT_NAMES = list(dict.fromkeys(n for f in REGISTRY.values() for n in f.formats))
_described = [f.describe for f in REGISTRY.values() if f.describe]
EXPECTED = ", ".join(_described[:-1]) + ", or " + _described[-1]


def source(entry: Format, files: list[Path], fmt: str, titles: Path | None) -> Source:
    """The Source of ``files`` read by ``entry``; ``titles`` is --titles (or None)."""
    extra = None
    if entry.titles is not None:
        extra = titles if (entry.titles.option and titles) else entry.titles.find(files[0])
    return Source(entry.name, entry.dataset(files[0], fmt), files, extra)


def read(src: Source, cfg: Config, sink=None) -> RawRatings:
    """Read a Source with its entry: the ratings, then its titles when it has them."""
    entry = REGISTRY[src.fmt]
    raw = entry.read(src, cfg, sink)
    if entry.titles is not None:
        if src.extra is not None:
            raw.items = entry.titles.read(src.extra)
        elif entry.titles.missing:
            log.info(entry.titles.missing)
    return raw
