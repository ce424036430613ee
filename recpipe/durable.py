"""Durable file-system primitives under the stage artifacts: atomic file writes (temporary
name, fsync, rename), folder swaps and their repair after a kill between the two renames,
removal of temporary files whose owner process is gone, and the per-stage kernel lock."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator, Sequence

from .cli import PipelineError, os_error_message

log = logging.getLogger("recpipe")


def stage_dir(data_dir: str | Path, stage: str) -> Path:
    """``DATA_DIR/<stage>/`` (a stage name may hold a slash: ``60_train/mf``)."""
    return Path(data_dir) / stage


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` owned by this process: ``.<name>.<kind>-<pid>`` (same
    folder, so the rename that publishes it is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 probes, sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # it exists, owned by another user
    except OSError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (names created, renamed, removed) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:   # some file systems cannot fsync a folder; nothing more to do there
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then its folders (deepest first)."""
    folders = []
    for root, dirs, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                _fsync_file(p)
        folders.append(Path(root))
    for d in reversed(folders):
        fsync_dir(d)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write a file under a temporary name and rename it into place only when the block ends
    without an error, so readers see the old file or the new one, never half of one:

        with atomic_write(out / "model.pt") as tmp:
            torch.save(obj, tmp)

    The file is fsynced before the rename and its folder after it (durable across a power
    loss). An OSError in the block or the rename (disk full, permission, ...) becomes one
    PipelineError line naming ``path``.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise PipelineError(os_error_message(e, path, "writing it")) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink()


def swap_folder(staged: Path, final: Path, fsync: bool = True) -> None:
    """Put the finished folder ``staged`` at ``final``, replacing what was there: the old one
    is renamed aside first, then removed after the new one is in place.

    ``staged``'s files and folders are fsynced first (``fsync``), the parent after the
    renames. A kill between the two renames leaves ``.<name>.old-<pid>`` and no ``final``:
    ``restore_interrupted_swap`` (called by StageOutput and read_manifest) puts it back."""
    staged, final = Path(staged), Path(final)
    if fsync:
        fsync_tree(staged)
    old = None
    if final.exists():
        old = temp_name(final, "old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    if fsync:
        fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _siblings(final: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, pid) of the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` beside ``final``."""
    out = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m and m["name"] == final.name:
            out.append((p, m["kind"], int(m["pid"])))
    return out


def restore_interrupted_swap(final: str | Path) -> Path | None:
    """When ``final`` is missing but a dead run's ``.<name>.old-<pid>`` is beside it (the run
    was killed between swap_folder's two renames), rename that back; returns it or None."""
    final = Path(final)
    if final.exists():
        return None
    olds = [(p, pid) for p, kind, pid in _siblings(final)
            if kind == "old" and pid != os.getpid() and not pid_alive(pid) and p.is_dir()]
    if not olds:
        return None
    olds.sort(key=lambda t: t[0].stat().st_mtime, reverse=True)   # the newest
    old = olds[0][0]
    try:
        os.replace(old, final)
    except OSError:          # another process restored it first, or a new final appeared
        return None
    fsync_dir(final.parent)
    log.info("restored %s from %s (a run was killed while replacing it)", final, old.name)
    return final


def remove_dead_temps(final: str | Path, extra: Sequence[Path] = ()) -> list[Path]:
    """Remove what killed runs left: ``.<name>.tmp-<pid>`` beside ``final``,
    ``.<name>.old-<pid>`` when ``final`` exists, and hidden ``.<file>.tmp-<pid>`` files inside
    ``final`` (and the folders ``extra``), each only when process ``pid`` is not alive."""
    final = Path(final)
    removed = []
    for p, kind, pid in _siblings(final):
        if pid == os.getpid() or pid_alive(pid):
            continue
        if kind == "old" and not final.exists():
            continue
        removed.append(p)
    for folder in [final, *extra]:
        try:
            entries = list(Path(folder).iterdir())
        except OSError:
            continue
        for p in entries:
            m = _TEMP_RE.match(p.name)
            if m and m["kind"] == "tmp" and int(m["pid"]) != os.getpid() \
                    and not pid_alive(int(m["pid"])):
                removed.append(p)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        log.debug("removed %s (left by a run that no longer exists)", p)
    return removed


def lock_path(data_dir: str | Path, stage: str) -> Path:
    """``DATA_DIR/.<stage, / replaced by _>.lock``."""
    return Path(data_dir) / f".{stage.replace('/', '_')}.lock"


@contextlib.contextmanager
def stage_lock(data_dir: str | Path, stage: str) -> Iterator[Path]:
    """Hold the write lock of ``DATA_DIR/<stage>`` for the block: a second run (any process)
    asking for it meanwhile is refused at once with one PipelineError line naming the PID
    and host that hold it.

    The lock is ``flock`` on ``DATA_DIR/.<stage>.lock`` (which holds "pid host"): the kernel
    releases it when its owner dies, so a killed run never leaves it stuck. The file is
    removed on release (while still locked; an acquirer checks it locked the file that is
    at the path, so removal races no one). Not re-entrant: nested use of one stage in one
    process is refused as well. Where the file system has no flock support it proceeds
    unlocked, with a warning."""
    data_dir = Path(data_dir)
    path = lock_path(data_dir, stage)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(os_error_message(e, data_dir, "creating the data folder",
                                             other="another --data-dir")) from None
    fd = -1
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PipelineError(os_error_message(e, path, f"locking stage {stage}",
                                                 other="another --data-dir")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            except OSError:
                holder = []
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            host = holder[1] if len(holder) > 1 else "unknown host"
            raise PipelineError(
                f"{stage_dir(data_dir, stage)} is being written by another run (PID {pid} on "
                f"{host}, lock {path}); wait for it to end or stop it (kill {pid} on {host}), "
                f"then run the command again") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOTSUP):
                os.close(fd)
                raise PipelineError(os_error_message(e, path, f"locking stage {stage}",
                                                     other="another --data-dir")) from None
            log.warning("%s: the file system does not support locks (%s); writing %s "
                        "unlocked", path, e.strerror, stage_dir(data_dir, stage))
            os.close(fd)
            fd = -1
            break
        # the file at the path may have been removed (released) between open and flock
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = -1
    else:
        raise PipelineError(f"{path}: could not take the lock of stage {stage} (it kept being "
                            f"replaced); run the command again")
    if fd >= 0:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    try:
        yield path
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
