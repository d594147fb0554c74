"""Local files, and the trust-boundary rules for everything below a set's or a manager's root.

Inside its root a :class:`LocalStorage` never follows a symbolic link (every
directory below the root is ``lstat``-ed, every file is opened with
``O_NOFOLLOW``), never opens anything but a regular file (files are opened with
``O_NONBLOCK`` and checked with ``fstat``, so a FIFO cannot block a reader), and
never deletes through a link. The root itself, and a file the caller names
directly (:func:`open_file`), may be links: the caller chose them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointFormatError
from .atomic import atomic_path
from .base import ByteSource, Storage

if TYPE_CHECKING:
    import numpy as np

__all__ = ["LocalSource", "LocalStorage", "open_file", "open_regular"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def refused(path: str, what: str) -> CheckpointFormatError:
    """The error for a file-system entry safeckpt will not use."""
    return CheckpointFormatError(
        f"{path} {what}; safeckpt does not follow links or open special files inside a checkpoint, refused",
        file=path,
    )


def open_regular(path: str | os.PathLike[str], *, follow: bool) -> int:
    """A read-only descriptor of the regular file at ``path``; never blocks (a FIFO is refused, not opened for reading).

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if it is a link (``follow=False``) or not a regular file.
    """
    name = os.fspath(path)
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise refused(name, "is a symbolic link") from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no such file", name) from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket or a device without a reader
            raise refused(name, "is not a regular file") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise refused(name, "is a directory" if stat.S_ISDIR(info.st_mode) else "is not a regular file")
    return fd


class LocalSource(ByteSource):
    """A local regular file opened for reading (see :func:`open_regular`)."""

    def __init__(self, path: str | os.PathLike[str], *, follow: bool) -> None:
        self._path = Path(path)
        self._follow = follow
        self.name = os.fspath(path)
        self._fd: int | None = open_regular(self._path, follow=follow)
        self.size = os.fstat(self._fd).st_size

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = open_regular(self._path, follow=self._follow)
        return self._fd

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        fd = self._descriptor()
        parts = []
        position = start
        while position < end:
            chunk = os.pread(fd, min(end - position, 1 << 30), position)
            if not chunk:
                break
            parts.append(chunk)
            position += len(chunk)
        data = b"".join(parts)
        if len(data) != end - start:
            raise CheckpointFormatError(f"{self.name}: short read of bytes [{start}, {end})", file=self.name, offset=start)
        return data

    def mapping(self) -> np.ndarray:
        import numpy as np  # imported by the readers that map tensors, never by `safeckpt scan` (start-up)

        fd = self._descriptor()
        if os.fstat(fd).st_size == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), dtype=np.uint8)

    @property
    def local_path(self) -> Path:
        return self._path

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def open_file(path: str | os.PathLike[str]) -> LocalSource:
    """Open a file the caller named (it may be a link to a regular file; nothing else is opened)."""
    return LocalSource(path, follow=True)


class LocalStorage(Storage):
    """Files under a local directory, written atomically (temp file, fsync, rename, directory fsync)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.fspath(root))
        self.url = os.fspath(self.root)

    def display(self, rel: str) -> str:
        return os.path.join(self.url, rel) if rel else self.url

    def _checked(self, rel: str) -> Path:
        """The path of ``rel``, after checking that no directory between the root and it is a link."""
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise refused(self.display(rel), "leaves its directory")
        current = self.root
        for part in parts[:-1]:
            current = current / part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                break
            if stat.S_ISLNK(info.st_mode):
                raise refused(os.fspath(current), "is a symbolic link")
            if not stat.S_ISDIR(info.st_mode):
                raise refused(os.fspath(current), "is not a directory")
        return self.root.joinpath(*parts)

    def child(self, rel: str) -> LocalStorage:
        path = self._checked(rel)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise refused(os.fspath(path), "is a symbolic link")
        return LocalStorage(path)

    def local_path(self, rel: str) -> Path:
        return self._checked(rel)

    @contextlib.contextmanager
    def atomic_path(self, rel: str) -> Iterator[Path]:
        target = self._checked(rel)
        self._make_parents(target)
        with atomic_path(target) as temp:
            yield temp

    def write_stream(self, rel: str, fill: Callable[[BinaryIO], Any]) -> None:
        with self.atomic_path(rel) as temp, open(temp, "xb") as f:
            fill(f)
            f.flush()

    def _make_parents(self, target: Path) -> None:
        parent = target.parent
        if parent != self.root:
            self._checked(os.path.relpath(parent, self.root) + "/x")  # no link between the root and it
        parent.mkdir(parents=True, exist_ok=True)

    def makedirs(self, rel: str = "") -> None:
        if not rel:
            self.root.mkdir(parents=True, exist_ok=True)
            return
        path = self._checked(rel + "/x").parent
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise refused(os.fspath(path), "is a symbolic link")
        path.mkdir(parents=True, exist_ok=True)

    def open(self, rel: str) -> LocalSource:
        return LocalSource(self._checked(rel), follow=False)

    def exists(self, rel: str) -> bool:
        try:
            os.lstat(self._checked(rel))
        except FileNotFoundError:
            return False
        return True

    def listdir(self, rel: str = "") -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        try:
            directory = self._checked(rel + "/x").parent if rel else self.root
            if rel and stat.S_ISLNK(os.lstat(directory).st_mode):
                raise refused(os.fspath(directory), "is a symbolic link")
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        out[entry.name] = None
                    elif entry.is_file(follow_symlinks=False):
                        out[entry.name] = entry.stat(follow_symlinks=False).st_size
        except (FileNotFoundError, NotADirectoryError):
            pass
        return out

    def remove(self, rel: str) -> None:
        path = self._checked(rel)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise refused(os.fspath(path), "is a directory")
            os.unlink(path)  # a link is removed itself, never its target

    def remove_tree(self, rel: str) -> None:
        path = self._checked(rel)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise refused(os.fspath(path), "is a symbolic link")
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path)
            return
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks links inside, never follows them
