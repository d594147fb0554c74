"""The multi-file layout: one file per component and a manifest written last.

For a base path ``models/m.pth`` and a component key ``k``:

- ``models/m_k.safetensors`` holds a component with tensors (a safeckpt single
  file whose tensors are named by their path *inside* the component, so a
  ``model_state_dict`` file holds exactly the state-dict keys);
- ``models/m_k.msgpack`` holds a component without tensors (a skeleton file);
- ``models/m.safeckpt.json`` is the manifest: format version, components, their
  files, sizes and SHA-256 digests. It is written last and is the commit point.

A manifest may only name plain file names in its own directory.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .container import FORMAT_VERSION, read_header
from .detect import Kind, detect
from .errors import CheckpointFormatError, IntegrityError
from .limits import Limits

__all__ = [
    "DEFAULT_KEYS",
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestEntry",
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
class ManifestEntry:
    """One component of a multi-file set.

    Attributes:
        key: the component's key in the state.
        file: its file name, in the manifest's directory.
        size: the file's size in bytes.
        sha256: hex digest of the file's header (safetensors: the length prefix and
            JSON header, which record the digests of every tensor and of the
            skeleton) or of the whole file (skeleton files).
    """

    key: str
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: tuple[ManifestEntry, ...]
    metadata: dict[str, Any]

    def file(self, entry: ManifestEntry) -> Path:
        return self.path.parent / entry.file


def file_digest(path: Path, limits: Limits) -> str:
    """The digest a manifest records for a component file (see :class:`ManifestEntry`)."""
    if detect(path) is Kind.SAFETENSORS:
        length = read_header(path, limits).header_bytes
    else:
        length = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0:
            chunk = f.read(min(length, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def manifest_bytes(entries: Sequence[ManifestEntry]) -> bytes:
    """The JSON text of a manifest for ``entries``."""
    document = {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "components": [
            {"key": e.key, "file": e.file, "size": e.size, "sha256": e.sha256} for e in entries
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _bad(path: Path, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}", file=str(path))


def _encodable(name: str) -> bool:
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeError:
        return False


def _safe_file_name(path: Path, name: Any) -> str:
    if not _is_plain_name(name) or not _encodable(name) or os.path.isabs(name) or Path(name).name != name:
        raise _bad(path, f"manifest names {name!r:.200}, which is not a file in the manifest's directory; refused")
    return name


def read_manifest(path: str | os.PathLike[str], limits: Limits) -> Manifest:
    """Read and validate a manifest.

    Raises:
        CheckpointFormatError: if it is malformed or names a file outside its directory.
        LimitExceededError: if it is larger or lists more components than ``limits`` allow.
    """
    path = Path(path)
    size = path.stat().st_size
    limits.check("max_header_bytes", size, what="the manifest size", file=str(path))
    try:
        document = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"manifest is not valid JSON: {exc}") from exc
    if type(document) is not dict or document.get("format") != MANIFEST_FORMAT:
        raise _bad(path, "not a safeckpt manifest")
    version = document.get("format_version")
    if type(version) is not int or version < 1:
        raise _bad(path, "manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise _bad(path, f"manifest is format version {version}; this safeckpt reads up to {FORMAT_VERSION}, upgrade it")
    components = document.get("components")
    if type(components) is not list:
        raise _bad(path, "manifest has no component list")
    limits.check("max_components", len(components), what="the number of components", file=str(path))
    entries = []
    for item in components:
        if type(item) is not dict:
            raise _bad(path, "malformed manifest component")
        key, file, fsize, sha = item.get("key"), item.get("file"), item.get("size"), item.get("sha256")
        if type(key) is not str or type(fsize) is not int or fsize < 0 or type(sha) is not str or len(sha) != 64:
            raise _bad(path, f"malformed manifest component {key!r:.100}")
        entries.append(ManifestEntry(key, _safe_file_name(path, file), fsize, sha))
    if len({e.key for e in entries}) != len(entries):
        raise _bad(path, "manifest lists a component twice")
    metadata = {k: v for k, v in document.items() if k != "components"}
    return Manifest(path, tuple(entries), metadata)


def check_entry(manifest: Manifest, entry: ManifestEntry, *, verify: bool, limits: Limits) -> Path:
    """The component's file, checked against the manifest (size always, digest with ``verify``).

    Raises:
        FileNotFoundError: if the file is missing.
        IntegrityError: if its size or digest differs (a torn or tampered set).
    """
    file = manifest.file(entry)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _bad(manifest.path, f"cannot read component file {entry.file!r}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise _bad(manifest.path, f"component file {entry.file!r} is not a regular file")
    size = info.st_size
    if size != entry.size:
        raise IntegrityError(
            f"{file} is {size} bytes, the manifest {manifest.path.name} says {entry.size}: "
            "the set is torn (a save was interrupted) or was modified",
            tensor_name=entry.key,
            file=str(file),
        )
    if verify:
        actual = file_digest(file, limits)
        if actual != entry.sha256:
            raise IntegrityError(
                f"{file} does not match the digest in {manifest.path.name}: the set is torn or was modified",
                tensor_name=entry.key,
                expected=entry.sha256,
                actual=actual,
                file=str(file),
            )
    return file


def find_manifest(path: str | os.PathLike[str]) -> Path | None:
    """The manifest for ``path`` when ``path`` is one or is the base path of a set."""
    path = Path(path)
    if path.name.endswith(MANIFEST_SUFFIX) and path.is_file():
        return path
    candidate = manifest_path(path)
    return candidate if candidate.is_file() else None


def discover(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Component files ``{base}_{key}.*`` of a set that has no manifest, by key."""
    base = Path(split_base(path))
    prefix = base.name + "_"
    found: dict[str, Path] = {}
    if not base.parent.is_dir():
        return found
    for file in sorted(base.parent.iterdir()):
        if file.is_file() and file.name.startswith(prefix) and not file.name.startswith("."):
            key = os.path.splitext(file.name[len(prefix) :])[0]
            if key and key not in found:
                found[key] = file
    return found

