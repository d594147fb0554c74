"""Loading twins of the seed API: ``load_single_file``, ``load`` and the lazy ``open``.

The format is detected from the bytes, never from the extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from .checkpoint import Checkpoint
from .detect import Kind, detect
from .errors import CheckpointFormatError
from .handler import logger
from .limits import DEFAULT_LIMITS, Limits

__all__ = ["load", "load_single_file", "open"]

Device = str | torch.device | int


def open(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Checkpoint:
    """Open a safeckpt or safetensors file for lazy reading.

    Args:
        path: the file.
        device: where tensors are placed when read.
        allowed_globals: classes/functions (or ``"module:qualname"``) that may be imported.
        verify: check recorded SHA-256 digests of what is read.
        limits: bounds on what the file may declare; set them when reading untrusted files.

    Returns:
        A :class:`Checkpoint`, to be used as a context manager.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if the file is not a safetensors file.
    """
    kind = detect(path)
    if kind is not Kind.SAFETENSORS:
        raise CheckpointFormatError(
            f"{path} is a {kind.value} file; open() reads safeckpt and safetensors files, use load() for others",
            file=os.fspath(path),
        )
    return Checkpoint(path, device=device, allowed_globals=allowed_globals, verify=verify, limits=limits)


def _load_torch_file(path: str | os.PathLike[str], kind: Kind, device: Device, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise CheckpointFormatError(
            f"{path} is a torch.save file ({kind.value}); safeckpt does not unpickle it. "
            "If you trust its author, pass trust_pickle=True",
            file=os.fspath(path),
        )
    logger.warning("trust_pickle=True: unpickling %s with torch.load(weights_only=False); it can run any code", path)
    return torch.load(path, map_location=torch.device(device) if not isinstance(device, int) else device, weights_only=False)


def load_single_file(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    allowed_globals: Iterable[Any] = (),
    trust_pickle: bool = False,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Load a whole single-file checkpoint.

    Args:
        path: a safeckpt file, a plain safetensors file, or a ``torch.save`` file.
        device: where tensors are placed (default CPU).
        allowed_globals: classes/functions (or ``"module:qualname"``) that may be
            imported to rebuild class references and objects; others stay inert.
        trust_pickle: for a ``torch.save`` file, unpickle it with
            ``torch.load(weights_only=False)``, which can run any code in it.
        verify: check the recorded SHA-256 digests; raise ``IntegrityError`` on mismatch.
        limits: bounds on what the file may declare.

    Returns:
        The state, with the types it was saved with (a dict of tensors for plain safetensors).

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if the file is corrupt or of no format safeckpt reads.
        IntegrityError: with ``verify=True``, on a digest mismatch.
    """
    kind = detect(path)
    if kind is Kind.SAFETENSORS:
        with Checkpoint(path, device=device, allowed_globals=allowed_globals, verify=verify, limits=limits) as ckpt:
            return ckpt.load()
    if kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        return _load_torch_file(path, kind, device, trust_pickle)
    raise CheckpointFormatError(f"{path} is not a checkpoint safeckpt can read ({kind.value})", file=os.fspath(path))


def load(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load any checkpoint safeckpt reads, detecting its format from its bytes.

    Takes the keyword arguments of :func:`load_single_file`.
    """
    return load_single_file(path, **kwargs)
