"""The one reader: single files and multi-file sets, on any storage.

Every load (the seed API's twins, :func:`safeckpt.open`, convert, the manager,
the CLI, ``distributed``) goes through here. The format is detected from the
bytes, never from the name. A component of a set must hold exactly the key its
manifest (or its file name, when discovered) lists it for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .container import META_COMPONENT
from .detect import Kind, detect_bytes
from .errors import CheckpointFormatError, ComponentNotFoundError, IntegrityError, SafeCkptError
from .handler import logger
from .legacy.torchfile import read_torch_file
from .limits import DEFAULT_LIMITS, Limits
from .multifile import (
    MANIFEST_SUFFIX,
    check_entry_in,
    discover_in,
    manifest_from,
    read_manifest_in,
    source_digest,
    split_base,
)
from .refs import AllowList, resolve_allowed
from .text import show
from .storage import ByteSource, Storage, locate, open_source, display_path

__all__ = ["ReadOptions", "load_any", "load_file", "load_set", "load_set_in", "load_source", "open_lazy"]

Device = str | torch.device | int


@dataclass(frozen=True)
class ReadOptions:
    """What every read takes (see :func:`safeckpt.load_single_file`)."""

    device: Device = "cpu"
    allowed_globals: Iterable[Any] = ()
    trust_pickle: bool = False
    verify: bool = False
    limits: Limits = DEFAULT_LIMITS
    copy: bool = False
    storage_options: Mapping[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        # resolved once per read: a set's components share it, and each unresolved name is warned about once
        object.__setattr__(self, "allowed_globals", AllowList(self.allowed_globals))

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.device) if isinstance(self.device, int) else torch.device(self.device)


def _name_the_file(exc: SafeCkptError, name: str, temp: str | None = None) -> None:
    """Make an error raised while reading ``name`` say so (message and ``file``), never naming a temp copy."""
    message = str(exc.args[0]) if exc.args else ""
    if temp is not None:
        message = message.replace(temp, name)
    if name not in message:
        message = f"{name}: {message}"
    exc.args = (message, *exc.args[1:])
    if exc.file is None or (temp is not None and exc.file == temp):
        exc.file = name


def _kind(source: ByteSource) -> Kind:
    return detect_bytes(source.head()[:16])


# --------------------------------------------------------------------------- single files


def open_lazy(path: str | os.PathLike[str], options: ReadOptions) -> Checkpoint:
    """:func:`safeckpt.open`: a lazy reader of a safeckpt, safetensors or skeleton file on any storage."""
    source = open_source(path, options.storage_options)
    try:
        kind = _kind(source)
        if kind not in (Kind.SAFETENSORS, Kind.SKELETON):
            raise CheckpointFormatError(
                f"{source.name} is a {kind.value} file; open() reads safeckpt and safetensors files, use load() for others",
                file=source.name,
            )
        if kind is Kind.SKELETON and options.verify:
            raise _no_own_digest(source.name)
        return Checkpoint(
            path, device=options.device, allowed_globals=options.allowed_globals, verify=options.verify,
            limits=options.limits, copy=options.copy, source=source,
        )
    except BaseException:
        source.close()
        raise


def load_file(path: str | os.PathLike[str], options: ReadOptions) -> Any:
    """:func:`safeckpt.load_single_file` on any storage."""
    with open_source(path, options.storage_options) as source:
        return load_source(source, options)


def load_source(source: ByteSource, options: ReadOptions) -> Any:
    """The whole value of one open file, of any kind safeckpt reads; errors name the file."""
    try:
        kind = _kind(source)
        if kind is Kind.SKELETON and options.verify:
            raise _no_own_digest(source.name)
        if kind in (Kind.SAFETENSORS, Kind.SKELETON):
            with _checkpoint(source, options) as ckpt:
                return ckpt.load()
        if kind is Kind.MANIFEST:
            manifest_from(source, options.limits)  # other JSON: not a checkpoint
            raise CheckpointFormatError(f"{source.name} is a multi-file manifest; use load_multi_files() or load()", file=source.name)
        return _load_torch(source, options)  # torch.save archives, pre-1.6 streams, bare pickles, unknown bytes
    except SafeCkptError as exc:
        _name_the_file(exc, source.name)
        raise


def _no_own_digest(name: str) -> IntegrityError:
    """``verify=True`` on a skeleton file read alone: its digest is in its set's manifest only."""
    return IntegrityError(
        f"{name} is a skeleton file of a multi-file set: it records no digest of its own (its set's manifest "
        "does), so it cannot be verified alone; load the set with verify=True, or this file with verify=False "
        "only if you trust it",
        file=name,
    )


def _checkpoint(source: ByteSource, options: ReadOptions) -> Checkpoint:
    return Checkpoint(
        source.name, device=options.device, allowed_globals=options.allowed_globals, verify=options.verify,
        limits=options.limits, copy=options.copy, source=source,
    )


def _load_torch(source: ByteSource, options: ReadOptions) -> Any:
    with source.local_copy() as local:  # a remote file is fetched whole: the reader needs a file
        try:
            return _load_torch_path(local, source.name, options)
        except SafeCkptError as exc:
            if source.local_path is None:
                _name_the_file(exc, source.name, temp=str(local))
            raise


def _load_torch_path(path: Path, name: str, options: ReadOptions) -> Any:
    if options.trust_pickle:
        logger.warning("trust_pickle=True: unpickling %s with torch.load(weights_only=False); it can run any code", name)
        return torch.load(path, map_location=options.torch_device, weights_only=False)
    if options.verify:
        raise IntegrityError(f"{name} is a torch.save file: it records no digests to verify", file=name)
    allow = AllowList(options.allowed_globals)  # first, so a refused allowed name is warned about even when the file is refused
    value = read_torch_file(path, device=options.torch_device, limits=options.limits, copy=options.copy).value
    try:
        return resolve_allowed(value, allow, max_depth=options.limits.max_depth)
    except Exception as exc:  # an allowed name that cannot be imported or rebuilt
        raise CheckpointFormatError(f"{name}: {type(exc).__name__}: {exc}", file=name) from exc


# --------------------------------------------------------------------------- multi-file sets


def load_set(path: str | os.PathLike[str], keys: Iterable[str] | None, options: ReadOptions) -> dict[str, Any]:
    """:func:`safeckpt.load_multi_files` on any storage (``path``: the base path or the manifest)."""
    storage, name = locate(path, options.storage_options)
    return load_set_in(storage, name, keys, options, shown=display_path(path))


def _manifest_name(storage: Storage, name: str) -> str | None:
    if name.endswith(MANIFEST_SUFFIX):
        return name if storage.exists(name) else None
    if storage.exists(name):  # a named JSON file is read as a manifest: any other JSON is refused there
        with storage.open(name) as source:
            if _kind(source) is Kind.MANIFEST:
                return name
    candidate = split_base(name) + MANIFEST_SUFFIX
    return candidate if storage.exists(candidate) else None


def load_set_in(
    storage: Storage, name: str, keys: Iterable[str] | None, options: ReadOptions, *, shown: str | None = None
) -> dict[str, Any]:
    """The components of the set based at ``name`` (or whose manifest is ``name``) in ``storage``."""
    shown = shown or storage.display(name)
    manifest_name = _manifest_name(storage, name)
    wanted_keys = None if keys is None else list(keys)
    files: dict[str, str] = {}
    digests: dict[str, str] = {}  # key -> the manifest's digest of its file
    if manifest_name is not None:
        manifest = read_manifest_in(storage, manifest_name, options.limits)
        available = [e.key for e in manifest.entries]
        for entry in manifest.entries:
            if wanted_keys is None or entry.key in wanted_keys:
                files[entry.key] = check_entry_in(storage, manifest, entry, verify=options.verify, limits=options.limits)
                digests[entry.key] = entry.sha256
    else:
        files = discover_in(storage, name)
        if not files:
            raise FileNotFoundError(2, f"no such file, and no multi-file set (no manifest {split_base(name)}{MANIFEST_SUFFIX}, no component files {split_base(name)}_*)", shown)
        if options.verify:
            raise IntegrityError(f"{shown} has no manifest, so there are no digests to verify", file=shown)
        available = list(files)
    wanted = list(available) if wanted_keys is None else wanted_keys
    missing = [key for key in wanted if key not in files]
    if missing:
        raise ComponentNotFoundError(
            f"{shown} has no component {show(missing[0])}; it has {show(available, 300)}", name=missing[0], available=available
        )
    component_options = options if manifest_name is not None else _without_verify(options)
    return {key: _load_component(storage, files[key], key, component_options, digests.get(key)) for key in wanted}


def _without_verify(options: ReadOptions) -> ReadOptions:
    return ReadOptions(options.device, options.allowed_globals, options.trust_pickle, False, options.limits, options.copy,
                       options.storage_options)


def _load_component(storage: Storage, rel: str, key: str, options: ReadOptions, sha256: str | None = None) -> Any:
    """One component file's value; a safeckpt file must hold exactly ``key`` (and record it, when it records one).
    With ``verify``, a skeleton file (no digest of its own) must match ``sha256``, the manifest's digest of
    it, checked on the same open file that is then decoded (a file put in its place after the check is not read)."""
    with storage.open(rel) as source:
        try:
            kind = _kind(source)
            if kind is Kind.SKELETON and options.verify:
                actual = None if sha256 is None else source_digest(source, options.limits)
                if actual is None or actual != sha256:
                    raise IntegrityError(
                        f"{source.name} does not match the digest its set's manifest records: the set is torn or was modified",
                        tensor_name=key, expected=sha256, actual=actual, file=source.name,
                    )
                options = _without_verify(options)  # verified whole, just now
            if kind not in (Kind.SAFETENSORS, Kind.SKELETON):
                return load_source(source, options)  # a seed torch.save component holds the value itself
            with _checkpoint(source, options) as ckpt:
                _check_component(ckpt, key, source.name)
                value = ckpt.load()
        except SafeCkptError as exc:
            _name_the_file(exc, source.name)
            raise
    if list(value) != [key]:
        raise CheckpointFormatError(f"{source.name} does not hold component {show(key)}; refused", file=source.name)
    return value[key]


def _check_component(ckpt: Checkpoint, key: str, name: str) -> None:
    if not ckpt.is_safeckpt:
        raise CheckpointFormatError(
            f"{name} is a plain safetensors file: it records no component, so it cannot be component {show(key)} of a set; refused",
            file=name,
        )
    root = ckpt._root
    recorded = ckpt._header.metadata.get(META_COMPONENT) if root is None or root.component is None else root.component
    if recorded is not None and recorded != key:
        raise CheckpointFormatError(
            f"{name} holds component {show(recorded, 100)}, but is listed as {show(key)}: a file of another set or key; refused",
            file=name,
        )


# --------------------------------------------------------------------------- either


def load_any(path: str | os.PathLike[str], options: ReadOptions) -> Any:
    """:func:`safeckpt.load`: a single file, a manifest, or a set's base path, on any storage."""
    try:
        source = open_source(path, options.storage_options)
    except FileNotFoundError:
        storage, name = locate(path, options.storage_options)
        if _manifest_name(storage, name) is None and not discover_in(storage, name):
            raise FileNotFoundError(2, "no such file", display_path(path)) from None
        return load_set_in(storage, name, None, options, shown=display_path(path))
    with source:
        if _kind(source) is not Kind.MANIFEST or not str(path).endswith(MANIFEST_SUFFIX):
            return load_source(source, options)  # other JSON: "not a safeckpt checkpoint"
    return load_set(path, None, options)
