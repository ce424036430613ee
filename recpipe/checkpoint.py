"""Checkpoints and the device choice, shared by stage 60 (writes) and stage 70 (reads).

``model.pt`` is a dict of plain values: the family name, its constructor arguments, the
state_dict, the task and the resolved config; it loads with ``torch.load(...,
weights_only=True)`` (no pickled objects). The RNG state helpers make ``--resume`` continue
exactly.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import atomic_write
from .cli import PipelineError
from .family import family


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when torch sees a device, else the CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{flag} cuda was asked for but torch sees no CUDA device "
                            f"(torch {torch.__version__}); use {flag} cpu or {flag} auto")
    return torch.device(name)


def save(obj: Any, path: Path) -> None:
    """torch.save under a temporary name, then rename (never a half-written file)."""
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:     # torch's writer reports a full disk this way
            if "write" not in str(e).lower():
                raise
            raise PipelineError(f"{path}: cannot write the checkpoint ({_first_line(e)}); "
                                f"free disk space or choose another --data-dir") from None


def train_command(model_dir: Path) -> str:
    return (f"python 60_train.py --model {Path(model_dir).name} "
            f"--data-dir {shlex.quote(str(Path(model_dir).parent.parent))}")


def _first_line(e: Exception) -> str:
    """One line for a failed load. torch's refusal of pickled objects is several lines and
    suggests weights_only=False, which would run arbitrary code from the file: not offered."""
    import pickle
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ("it holds pickled Python objects, which are not loaded (only plain tensors "
                "and values, torch.load(weights_only=True))")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def build(meta: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The model a checkpoint describes (dense tables), weights loaded, in eval mode."""
    args = dict(meta["model_args"])
    args["sparse"] = False
    try:
        cls = family(meta["model"])
    except ValueError as e:
        raise PipelineError(f"{e}: the checkpoint names a model family this version does not "
                            f"have") from None
    model = cls(meta["n_users"], meta["n_items"], **args)
    model.load_state_dict(meta["state_dict"])
    return model.to(device).eval()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               filename: str = "model.pt") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, metadata) from DIR/model.pt (weights_only load).

    ``filename="selected.pt"`` loads the model selected on validation before the refit
    (trained on train only; written only when the run refitted)."""
    path = Path(model_dir) / filename
    if not path.exists():
        raise PipelineError(f"{path} not found: train the model first with "
                            f"`{train_command(Path(model_dir))}`")
    try:
        meta = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a user-level error
        raise PipelineError(f"{path} is unreadable: {_first_line(e)}; retrain with "
                            f"`{train_command(Path(model_dir))}`") from None
    return build(meta, device), meta


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    gen.set_state(st["generator"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
