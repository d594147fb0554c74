"""Files on any fsspec backend (``s3://``, ``gs://``, ``memory://``...).

Atomicity, per backend:

- ``s3://`` (s3fs), ``gs://`` (gcsfs): an object appears whole when its upload
  completes; a write that fails in-process is aborted (``discard``), and the
  previous object at that key, if any, stays as it was;
- ``memory://``: each file is built in memory and stored in one step;
- other backends: whatever a completed ``open(..., "wb")`` gives.

Object stores have no links or special files; the rules of :mod:`.local` have
nothing to check here beyond refusing directories where files are expected.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointFormatError
from .base import ByteSource, Storage

__all__ = ["FsspecSource", "FsspecStorage", "url_to_fs"]


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url``."""
    import fsspec.core

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


class FsspecSource(ByteSource):
    """One object, read with range requests."""

    def __init__(self, fs: Any, path: str, name: str) -> None:
        self._fs = fs
        self._path = path
        self.name = name
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: no such file") from None
        if info.get("type") == "directory":
            raise CheckpointFormatError(f"{name} is a directory, not a file", file=name)
        self.size = int(info.get("size") or 0)

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        data = bytes(self._fs.cat_file(self._path, start=start, end=end))
        if len(data) != end - start:
            raise CheckpointFormatError(f"{self.name}: short read of bytes [{start}, {end})", file=self.name, offset=start)
        return data


class FsspecStorage(Storage):
    """Files under an fsspec location."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, fs: Any = None) -> None:
        if fs is None:
            self.fs, path = url_to_fs(url, storage_options)
        else:
            self.fs, path = fs, fs._strip_protocol(url)
        self.root = path.rstrip("/")
        self.url = url.rstrip("/")
        self._memory = type(self.fs).__name__ == "MemoryFileSystem"

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def display(self, rel: str) -> str:
        return posixpath.join(self.url, rel) if rel else self.url

    def child(self, rel: str) -> FsspecStorage:
        return FsspecStorage(self.display(rel), fs=self.fs)

    @contextlib.contextmanager
    def atomic_path(self, rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="safeckpt-") as tmp:
            temp = Path(tmp) / posixpath.basename(rel)
            yield temp
            self.write_bytes(rel, temp.read_bytes()) if self._memory else self.fs.put_file(os.fspath(temp), self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def write_stream(self, rel: str, fill: Callable[[BinaryIO], Any]) -> None:
        target = self._path(rel)
        if self._memory:  # memory:// files are visible while open: build the bytes, then store them at once
            buffer = io.BytesIO()
            fill(buffer)
            self.fs.pipe_file(target, buffer.getvalue())
            return
        existed = bool(self.fs.exists(target))
        f = self.fs.open(target, "wb")
        try:
            fill(f)
        except BaseException:
            self._abandon(f, target, existed)
            raise
        f.close()

    def _abandon(self, f: Any, target: str, existed: bool) -> None:
        """Drop a half-written upload: abort it (s3fs aborts the multipart upload) and never commit it.

        What a backend left at ``target`` is removed only when nothing was there before: on an
        object store the previous object is still the committed one, and stays.
        """
        with contextlib.suppress(Exception):
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
            f.closed = True  # closing would upload what was buffered
        if not existed:
            with contextlib.suppress(Exception):
                self.fs.rm_file(target)

    def makedirs(self, rel: str = "") -> None:
        if not self._memory or rel:
            with contextlib.suppress(Exception):
                self.fs.makedirs(self._path(rel), exist_ok=True)

    def open(self, rel: str) -> FsspecSource:
        return FsspecSource(self.fs, self._path(rel), self.display(rel))

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._path(rel)))

    def listdir(self, rel: str = "") -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        base = self._path(rel).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            listing = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return out
        for info in listing:
            name = posixpath.basename(info["name"].rstrip("/"))
            if name and info["name"].rstrip("/") != base:
                out[name] = None if info.get("type") == "directory" else int(info.get("size") or 0)
        return out

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def remove_tree(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(rel), recursive=True)
