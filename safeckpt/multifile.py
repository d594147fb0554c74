"""The multi-file layout: one file per component and a manifest written last.

For a base path ``models/m.pth`` and a component key ``k``:

- ``models/m_k.safetensors`` holds a component with tensors (a safeckpt single
  file whose tensors are named by their path *inside* the component, so a
  ``model_state_dict`` file holds exactly the state-dict keys);
- ``models/m_k.msgpack`` holds a component without tensors (a skeleton file);
- ``models/m.safeckpt.json`` is the manifest: format version, components, their
  files, sizes and SHA-256 digests. It is written last and is the commit point.

A manifest may only name plain file names in its own directory, and is
recognised by its ``format`` marker and schema only: any other JSON is not a
checkpoint. Every function here works on a :class:`~safeckpt.storage.Storage`
(local or fsspec); the ``path`` variants are the local shorthand the CLI uses.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .container import FORMAT_VERSION
from .detect import Kind, detect_bytes
from .errors import CheckpointFormatError, ComponentFileMissingError, IntegrityError
from .limits import Limits
from .storage import ByteSource, FileRecord, Storage, locate, open_file
from .text import show
from .version import __version__

__all__ = [
    "DEFAULT_KEYS",
    "MANIFEST_FORMAT",
    "Manifest",
    "check_entry",
    "check_keys",
    "component_path",
    "discover",
    "file_digest",
    "find_manifest",
    "manifest_path",
    "read_manifest",
    "manifest_bytes",
]

DEFAULT_KEYS = ("model_state_dict", "optimizer_state_dict", "model_kwargs")
MANIFEST_FORMAT = "safeckpt-multi"
MANIFEST_SUFFIX = ".safeckpt.json"
SAFETENSORS_SUFFIX = ".safetensors"
SKELETON_SUFFIX = ".msgpack"


def split_base(path: str | os.PathLike[str]) -> str:
    """``models/m.pth`` -> ``models/m``: what component and manifest names start with."""
    return os.path.splitext(os.fspath(path))[0]


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest of the set whose base path is ``path``."""
    return Path(split_base(path) + MANIFEST_SUFFIX)


def component_path(path: str | os.PathLike[str], key: str, *, has_tensors: bool) -> Path:
    """Where component ``key`` of the set based at ``path`` is written."""
    return Path(f"{split_base(path)}_{key}{SAFETENSORS_SUFFIX if has_tensors else SKELETON_SUFFIX}")


def _is_plain_name(name: Any) -> bool:
    """A non-empty str naming an entry of a directory: no separator, NUL, ``.`` or ``..``."""
    return (
        type(name) is str
        and name not in ("", ".", "..")
        and not any(sep in name for sep in ("/", "\\", "\0", os.altsep or "/"))
    )


def check_keys(keys: Iterable[Any]) -> list[str]:
    """Validate ``keys_to_save``: each must be a safe file-name fragment.

    Raises:
        ValueError: naming the first key that is empty, not a str, or holds a
            path separator, ``..`` or a NUL byte.
    """
    if isinstance(keys, (str, bytes)):
        raise ValueError(f"keys_to_save must be a list of keys, not the single string {keys!r}")
    checked = []
    for key in keys:
        if not _is_plain_name(key) or ".." in key:
            raise ValueError(
                f"keys_to_save entry {key!r} is not a safe file-name fragment "
                "(it must be a non-empty str without path separators, '..' or NUL)"
            )
        checked.append(key)
    if len(set(checked)) != len(checked):
        raise ValueError(f"keys_to_save has duplicates: {checked}")
    return checked


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """A read manifest: one :class:`~safeckpt.storage.FileRecord` per component (its ``key``, its
    ``name`` in the manifest's directory, ``size`` and ``sha256``: see :func:`source_digest`)."""

    path: Path | str  # the manifest, as a path or URL
    entries: tuple[FileRecord, ...]
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return posixpath.basename(str(self.path)) if "://" in str(self.path) else Path(self.path).name

    def file(self, entry: FileRecord) -> Path:
        """The local path of a component (local manifests)."""
        return Path(self.path).parent / entry.name


def source_digest(source: ByteSource, limits: Limits) -> str:
    """The digest a manifest (or a step's marker) records for a file: of the length prefix and JSON
    header of a safetensors file (which record the digests of every tensor and of the skeleton),
    of the whole file otherwise."""
    head = source.head()[:16]
    length = source.size
    if detect_bytes(head) is Kind.SAFETENSORS:
        (declared,) = struct.unpack("<Q", head[:8])
        limits.check("max_header_bytes", declared, what="the safetensors header length", file=source.name)
        length = min(source.size, 8 + declared)
    digest = hashlib.sha256()
    position = 0
    while position < length:
        end = min(length, position + (1 << 24))
        digest.update(source.read(position, end))
        position = end
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str], limits: Limits) -> str:
    """:func:`source_digest` of a local file."""
    with open_file(path) as source:
        return source_digest(source, limits)


def manifest_bytes(entries: Sequence[FileRecord]) -> bytes:
    """The JSON text of a manifest for ``entries`` (records with a ``key`` and a ``sha256``)."""
    document = {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "components": [
            {"key": e.key, "file": e.name, "size": e.size, "sha256": e.sha256} for e in entries
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _bad(path: Path | str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}", file=str(path))


def _encodable(name: str) -> bool:
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeError:
        return False


def _safe_file_name(path: Path | str, name: Any) -> str:
    if not _is_plain_name(name) or not _encodable(name) or os.path.isabs(name) or Path(name).name != name:
        raise _bad(path, f"manifest names {name!r:.200}, which is not a file in the manifest's directory; refused")
    return name


def read_manifest(path: str | os.PathLike[str], limits: Limits) -> Manifest:
    """Read and validate a local manifest (see :func:`read_manifest_in`)."""
    storage, name = locate(path)
    manifest = read_manifest_in(storage, name, limits)
    return Manifest(Path(path), manifest.entries, manifest.metadata)


def read_manifest_in(storage: Storage, rel: str, limits: Limits) -> Manifest:
    """Read and validate the manifest ``rel`` of ``storage``.

    Raises:
        CheckpointFormatError: if it is not a safeckpt manifest (any other JSON), is
            malformed, or names a file outside its directory.
        LimitExceededError: if it is larger or lists more components than ``limits`` allow.
    """
    with storage.open(rel) as source:
        return manifest_from(source, limits)


def manifest_from(source: ByteSource, limits: Limits) -> Manifest:
    """Read and validate the manifest ``source``, its size bounded first (see :func:`read_manifest_in`)."""
    limits.check("max_header_bytes", source.size, what="the manifest size", file=source.name)
    return parse_manifest(source.read(0, source.size), source.name, limits)


def parse_manifest(raw: bytes, path: str, limits: Limits) -> Manifest:
    """Validate the bytes of a manifest named ``path`` (see :func:`read_manifest_in`)."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"not a safeckpt checkpoint: not valid JSON ({exc})") from exc
    if type(document) is not dict or document.get("format") != MANIFEST_FORMAT:
        raise _bad(path, f"not a safeckpt checkpoint: a JSON file without the {MANIFEST_FORMAT!r} format marker")
    version = document.get("format_version")
    if type(version) is not int or version < 1:
        raise _bad(path, "manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise _bad(path, f"manifest is format version {version}; this safeckpt reads up to {FORMAT_VERSION}, upgrade it")
    components = document.get("components")
    if type(components) is not list:
        raise _bad(path, "manifest has no component list")
    limits.check("max_components", len(components), what="the number of components", file=path)
    entries = []
    for item in components:
        if type(item) is not dict:
            raise _bad(path, "malformed manifest component")
        key, file, fsize, sha = item.get("key"), item.get("file"), item.get("size"), item.get("sha256")
        if type(key) is not str or type(fsize) is not int or fsize < 0 or type(sha) is not str or len(sha) != 64:
            raise _bad(path, f"malformed manifest component {key!r:.100}")
        entries.append(FileRecord(_safe_file_name(path, file), fsize, sha, key))
    if len({e.key for e in entries}) != len(entries):
        raise _bad(path, "manifest lists a component twice")
    metadata = {k: v for k, v in document.items() if k != "components"}
    return Manifest(path, tuple(entries), metadata)


def check_entry(manifest: Manifest, entry: FileRecord, *, verify: bool, limits: Limits) -> Path:
    """The local path of a component, checked against a local manifest (see :func:`check_entry_in`)."""
    storage, _ = locate(manifest.path)
    check_entry_in(storage, manifest, entry, verify=verify, limits=limits)
    return manifest.file(entry)


def check_entry_in(storage: Storage, manifest: Manifest, entry: FileRecord, *, verify: bool, limits: Limits) -> str:
    """The component's file (relative to ``storage``, the manifest's directory), checked against the
    manifest: a regular file, not a link (:mod:`safeckpt.storage.local`), its size always, its digest
    with ``verify``.

    Raises:
        CheckpointFormatError: if it is a link or not a regular file.
        ComponentFileMissingError: if it is missing (an ``IntegrityError`` and a ``FileNotFoundError``).
        IntegrityError: if its size or digest differs (a torn or tampered set).
    """
    try:
        opened = storage.open(entry.name)
    except FileNotFoundError:  # the manifest's bytes name it: data of the set, not the caller's path
        shown = storage.display(entry.name)
        raise ComponentFileMissingError(
            f"{manifest.name} lists component {show(entry.key)}, whose file {shown} is missing: the set is "
            "incomplete (torn or modified)", tensor_name=entry.key, file=shown,
        ) from None
    with opened as source:
        if source.size != entry.size:
            raise IntegrityError(
                f"{source.name} is {source.size} bytes, the manifest {manifest.name} says {entry.size}: "
                "the set is torn (a save was interrupted) or was modified",
                tensor_name=entry.key,
                file=source.name,
            )
        if verify:
            actual = source_digest(source, limits)
            if actual != entry.sha256:
                raise IntegrityError(
                    f"{source.name} does not match the digest in {manifest.name}: the set is torn or was modified",
                    tensor_name=entry.key,
                    expected=entry.sha256,
                    actual=actual,
                    file=source.name,
                )
    return entry.name


def find_manifest(path: str | os.PathLike[str]) -> Path | None:
    """The manifest for ``path`` when ``path`` is one or is the base path of a set (local)."""
    storage, name = locate(path)
    found = find_manifest_in(storage, name)
    return None if found is None else Path(os.path.dirname(os.fspath(path))) / found


def find_manifest_in(storage: Storage, name: str) -> str | None:
    """The manifest's name when ``name`` is one or is the base name of a set in ``storage``."""
    listing = storage.listdir()
    if name.endswith(MANIFEST_SUFFIX) and listing.get(name) is not None:
        return name
    candidate = split_base(name) + MANIFEST_SUFFIX
    return candidate if listing.get(candidate) is not None else None


def discover(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Component files ``{base}_{key}.*`` of a local set that has no manifest, by key."""
    storage, name = locate(path)
    parent = os.path.dirname(os.fspath(path))
    return {key: Path(parent) / rel for key, rel in discover_in(storage, name).items()}


def discover_in(storage: Storage, name: str) -> dict[str, str]:
    """Component files ``{base}_{key}.*`` of the set based at ``name`` in ``storage``, by key.

    Only regular files are listed (links and special files are not components).
    """
    prefix = split_base(name) + "_"
    found: dict[str, str] = {}
    listing = storage.listdir()
    for file in sorted(listing):
        if listing[file] is not None and file.startswith(prefix) and not file.startswith("."):
            key = os.path.splitext(file[len(prefix) :])[0]
            if key and key not in found:
                found[key] = file
    return found


def old_components(storage: Storage, manifest_name: str, limits: Limits) -> set[str]:
    """The files a set's current manifest names (empty when there is no valid one): what a rewrite may remove."""
    try:
        return {entry.name for entry in read_manifest_in(storage, manifest_name, limits).entries}
    except (OSError, CheckpointFormatError):
        return set()
