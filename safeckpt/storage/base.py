"""The storage interface: what the layers above need from a local directory or an object store.

A :class:`Storage` is rooted at one directory (or prefix); every name it takes
is relative to that root (``"step_1/COMMITTED"``). A :class:`ByteSource` is one
file opened for reading: its size, byte ranges, and a memory mapping or local
path when the backend has them.
"""

from __future__ import annotations

import contextlib
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # numpy only names a return type here: `safeckpt scan` never loads it (start-up)
    import numpy as np

__all__ = ["ByteSource", "FileRecord", "Storage", "unmatched"]


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: the record the multi-file manifest, the manager's ``COMMITTED``
    marker and the sharded index keep of it (each writes it in its own format, see FORMAT.md).

    Attributes:
        name: the file, relative to its storage (a plain file name in a manifest, marker or index).
        size: its size in bytes.
        sha256: hex digest of the length prefix and header for a safetensors file (the header
            records every tensor's digest), of the whole file otherwise; ``None`` where the record
            keeps none (the sharded index checks its shards by size and by their headers).
        key: the state key of the component the file holds (manifest records); empty elsewhere.
    """

    name: str
    size: int
    sha256: str | None = None
    key: str = ""


def unmatched(records: Iterable[FileRecord], listing: Mapping[str, int | None]) -> tuple[list[FileRecord], list[str]]:
    """Compare ``records`` with a directory's ``listing`` (:meth:`Storage.listdir`): the records whose
    file it lacks (or holds as a directory) or holds at another size, and the names it holds that no
    record names, sorted."""
    records = list(records)
    recorded = {record.name for record in records}
    changed = [record for record in records if listing.get(record.name) != record.size]
    return changed, sorted(name for name in listing if name not in recorded)


class ByteSource:
    """One file opened for reading."""

    name: str  # the file as a path or URL, for messages
    size: int

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; a short read raises CheckpointFormatError."""
        raise NotImplementedError

    def head(self, n: int = 64 * 1024) -> bytes:
        """The first ``n`` bytes (fewer for a shorter file), read once and kept: the format check and
        the header usually take one read (one range request on remote storage)."""
        cached: bytes | None = getattr(self, "_head", None)
        want = min(self.size, n)
        if cached is None or len(cached) < want:
            cached = self.read(0, max(want, min(self.size, 64 * 1024)))
            self._head = cached
        return cached[:want]

    def mapping(self) -> np.ndarray | None:
        """The whole file as a private copy-on-write ``uint8`` mapping, where the backend has one."""
        return None

    @property
    def local_path(self) -> Path | None:
        """The file's local path, where there is one."""
        return None

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """The file as a local path: its own where it has one, else a temporary copy (named like the
        file, fetched in 64 MiB reads) that is removed when the block ends."""
        if self.local_path is not None:
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="safeckpt-") as tmp:
            temp = Path(tmp) / (posixpath.basename(self.name.rstrip("/")) or "file")
            with open(temp, "wb") as f:
                position = 0
                while position < self.size:
                    end = min(self.size, position + (1 << 26))
                    f.write(self.read(position, end))
                    position = end
            yield temp

    def close(self) -> None:
        """Release what the source holds; reading again reopens it."""

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage:
    """Files under one root. Subclasses: :class:`~.local.LocalStorage`, :class:`~.remote_fs.FsspecStorage`."""

    url: str  # the root as a path or URL

    def display(self, rel: str) -> str:
        """``rel`` as a path or URL for messages and return values."""
        raise NotImplementedError

    def child(self, rel: str) -> Storage:
        """The storage rooted at the directory ``rel`` (refused when it is a link)."""
        raise NotImplementedError

    def local_path(self, rel: str) -> Path | None:
        """The local path of ``rel`` (checked: no link below the root), or ``None`` on remote storage."""
        return None

    # writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic_path(self, rel: str) -> Iterator[Path]:
        """A temporary local path named like ``rel``; when the block succeeds it becomes ``rel``, whole."""
        raise NotImplementedError
        yield  # pragma: no cover

    def write_stream(self, rel: str, fill: Callable[[BinaryIO], Any]) -> None:
        """Write ``rel`` by calling ``fill(f)`` on a write-only file; the file appears whole or not at all."""
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` holding ``data``, whole or not at all."""
        self.write_stream(rel, lambda f: f.write(data))

    def makedirs(self, rel: str = "") -> None:
        raise NotImplementedError

    # reading -------------------------------------------------------------------------

    def open(self, rel: str) -> ByteSource:
        """Open a regular file for reading.

        Raises:
            FileNotFoundError: if it is missing.
            CheckpointFormatError: if it is a link below the root or not a regular file.
        """
        raise NotImplementedError

    def size(self, rel: str) -> int:
        with self.open(rel) as source:
            return source.size

    def read(self, rel: str, max_bytes: int = 16 << 20) -> bytes:
        """The whole of a small file, read only up to one byte past ``max_bytes``.

        Raises:
            ValueError: if the file holds more than ``max_bytes``.
        """
        with self.open(rel) as source:
            if source.size > max_bytes:
                raise ValueError(f"{self.display(rel)} is larger than {max_bytes} bytes")
            return source.read(0, source.size)

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def listdir(self, rel: str = "") -> dict[str, int | None]:
        """``{name: size}`` of the regular files and directories (``None``) under ``rel``; links are left out."""
        raise NotImplementedError

    # removing ------------------------------------------------------------------------

    def remove(self, rel: str) -> None:
        """Delete one file (never through a link); missing is fine."""
        raise NotImplementedError

    def remove_tree(self, rel: str) -> None:
        """Delete a directory and everything under it (never through a link); missing is fine."""
        raise NotImplementedError
