"""Torch storages named by persistent ids, and the storages of a pre-1.6 stream.

A ``torch.save`` pickle names each storage by a persistent id
``('storage', <storage type>, key, location, numel[, view])`` (:func:`storage_pid`
checks its shape); pre-1.6 files also name an ``nn.Module`` class as
``('module', cls, file, source)`` (:func:`module_class`: kept as an inert reference).
:class:`StreamStorages` gives the storages of a pre-1.6 stream in one pass over
its pickles.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointFormatError
from ..limits import check_in_file
from ..refs import GlobalRef
from ..text import show
from .rebuild import StorageRef, StorageType

__all__ = ["StreamStorages", "element_size", "module_class", "storage_pid"]


def module_class(pid: Any) -> GlobalRef | None:
    """Pre-1.6 files store an ``nn.Module`` subclass as ``('module', cls, file, source)``:
    the class reference is kept (inert), its recorded source is ignored."""
    if type(pid) is tuple and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], GlobalRef):
        return pid[1]
    return None



def storage_pid(pid: Any, path: str) -> tuple[StorageType, str, str, int, Any]:
    """``(storage type, key, location, numel, view or None)`` of a storage's persistent id.

    Raises:
        CheckpointFormatError: if ``pid`` is not a well-formed storage reference.
    """
    if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage":
        raise CheckpointFormatError(f"{path}: persistent id {show(pid)} is not a torch storage")
    _, kind, key, location, numel = pid[:5]
    if not isinstance(kind, StorageType) or type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
        raise CheckpointFormatError(f"{path}: malformed storage reference {show(pid)}")
    return kind, key, location, numel, pid[5] if len(pid) == 6 else None


def element_size(kind: StorageType) -> int:
    """Bytes per element of a storage type (1 for untyped storage)."""
    return 1 if kind.dtype is None else kind.dtype.itemsize


class StreamStorages:
    """The storages of a pre-1.6 stream, read in one pass over its pickles.

    The stream holds the main pickle, then the list of storage keys, then each storage as an
    int64 element count and its bytes. Where a storage's bytes lie depends on the element size
    of every storage before it, which only the whole main pickle tells; and a tensor is made
    (and checked) over its storage's bytes as soon as the pickle names it. So each storage is
    allocated when the pickle first names it, in fresh memory (like ``torch.load``: a pre-1.6
    stream cannot be memory-mapped), and filled from the file once the key list gives the
    layout. What is allocated is bounded before allocating: the storages lie after the main
    pickle, so together they hold at most the rest of the file. No storage is handed out
    unfilled: a named storage with no data is an error.
    """

    def __init__(self, path: str, device: torch.device, f: BinaryIO, size: int) -> None:
        self._path = path
        self._device = device
        self._f = f
        self._size = size
        self._declared: dict[str, tuple[int, int, torch.Tensor]] = {}  # key -> (numel, itemsize, bytes)
        self._refs: dict[str, StorageRef] = {}
        self._allocated = f.tell()  # the main pickle starts here: the storages lie in the bytes after it

    def persistent_load(self, pid: Any) -> Any:
        path = self._path
        cls = module_class(pid)
        if cls is not None:
            return cls
        kind, key, _, numel, view = storage_pid(pid, path)
        root = self._refs.get(key)
        if root is None:
            root = self._refs[key] = self._allocate(key, kind, numel)
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3 or type(view[1]) is not int or type(view[2]) is not int:
            raise CheckpointFormatError(f"{path}: malformed storage view of {key!r:.50}", file=path)
        view_key, start, length = view
        part = self._refs.get(str(view_key))
        if part is not None:
            return part
        itemsize = element_size(kind)
        if start < 0 or length < 0 or (start + length) * itemsize > root.nbytes:
            raise CheckpointFormatError(f"{path}: storage view outside {key!r:.50}", file=path)
        part = StorageRef(
            str(view_key), kind.dtype, length * itemsize,
            partial(_slice, root, start * itemsize, (start + length) * itemsize),
        )
        self._refs[str(view_key)] = part
        return part

    def _allocate(self, key: str, kind: StorageType, numel: int) -> StorageRef:
        path = self._path
        itemsize = element_size(kind)
        nbytes = numel * itemsize
        self._allocated += nbytes
        check_in_file(  # before allocating: the storages follow the main pickle in the file
            self._allocated, self._size,
            lambda: f"{path}: the storages named up to {key!r:.50}", file=path,
        )
        data = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        self._declared[key] = (numel, itemsize, data)
        return StorageRef(key, kind.dtype, nbytes, partial(_same, data))

    def fill(self, keys: list[str], data_start: int) -> None:
        """Read each storage's bytes (after checking the layout against what the pickle declared).

        Raises:
            CheckpointFormatError: a storage the pickle names has no data, or disagrees with it.
            LimitExceededError: (``limit="file_size"``) a storage runs past the end of the file.
        """
        f, path = self._f, self._path
        filled: set[str] = set()
        offset = data_start
        for key in keys:
            f.seek(offset)
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointFormatError(f"{path}: truncated before storage {key!r:.50}", file=path)
            (count,) = struct.unpack("<q", head)
            declared = self._declared.get(key)
            if declared is None or count < 0:
                raise CheckpointFormatError(f"{path}: storage {key!r:.50} is not referenced or malformed", file=path)
            numel, itemsize, data = declared
            nbytes = count * itemsize
            check_in_file(offset + 8 + nbytes, self._size, partial(_storage_named, path, key), file=path)
            if count != numel:
                raise CheckpointFormatError(f"{path}: storage {key!r:.50} size disagrees with its data", file=path)
            if not data.is_meta:  # scanning: nothing to read
                _read_into(f, data, path, key)
            filled.add(key)
            offset += 8 + nbytes
        for key in self._declared:
            if key not in filled:
                raise CheckpointFormatError(f"{path}: storage {key!r:.50} has no data", file=path)


def _storage_named(path: str, key: str) -> str:
    return f"{path}: storage {key!r:.50}"


def _same(data: torch.Tensor) -> torch.Tensor:
    return data


def _slice(root: StorageRef, begin: int, end: int) -> torch.Tensor:
    return root.bytes()[begin:end]


def _read_into(f: BinaryIO, data: torch.Tensor, path: str, key: str) -> None:
    """Fill ``data`` (flat ``uint8``, any device) with the next ``data.numel()`` bytes of ``f``."""
    if not data.numel():
        return
    host = data if data.device.type == "cpu" else torch.empty(data.numel(), dtype=torch.uint8)
    view = host.numpy().data
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise CheckpointFormatError(f"{path}: storage {key!r:.50} is truncated", file=path)
        done += n
    if host is not data:
        data.copy_(host)
