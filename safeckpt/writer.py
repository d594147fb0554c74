"""The one writer: single files and multi-file sets, on any storage.

Every save (the seed API, convert, the manager, ``distributed``) goes through
here. A state is *planned* first (encoded now, so a caller may change it
afterwards), then its files are written into a :class:`~safeckpt.storage.Storage`,
each whole or not at all; a set's manifest is written last and is its commit
point. After it commits, the files the set's previous manifest named and the new
one does not are removed (never any other file).

``format="auto"`` writes the safe format when the state allows it, else
``torch.save``, with one :class:`FallbackWarning` pointing at the caller's line;
what neither format can hold raises :class:`UnsupportedValueError` naming the
path in the state.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import posixpath
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Union

import numpy as np
import torch

from .container import Encoded, encode_state, single_header, skeleton_file_bytes, write_single
from .errors import FallbackWarning, UnsupportedValueError
from .limits import DEFAULT_LIMITS
from .multifile import manifest_bytes, old_components, source_digest
from .storage import FileRecord, Storage
from .stream import hash_parts, pieces

__all__ = [
    "FORMATS",
    "TorchValue",
    "check_format",
    "plan_multi",
    "plan_single",
    "stream_single",
    "write_files",
    "write_set",
]

FORMATS = ("safe", "torch", "auto")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class TorchValue:
    """A value to write with ``torch.save`` (format ``"torch"``, or ``"auto"`` after a fallback)."""

    value: Any
    path_in_state: str = "state"
    reason: str = ""  # why the safe format could not hold it (auto)


Payload = Union[Encoded, bytes, TorchValue]


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside safeckpt: warnings point at the user's line."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


# --------------------------------------------------------------------------- planning


def _encode_or_fallback(state: Mapping[Any, Any], format: str, **options: Any) -> Encoded | TorchValue:
    if format == "torch":
        return TorchValue(state)
    try:
        return encode_state(state, DEFAULT_LIMITS, **options)
    except UnsupportedValueError as exc:
        if format != "auto":
            raise
        return TorchValue(state, exc.path_in_state or "state", str(exc))


class _Discard:
    """A write-only sink: ``torch.save`` into it tells whether it can hold a value, writing nothing."""

    def write(self, data: Any) -> int:
        return len(memoryview(data))

    def flush(self) -> None:
        pass


def _check_torch_holds(values: list[TorchValue]) -> None:
    """Before anything is written: raise UnsupportedValueError if torch.save cannot hold what auto fell back for."""
    for value in values:
        try:
            torch.save(value.value, _Discard())
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise UnsupportedValueError(
                f"{value.path_in_state} can be stored neither in the safe format ({value.reason}) "
                f"nor by torch.save ({type(exc).__name__}: {exc})",
                path_in_state=value.path_in_state,
            ) from exc


def plan_single(state: Mapping[Any, Any], name: str, format: str) -> list[tuple[str, Payload]]:
    """The file of a single-file checkpoint ``name``: ``[(name, payload)]``."""
    payload = _encode_or_fallback(state, format)
    if format == "auto" and isinstance(payload, TorchValue):
        _check_torch_holds([payload])
    return [(name, payload)]


def plan_multi(state: Mapping[Any, Any], base: str, keys: Iterable[str], format: str) -> list[tuple[str, Payload]]:
    """The component files of the set based at ``base`` (the manifest is added by :func:`write_set`).

    Safe components are ``{stem}_{key}.safetensors`` (with tensors) or ``.msgpack``
    (without), recording their key; ``torch.save`` components keep the seed's
    ``{stem}_{key}{ext}`` (``.pt`` when the base has no extension).
    """
    stem, ext = posixpath.splitext(base)
    keys = list(keys)
    planned = [_encode_or_fallback({key: state[key]}, format, dedupe=False, prefixed=False) for key in keys]
    fallback = next((p for p in planned if isinstance(p, TorchValue)), None)
    if fallback is not None:  # the whole set falls back, as the seed wrote it
        _check_torch_holds([TorchValue(state[key], fallback.path_in_state, fallback.reason) for key in keys])
        return [(f"{stem}_{key}{ext or '.pt'}", TorchValue(state[key], fallback.path_in_state, fallback.reason)) for key in keys]
    files: list[tuple[str, Payload]] = []
    for key, payload in zip(keys, planned):
        assert isinstance(payload, Encoded)
        payload.component = key
        if payload.entries:
            files.append((f"{stem}_{key}.safetensors", payload))
        else:
            files.append((f"{stem}_{key}.msgpack", skeleton_file_bytes(payload)))
    return files


# --------------------------------------------------------------------------- writing


def stream_single(f: BinaryIO, encoded: Encoded) -> tuple[int, str]:
    """Write a single-file checkpoint to ``f`` front to back, never seeking (object stores).

    The tensors are hashed first (one extra pass over memory), so the header with
    the final digests goes out before the data; tensors are read in pieces.

    Returns:
        (bytes written, SHA-256 of the length prefix and header).
    """
    entries = encoded.entries
    sizes = [entry.nbytes for entry in entries]

    def read(index: int, begin: int, end: int) -> np.ndarray:
        return entries[index].cpu_array(begin, end)

    head = single_header(encoded, hash_parts(sizes, read))
    f.write(head)
    for index, nbytes in enumerate(sizes):
        for begin, end in pieces(0, nbytes):
            f.write(read(index, begin, end).data)
    return len(head) + sum(sizes), hashlib.sha256(head).hexdigest()


def _torch_save(storage: Storage, rel: str, value: TorchValue) -> None:
    try:
        with storage.atomic_path(rel) as temp:  # a file of the final name: torch.save's archive name is the stem
            torch.save(value.value, temp)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise UnsupportedValueError(
            f"{value.path_in_state} cannot be stored by torch.save: {type(exc).__name__}: {exc}",
            path_in_state=value.path_in_state,
        ) from exc


def _write(storage: Storage, rel: str, payload: Payload, *, record: bool) -> FileRecord | None:
    if isinstance(payload, bytes):
        storage.write_bytes(rel, payload)
        return FileRecord(rel, len(payload), hashlib.sha256(payload).hexdigest())
    if isinstance(payload, TorchValue):
        _torch_save(storage, rel, payload)
        if not record:  # digesting a torch.save file reads it whole: only when a marker needs it
            return None
    elif storage.local_path(rel) is not None:
        with storage.atomic_path(rel) as temp, open(temp, "xb") as f:
            write_single(f, payload)  # seekable: parallel positioned writes, digests patched in
            f.flush()
    else:
        out: list[tuple[int, str]] = []
        storage.write_stream(rel, lambda f: out.append(stream_single(f, payload)))
        return FileRecord(rel, *out[0])
    with storage.open(rel) as source:
        return FileRecord(rel, source.size, source_digest(source, DEFAULT_LIMITS))


def write_files(
    storage: Storage, files: list[tuple[str, Payload]], *, format: str, record: bool = True
) -> list[FileRecord]:
    """Write planned files, each whole or not at all; warn once if ``auto`` fell back to torch.save.

    Returns the records of the files written (``torch.save`` files only with ``record``).
    """
    records = []
    for rel, payload in files:
        written = _write(storage, rel, payload, record=record)
        if written is not None:
            records.append(written)
    fallbacks = [(rel, p) for rel, p in files if isinstance(p, TorchValue)]
    if format == "auto" and fallbacks:
        names = ", ".join(storage.display(rel) for rel, _ in fallbacks)
        first = fallbacks[0][1]
        warnings.warn(
            f"{first.path_in_state} cannot be stored in the safe format ({first.reason}); wrote {names} with torch.save instead",
            FallbackWarning,
            stacklevel=_caller_stacklevel(),
        )
    return records


def write_set(
    storage: Storage, files: list[tuple[str, Payload]], keys: list[str], manifest: str, *, format: str, record: bool = False
) -> list[FileRecord]:
    """Write a set's component files, then its manifest (the commit point), then remove the
    files the previous manifest named that this one does not.

    A ``torch.save`` set is the seed's layout, without a manifest (on every
    backend; readers discover its files): writing one removes the previous
    manifest of the same base, which would otherwise describe a set that is gone.
    """
    previous = old_components(storage, manifest, DEFAULT_LIMITS)
    records = write_files(storage, files, format=format, record=record)
    directory = posixpath.dirname(manifest)
    if all(isinstance(payload, TorchValue) for _, payload in files):
        storage.remove(manifest)
        out = records
    else:
        entries = [replace(r, name=posixpath.basename(r.name), key=key) for key, r in zip(keys, records)]
        data = manifest_bytes(entries)
        storage.write_bytes(manifest, data)
        out = [*records, FileRecord(manifest, len(data), hashlib.sha256(data).hexdigest())]
    kept = {posixpath.basename(rel) for rel, _ in files}
    for name in sorted(previous - kept):
        storage.remove(posixpath.join(directory, name) if directory else name)
    return out
