"""Stage artifacts: atomic stage folders, manifests written last, upstream checks.

Every stage writes ``DATA_DIR/<stage>/`` (e.g. ``data/10_preprocessing/``). The folder is
built under a temporary name and renamed into place only after ``manifest.json`` is written,
so an interrupted or failed run leaves the previous artifact as it was. Each manifest holds
the fingerprint of its upstream manifest; the next stage checks the whole chain before
reading and names the command to rerun when something is missing or stale.

Reliability: the manifest records each file's size and SHA-256 ("file_info"), checked before
the files are read; one run at a time writes a stage (``stage_lock``, a kernel lock released
when its owner dies); files and folders are fsynced before the rename that publishes them; a
run killed while swapping folders is repaired by the next one, and temporary files of dead
runs are removed. Every OSError while writing names the path it was writing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import struct
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cli import PipelineError, file_in_path, command_line, config_dict, os_error_message
from .durable import (atomic_write, fsync_dir, fsync_tree, lock_path,  # noqa: F401
                      pid_alive, remove_dead_temps, restore_interrupted_swap, stage_dir,
                      stage_lock, swap_folder, temp_name)

log = logging.getLogger("recpipe")

STAGES = ["10_preprocessing", "20_make_ids", "30_split_train_test", "40_make_sparse_matrix",
          "60_train", "70_recommend"]
MANIFEST = "manifest.json"


def default_command(stage: str, data_dir: str | Path) -> str:
    extra = " --input PATH" if stage == "10_preprocessing" else ""
    return f"python {stage}.py --data-dir {data_dir}{extra}"


# what reading a truncated or corrupt .npy / .npz / zip raises (numpy, scipy, zipfile)
CORRUPT_FILE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
                       struct.error)

HASH_CHUNK = 4 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (about 1-2 s per GB)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def fingerprint(manifest_path: Path) -> str:
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:16]


def _rerun_hint(manifest: dict[str, Any] | None, stage: str, data_dir: Path) -> str:
    if manifest and manifest.get("command"):
        return manifest["command"]
    return default_command(stage, data_dir)


def rerun_command(data_dir: str | Path, stage: str) -> str:
    """The command that rebuilds ``stage``: its manifest's, else the default one."""
    try:
        manifest = json.loads((stage_dir(data_dir, stage) / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    return _rerun_hint(manifest if isinstance(manifest, dict) else None, stage, Path(data_dir))


# files whose hash was checked in this process: (path, sha256) -> (size, mtime_ns)
_verified: dict[tuple[str, str], tuple[int, int]] = {}


def verify_files(data_dir: str | Path, stage: str, manifest: dict[str, Any],
                 hashes: bool = True) -> None:
    """Check that every file in the manifest's "file_info" is there with its recorded size
    and (``hashes``) SHA-256; a manifest without file_info (older artifacts) passes.

    Raises one PipelineError line: the file, what is wrong, the command that rebuilds it."""
    info = manifest.get("file_info")
    if not isinstance(info, dict):
        return
    folder = stage_dir(data_dir, stage)
    for name, want in info.items():
        if not isinstance(want, dict):
            continue
        p = folder / name
        what = None
        try:
            st = p.stat()
        except FileNotFoundError:
            what = "missing"
        except OSError as e:
            raise PipelineError(os_error_message(e, p, f"checking stage {stage}")) from None
        if what is None and st.st_size != want.get("bytes"):
            what = f"{st.st_size} bytes, the manifest says {want.get('bytes')}"
        if what is None and hashes and want.get("sha256"):
            key = (str(p), want["sha256"])
            if _verified.get(key) != (st.st_size, st.st_mtime_ns):
                try:
                    got = file_sha256(p)
                except OSError as e:
                    raise PipelineError(os_error_message(e, p, f"checking stage {stage}")
                                        ) from None
                if got != want["sha256"]:
                    what = "content hash differs from the manifest's (the file is corrupt)"
                else:
                    _verified[key] = (st.st_size, st.st_mtime_ns)
        if what is not None:
            raise PipelineError(
                f"{p}: {what}; stage {stage} is damaged or was changed after it was written; "
                f"rebuild it with `{_rerun_hint(manifest, stage, Path(data_dir))}`")


def read_manifest(data_dir: str | Path, stage: str, needed_by: str | None = None,
                  verify: str = "hash") -> dict[str, Any]:
    """Read and check ``DATA_DIR/<stage>/manifest.json`` and the chain above it.

    Raises PipelineError naming the command to run when the artifact is missing, unreadable,
    damaged (a file of "file_info" missing, of another size or, with ``verify="hash"``,
    another content) or older than its upstream. The chain above gets the size check only;
    ``verify="none"`` skips the file checks.
    """
    data_dir = Path(data_dir)
    path = stage_dir(data_dir, stage) / MANIFEST
    who = f" (needed by {needed_by})" if needed_by else ""
    restore_interrupted_swap(stage_dir(data_dir, stage))
    if not path.exists():
        blocker = file_in_path(data_dir)
        if blocker is not None:
            raise PipelineError(
                f"{data_dir}: {blocker} is a file, not a folder{who}; pass a folder to "
                f"--data-dir")
        raise PipelineError(
            f"{path} not found{who}: stage {stage} has not been run in {data_dir}; "
            f"run `{default_command(stage, data_dir)}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path} is unreadable ({e}); rerun `{default_command(stage, data_dir)}`")
    for up_stage, up_fp in (manifest.get("upstream") or {}).items():
        up_path = stage_dir(data_dir, up_stage) / MANIFEST
        if not up_path.exists():
            raise PipelineError(
                f"{stage_dir(data_dir, stage)} was built from {stage_dir(data_dir, up_stage)}, "
                f"which is gone; run `{default_command(up_stage, data_dir)}` and then "
                f"`{_rerun_hint(manifest, stage, data_dir)}`")
        if fingerprint(up_path) != up_fp:
            raise PipelineError(
                f"{stage_dir(data_dir, stage)} is stale: {stage_dir(data_dir, up_stage)} changed "
                f"after it was built; rerun `{_rerun_hint(manifest, stage, data_dir)}`")
        # the chain above must hold too (sizes only: its files are not read now)
        read_manifest(data_dir, up_stage, verify="size" if verify != "none" else "none")
    if verify != "none":
        verify_files(data_dir, stage, manifest, hashes=verify == "hash")
    return manifest


def upstream_entry(data_dir: str | Path, stage: str) -> dict[str, str]:
    """``{"<stage>": fingerprint}`` for the manifest of ``stage``: store as "upstream"."""
    return {stage: fingerprint(stage_dir(data_dir, stage) / MANIFEST)}


def stage_manifest(prog: str, argv, cfg: Any, data_dir: str | Path, upstream_stage: str,
                   up: dict[str, Any]) -> dict[str, Any]:
    """The fields every downstream stage's manifest starts with: the command and resolved
    config that made it, the fingerprint of its upstream, and what it passes through."""
    return {"command": command_line(prog, argv), "config": config_dict(cfg),
            "upstream": upstream_entry(data_dir, upstream_stage),
            "dataset": up.get("dataset"), "rating_scale": up.get("rating_scale"),
            "has_timestamp": up.get("has_timestamp")}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary name, fsync, rename)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def work_dir_for(data_dir: str | Path, stage: str) -> Path:
    """A persistent build folder for ``StageOutput(work_dir=...)``: ``.<name>.work`` beside
    the stage folder (same file system, so committing it is a rename)."""
    final = stage_dir(data_dir, stage)
    return final.with_name(f".{final.name}.work")


def file_info(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {"bytes", "sha256"}} of every file under ``folder`` but the manifest."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST or not p.is_file():
            continue
        out[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return out


class StageOutput:
    """Build a stage folder under a temporary name; swap it in when the manifest is written.

    with StageOutput(data_dir, "20_make_ids") as out:
        df.to_parquet(out.path("ratings.parquet"))
        out.commit({...manifest fields...})

    Entering takes ``stage_lock`` (a second run of the stage is refused), repairs a swap a
    killed run left half done and removes dead runs' temporary files; leaving releases the
    lock. By default the folder is built in ``.<name>.tmp-<pid>``, cleared on entry and
    removed on failure. With ``work_dir`` it is built there instead, a persistent folder the
    caller manages (neither cleared on entry nor removed on failure: e.g. stage 60's
    resumable checkpoint), which commit() renames into place like the default one; it must
    be on the file system of DATA_DIR (``work_dir_for`` gives one). Stage names may hold a
    slash ("60_train/mf": DATA_DIR/60_train/mf). Any OSError in the block becomes one
    PipelineError line naming the path.
    """

    def __init__(self, data_dir: str | Path, stage: str, work_dir: Path | None = None):
        self.data_dir = Path(data_dir)
        self.stage = stage
        self.final = stage_dir(self.data_dir, stage)
        # a sibling of the final folder (same file system, so the rename is atomic)
        self.persistent = work_dir is not None
        self.tmp = Path(work_dir) if work_dir is not None else temp_name(self.final)
        self._committed = False
        self._t0 = time.time()
        self._lock: contextlib.ExitStack | None = None

    def __enter__(self) -> "StageOutput":
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(os_error_message(e, self.final.parent, "creating the data "
                                                 "folder", other="another --data-dir")) from None
        stack = contextlib.ExitStack()
        stack.enter_context(stage_lock(self.data_dir, self.stage))
        try:
            restore_interrupted_swap(self.final)
            remove_dead_temps(self.final, [self.tmp] if self.persistent else [])
            if self.persistent:
                self.tmp.mkdir(parents=True, exist_ok=True)
            else:
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                self.tmp.mkdir()
        except OSError as e:
            stack.close()
            raise PipelineError(os_error_message(e, None, f"preparing {self.final}",
                                                 other="another --data-dir")) from None
        except BaseException:
            stack.close()
            raise
        self._lock = stack
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write manifest.json last (with every file's size and SHA-256), then rename the
        folder into place (fsynced first)."""
        # run_id makes every build's manifest (and so its fingerprint) unique: a rebuilt
        # upstream always marks its downstream stale, even within the same second.
        full = {"stage": self.stage, "run_id": uuid.uuid4().hex,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - self._t0, 3), **manifest}
        full.setdefault("files", sorted(p.name for p in self.tmp.iterdir() if p.name != MANIFEST))
        full["file_info"] = file_info(self.tmp)
        write_json(self.tmp / MANIFEST, full)
        try:
            swap_folder(self.tmp, self.final)
        except OSError as e:
            raise PipelineError(os_error_message(e, self.final, "putting the new folder in "
                                                 "place", other="another --data-dir")) from None
        self._committed = True
        return self.final

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._committed and not self.persistent and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
        if isinstance(exc, OSError):
            where = exc.filename if exc.filename is not None else self.tmp
            raise PipelineError(os_error_message(exc, where, f"building {self.final}",
                                                 other="another --data-dir")) from None


def dtypes_of(df) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def write_parquet(df, path: Path) -> None:
    """Parquet with the frame's explicit dtypes, no index."""
    df.to_parquet(path, index=False, engine="pyarrow", compression="zstd")


def read_parquet(path: Path, columns: list[str] | None = None):
    import pandas as pd
    import pyarrow as pa
    if not Path(path).exists():
        raise PipelineError(f"{path} is missing although its manifest exists; rerun the stage "
                            f"that writes {Path(path).parent}")
    try:
        return pd.read_parquet(path, columns=columns, engine="pyarrow")
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path} is unreadable ({e}); rerun the stage that writes "
                            f"{Path(path).parent}") from None


def read_columns(path: Path, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """A Parquet table as {column: array}, read one column at a time.

    Numbers become numpy arrays (missing floats NaN), strings Arrow-backed pandas Series (no
    Python object per value). Peak memory stays near the size of the data itself, where a
    whole-table pandas conversion needs about twice that.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not Path(path).exists():
        raise PipelineError(f"{path} is missing although its manifest exists; rerun the stage "
                            f"that writes {Path(path).parent}")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path} is unreadable ({e}); rerun the stage that writes "
                            f"{Path(path).parent}") from None
    out: dict[str, Any] = {}
    for name in columns or pf.schema_arrow.names:
        col = pf.read(columns=[name]).column(0)
        t = col.type
        if pa.types.is_integer(t) and col.null_count:
            raise PipelineError(f"{path}: column {name} has {col.null_count} missing values; "
                                f"expected none; rerun the stage that writes {Path(path).parent}")
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            out[name] = col.to_numpy()
        else:
            out[name] = col.to_pandas()
        del col
    return out
