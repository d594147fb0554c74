"""Loading twins of the seed API: ``load_single_file``, ``load_multi_files``, ``load`` and the lazy ``open``.

Each takes a local path or an fsspec URL (``s3://...``, ``memory://...``, with
``storage_options=``) and reads through the one reader (:mod:`safeckpt.reader`).
The format is detected from the bytes, never from the extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .checkpoint import Checkpoint
from .limits import DEFAULT_LIMITS, Limits
from .reader import ReadOptions, load_any, load_file, load_set, open_lazy
from .signing import verified_copy
from .storage import is_url

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
            remote file is read with range requests (see :mod:`safeckpt.storage`).
        copy: return tensors in fresh memory rather than as views of a copy-on-write
            mapping of the file (see :class:`Checkpoint`).

    Returns:
        A :class:`Checkpoint`, to be used as a context manager.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if the file is not a safetensors file.
    """
    return open_lazy(
        path,
        ReadOptions(device, allowed_globals, False, verify, limits, copy, storage_options),
    )


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
    return load_file(path, ReadOptions(device, allowed_globals, trust_pickle, verify, limits, copy, storage_options))


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
    return load_set(path, keys, ReadOptions(device, allowed_globals, trust_pickle, verify, limits, copy, storage_options))


def load(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    trust_pickle: bool = False,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: Mapping[str, Any] | None = None,
    copy: bool = False,
    signature: str | os.PathLike[str] | None = None,
    public_key: str | os.PathLike[str] | None = None,
) -> Any:
    """Load any checkpoint safeckpt reads, detecting its format from its bytes.

    Args:
        path: a safeckpt single file, a plain safetensors file, a ``torch.save``
            file (see ``trust_pickle``), a multi-file manifest, or the base path of
            a multi-file set; a local path or an fsspec URL.
        device, allowed_globals, trust_pickle, verify, limits, storage_options, copy:
            as for :func:`load_single_file`.
        signature: a ``model_signing`` signature of ``path`` (a local file, set or
            directory); with ``public_key``, the signed files are verified first and only
            that verified private copy is parsed (see :mod:`safeckpt.signing`).
        public_key: the signer's PEM public key, with ``signature``.

    Returns:
        The state (``{key: value}`` for a multi-file set).

    Raises:
        FileNotFoundError: "no such file", naming ``path``, when there is neither
            a file nor a multi-file set there.
        CheckpointFormatError: if it is corrupt or of no format safeckpt reads
            (any JSON that is not a safeckpt manifest is "not a safeckpt checkpoint").
        IntegrityError: with ``verify=True``, on a digest mismatch.
        UnsafeCheckpointError: for a legacy file that names a dangerous global.
        SignatureError: with ``signature``, when it does not verify (nothing was parsed).
    """
    options = ReadOptions(device, allowed_globals, trust_pickle, verify, limits, copy, storage_options)
    if signature is None and public_key is None:
        return load_any(path, options)
    if signature is None or public_key is None or is_url(path):
        raise ValueError("a signed load takes a local path, signature= and public_key= together")
    with verified_copy(path, signature, public_key=public_key) as private:
        return load_any(private, options)
