"""The shared plumbing: typed configs, atomic stage folders, manifest chain checks."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import pytest

from recpipe.artifacts import StageOutput, read_manifest, upstream_entry
from recpipe.cli import PipelineError, opt, parse_config, run_main


@dataclasses.dataclass
class _Cfg:
    data_dir: Path = opt(Path("data"), "artifact folder")
    strategy: str = opt("random", "split strategy", choices=["random", "loo"])
    ratio: Optional[float] = opt(None, "a ratio")
    keep: bool = opt(False, "keep rows")


def test_config_parses_types_choices_and_bools():
    cfg = parse_config(_Cfg, ["--strategy", "loo", "--ratio", "0.25", "--keep",
                              "--data-dir", "x"], "t.py", "test")
    assert cfg == _Cfg(data_dir=Path("x"), strategy="loo", ratio=0.25, keep=True)
    assert parse_config(_Cfg, [], "t.py", "test") == _Cfg()


@pytest.mark.parametrize("argv", [["--bogus"], ["--strategy", "nope"], ["--ratio", "abc"]])
def test_config_rejects_bad_options_listing_accepted_ones(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, argv, "t.py", "test")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "accepted options:" in err and "--strategy" in err and "--data-dir" in err


def _write(data_dir: Path, stage: str, payload: str, **manifest) -> Path:
    with StageOutput(data_dir, stage) as out:
        out.path("payload.txt").write_text(payload)
        return out.commit(manifest)


def test_stage_output_is_atomic_and_keeps_previous_artifact_on_failure(tmp_path):
    final = _write(tmp_path, "10_preprocessing", "v1", n_ratings=1)
    with pytest.raises(RuntimeError):
        with StageOutput(tmp_path, "10_preprocessing") as out:
            out.path("payload.txt").write_text("half-written")
            raise RuntimeError("interrupted")
    assert (final / "payload.txt").read_text() == "v1"
    assert json.loads((final / "manifest.json").read_text())["n_ratings"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10_preprocessing"]  # no temp left


def test_manifest_chain_detects_missing_and_stale_upstream(tmp_path):
    with pytest.raises(PipelineError, match=r"python 10_preprocessing.py --data-dir .* --input PATH"):
        read_manifest(tmp_path, "10_preprocessing", needed_by="20_make_ids.py")
    _write(tmp_path, "10_preprocessing", "v1")
    _write(tmp_path, "20_make_ids", "ids", upstream=upstream_entry(tmp_path, "10_preprocessing"),
           command="python 20_make_ids.py --data-dir X --min-user-ratings 5")
    assert read_manifest(tmp_path, "20_make_ids")["stage"] == "20_make_ids"
    _write(tmp_path, "10_preprocessing", "v2")  # upstream rebuilt: 20 is now stale
    with pytest.raises(PipelineError, match="stale.*--min-user-ratings 5"):
        read_manifest(tmp_path, "20_make_ids")


def test_nested_stage_folder(tmp_path):
    final = _write(tmp_path, "60_train/mf", "model")
    assert final == tmp_path / "60_train" / "mf" and (final / "manifest.json").exists()


def test_run_main_turns_user_errors_into_exit_1(capsys):
    def main(argv):
        raise PipelineError("ratings.csv:3: rating 'x' is not a number")
    assert run_main(main, []) == 1
    assert capsys.readouterr().err.strip() == "error: ratings.csv:3: rating 'x' is not a number"
