"""Stage artifacts: atomic stage folders, manifests written last, upstream checks.

Every stage writes ``DATA_DIR/<stage>/`` (e.g. ``data/10_preprocessing/``). The folder is
built under a temporary name and renamed into place only after ``manifest.json`` is written,
so an interrupted or failed run leaves the previous artifact as it was. Each manifest holds
the fingerprint of its upstream manifest; the next stage checks the whole chain before
reading and names the command to rerun when something is missing or stale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .cli import PipelineError, command_line, config_dict

STAGES = ["10_preprocessing", "20_make_ids", "30_split_train_test", "40_make_sparse_matrix",
          "60_train", "70_recommend"]
MANIFEST = "manifest.json"


def stage_dir(data_dir: str | Path, stage: str) -> Path:
    return Path(data_dir) / stage


def default_command(stage: str, data_dir: str | Path) -> str:
    extra = " --input PATH" if stage == "10_preprocessing" else ""
    return f"python {stage}.py --data-dir {data_dir}{extra}"


def fingerprint(manifest_path: Path) -> str:
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:16]


def _rerun_hint(manifest: dict[str, Any] | None, stage: str, data_dir: Path) -> str:
    if manifest and manifest.get("command"):
        return manifest["command"]
    return default_command(stage, data_dir)


def read_manifest(data_dir: str | Path, stage: str, needed_by: str | None = None) -> dict[str, Any]:
    """Read and check ``DATA_DIR/<stage>/manifest.json`` and the chain above it.

    Raises PipelineError naming the command to run when the artifact is missing, unreadable
    or older than its upstream.
    """
    data_dir = Path(data_dir)
    path = stage_dir(data_dir, stage) / MANIFEST
    who = f" (needed by {needed_by})" if needed_by else ""
    if not path.exists():
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
        read_manifest(data_dir, up_stage)  # the chain above must hold too
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


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` owned by this process: ``.<name>.<kind>-<pid>`` (same
    folder, so the rename that publishes it is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write a file under a temporary name and rename it into place only when the block ends
    without an error, so readers see the old file or the new one, never half of one:

        with atomic_write(out / "model.pt") as tmp:
            torch.save(obj, tmp)
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def swap_folder(staged: Path, final: Path) -> None:
    """Put the finished folder ``staged`` at ``final``, replacing what was there: the old one
    is renamed aside first, then removed after the new one is in place."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = temp_name(final, "old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


class StageOutput:
    """Build a stage folder under a temporary name; swap it in when the manifest is written.

    with StageOutput(data_dir, "20_make_ids") as out:
        df.to_parquet(out.path("ratings.parquet"))
        out.commit({...manifest fields...})
    """

    def __init__(self, data_dir: str | Path, stage: str):
        self.data_dir = Path(data_dir)
        self.stage = stage
        self.final = stage_dir(self.data_dir, stage)
        # a sibling of the final folder (same file system, so the rename is atomic)
        self.tmp = temp_name(self.final)
        self._committed = False
        self._t0 = time.time()

    def __enter__(self) -> "StageOutput":
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"cannot create data folder {self.data_dir}: {e.strerror}; "
                                f"choose another with --data-dir") from None
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write manifest.json last, then rename the folder into place."""
        # run_id makes every build's manifest (and so its fingerprint) unique: a rebuilt
        # upstream always marks its downstream stale, even within the same second.
        full = {"stage": self.stage, "run_id": uuid.uuid4().hex,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - self._t0, 3), **manifest}
        full.setdefault("files", sorted(p.name for p in self.tmp.iterdir()))
        write_json(self.tmp / MANIFEST, full)
        swap_folder(self.tmp, self.final)
        self._committed = True
        return self.final

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def dtypes_of(df) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def write_parquet(df, path: Path) -> None:
    """Parquet with the frame's explicit dtypes, no index."""
    df.to_parquet(path, index=False, engine="pyarrow", compression="zstd")


def read_parquet(path: Path, columns: list[str] | None = None):
    import pandas as pd
    if not Path(path).exists():
        raise PipelineError(f"{path} is missing although its manifest exists; rerun the stage "
                            f"that writes {Path(path).parent}")
    return pd.read_parquet(path, columns=columns, engine="pyarrow")


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
