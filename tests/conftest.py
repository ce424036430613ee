"""Shared test fixtures: the real data in ../shared/data, temp data folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with the reason when a fresh clone does not have it (session
    scope, so module-scoped fixtures that build pipelines from it can use it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set RECPIPE_SHARED_DATA to run)")
    return SHARED_DATA


def run_script(script: str, *args: str, check: bool = True, cwd: Path = ROOT,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a numbered script the way a user does; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RECPIPE_PROGRESS="0")
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
