"""Runs several stage-60 trainings in one process (or one torchrun launch), copying each
run's folder to OUT/<label>: ``python tests/dist_runs.py OUT RUNS.json`` or
``torchrun --nproc_per_node 2 tests/dist_runs.py OUT RUNS.json``, RUNS.json a list of
[label, data_dir, model, [60_train.py arguments...]]. test_distributed.py launches it once per
world size instead of once per run (each launch imports torch in every process)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpipe import distributed  # noqa: E402
from recpipe.cli import setup_logging  # noqa: E402
from recpipe.train import main  # noqa: E402


def run(out: Path, runs: list) -> None:
    setup_logging()
    for label, data_dir, model, args in runs:
        main(["--data-dir", data_dir, "--model", model, *args])
        if distributed.current().leader:
            shutil.copytree(Path(data_dir) / "60_train" / model, out / label)


if __name__ == "__main__":
    run(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
