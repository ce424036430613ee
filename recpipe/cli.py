"""Command-line plumbing shared by every numbered script.

One typed config (a dataclass) per stage; its fields are the flags, their defaults and help
live in one place. ``run_main`` turns user errors into one clear line and exit code 1 while
bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("recpipe")


class PipelineError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit 1.

    The message should say what went wrong, where (file:line), the offending value, what was
    expected, and the command that fixes it.
    """


# errno -> (what went wrong, what to do; {other} names the alternative location)
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "free space on that file system (or choose {other}) and run "
                                "the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or choose {other}) "
                                          "and run the command again"),
    errno.EACCES: ("permission denied", "make it accessible to this user (or choose {other}) "
                                        "and run the command again"),
    errno.EPERM: ("operation not permitted", "make it writable by this user (or choose "
                                             "{other}) and run the command again"),
    errno.EROFS: ("read-only file system", "choose {other} on a writable file system"),
    errno.ENOTDIR: ("not a folder", "choose {other} (or move that file away)"),
    errno.EISDIR: ("is a folder, expected a file", "move that folder away or pass a file"),
    errno.ENOENT: ("not found", "check the path and run the command again"),
    errno.EEXIST: ("already exists", "move it away and run the command again"),
    errno.EIO: ("input/output error", "the disk reported an error: check it, then run the "
                                      "command again"),
    errno.EXDEV: ("on another file system", "a folder built to be renamed into place must be "
                                            "on the file system of its destination"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run the command "
                                          "again"),
    errno.ENAMETOOLONG: ("name too long", "choose a shorter path"),
}


def file_in_path(path: Path) -> Path | None:
    """The first existing component of ``path`` that is not a folder (the cause of ENOTDIR)."""
    for p in [*reversed(Path(path).parents), Path(path)]:
        if p.exists() and not p.is_dir():
            return p
    return None


def os_error_message(e: OSError, path: str | Path | None = None, action: str | None = None,
                     hint: str | None = None, other: str = "another location") -> str:
    """One line for an OSError: ``<path>: <what>[, while <action>] (<strerror>); <hint>``.

    ``path`` is what was being read or written (default: the error's own filename);
    ``hint`` replaces the default advice for the error number, in which ``other`` names the
    alternative (e.g. "another --data-dir")."""
    where = path if path is not None else e.filename
    what, advice = _OS_ERRORS.get(e.errno, ("cannot access it", "check the path and run the "
                                                                "command again"))
    if e.errno == errno.ENOTDIR:
        blocker = file_in_path(Path(where if where is not None else e.filename or "."))
        if blocker is not None:
            what = f"{blocker} is a file, not a folder"
    if action:
        what = f"{what}, while {action}"
    reason = e.strerror or str(e) or type(e).__name__
    head = f"{where}: " if where is not None else ""
    return f"{head}{what} ({reason}); {hint or advice.format(other=other)}"


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, flag: str | None = None,
        short: str | None = None) -> Any:
    """A config field: default, help text and optional choices, all in one place."""
    meta = {"help": help, "choices": choices, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors also list every accepted option."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D401
        accepted = sorted({s for a in self._actions for s in a.option_strings})
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\naccepted options: {', '.join(accepted)}\n"
                     f"run `python {self.prog} --help` for details\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where the default is None: such
    an option's help says itself where its value comes from (e.g. the model's preset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(cfg_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser generated from a config dataclass."""
    parser = _Parser(prog=prog, description=description,
                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        meta = f.metadata
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [meta.get("flag") or "--" + f.name.replace("_", "-")]
        if meta.get("short"):
            names.insert(0, meta["short"])
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", ""), "default": default}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(tp)
            if origin in (list, tuple):
                (elem,) = typing.get_args(tp)[:1]
                kw["type"] = elem
                kw["nargs"] = "+"
            else:
                kw["type"] = Path if tp is Path else tp
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            kw["metavar"] = f.name.upper() if not meta.get("choices") else None
            if kw["metavar"] is None:
                del kw["metavar"]
        parser.add_argument(*names, **kw)
    return parser


def parse_config(cfg_cls: type, argv: Sequence[str] | None, prog: str, description: str):
    parser = build_parser(cfg_cls, prog, description)
    # under torchrun every rank parses the same line: --help and usage errors print once
    quiet = contextlib.ExitStack()
    if _rank() != 0:
        sink = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
    try:
        with quiet:
            ns = parser.parse_args(argv)
            cfg = cfg_cls(**vars(ns))
            check = getattr(cfg, "validate", None)
            if check is not None:
                try:
                    check()
                except PipelineError as e:
                    parser.error(str(e))
    except SystemExit:
        _let_rank0_report()
        raise
    return cfg


def _let_rank0_report(seconds: float = 5.0) -> None:
    """Under torchrun, a rank other than 0 that meets the same user error as rank 0 waits
    before exiting: its exit makes torchrun stop every rank, which could kill rank 0 before
    it has printed the one error line (rank 0's own exit ends this wait)."""
    if _rank() != 0:
        import time
        time.sleep(seconds)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as JSON-safe values."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def print_config(cfg: Any, prog: str) -> None:
    log.info("%s config: %s", prog, json.dumps(config_dict(cfg), sort_keys=True))


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as the user would type it again."""
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + " ".join(shlex.quote(a) for a in [prog, *args])


def set_seed(seed: int) -> None:
    """Seed every RNG the pipeline uses (Python, NumPy, torch when it is loaded)."""
    random.seed(seed)
    import numpy as np
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        import torch
        torch.manual_seed(seed)


def keep_freed_memory() -> None:
    """Let glibc reuse the memory freed by one training step for the next (Linux only).

    By default glibc maps every block over its adaptive threshold (at most 32 MiB) with its
    own mmap and unmaps it when freed, so each step of a large batch page-faults its
    temporaries in again (a fresh 32 MiB tensor costs about as much as gathering it). With
    the threshold fixed at 32 MiB and trimming above 1 GiB, those blocks come from the heap
    and are reused. Measured on the MF row path (gradient + RowSparseAdam step) at batch
    65,536 on 480k x 17,770 tables, one thread, three alternating runs on a busy machine:
    201-210 ms of CPU time per step against 232-268 ms without."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                        # musl or another libc: keep its defaults
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def training_numerics() -> None:
    """Stage 60's CPU numerics, which stage 70 and the benches set too, so that a model
    scores (and times) as it trained: subnormal floats flushed to zero (Adam moments and
    L2-shrunk embeddings decay into them, and they make CPU arithmetic 10-100x slower; EASE's
    recency weights reach 0.5 ** 140, and the last bits they change can swap a near-tie of a
    ranking), and glibc's freed blocks kept for reuse (``keep_freed_memory``)."""
    import torch
    torch.set_flush_denormal(True)
    keep_freed_memory()


class _TqdmHandler(logging.Handler):
    """Routes log lines through tqdm.write so they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger("recpipe")
    root.handlers.clear()
    h = _TqdmHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def progress_disabled() -> bool:
    """No bars when stderr is not a terminal (CI, logs) unless RECPIPE_PROGRESS=1."""
    env = os.environ.get("RECPIPE_PROGRESS")
    if env is not None:
        return env == "0"
    return not sys.stderr.isatty()


def _rank() -> int:
    """The process's rank under torchrun (0 without it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a script's main: user errors become one line and exit code 1.

    So does every OSError (disk full, permission denied, read-only file system, a file where
    a folder is expected, ...): the environment, not a bug (RECPIPE_VERBOSE=1 adds its
    traceback). Other exceptions keep their traceback."""
    setup_logging(os.environ.get("RECPIPE_VERBOSE") == "1")
    try:
        main(argv)
    except PipelineError as e:
        # under torchrun every rank meets the same user error: rank 0 reports it
        if _rank() == 0 or os.environ.get("RECPIPE_VERBOSE") == "1":
            print(f"error: {e}", file=sys.stderr)
        _let_rank0_report()
        return 1
    except OSError as e:
        if os.environ.get("RECPIPE_VERBOSE") == "1":
            import traceback
            traceback.print_exc()
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size or a machine with more RAM",
              file=sys.stderr)
        return 1
    return 0
