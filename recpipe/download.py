"""Fetch a public MovieLens archive by name: verified against its published MD5, extracted atomically.

``download("ml-100k", DATA_DIR/"raw", base_url)`` fetches ``BASE/ml-100k.zip`` and
``BASE/ml-100k.zip.md5`` (GroupLens publishes ``MD5 (ml-100k.zip) = <hex>``), checks the MD5 and
the zip's own CRCs, extracts into a temporary folder beside the target and renames it into
place, so ``DATA_DIR/raw/ml-100k/`` is either complete or absent. A second call finds it and
does nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from .artifacts import swap_folder
from .cli import PipelineError, log

KNOWN = ["ml-100k", "ml-1m", "ml-10m", "ml-latest-small", "ml-20m", "ml-25m", "ml-32m", "ml-latest"]
# the folder each archive unpacks to, when it differs from the name
_ZIP_FOLDER = {"ml-10m": "ml-10M100K"}
_MARKER = ".recpipe-download.json"
_CHUNK = 1 << 20


def _fetch(url: str, dest: Path | None, timeout: float) -> tuple[bytes | None, str, int]:
    """GET url; into dest (streamed, MD5 computed on the way) or returned as bytes."""
    md5 = hashlib.md5()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if dest is None:
                data = resp.read()
                return data, hashlib.md5(data).hexdigest(), len(data)
            total = int(resp.headers.get("Content-Length") or 0)
            from tqdm import tqdm

            from .cli import progress_disabled
            with open(dest, "wb") as f, tqdm(total=total or None, unit="B", unit_scale=True,
                                             desc=dest.name.split(".part")[0],
                                             disable=progress_disabled()) as bar:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            if total and size != total:
                raise PipelineError(f"{url}: download cut short ({size} of {total} bytes); run the "
                                    f"command again")
    except urllib.error.HTTPError as e:
        raise PipelineError(f"{url}: HTTP {e.code} {e.reason}; expected a MovieLens archive there "
                            f"(names: {', '.join(KNOWN)}; --base-url sets the site)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"{url}: cannot download ({reason}); check the network or --base-url, "
                            f"or download it yourself and pass --input PATH") from None
    return None, md5.hexdigest(), size


def _published_md5(text: str, url: str) -> str:
    m = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if m is None:
        raise PipelineError(f"{url}: {text.strip()[:120]!r}: no MD5 checksum found; expected "
                            f"`MD5 (NAME.zip) = <32 hex digits>`")
    return m.group(1).lower()


def extract_zip(path: Path, into: Path, name: str | Path, fix: str) -> None:
    """Extract a zip after checking every member's CRC and refusing unsafe member names.

    ``name`` is what error messages call the archive (its path or URL), ``fix`` what to do.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise PipelineError(f"{name}: corrupt zip member {bad!r} (CRC mismatch); {fix}")
            for m in zf.namelist():
                if m.startswith("/") or ".." in Path(m).parts:
                    raise PipelineError(f"{name}: unsafe member name {m!r} in the zip; refusing "
                                        f"to extract it")
            zf.extractall(into)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise PipelineError(f"{name}: not a valid zip archive ({e}); expected a complete .zip "
                            f"of ratings files: {fix}") from None


def download(name: str, raw_dir: Path, base_url: str, timeout: float = 60.0) -> Path:
    """DATA_DIR/raw/NAME/ with the extracted archive (downloaded and verified if missing)."""
    if not re.fullmatch(r"ml-[a-z0-9-]+", name):
        raise PipelineError(f"--download {name!r}: expected a MovieLens archive name such as "
                            f"{', '.join(KNOWN)}")
    if name not in KNOWN:
        log.info("--download %s is not one of %s; trying it anyway", name, ", ".join(KNOWN))
    raw_dir = Path(raw_dir)
    target = raw_dir / name
    marker = target / _MARKER
    if marker.is_file():
        log.info("%s already downloaded and verified in %s", name, target)
        return target
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create {raw_dir}: {e.strerror}; choose another --data-dir") from None
    base = base_url.rstrip("/")
    zip_url, md5_url = f"{base}/{name}.zip", f"{base}/{name}.zip.md5"
    t0 = time.time()
    text, _, _ = _fetch(md5_url, None, timeout)
    want = _published_md5(text.decode("utf-8", "replace"), md5_url)
    part = raw_dir / f".{name}.zip.part-{os.getpid()}"
    tmp = raw_dir / f".{name}.extract-{os.getpid()}"
    try:
        log.info("downloading %s", zip_url)
        _, got, size = _fetch(zip_url, part, timeout)
        if got != want:
            raise PipelineError(f"{zip_url}: MD5 mismatch: downloaded {size} bytes with MD5 {got}, "
                                f"expected {want} (from {md5_url}); the download is corrupt or "
                                f"incomplete: run the command again")
        if tmp.exists():
            shutil.rmtree(tmp)
        extract_zip(part, tmp, zip_url, "run the command again")
        entries = [p for p in tmp.iterdir() if not p.name.startswith("__MACOSX")]
        inner = _ZIP_FOLDER.get(name, name)
        root = next((p for p in entries if p.is_dir() and p.name.lower() == inner.lower()), None)
        if root is None:
            root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        (root / _MARKER).write_text(json.dumps(
            {"name": name, "url": zip_url, "md5": got, "bytes": size,
             "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
        staged = raw_dir / f".{name}.ready-{os.getpid()}"
        os.replace(root, staged)
        swap_folder(staged, target)  # replaces an incomplete earlier extraction (no marker)
        os.replace(part, raw_dir / f"{name}.zip")
    finally:
        for p in (part, tmp):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
    log.info("%s: %d bytes, MD5 %s verified, extracted to %s in %.1fs", name, size, got, target,
             time.time() - t0)
    return target
