"""Stage 60 survives kills, races, refused resumes and diverged runs without touching the
last good model; stage 70's edge cases end in one line. On ML-100K through stages 20-40
(the real data in ../shared/data), few epochs."""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from recpipe import ids, matrix, split
from recpipe.cli import PipelineError, parse_config, run_main
from recpipe.recommend import main as recommend_main
from recpipe.train import TrainConfig, run, work_dir
from stage_fixtures import write_ml100k_stage10

FAST = ["--threads", "1", "--batch-size", "8192", "--dim", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data) -> Path:
    """ML-100K, random split, a finished mf run (the 'last good model')."""
    d = tmp_path_factory.mktemp("rel")
    write_ml100k_stage10(d, shared_data)
    ids.main(["--data-dir", str(d)])
    split.main(["--data-dir", str(d), "--seed", "1", "--strategy", "random"])
    matrix.main(["--data-dir", str(d)])
    _train(d, "--epochs", "2")
    return d


def _train(d: Path, *argv: str) -> dict:
    return run(parse_config(TrainConfig, ["--data-dir", str(d), "--model", "mf", *FAST, *argv],
                            "60_train.py", ""))


def _snapshot(d: Path) -> dict[str, str]:
    out = d / "60_train" / "mf"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _answer(d: Path, capsys) -> str:
    capsys.readouterr()
    assert run_main(recommend_main, ["--data-dir", str(d), "--model", "mf", "--user", "1"]) == 0
    return capsys.readouterr().out


def _popen(d: Path, *argv: str) -> subprocess.Popen:
    import shutil
    shutil.rmtree(work_dir(d, "mf"), ignore_errors=True)     # a killed run's leftovers
    env = dict(os.environ, RECPIPE_PROGRESS="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "60_train.py"), "--data-dir", str(d),
                             "--model", "mf", *FAST, *argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.shared
def test_kill_9_mid_run_leaves_the_model_and_stage70_answer_unchanged(trained, capsys):
    before, answer = _snapshot(trained), _answer(trained, capsys)
    proc = _popen(trained, "--epochs", "500", "--patience", "500", "--batch-size", "512")
    try:
        _wait_for(work_dir(trained, "mf") / "checkpoint.pt", proc)   # epoch 1 done
        time.sleep(0.3)                                              # mid-epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _snapshot(trained) == before
    assert _answer(trained, capsys) == answer
    # the next run resumes the killed one from its own checkpoint, not the published one
    ck = torch.load(work_dir(trained, "mf") / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] >= 1 and ck["config"]["batch_size"] == 512


@pytest.mark.shared
def test_a_second_run_is_refused_while_the_first_holds_the_lock(trained):
    proc = _popen(trained, "--epochs", "500", "--patience", "500", "--batch-size", "512")
    try:
        _wait_for(work_dir(trained, "mf") / "checkpoint.pt", proc)
        with pytest.raises(PipelineError, match=rf"PID {proc.pid}"):
            _train(trained, "--epochs", "1")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.shared
def test_diverged_and_refused_runs_leave_the_previous_artifact(trained, capsys):
    before, answer = _snapshot(trained), _answer(trained, capsys)
    with pytest.raises(PipelineError, match="diverged"):
        _train(trained, "--epochs", "20", "--optimizer", "sgd", "--lr", "1e6", "--reg", "0",
               "--batch-size", "0")
    with pytest.raises(PipelineError, match="other settings.*lr_schedule"):
        _train(trained, "--epochs", "3", "--resume", "--lr-schedule", "cosine")
    assert _snapshot(trained) == before and _answer(trained, capsys) == answer


@pytest.mark.shared
def test_resume_after_a_rebuilt_split_is_refused(trained, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(trained, d)
    _train(d, "--epochs", "1")
    split.main(["--data-dir", str(d), "--seed", "2", "--strategy", "random"])
    matrix.main(["--data-dir", str(d)])
    with pytest.raises(PipelineError, match="another build of 40_make_sparse_matrix"):
        _train(d, "--epochs", "2", "--resume")


@pytest.mark.shared
def test_stage70_edge_cases_end_in_one_line(trained, tmp_path, capsys):
    base = ["--data-dir", str(trained), "--model", "mf"]
    capsys.readouterr()
    assert run_main(recommend_main, [*base, "--user", "abc"]) == 1
    assert "the id is not an integer" in capsys.readouterr().err
    f = tmp_path / "users.txt"
    f.write_text("999999\n888888\n")
    assert run_main(recommend_main, [*base, "--batch", str(f), "--out",
                                     str(tmp_path / "r.csv"), "--no-fallback"]) == 1
    assert "none of its 2 user ids is known" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert run_main(recommend_main, [*base, "--batch", "all", "--out",
                                     str(blocker / "r.csv")]) == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err


def test_a_pickled_checkpoint_is_refused_in_one_line(tmp_path):
    from recpipe.checkpoint import load_model

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "60_train" / "mf"
    d.mkdir(parents=True)
    with open(d / "model.pt", "wb") as fh:
        pickle.dump({"model": "mf", "obj": Evil()}, fh)
    torch.save({"model": "mf", "obj": Evil()}, d / "model.pt")
    with pytest.raises(PipelineError) as e:
        load_model(d)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only=False" not in msg and "pickled" in msg


def test_help_says_where_preset_defaults_come_from():
    out = run_script("60_train.py", "--help").stdout
    assert "(default: None)" not in out and "preset" in out


def test_next_hint_quotes_a_data_dir_with_spaces(tmp_path, shared_data):
    d = tmp_path / "my data"
    write_ml100k_stage10(d, shared_data)
    p = run_script("20_make_ids.py", "--data-dir", str(d))
    assert f"--data-dir '{d}'" in p.stderr


def test_cp1252_titles_keep_their_punctuation():
    from recpipe.readers.text import decode_text
    assert decode_text("It\u2019s \u2013 \u20ac5".encode("cp1252")) == "It\u2019s \u2013 \u20ac5"
    assert decode_text("caf\u00e9".encode("latin-1")) == "caf\u00e9"
    assert decode_text(b"\x81\xe9") == "\x81\u00e9"          # undefined in cp1252: latin-1
