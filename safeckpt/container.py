"""The single-file layout, writing side: encoding a state and writing the file.

See FORMAT.md for the byte-level specification. :func:`encode_state` turns a
state into a skeleton root plus tensor entries, :func:`single_header` builds the
header, :func:`write_single` streams them to a file (hashing each region as it
goes), :func:`skeleton_file_bytes` gives a standalone skeleton file. Reading
(header parsing and validation, digest checks, the skeleton root) lives in
:mod:`safeckpt.header`; its names are re-exported here.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

from .codec import Encoder, pack
from .errors import UnsupportedValueError
from .header import (
    DATA_ALIGNMENT,
    DIGEST_PREFIX,
    FORMAT_VERSION,
    META_COMPONENT,
    META_CREATED,
    META_DIGESTS,
    META_FORMAT,
    META_HEADER_DIGEST,
    META_LIBRARY,
    META_SKELETON,
    META_TORCH,
    META_VERSION,
    SKELETON_FILE_FORMAT,
    Header,
    Root,
    TensorInfo,
    _header_digest,
    _table_json,
    parse_header,
    parse_root,
    read_header,
    skeleton_bytes,
    verified_digests,
)
from .limits import Limits
from .stream import open_stream
from .tensors import Entry, NameAllocator, TensorPlan
from .text import segment
from .version import __version__

# The reading side lives in .header; its names stay importable from here.
__all__ = [
    "DATA_ALIGNMENT",
    "DIGEST_PREFIX",
    "FORMAT_VERSION",
    "META_COMPONENT",
    "META_CREATED",
    "META_DIGESTS",
    "META_FORMAT",
    "META_HEADER_DIGEST",
    "META_LIBRARY",
    "META_SKELETON",
    "META_TORCH",
    "META_VERSION",
    "SKELETON_FILE_FORMAT",
    "Encoded",
    "Header",
    "Root",
    "TensorInfo",
    "encode_state",
    "parse_header",
    "parse_root",
    "read_header",
    "single_header",
    "skeleton_bytes",
    "skeleton_file_bytes",
    "verified_digests",
    "write_single",
]

_new_digest = hashlib.sha256  # per tensor (the benchmarks swap in a no-op to measure hashing's share)


# --------------------------------------------------------------------------- encoding a state


@dataclass
class Encoded:
    """A state ready to be written: the skeleton root (and its packed bytes) and the tensor entries in file order."""

    root: dict[str, Any]
    entries: list[Entry]
    component: str | None = None  # the key of a multi-file component, recorded in the file
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    @functools.cached_property
    def skeleton(self) -> bytes:
        return pack(self.root)


def _segment(key: Any) -> str:
    """A component's name prefix: ``str(key)`` with ``%`` and ``/`` escaped, so that the
    text before an entry name's first ``/`` always names its component."""
    text = segment(key).replace("%", "%25").replace("/", "%2F")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


ROOT_VALUE_SEGMENT = "root"  # the entry-name prefix of a root that is not a dict (FORMAT.md section 2)


def encode_state(
    state: Any, limits: Limits, *, dedupe: bool = True, prefixed: bool = True, any_root: bool = False
) -> Encoded:
    """Encode a state dict into a skeleton root and tensor entries.

    Args:
        state: a ``dict`` or ``OrderedDict`` (with ``any_root``, any value the
            format holds); it is only read.
        limits: ``max_depth`` applies to what is saved.
        dedupe: store tied tensors once (see :class:`TensorPlan`).
        prefixed: name tensors ``<component>/<path>``; ``False`` names them by the
            path inside their component (multi-file components).
        any_root: store a root that is not a dict (a tensor, a list, an object)
            as root kind ``"value"``: one component whose value is the root.

    Raises:
        UnsupportedValueError: naming the path of a value the format cannot hold.
    """
    if any_root and type(state) not in (dict, OrderedDict):
        plan = TensorPlan(NameAllocator(), dedupe=dedupe)
        encoder = Encoder(plan, limits)
        encoder.prefix = ROOT_VALUE_SEGMENT
        value = encoder.encode(state, (ROOT_VALUE_SEGMENT,))  # entry names root, root/0, root/1/a...
        entries = plan.finalize()
        root: dict[str, Any] = {"root": "value", "attrs": None, "components": [[pack(None), ROOT_VALUE_SEGMENT, pack(value)]]}
        return Encoded(root, entries)
    if type(state) not in (dict, OrderedDict):
        raise UnsupportedValueError(
            f"a checkpoint state must be a dict or OrderedDict, not {type(state).__qualname__}",
            path_in_state="state",
            value_type=type(state).__qualname__,
        )
    plan = TensorPlan(NameAllocator(), dedupe=dedupe)
    encoder = Encoder(plan, limits)
    segments = NameAllocator()
    components = []
    for key, value in state.items():
        segment = encoder.prefix = segments.claim(_segment(key)) if prefixed else ""
        components.append([encoder.encode(key, (key,)), segment, encoder.encode(value, (key,))])
    encoder.prefix = segments.claim("__dict__")
    encoded_attrs = encoder.encode_attrs(state, (), 1) if type(state) is OrderedDict else None
    entries = plan.finalize()  # fills the tensor references inside the encoded values
    root = {
        "root": "ordered_dict" if type(state) is OrderedDict else "dict",
        "attrs": None if encoded_attrs is None else pack(encoded_attrs),
        "components": [[pack(k), segment, pack(v)] for k, segment, v in components],
    }
    return Encoded(root, entries)


# --------------------------------------------------------------------------- writing


def _placeholder_digests(count: int) -> str:
    return DIGEST_PREFIX + "0" * 64 * (count + 1)


def _table(entries: list[Entry]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    offset = 0
    for entry in entries:
        table[entry.name] = {"dtype": entry.code, "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    return table


def _header_bytes(entries: list[Entry], metadata: dict[str, str], *, placeholder: bool) -> bytes:
    table = _table_json(_table(entries))
    metadata[META_HEADER_DIGEST] = DIGEST_PREFIX + ("0" * 64 if placeholder else _header_digest(metadata, table))
    raw = b'{"__metadata__":' + json.dumps(metadata, separators=(",", ":")).encode("ascii")
    raw += b"," + table[1:] if len(table) > 2 else b"}"
    return raw + b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)


def single_header(encoded: Encoded, digests: list[str] | None = None) -> bytes:
    """The length prefix and JSON header of a single file; ``None`` digests give the placeholder
    of the same length, written first and replaced once the data is hashed."""
    skeleton = encoded.skeleton
    metadata = {
        META_FORMAT: "pt",
        META_VERSION: str(FORMAT_VERSION),
        META_LIBRARY: __version__,
        META_TORCH: str(torch.__version__),
        META_CREATED: encoded.created,
        **({} if encoded.component is None else {META_COMPONENT: encoded.component}),
        META_SKELETON: base64.b64encode(skeleton).decode("ascii"),
        META_DIGESTS: _placeholder_digests(len(encoded.entries))
        if digests is None
        else DIGEST_PREFIX + hashlib.sha256(skeleton).hexdigest() + "".join(digests),
    }
    header = _header_bytes(encoded.entries, metadata, placeholder=digests is None)
    return struct.pack("<Q", len(header)) + header


def write_single(f: BinaryIO, encoded: Encoded) -> None:
    """Write a single-file checkpoint to the empty binary file ``f`` (seekable, with a descriptor) and fsync it."""
    placeholder = single_header(encoded)
    head = np.frombuffer(placeholder, dtype=np.uint8)
    entries = encoded.entries

    def read(index: int, begin: int, end: int) -> np.ndarray:
        return head[begin:end] if index == 0 else entries[index - 1].cpu_array(begin, end)

    sizes = [len(placeholder), *(entry.nbytes for entry in entries)]
    with open_stream(f, sum(sizes)) as stream:
        digests = stream.write(sizes, read, hold=len(placeholder), new_digest=_new_digest)[1:]  # [0]: the header's
        final = single_header(encoded, digests)
        assert len(final) == len(placeholder), "digests must not change the header length"
        stream.finish(final)


def skeleton_file_bytes(encoded: Encoded) -> bytes:
    """A component without tensors as a standalone msgpack file (FORMAT.md section 3)."""
    component = {} if encoded.component is None else {"component": encoded.component}
    return pack({"format": SKELETON_FILE_FORMAT, "format_version": FORMAT_VERSION, **component, **encoded.root})
