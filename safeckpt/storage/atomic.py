"""Atomic local file writes: a checkpoint at a path is always the old one or the new one, whole.

The new file is written under its final name inside a private sibling directory
(``.<name>.<pid>-<token>.tmp/<name>``), flushed and fsynced, then renamed over
the target and the directory is fsynced. Writing under the final name keeps
``torch.save``'s archive name identical to a direct save. Leftovers of writers
that died (their pid is gone) are removed by the next save to the same path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_path", "atomic_write", "fsync_dir", "pid_alive"]


def fsync_dir(directory: Path) -> None:
    """Persist a rename or creation inside ``directory`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return
    for candidate in candidates:
        pid_text = candidate.name[len(prefix) : -len(".tmp")].partition("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path with the same file name; on success it replaces ``path`` atomically.

    The parent directory is created if missing. On any exception the temporary
    file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    workdir = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    workdir.mkdir()
    try:
        temp = workdir / target.name
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a fresh temporary file, then move it over ``path`` atomically."""
    with atomic_path(path) as temp:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
    return Path(path)
