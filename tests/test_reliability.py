"""Stage artifacts survive kills, races, corrupt files and full disks.

Each test makes its own tiny data: manifests that record every file's size and hash, the
per-stage lock, repair of a swap killed half way, removal of dead runs' temporary files,
OSErrors as one line, and truncated .npz / .npy files as one line naming their rebuild.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recpipe import artifacts, dataset
from recpipe import ids as ids_stage, matrix as matrix_stage, split as split_stage
from recpipe.artifacts import (StageOutput, read_manifest, stage_lock, temp_name, work_dir_for,
                               write_json)
from recpipe.cli import PipelineError, run_main
from stage_fixtures import make_ratings, write_stage10

ROOT = Path(__file__).resolve().parents[1]


def _tiny_stage10(data_dir: Path, n_users: int = 30, n_items: int = 40, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, n_users, 600), rng.integers(0, n_items, 600)],
                               1), axis=0)
    r = rng.integers(1, 6, len(pairs)).astype(np.float32)
    write_stage10(data_dir, make_ratings(pairs[:, 0] + 100, pairs[:, 1] + 500, r,
                                         rng.integers(0, 10**6, len(pairs))))


def _stages_to_20(data_dir: Path) -> None:
    _tiny_stage10(data_dir)
    assert run_main(ids_stage.main, ["--data-dir", str(data_dir)]) == 0


def _stages_to_30_loo(data_dir: Path) -> None:
    _stages_to_20(data_dir)
    assert run_main(split_stage.main, ["--data-dir", str(data_dir), "--strategy", "loo",
                                       "--negatives", "5"]) == 0


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _strip_file_info(data_dir: Path, stage: str) -> None:
    """Make the manifest look like one written before file_info existed."""
    p = data_dir / stage / "manifest.json"
    m = json.loads(p.read_text())
    m.pop("file_info")
    p.write_text(json.dumps(m, indent=2))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. manifest file records -----------------------------------------------------------------

def test_manifest_records_files_and_read_manifest_catches_a_truncated_one(tmp_path, capsys):
    _stages_to_20(tmp_path)
    s20 = tmp_path / "20_make_ids"
    m = json.loads((s20 / "manifest.json").read_text())
    assert m["files"] == ["items.parquet", "ratings.parquet", "users.parquet"]  # kept as it was
    assert set(m["file_info"]) == set(m["files"])
    for name, info in m["file_info"].items():
        data = (s20 / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert read_manifest(tmp_path, "20_make_ids")["stage"] == "20_make_ids"

    _truncate(s20 / "ratings.parquet")
    with pytest.raises(PipelineError) as e:
        read_manifest(tmp_path, "20_make_ids")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{s20 / 'ratings.parquet'}: " in msg and "bytes, the manifest says" in msg
    assert f"python 20_make_ids.py --data-dir {tmp_path}" in msg
    # the next stage stops on it with that one line, before reading the table
    assert run_main(split_stage.main, ["--data-dir", str(tmp_path)]) == 1
    assert "ratings.parquet" in _one_error_line(capsys)


def test_same_size_corruption_is_caught_by_hash_and_chain_by_size(tmp_path):
    _stages_to_20(tmp_path)
    p = tmp_path / "20_make_ids" / "users.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"users.parquet: content hash differs.*"
                                            r"`python 20_make_ids.py"):
        read_manifest(tmp_path, "20_make_ids")
    _stages_to_20(tmp_path)
    _truncate(tmp_path / "10_preprocessing" / "ratings.parquet")   # upstream of the one read
    with pytest.raises(PipelineError, match=r"10_preprocessing/ratings.parquet: \d+ bytes"):
        read_manifest(tmp_path, "20_make_ids")
    # manifests without file_info (older artifacts) are accepted
    _stages_to_20(tmp_path)
    _strip_file_info(tmp_path, "20_make_ids")
    assert read_manifest(tmp_path, "20_make_ids")["stage"] == "20_make_ids"


# -- 2. the stage lock ------------------------------------------------------------------------

def test_lock_refuses_a_second_process_and_dies_with_its_owner(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from recpipe.artifacts import stage_lock
            with stage_lock(sys.argv[1], "60_train/mf"):
                print("locked", flush=True)
                time.sleep(120)
        """), str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / ".60_train_mf.lock").read_text().split() == [
            str(holder.pid), socket.gethostname()]
        with pytest.raises(PipelineError) as e:
            with StageOutput(tmp_path, "60_train/mf"):
                pass
        msg = str(e.value)
        assert "\n" not in msg
        assert f"PID {holder.pid} on {socket.gethostname()}" in msg
        assert str(tmp_path / "60_train" / "mf") in msg
        assert not list((tmp_path / "60_train").iterdir())     # nothing built meanwhile
        with pytest.raises(PipelineError, match=rf"PID {holder.pid} "):
            with stage_lock(tmp_path, "60_train/mf"):
                pass

        def main(argv):
            with StageOutput(tmp_path, "60_train/mf") as out:
                out.commit({})
        assert run_main(main, []) == 1
        assert f"PID {holder.pid}" in _one_error_line(capsys)
        with StageOutput(tmp_path, "60_train/other") as out:   # another stage is free
            out.commit({})
    finally:
        holder.kill()
        holder.wait()
    # killed with the lock held: the kernel released it, the next run takes it
    with StageOutput(tmp_path, "60_train/mf") as out:
        out.path("model.txt").write_text("m")
        out.commit({})
    assert (tmp_path / "60_train" / "mf" / "model.txt").read_text() == "m"
    assert not (tmp_path / ".60_train_mf.lock").exists()      # removed on release


# -- 4. a kill between the two renames ----------------------------------------------------------

_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from recpipe import artifacts
    final = Path(sys.argv[1]) / "20_make_ids"
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if Path(src) == final:          # the old folder is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace                # the module every publishing rename goes through
    with artifacts.StageOutput(sys.argv[1], "20_make_ids") as out:
        out.path("payload.txt").write_text("v2")
        out.commit({})
""")


def _kill_between_renames(data_dir: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(data_dir)], cwd=ROOT)
    assert proc.returncode == -9
    assert not (data_dir / "20_make_ids").exists()
    names = {p.name for p in data_dir.iterdir()}
    pid = next(int(n.rsplit("-", 1)[1]) for n in names if n.startswith(".20_make_ids.old-"))
    assert f".20_make_ids.tmp-{pid}" in names      # the finished new folder, never put in place
    return pid


def test_kill_between_renames_is_restored_by_the_next_run(tmp_path):
    with StageOutput(tmp_path, "20_make_ids") as out:
        out.path("payload.txt").write_text("v1")
        out.commit({"n": 1})
    _kill_between_renames(tmp_path)
    # a reader restores it
    assert read_manifest(tmp_path, "20_make_ids")["n"] == 1
    assert (tmp_path / "20_make_ids" / "payload.txt").read_text() == "v1"

    pid = _kill_between_renames(tmp_path)
    # so does the next writer, which also removes the dead run's leftovers
    with StageOutput(tmp_path, "20_make_ids") as out:
        assert (tmp_path / "20_make_ids" / "payload.txt").read_text() == "v1"
        names = {p.name for p in tmp_path.iterdir()}
        assert f".20_make_ids.tmp-{pid}" not in names and f".20_make_ids.old-{pid}" not in names
        out.path("payload.txt").write_text("v3")
        out.commit({"n": 3})
    assert (tmp_path / "20_make_ids" / "payload.txt").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20_make_ids"]


# -- 5. temporary files of dead runs --------------------------------------------------------------

def test_leftovers_of_dead_runs_are_removed_those_of_live_runs_kept(tmp_path):
    with StageOutput(tmp_path, "60_train/mf") as out:
        out.path("model.pt").write_bytes(b"m")
        out.commit({})
    final = tmp_path / "60_train" / "mf"
    work = work_dir_for(tmp_path, "60_train/mf")
    work.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = _dead_pid()
        made = {}
        for who, pid in (("dead", dead), ("live", live.pid)):
            made[who] = [final.parent / f".mf.tmp-{pid}", final.parent / f".mf.old-{pid}",
                         final / f".model.pt.tmp-{pid}", final / f".checkpoint.pt.tmp-{pid}",
                         work / f".checkpoint.pt.tmp-{pid}"]
            for p in made[who]:
                if p.parent == final.parent:
                    p.mkdir()
                    (p / "half.npz").write_bytes(b"x")
                else:
                    p.write_bytes(b"half")
        (work / "checkpoint.pt").write_bytes(b"resumable")
        with StageOutput(tmp_path, "60_train/mf", work_dir=work):
            pass
        assert not any(p.exists() for p in made["dead"])
        assert all(p.exists() for p in made["live"])
        assert (final / "model.pt").exists() and (work / "checkpoint.pt").exists()
    finally:
        live.kill()
        live.wait()


# -- 3. the persistent work folder ----------------------------------------------------------------

def test_work_dir_survives_failures_and_is_committed_into_place(tmp_path):
    work = work_dir_for(tmp_path, "60_train/mf")
    assert work == tmp_path / "60_train" / ".mf.work"
    with pytest.raises(RuntimeError):
        with StageOutput(tmp_path, "60_train/mf", work_dir=work) as out:
            assert out.path("checkpoint.pt") == work / "checkpoint.pt"
            out.path("checkpoint.pt").write_bytes(b"epoch 3")
            raise RuntimeError("killed mid-training")
    assert (work / "checkpoint.pt").read_bytes() == b"epoch 3"      # kept for --resume
    assert not (tmp_path / "60_train" / "mf").exists()
    with StageOutput(tmp_path, "60_train/mf", work_dir=work) as out:
        assert (work / "checkpoint.pt").read_bytes() == b"epoch 3"  # not cleared on entry
        out.path("model.pt").write_bytes(b"final")
        final = out.commit({"model": "mf"})
    assert final == tmp_path / "60_train" / "mf" and not work.exists()
    m = read_manifest(tmp_path, "60_train/mf")
    assert m["files"] == ["checkpoint.pt", "model.pt"]
    assert m["file_info"]["model.pt"] == {"bytes": 5,
                                         "sha256": hashlib.sha256(b"final").hexdigest()}
    assert sorted(p.name for p in (tmp_path / "60_train").iterdir()) == ["mf"]


# -- 6. OSErrors: one line through run_main -------------------------------------------------------

def test_disk_full_while_a_stage_writes_is_one_line(tmp_path, monkeypatch, capsys):
    _stages_to_20(tmp_path)
    before = (tmp_path / "20_make_ids" / "manifest.json").read_text()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    assert run_main(ids_stage.main, ["--data-dir", str(tmp_path)]) == 1
    line = _one_error_line(capsys)
    assert "disk full" in line and "(No space left on device)" in line
    assert str(tmp_path / "20_make_ids") in line and "--data-dir" in line
    # the previous artifact is untouched and nothing temporary is left
    assert (tmp_path / "20_make_ids" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10_preprocessing", "20_make_ids"]


@pytest.mark.parametrize("code,what", [(errno.ENOSPC, "disk full"),
                                       (errno.EACCES, "permission denied"),
                                       (errno.EROFS, "read-only file system")])
def test_write_helpers_name_the_file_they_write(tmp_path, monkeypatch, capsys, code, what):
    target = tmp_path / "metrics.json"

    def replace(src, dst):
        raise OSError(code, os.strerror(code), str(src))
    monkeypatch.setattr(os, "replace", replace)         # every publishing rename
    assert run_main(lambda argv: write_json(target, {"a": 1}), []) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {target}: {what}, while writing it ({os.strerror(code)}); ")
    assert not target.exists() and not temp_name(target).exists()


def test_any_oserror_is_one_line_but_bugs_keep_their_traceback(tmp_path, capsys):
    def main(argv):
        open(tmp_path / "no" / "such" / "file.csv")
    assert run_main(main, []) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'no' / 'such' / 'file.csv'}: not found")

    def bug(argv):
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        run_main(bug, [])


def test_data_dir_under_a_regular_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    bad = afile / "data"
    assert run_main(ids_stage.main, ["--data-dir", str(bad)]) == 1       # reads first
    assert f"{afile} is a file, not a folder" in _one_error_line(capsys)

    def writer(argv):                                                    # writes first
        with StageOutput(bad, "10_preprocessing") as out:
            out.commit({})
    assert run_main(writer, []) == 1
    line = _one_error_line(capsys)
    assert f"{afile} is a file, not a folder" in line and "(Not a directory)" in line
    assert "--data-dir" in line


# -- 7. truncated stage-40 inputs ---------------------------------------------------------------

def test_truncated_npz_candidates_and_negatives_are_one_line(tmp_path, capsys):
    _stages_to_30_loo(tmp_path)
    s30, s40 = tmp_path / "30_split_train_test", tmp_path / "40_make_sparse_matrix"
    neg = s30 / "test_negatives.npy"
    good_neg = neg.read_bytes()
    # stage 40 reads stage 30's negatives: truncated, caught by the size check ...
    _truncate(neg)
    assert run_main(matrix_stage.main, ["--data-dir", str(tmp_path)]) == 1
    assert "test_negatives.npy" in _one_error_line(capsys)
    # ... and by the loader where the manifest has no file_info
    _strip_file_info(tmp_path, "30_split_train_test")
    assert run_main(matrix_stage.main, ["--data-dir", str(tmp_path)]) == 1
    line = _one_error_line(capsys)
    assert f"{neg} is unreadable" in line and "python 30_split_train_test.py" in line
    neg.write_bytes(good_neg)
    assert run_main(matrix_stage.main, ["--data-dir", str(tmp_path)]) == 0
    assert {"test_candidates.npz", "train.npz"} <= set(
        json.loads((s40 / "manifest.json").read_text())["file_info"])

    # stage 40's matrices and candidates, read by stages 60 / 70
    bad = tmp_path / "copy" / "40_make_sparse_matrix" / "train.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes((s40 / "train.npz").read_bytes()[:300])
    with pytest.raises(PipelineError) as e:
        dataset._load_npz(bad)
    assert "\n" not in str(e.value) and f"{bad} is unreadable" in str(e.value)
    assert "python 40_make_sparse_matrix.py" in str(e.value)

    _truncate(s40 / "test_candidates.npz")
    with pytest.raises(PipelineError, match=r"test_candidates.npz: \d+ bytes, the manifest"):
        dataset.load_data(tmp_path, "implicit", torch.device("cpu"))
    _strip_file_info(tmp_path, "40_make_sparse_matrix")
    with pytest.raises(PipelineError) as e:
        dataset.load_data(tmp_path, "implicit", torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "test_candidates.npz is unreadable" in msg
    assert f"python 40_make_sparse_matrix.py --data-dir {tmp_path}" in msg
