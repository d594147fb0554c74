"""The storage layer: where checkpoint bytes live (a local directory or an fsspec location).

Everything above it reads and writes through :class:`Storage` and
:class:`ByteSource`; :func:`is_url` is the one place that tells a URL from a
local path, and the trust-boundary rules for files inside a set or a manager
directory (no links followed, only regular files opened, nothing deleted
through a link) live in :mod:`.local`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .atomic import atomic_path, atomic_write, fsync_dir, pid_alive
from .base import ByteSource, FileRecord, Storage, unmatched
from .fsspec_store import FsspecSource, FsspecStorage
from .local import LocalSource, LocalStorage, open_file, open_regular
from .paths import is_url, join, display_path, split_location

__all__ = [
    "ByteSource",
    "FileRecord",
    "FsspecSource",
    "FsspecStorage",
    "LocalSource",
    "LocalStorage",
    "Storage",
    "atomic_path",
    "atomic_write",
    "fsync_dir",
    "is_url",
    "join",
    "local_text",
    "locate",
    "open_file",
    "open_regular",
    "open_source",
    "open_storage",
    "pid_alive",
    "display_path",
    "split_location",
    "unmatched",
]


def local_text(location: str | os.PathLike[str]) -> str | None:
    """The local path a location names (a path, or a ``file://`` URL without its scheme); ``None`` for
    any other URL."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return text.removeprefix("file://")
    return None if is_url(text) else text


def open_storage(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *, fs: Any = None) -> Storage:
    """The storage rooted at a directory: a local path, a ``file://`` URL, or any fsspec URL."""
    local = local_text(location)
    if local is not None and fs is None:
        return LocalStorage(local)
    return FsspecStorage(os.fspath(location), storage_options, fs=fs)


def locate(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *, fs: Any = None) -> tuple[Storage, str]:
    """``(storage of its directory, file name)`` for a file path or URL."""
    parent, name = split_location(path)
    return open_storage(parent, storage_options, fs=fs), name


def open_source(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> ByteSource:
    """Open a file the caller named: a local file (a link to one is followed) or an fsspec object."""
    local = local_text(path)
    if local is not None:
        return open_file(local)
    storage, name = locate(path, storage_options)
    return storage.open(name)
