"""--download: a MovieLens zip + md5 served by a local http.server (never the internet)."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recpipe import preprocess
from recpipe.cli import PipelineError
from recpipe.download import download
from tests.conftest import FIXTURES, run_script

NAME = "ml-latest-small"


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in ["ratings.csv", "movies.csv"]:
            zf.writestr(f"{NAME}/{n}", (FIXTURES / "raw" / "ml-latest-small" / n).read_bytes())
    return buf.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def site(tmp_path):
    """A local site with NAME.zip and NAME.zip.md5 (GroupLens' md5 format); yields (url, folder)."""
    root = tmp_path / "site"
    root.mkdir()
    data = make_zip()
    (root / f"{NAME}.zip").write_bytes(data)
    (root / f"{NAME}.zip.md5").write_text(f"MD5 ({NAME}.zip) = {hashlib.md5(data).hexdigest()}\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, server
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_extracts_and_preprocesses(site, tmp_path):
    url, _, server = site
    data = tmp_path / "data"
    out = preprocess.main(["--download", NAME, "--base-url", url, "--data-dir", str(data)])
    m = json.loads((out / "manifest.json").read_text())
    assert (m["n_ratings"], m["n_users"], m["n_items"], m["dataset"]) == (3, 2, 2, NAME)
    raw = data / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [NAME, f"{NAME}.zip"]  # no temp leftovers
    assert (raw / NAME / "ratings.csv").read_bytes() == \
        (FIXTURES / "raw" / "ml-latest-small" / "ratings.csv").read_bytes()
    marker = json.loads((raw / NAME / ".recpipe-download.json").read_text())
    assert marker["md5"] == hashlib.md5((raw / f"{NAME}.zip").read_bytes()).hexdigest()
    # a second run finds the verified copy and needs no server
    server.shutdown()
    assert download(NAME, raw, url) == raw / NAME


def test_wrong_md5_fails_and_leaves_nothing(site, tmp_path):
    url, root, _ = site
    (root / f"{NAME}.zip.md5").write_text(f"MD5 ({NAME}.zip) = {'0' * 32}\n")
    raw = tmp_path / "data" / "raw"
    with pytest.raises(PipelineError, match=r"MD5 mismatch: .* expected 0{32}"):
        download(NAME, raw, url)
    assert list(raw.iterdir()) == []
    # as a user sees it: one line, exit 1, no traceback, no artifact
    proc = run_script("10_preprocessing.py", "--download", NAME, "--base-url", url,
                      "--data-dir", str(tmp_path / "data"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "MD5 mismatch" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "data" / "10_preprocessing").exists()


def test_corrupt_zip_with_matching_md5_is_rejected(site, tmp_path):
    url, root, _ = site
    data = bytearray(make_zip())
    data[60:70] = b"XXXXXXXXXX"  # inside the compressed ratings.csv: CRC check fails
    (root / f"{NAME}.zip").write_bytes(bytes(data))
    (root / f"{NAME}.zip.md5").write_text(hashlib.md5(bytes(data)).hexdigest() + f"  {NAME}.zip\n")
    raw = tmp_path / "raw"
    with pytest.raises(PipelineError, match=rf"{NAME}.zip: (corrupt member|not a valid zip)"):
        download(NAME, raw, url)
    assert list(raw.iterdir()) == []


def test_unknown_archive_and_bad_name(site, tmp_path):
    url, _, _ = site
    with pytest.raises(PipelineError, match=r"ml-nope.zip.md5: HTTP 404"):
        download("ml-nope", tmp_path / "raw", url)
    with pytest.raises(PipelineError, match=r"expected a MovieLens archive name"):
        download("../etc", tmp_path / "raw", url)


def test_unreachable_site(tmp_path):
    with pytest.raises(PipelineError, match=r"cannot download"):
        download(NAME, tmp_path / "raw", "http://127.0.0.1:9", timeout=5)
