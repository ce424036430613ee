"""The whole pipeline end to end, as a user runs it: scripts in order, then make."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

SCRIPTS = ["10_preprocessing.py", "20_make_ids.py", "30_split_train_test.py",
           "40_make_sparse_matrix.py", "60_train.py", "70_recommend.py"]
TINY_DEMO = ["--demo-users", "300", "--demo-items", "120", "--demo-ratings", "15000"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    out = run_script(script, "--help").stdout
    assert "usage:" in out and "--data-dir" in out


def test_scripts_end_to_end_on_tiny_demo(tmp_path):
    d = str(tmp_path / "data")
    run_script("10_preprocessing.py", "--data-dir", d, "--input", "demo", *TINY_DEMO)
    run_script("20_make_ids.py", "--data-dir", d)
    run_script("30_split_train_test.py", "--data-dir", d, "--strategy", "random", "--seed", "1")
    run_script("40_make_sparse_matrix.py", "--data-dir", d)
    run_script("60_train.py", "--data-dir", d, "--model", "mf", "--epochs", "8")
    metrics = json.loads((tmp_path / "data/60_train/mf/metrics.json").read_text())
    assert set(metrics) >= {"test", "valid", "best_epoch", "train_seconds", "config"}
    assert metrics["test"]["rmse"] < 1.3 and metrics["test"]["mae"] < metrics["test"]["rmse"]
    import pandas as pd
    user = pd.read_parquet(tmp_path / "data/20_make_ids/users.parquet").raw_user_id.iloc[0]
    rec = run_script("70_recommend.py", "--data-dir", d, "--model", "mf", "--user", str(user),
                     "-k", "5").stdout
    assert "Demo Movie" in rec or "title" in rec.lower(), rec


def test_stage_without_its_input_names_the_command(tmp_path):
    d = str(tmp_path / "empty")
    proc = run_script("30_split_train_test.py", "--data-dir", d, check=False)
    assert proc.returncode == 1
    assert "python 20_make_ids.py --data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_reruns_only_what_changed(tmp_path):
    d = tmp_path / "data"
    pre = "PRE_ARGS=" + " ".join(TINY_DEMO)
    base = ["make", "-C", str(ROOT), f"DATA={d}", f"PYTHON={sys.executable}", pre]

    def make(*extra, check=True):
        return subprocess.run([*base, *extra], capture_output=True, text=True, check=check,
                              env=dict(os.environ, RECPIPE_PROGRESS="0"))

    make("train", "TRAIN_ARGS=--epochs 2")
    assert (d / "60_train/mf/model.pt").exists()
    # nothing changed: make has nothing to do
    assert make("-q", "train", "TRAIN_ARGS=--epochs 2", check=False).returncode == 0
    # a stage-60 parameter changed: only stage 60 reruns
    dry = make("-n", "train", "TRAIN_ARGS=--epochs 3").stdout
    assert "60_train.py" in dry and "30_split_train_test.py" not in dry
    # a split parameter changed: 30, 40 and 60 rerun, 10 and 20 do not
    dry = make("-n", "train", "TRAIN_ARGS=--epochs 2", "SPLIT_ARGS=--seed 7").stdout
    assert "30_split_train_test.py" in dry and "40_make_sparse_matrix.py" in dry
    assert "10_preprocessing.py" not in dry and "20_make_ids.py" not in dry
