"""Reading a safetensors header: parsing and validating it, the digest checks, the skeleton root.

:func:`read_header` (a local file), :func:`read_header_from` (any
:class:`~safeckpt.storage.ByteSource`) and :func:`parse_header` parse and validate
the header of a safetensors file against :class:`Limits` before anything else is read;
:func:`verified_digests` checks what a safeckpt header declares; :func:`skeleton_bytes`
and :func:`parse_root` give the skeleton root. This module also
owns the metadata keys and the header digest (FORMAT.md 1.3), which the writing side
(:mod:`safeckpt.container`) reuses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import torch

from .errors import CheckpointFormatError, IntegrityError
from .detect import Kind, detect_bytes
from .limits import Limits, check_in_file
from .storage import ByteSource, open_file
from .tensors import DTYPES_FROM_SAFETENSORS, SAFETENSORS_DTYPES, check_dims

FORMAT_VERSION = 1
META_FORMAT = "format"  # "pt", as Hugging Face loaders expect
META_VERSION = "safeckpt.format_version"
META_SKELETON = "safeckpt.skeleton"
META_DIGESTS = "safeckpt.digests"
META_HEADER_DIGEST = "safeckpt.header_digest"
META_LIBRARY = "safeckpt.library_version"
META_TORCH = "safeckpt.torch_version"
META_CREATED = "safeckpt.created"
META_COMPONENT = "safeckpt.component"  # the key a multi-file component file holds (FORMAT.md)
DATA_ALIGNMENT = 64
DIGEST_PREFIX = "sha256:"
_VERSION = re.compile(r"[0-9]{1,9}\Z")
_HEAD_FETCH = 64 * 1024  # first read: the length prefix and, usually, the whole header


# --------------------------------------------------------------------------- the header digest


def _header_digest(metadata: Mapping[str, str], table_json: bytes) -> str:
    """SHA-256 of what the header declares (FORMAT.md 1.3): every ``__metadata__`` key and value but
    the header digest itself as canonical JSON (keys sorted), a newline, then the tensor table
    ``{name: {"dtype", "shape", "data_offsets"}}`` in data order as compact JSON. Padding and
    key order are layout, not meaning, and are not covered."""
    declared = {k: v for k, v in metadata.items() if k != META_HEADER_DIGEST}
    canonical = json.dumps(declared, sort_keys=True, separators=(",", ":")).encode("ascii")
    return hashlib.sha256(canonical + b"\n" + table_json).hexdigest()


def _table_json(table: Mapping[str, Any]) -> bytes:
    return json.dumps(table, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------- reading


class TensorInfo(NamedTuple):
    """One tensor entry of a safetensors header. Offsets are relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: str
    entries: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @property
    def is_safeckpt(self) -> bool:
        return META_SKELETON in self.metadata

    def digests(self) -> tuple[str, dict[str, str]] | None:
        """(skeleton digest, {entry: digest}) when the file records them."""
        text = self.metadata.get(META_DIGESTS)
        if text is None:
            return None
        body = text[len(DIGEST_PREFIX) :]
        if not text.startswith(DIGEST_PREFIX) or len(body) != 64 * (len(self.entries) + 1):
            raise CheckpointFormatError(f"malformed {META_DIGESTS} in the header", file=self.path)
        parts = [body[i : i + 64] for i in range(0, len(body), 64)]
        return parts[0], dict(zip(self.entries, parts[1:]))


def verified_digests(header: Header, skeleton: bytes) -> dict[str, str]:
    """Check what a safeckpt file's header declares, for ``verify=True``; return ``{entry: digest}``.

    The one place where digests are required and checked before anything is decoded: both
    digest keys must be there and well-formed, ``skeleton`` (the decoded skeleton bytes) must
    match its digest, and the header digest must match the header as parsed (every metadata
    key and value, every entry's name, dtype, shape and offsets). The entries' digests, which
    the header digest covers, are checked against their bytes as each entry is read.

    Raises:
        IntegrityError: a digest that is missing, unreadable or does not match; ``tensor_name``
            is ``"<header>"`` or ``"<skeleton>"``.
    """
    recorded = header.metadata.get(META_HEADER_DIGEST)
    try:
        digests = header.digests()
    except CheckpointFormatError:
        digests = None
    if recorded is None or digests is None or not _DIGEST.match(recorded) or not _DIGEST.match(
        header.metadata[META_DIGESTS][: len(DIGEST_PREFIX) + 64]
    ):
        raise IntegrityError(
            f"{header.path}: the header has no readable {META_HEADER_DIGEST} and {META_DIGESTS} to verify "
            "(the file was modified, or written by an earlier safeckpt that did not digest its header); "
            "load it with verify=False only if you trust it, and save it again (safeckpt convert OLD NEW) "
            "to record the digest",
            tensor_name="<header>",
            file=header.path,
        )
    _expect_digest(header.path, "<skeleton>", digests[0], hashlib.sha256(skeleton).hexdigest())
    table = {  # header.entries is in data order
        info.name: {"dtype": SAFETENSORS_DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
        for info in header.entries.values()
    }
    actual = _header_digest(header.metadata, _table_json(table))
    _expect_digest(header.path, "<header>", recorded[len(DIGEST_PREFIX) :], actual)
    return digests[1]


def _expect_digest(path: str, name: str, expected: str, actual: str) -> None:
    if actual != expected:
        what = "the skeleton" if name == "<skeleton>" else "the header (metadata or tensor table)"
        raise IntegrityError(
            f"{path}: {what} does not match its recorded SHA-256 digest (the file is corrupt or was modified)",
            tensor_name=name,
            expected=expected,
            actual=actual,
            file=path,
        )


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def _bad(path: str, message: str, offset: int | None = None) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}", file=path, offset=offset)


def read_header(path: str | os.PathLike[str], limits: Limits) -> Header:
    """Read and validate the header of a local safetensors file (a link to one is followed).

    Every declared size is checked against ``limits`` and the file size before
    it is read; offsets must tile the data section exactly, as safetensors requires.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if it is not a well-formed safetensors file (or not a regular file).
        LimitExceededError: if it declares more than ``limits`` allow.
    """
    with open_file(path) as source:
        return read_safetensors_header(source, limits)


def read_safetensors_header(source: ByteSource, limits: Limits) -> Header:
    """Read and validate the header of the safetensors file ``source`` (see :func:`read_header`).

    Reads the first 64 KiB, then the rest of the header if it is longer: one
    range request on remote storage for most files.
    """
    name, size = source.name, source.size
    head = source.head(_HEAD_FETCH)
    if len(head) < 8:
        raise _bad(name, f"file of {size} bytes is too short for a safetensors header")
    (length,) = struct.unpack("<Q", head[:8])
    limits.check("max_header_bytes", length, what="the safetensors header length", file=name)
    check_in_file(8 + length, size, lambda: f"{name}: the header length {length}", file=name)
    if 8 + length > len(head):
        head += source.read(len(head), 8 + length)
    return parse_header(name, head[8 : 8 + length], size, limits)


def read_header_from(source: ByteSource, limits: Limits) -> tuple[Kind, Header, bytes | None]:
    """The kind, header and (for a skeleton file) raw skeleton of a safetensors or skeleton file.

    Raises:
        CheckpointFormatError: for a file of another kind.
        LimitExceededError: if the header or skeleton is larger than ``limits`` allow.
    """
    name, size = source.name, source.size
    head = source.head(_HEAD_FETCH)
    kind = detect_bytes(head[:16])
    if kind is Kind.SKELETON:
        limits.check("max_skeleton_bytes", size, what="the skeleton file size", file=name)
        raw = head if size <= len(head) else head + source.read(len(head), size)
        return kind, Header(name, {}, {}, 0, size), raw
    if kind is not Kind.SAFETENSORS and len(head) >= 8:
        raise CheckpointFormatError(f"{name} is a {kind.value} file, not a safetensors file; use load() for other formats", file=name)
    return kind, read_safetensors_header(source, limits), None


def parse_header(name: str, raw: bytes, size: int, limits: Limits) -> Header:
    """Validate the JSON header ``raw`` of a safetensors file of ``size`` bytes (see :func:`read_header`).

    Used on bytes read from a local file or fetched from remote storage.
    """
    length = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(name, f"header is not valid JSON: {exc}", 8) from exc
    if type(header) is not dict:
        raise _bad(name, "header is not a JSON object", 8)
    metadata = header.pop("__metadata__", None) or {}
    if type(metadata) is not dict or not all(type(k) is str and type(v) is str for k, v in metadata.items()):
        raise _bad(name, "__metadata__ must map strings to strings", 8)
    limits.check("max_tensors", len(header), what="the number of tensors", file=name)
    data_size = size - 8 - length
    infos = []
    for key, spec in header.items():
        infos.append(_tensor_info(name, key, spec, limits, data_size))
    infos.sort(key=_by_offsets)
    position = 0
    for info in infos:
        if info.begin != position:
            raise _bad(name, f"tensor {info.name!r} starts at data byte {info.begin}, expected {position}")
        position = info.end
    if position != data_size:
        raise _bad(name, f"tensors cover {position} bytes but the data section holds {data_size}")
    return Header(name, {info.name: info for info in infos}, metadata, 8 + length, size)


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _by_offsets(info: TensorInfo) -> tuple[int, int]:
    return info.begin, info.end


def _tensor_info(path: str, name: str, spec: Any, limits: Limits, data_size: int) -> TensorInfo:
    # Runs once per tensor of every file opened: kept to plain, cheap checks.
    if type(spec) is not dict or spec.keys() != _ENTRY_KEYS:
        raise _bad(path, f"malformed header entry for tensor {name!r:.200}")
    dtype = DTYPES_FROM_SAFETENSORS.get(spec["dtype"]) if type(spec["dtype"]) is str else None
    shape, offsets = spec["shape"], spec["data_offsets"]
    if dtype is None:
        raise _bad(path, f"tensor {name!r:.200} has unknown dtype {spec['dtype']!r:.50}")
    if type(shape) is not list:
        raise _bad(path, f"tensor {name!r:.200} has a malformed shape")
    numel = check_dims(shape, what=f"tensor {name!r:.200}", limits=limits, file=path)
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise _bad(path, f"tensor {name!r:.200} has malformed data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"tensor {name!r:.200} has malformed data_offsets [{begin}, {end})")
    check_in_file(
        end, data_size, lambda: f"{path}: tensor {name!r:.200} at data bytes [{begin}, {end}), outside the data section,", file=path
    )
    if numel * dtype.itemsize != end - begin:
        raise _bad(path, f"tensor {name!r:.200} of shape {shape} needs {numel * dtype.itemsize} bytes, has {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


@dataclass
class Root:
    """The decoded top level of a skeleton: components still packed, decoded one at a time."""

    kind: str  # "dict" | "ordered_dict" | "value" (the state is its one component's value)
    attrs: bytes | None
    components: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    component: str | None = None  # a skeleton file's recorded component key


def skeleton_bytes(header: Header, limits: Limits) -> bytes:
    """The raw msgpack skeleton of a safeckpt file (version-checked, base64-decoded)."""
    version = header.metadata.get(META_VERSION, "")
    if not _VERSION.match(version):
        raise _bad(header.path, f"missing or malformed {META_VERSION}")
    if int(version) > FORMAT_VERSION:
        raise _bad(header.path, f"written in safeckpt format version {version}; this safeckpt reads up to {FORMAT_VERSION}, upgrade it")
    text = header.metadata[META_SKELETON]
    decoded_size = len(text) * 3 // 4 - len(text[-2:]) + len(text[-2:].rstrip("="))  # exact for valid base64
    limits.check("max_skeleton_bytes", decoded_size, what="the skeleton size", file=header.path)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(header.path, f"skeleton is not valid base64: {exc}") from exc


SKELETON_FILE_FORMAT = "safeckpt-skeleton"


def parse_root(raw: bytes, limits: Limits, path: str, *, standalone: bool = False) -> Root:
    """Decode the top level of a skeleton (plain msgpack, no extension types)."""
    try:
        root = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_array_len=max(limits.max_components + 1, 3),  # one past, so the check below names the limit
            max_map_len=16,
            max_bin_len=limits.max_skeleton_bytes,
            max_str_len=limits.max_str_len,
            max_ext_len=0,
        )
    except Exception as exc:
        raise _bad(path, f"skeleton root is corrupt: {type(exc).__name__}: {exc}") from exc
    if type(root) is not dict or root.get("root") not in ("dict", "ordered_dict", "value"):
        raise _bad(path, "skeleton root is malformed")
    if standalone:
        version = root.get("format_version")
        if root.get("format") != SKELETON_FILE_FORMAT or type(version) is not int:
            raise _bad(path, "not a safeckpt skeleton file")
        if version > FORMAT_VERSION:
            raise _bad(path, f"written in safeckpt format version {version}; this safeckpt reads up to {FORMAT_VERSION}, upgrade it")
    attrs, components, component = root.get("attrs"), root.get("components"), root.get("component")
    if not (attrs is None or type(attrs) is bytes) or type(components) is not list or not (component is None or type(component) is str):
        raise _bad(path, "skeleton root is malformed")
    limits.check("max_components", len(components), what="the number of components", file=path)
    parsed = []
    for item in components:
        if not (
            type(item) is list
            and len(item) == 3
            and type(item[0]) is bytes
            and type(item[1]) is str
            and type(item[2]) is bytes
        ):
            raise _bad(path, "skeleton component is malformed")
        parsed.append((item[0], item[1], item[2]))
    if root["root"] == "value" and (len(parsed) != 1 or attrs is not None):
        raise _bad(path, "a skeleton whose root is a value must hold exactly one component and no attributes")
    return Root(root["root"], attrs, parsed, component if standalone else None)
