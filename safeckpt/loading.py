"""Loading twins of the seed API: ``load_single_file``, ``load`` and the lazy ``open``.

The format is detected from the bytes, never from the extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .detect import Kind, detect
from .errors import CheckpointFormatError, ComponentNotFoundError, IntegrityError
from .handler import logger
from .legacy import read_torch_file
from .limits import DEFAULT_LIMITS, Limits
from .multifile import check_entry, discover, find_manifest, manifest_path, read_manifest, split_base
from .refs import AllowList, resolve_allowed
from .signing import verified_copy
from .urls import is_url

__all__ = ["load", "load_multi_files", "load_single_file", "open"]

Device = str | torch.device | int


def open(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: Mapping[str, Any] | None = None,
    copy: bool = False,
) -> Checkpoint:
    """Open a safeckpt or safetensors file for lazy reading.

    Args:
        path: the file.
        device: where tensors are placed when read.
        allowed_globals: classes/functions (or ``"module:qualname"``) that may be imported.
        verify: check recorded SHA-256 digests of what is read.
        limits: bounds on what the file may declare; set them when reading untrusted files.
        storage_options: for an fsspec URL (``s3://...``), the filesystem's options; a
            remote file is read with range requests (see :mod:`safeckpt.remote`).
        copy: return tensors in fresh memory rather than as views of a copy-on-write
            mapping of the file (see :class:`Checkpoint`).

    Returns:
        A :class:`Checkpoint`, to be used as a context manager.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if the file is not a safetensors file.
    """
    if is_url(path):
        from . import remote

        return remote.open(str(path), device=device, allowed_globals=allowed_globals, verify=verify, limits=limits,
                           storage_options=storage_options)
    kind = detect(path)
    if kind not in (Kind.SAFETENSORS, Kind.SKELETON):
        raise CheckpointFormatError(
            f"{path} is a {kind.value} file; open() reads safeckpt and safetensors files, use load() for others",
            file=os.fspath(path),
        )
    return Checkpoint(path, device=device, allowed_globals=allowed_globals, verify=verify, limits=limits, copy=copy)


def _device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _load_torch_file(
    path: str | os.PathLike[str],
    device: Device,
    allowed_globals: Iterable[Any],
    trust_pickle: bool,
    verify: bool,
    limits: Limits,
    copy: bool,
) -> Any:
    if trust_pickle:
        logger.warning("trust_pickle=True: unpickling %s with torch.load(weights_only=False); it can run any code", path)
        return torch.load(path, map_location=_device(device), weights_only=False)
    if verify:
        raise IntegrityError(f"{path} is a torch.save file: it records no digests to verify", file=os.fspath(path))
    value = read_torch_file(path, device=_device(device), limits=limits, copy=copy).value
    allow = AllowList(allowed_globals)
    try:
        return resolve_allowed(value, allow, max_depth=limits.max_depth)
    except Exception as exc:  # an allowed name that cannot be imported or rebuilt
        raise CheckpointFormatError(f"{path}: {type(exc).__name__}: {exc}", file=os.fspath(path)) from exc


def load_single_file(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    trust_pickle: bool = False,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: Mapping[str, Any] | None = None,
    copy: bool = False,
) -> Any:
    """Load a whole single-file checkpoint.

    Args:
        path: a safeckpt file, a plain safetensors file, or a ``torch.save`` file
            (zip or pre-1.6 format) or bare pickle, read without executing anything:
            allowlisted constructors are rebuilt by safeckpt's own code, other classes
            and functions come back as inert ``GlobalRef``/``OpaqueObject``.
        device: where tensors are placed (default CPU).
        allowed_globals: classes/functions (or ``"module:qualname"``) that may be
            imported to rebuild class references and objects; others stay inert.
        trust_pickle: for a ``torch.save`` file, unpickle it with
            ``torch.load(weights_only=False)`` instead, which can run any code in it
            (logged as a warning).
        verify: check the recorded SHA-256 digests; raise ``IntegrityError`` on mismatch.
        limits: bounds on what the file may declare.
        storage_options: for an fsspec URL (``s3://...``, ``memory://...``), the
            filesystem's options.
        copy: return tensors in fresh memory rather than as zero-copy views of a
            copy-on-write mapping of the file (see :class:`Checkpoint`).

    Returns:
        The state, with the types it was saved with (a dict of tensors for plain safetensors).

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if the file is corrupt or of no format safeckpt reads.
        IntegrityError: with ``verify=True``, on a digest mismatch.
        UnsafeCheckpointError: for a legacy file that names a dangerous global, listing them all.
    """
    if is_url(path):
        from . import remote

        return remote.load_single_file(
            str(path), device=device, allowed_globals=allowed_globals, trust_pickle=trust_pickle, verify=verify,
            limits=limits, storage_options=storage_options,
        )
    kind = detect(path)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON):
        with Checkpoint(
            path, device=device, allowed_globals=allowed_globals, verify=verify, limits=limits, copy=copy
        ) as ckpt:
            return ckpt.load()
    if kind is Kind.MANIFEST:
        raise CheckpointFormatError(f"{path} is a multi-file manifest; use load_multi_files() or load()", file=os.fspath(path))
    # torch.save archives, pre-1.6 streams and bare pickles (of any protocol, so also unknown bytes)
    return _load_torch_file(path, device, allowed_globals, trust_pickle, verify, limits, copy)


def load_multi_files(
    path: str | os.PathLike[str],
    keys: Iterable[str] | None = None,
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    trust_pickle: bool = False,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: Mapping[str, Any] | None = None,
    copy: bool = False,
) -> dict[str, Any]:
    """Load a multi-file set written by ``save_multi_files``.

    Args:
        path: the set's base path (``models/m.pth``) or its manifest
            (``models/m.safeckpt.json``). Without a manifest, the files
            ``{base}_{key}.*`` are discovered (``torch.save`` ones need ``trust_pickle``).
        keys: components to load (default: all).
        device, allowed_globals, trust_pickle, verify, limits, copy: as for :func:`load_single_file`;
            ``verify=True`` also checks every file against the manifest's digests,
            which detects a torn set (a save interrupted between files).

    Returns:
        ``{key: value}`` in the manifest's order.

    Raises:
        FileNotFoundError: if there is neither a manifest nor component files.
        ComponentNotFoundError: if a key in ``keys`` is not in the set.
        IntegrityError: if a file's size (always) or digest (``verify``) differs from the manifest.
        CheckpointFormatError: for a malformed manifest, or one naming a file outside its directory.
    """
    if is_url(path):
        from . import remote

        return remote.load_multi_files(
            str(path), keys, device=device, allowed_globals=allowed_globals, trust_pickle=trust_pickle, verify=verify,
            limits=limits, storage_options=storage_options,
        )
    options = dict(
        device=device, allowed_globals=allowed_globals, trust_pickle=trust_pickle, verify=verify, limits=limits, copy=copy
    )
    manifest_file = find_manifest(path)
    files: dict[str, Path]
    if manifest_file is not None:
        manifest = read_manifest(manifest_file, limits)
        files = {e.key: check_entry(manifest, e, verify=verify, limits=limits) for e in manifest.entries
                 if keys is None or e.key in set(keys)}
        available = [e.key for e in manifest.entries]
    else:
        files = discover(path)
        if not files:
            raise FileNotFoundError(f"no manifest {manifest_path(path)} and no component files {split_base(path)}_*")
        available = list(files)
        options["verify"] = False  # nothing recorded to verify against without a manifest
        if verify:
            raise IntegrityError(f"{path} has no manifest, so there are no digests to verify", file=os.fspath(path))
    wanted = list(available) if keys is None else list(keys)
    missing = [key for key in wanted if key not in files]
    if missing:
        raise ComponentNotFoundError(
            f"{path} has no component {missing[0]!r}; it has {available}", name=missing[0], available=available
        )
    out: dict[str, Any] = {}
    for key in wanted:
        out[key] = _load_component(files[key], key, options)
    return out


def _load_component(file: Path, key: str, options: dict[str, Any]) -> Any:
    value = load_single_file(file, **options)
    if isinstance(value, dict) and list(value) == [key]:  # a safeckpt component file holds {key: value}
        return value[key]
    if detect(file) in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):  # a seed torch.save component: the value itself
        return value
    if isinstance(value, dict) and key not in value:  # a plain safetensors file: a state dict
        return value
    raise CheckpointFormatError(f"{file} does not hold component {key!r}", file=str(file))


def load(
    path: str | os.PathLike[str],
    *,
    signature: str | os.PathLike[str] | None = None,
    public_key: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Load any checkpoint safeckpt reads, detecting its format from its bytes.

    ``path`` may be a safeckpt single file, a plain safetensors file, a
    ``torch.save`` file (see ``trust_pickle``), a multi-file manifest, or the base
    path of a multi-file set. Takes the keyword arguments of :func:`load_single_file`.
    With ``signature`` (a ``model_signing`` signature) and ``public_key``, the signed
    files are verified first and only that verified copy is parsed (see :mod:`safeckpt.signing`).
    """
    if signature is not None or public_key is not None:  # signing hook: verify, then load the verified copy
        if signature is None or public_key is None or is_url(path):
            raise ValueError("a signed load takes a local path, signature= and public_key= together")
        with verified_copy(path, signature, public_key=public_key) as private:
            return load(private, **kwargs)
    if is_url(path):
        from . import remote

        return remote.load(str(path), **kwargs)
    if not Path(path).is_file() or detect(path) is Kind.MANIFEST:
        if find_manifest(path) is not None or not Path(path).exists():
            return load_multi_files(path, **kwargs)
    return load_single_file(path, **kwargs)
