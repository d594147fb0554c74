"""Tell checkpoint formats apart from their first bytes, never from the file name."""

from __future__ import annotations

import os
import struct
from enum import Enum

from .storage.local import open_file

__all__ = ["Kind", "detect", "detect_all", "detect_bytes", "kinds_bytes"]


class Kind(str, Enum):
    """What a file holds."""

    SAFETENSORS = "safetensors"  # a safeckpt single file or any plain safetensors file
    TORCH_ZIP = "torch-zip"  # torch.save of torch >= 1.6 (also TorchScript archives)
    TORCH_LEGACY = "torch-legacy"  # torch.save before 1.6, or a bare pickle
    MANIFEST = "manifest"  # a safeckpt multi-file manifest (JSON)
    SKELETON = "skeleton"  # a safeckpt component without tensors (msgpack)
    UNKNOWN = "unknown"


def detect(path: str | os.PathLike[str]) -> Kind:
    """The :class:`Kind` of the file at ``path``.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if it is not a regular file.
    """
    with open_file(path) as source:  # a regular file (a link to one is followed); never blocks on a FIFO
        return detect_bytes(source.read(0, min(source.size, 16)))


def detect_all(path: str | os.PathLike[str]) -> tuple[Kind, ...]:
    """Every :class:`Kind` the first bytes of ``path`` fit, most specific first (see :func:`kinds_bytes`).

    Raises:
        FileNotFoundError: if there is no such file.
    """
    with open_file(path) as source:
        return kinds_bytes(source.read(0, min(source.size, 16)))


def kinds_bytes(head: bytes) -> tuple[Kind, ...]:
    """Every kind ``head`` fits. More than one means a polyglot: a safetensors header
    whose length bytes spell ``PK\x03\x04`` is also what ``torch.load`` opens as a zip
    archive. :func:`detect_bytes` returns the first; ``scan`` scans them all."""
    found = []
    if len(head) >= 9 and struct.unpack("<Q", head[:8])[0] >= 2 and head[8:9] == b"{":
        found.append(Kind.SAFETENSORS)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        found.append(Kind.TORCH_ZIP)
    if head[1:8] == b"\xa6format" and 0x81 <= head[0] <= 0x8F:
        found.append(Kind.SKELETON)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        found.append(Kind.TORCH_LEGACY)
    if head.lstrip()[:1] == b"{":
        found.append(Kind.MANIFEST)
    return tuple(found) or (Kind.UNKNOWN,)


def detect_bytes(head: bytes) -> Kind:
    """The :class:`Kind` of a file from its first 16 bytes (local or fetched from remote storage)."""
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if length >= 2 and head[8:9] == b"{":  # a header cut short is still reported as safetensors
            return Kind.SAFETENSORS
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return Kind.TORCH_ZIP
    if head[1:8] == b"\xa6format" and 0x81 <= head[0] <= 0x8F:
        return Kind.SKELETON
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return Kind.TORCH_LEGACY
    if head.lstrip()[:1] == b"{":
        return Kind.MANIFEST
    return Kind.UNKNOWN
