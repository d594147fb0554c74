"""The seed checkpoint API: ``save_single_file``, with the seed's names and parameters.

Replacing ``from nn_handler.checkpointing.saving import save_single_file`` with
``from safeckpt.saving import save_single_file`` is the whole migration.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .container import encode_state, write_single
from .errors import FallbackWarning, UnsupportedValueError
from .handler import Reporter
from .io import atomic_path, atomic_write
from .limits import DEFAULT_LIMITS

__all__ = ["FORMATS", "save_single_file"]

FORMATS = ("safe", "torch", "auto")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")


def _torch_save(value: Any, path: Path) -> None:
    with atomic_path(path) as temp:
        torch.save(value, temp)


def _write_one(state: Mapping[Any, Any], path: Path, format: str) -> str:
    """Write ``state`` to ``path`` in ``format``; return the format actually written."""
    if format == "torch":
        _torch_save(state, path)
        return "torch"
    try:
        encoded = encode_state(state, DEFAULT_LIMITS)
    except UnsupportedValueError as exc:
        if format != "auto":
            raise
        warnings.warn(
            f"{exc.path_in_state} cannot be stored in the safe format ({exc}); wrote {path} with torch.save instead",
            FallbackWarning,
            stacklevel=4,
        )
        _torch_save(state, path)
        return "torch"
    atomic_write(path, partial(write_single, encoded=encoded))
    return "safe"


def save_single_file(nn_handler: Any, state: Mapping[Any, Any], path: str | os.PathLike[str], *, format: str = "safe") -> Path:
    """Save a whole training state to one file.

    Args:
        nn_handler: any object or ``None``; see :mod:`safeckpt.handler` for how its
            ``log``, ``raise_error`` and ``_rank`` are used.
        state: a dict (or OrderedDict) of the training state; never modified.
        path: the file to write; its parent directory is created if missing.
        format: ``"safe"`` (safetensors + msgpack, no pickle), ``"torch"``
            (exactly ``torch.save``) or ``"auto"`` (safe when the state allows it,
            else ``torch.save`` with a :class:`FallbackWarning`).

    Returns:
        The path written.

    Raises:
        UnsupportedValueError: with ``format="safe"``, naming the path in the state of
            a value the safe format cannot hold (through ``nn_handler.raise_error`` when it has one).
        OSError: if the file cannot be written; a previous file at ``path`` is left intact.
    """
    _check_format(format)
    reporter = Reporter(nn_handler)
    target = Path(path)
    try:
        _write_one(state, target, format)
    except Exception as exc:
        reporter.fail(exc, f"Rank {reporter.rank} failed to save NNHandler state to {target}: {exc}")
    reporter.log(f"NNHandler state saved successfully by Rank {reporter.rank} to: {target}")
    return target
