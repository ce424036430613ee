"""The format registry of stage 10: every --format name has an entry, every entry reads its
tiny fixture into the one record type, detection is a loop over the registry."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recpipe import formats, preprocess, readers
from tests.conftest import FIXTURES

RAW = FIXTURES / "raw"

# one tiny fixture per registry entry: a new entry needs one here
FIXTURE_OF = {
    "netflix": RAW / "netflix",
    "netflix-combined": RAW / "netflix_combined",
    "ml-100k": RAW / "ml-100k",
    "ml-dat": RAW / "ml-1m",
    "ml-csv": RAW / "ml-latest-small",
    "anime": RAW / "anime",
    "ncf": RAW / "ncf",
    "csv": RAW / "csv" / "plain.csv",
}


def _format_choices() -> list[str]:
    field = next(f for f in dataclasses.fields(preprocess.Config) if f.name == "format")
    return list(field.metadata["choices"])


def test_registry_covers_every_format_option():
    choices = _format_choices()
    assert choices == preprocess.FORMATS
    # auto detects; demo generates a dataset in the Netflix layout, read by the netflix entry
    assert choices == ["auto", *formats.FORMAT_NAMES, "demo"]
    for name in formats.FORMAT_NAMES:
        assert [f for f in formats.REGISTRY.values() if name in f.formats], name
    assert set(FIXTURE_OF) == set(formats.REGISTRY)
    for entry in formats.REGISTRY.values():
        assert entry.read is not None and entry.dataset is not None
        assert entry.find is not None or entry.sniff is not None or entry.file_name is not None


@pytest.mark.parametrize("name", list(FIXTURE_OF))
def test_every_entry_reads_one_record_type(tmp_path, name):
    cfg = preprocess.Config(input=str(FIXTURE_OF[name]), data_dir=tmp_path)
    src = preprocess.detect(FIXTURE_OF[name], "auto", "")
    assert src.fmt == name
    entry = formats.REGISTRY[name]
    raw = entry.read(src, cfg, None)
    assert type(raw) is readers.RawRatings
    assert isinstance(raw.table, pa.Table) and raw.table.num_rows > 0
    assert raw.table.column_names[:3] == ["raw_user_id", "raw_item_id", "rating"]
    assert raw.table.schema.field("rating").type == pa.float32()
    if "timestamp" in raw.table.column_names:
        assert raw.table.schema.field("timestamp").type == pa.int64()
    assert raw.dataset == src.dataset and raw.inputs and len(raw.rating_scale) == 2
    assert raw.dropped.keys() == {"unrated"}
    # titles: found next to the ratings and read by the entry's titles reader
    full = formats.read(src, cfg)
    assert type(full) is readers.RawRatings and full.table.equals(raw.table)
    if entry.titles is None or src.extra is None:  # netflix_combined/ has no movie_titles.txt
        assert src.extra is None and full.items is None
    else:
        assert list(full.items.columns) == ["raw_item_id", "title", "year"]
        assert str(full.items["raw_item_id"].dtype) == "int64"


def test_streamed_read_returns_the_record_without_a_table(tmp_path):
    src = preprocess.detect(RAW / "netflix", "auto", "")
    seen = []
    raw = formats.read(src, preprocess.Config(input="x", data_dir=tmp_path), seen.append)
    assert type(raw) is readers.RawRatings and raw.table is None
    assert sum(t.num_rows for t in seen) == 6 and raw.items is not None


def test_detection_is_a_loop_over_the_registry(tmp_path):
    # a file name decides before the content does
    f = tmp_path / "u.data"
    f.write_text("1:\n")
    assert preprocess.detect(f, "auto", "").fmt == "ml-100k"
    # content: the first entry whose sniff accepts the first line; csv takes the rest
    g = tmp_path / "r.txt"
    g.write_text("1::2::3::4\n")
    assert preprocess.detect(g, "auto", "").fmt == "ml-dat"
    g.write_text("7:\n1,3,2005-09-06\n8:\n2,4,2005-09-06\n")
    assert preprocess.detect(g, "auto", "").fmt == "netflix-combined"
    g.write_text("a,b,c\n1,2,3\n")
    assert preprocess.detect(g, "auto", "").fmt == "csv"
    # --format netflix selects two entries: the file name picks one
    combined = RAW / "netflix_combined" / "combined_data_1.txt"
    assert preprocess.detect(combined, "netflix", "").fmt == "netflix-combined"
    # --format names the dataset of the entries that read several (ml-dat, ml-csv)
    src = preprocess.detect(RAW / "ml-latest-small", "ml-20m", "")
    assert (src.fmt, src.dataset) == ("ml-csv", "ml-20m")
    # --titles replaces the lookup only for the entries whose titles allow it
    titles = RAW / "netflix" / "movie_titles.txt"
    assert preprocess.detect(RAW / "netflix_combined", "auto", str(titles)).extra == titles
    assert preprocess.detect(RAW / "ml-100k", "auto", str(titles)).extra.name == "u.item"


def test_expected_inputs_listed_from_the_registry():
    assert preprocess.EXPECTED_FOLDER == formats.EXPECTED
    for entry in formats.REGISTRY.values():
        assert entry.describe in formats.EXPECTED


def test_anime_unrated_rows_are_nan_in_the_parser():
    t = readers.read_anime(RAW / "anime" / "rating.csv")
    r = t.column("rating").to_numpy()
    assert np.isnan(r).sum() == 2 and t.num_rows == 5


def test_held_out_file_readers_live_with_the_readers(tmp_path):
    from recpipe import split
    assert split.read_probe is readers.read_probe
    assert split.read_ncf_test is readers.read_ncf_test
    p = tmp_path / "probe.txt"
    p.write_text("1:\n30878\n2:\n7\n")
    got = readers.read_probe(Path(p))
    assert got["raw_item_id"].tolist() == ["1", "2"] and got["line"].tolist() == [2, 4]
