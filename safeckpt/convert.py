"""``convert``: turn a legacy ``torch.save`` file into a safeckpt checkpoint without running it."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UnsupportedValueError
from .limits import DEFAULT_LIMITS, Limits
from .loading import load_single_file
from .saving import save_multi_files, save_single_file
from .storage import is_url

__all__ = ["convert"]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    multi: bool = False,
    keys_to_save: Iterable[str] | None = None,
    allowed_globals: Iterable[Any] = (),
    limits: Limits = DEFAULT_LIMITS,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | dict[str, Path]:
    """Convert a checkpoint (typically a legacy ``.pth``/``.pt``/``.bin``) to the safe format.

    The source is read without executing anything (see :func:`safeckpt.load`):
    class and function references become inert ``GlobalRef``s and are written
    as such, so the classes need not even be importable.

    Args:
        src: the file to convert: a ``torch.save`` file, a bare pickle, or any
            file safeckpt reads.
        dst: where to write; by default ``src`` with the suffix ``.safetensors``
            (a single file) or, with ``multi``, the base path ``src`` itself.
        multi: write a multi-file set as ``save_multi_files`` does (with the
            seed's ``model_kwargs`` folding) instead of one file.
        keys_to_save: components of the multi-file set (default: the seed's three).
        allowed_globals: names to import and rebuild while reading (rarely useful
            for conversion: inert references convert as well).
        limits: bounds on what the source may declare.

    Returns:
        The file written, or with ``multi=True`` the ``{key: path}`` of the set.

    Raises:
        UnsafeCheckpointError: if ``src`` names dangerous globals; nothing is written.
        CheckpointFormatError: if ``src`` is malformed.
        UnsupportedValueError: if ``src`` does not hold a dict.
        ValueError: if the default ``dst`` would overwrite ``src``.
    """
    source: Any = src if is_url(src) else Path(src)
    state = load_single_file(source, allowed_globals=allowed_globals, limits=limits, storage_options=storage_options)
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(
            f"{source} holds a {type(state).__name__}, not a dict; load it with safeckpt.load and save "
            "the parts you need in a dict",
            path_in_state="state",
            value_type=type(state).__qualname__,
        )
    if multi:
        base = source if dst is None else (dst if is_url(dst) else Path(dst))
        return save_multi_files(None, state, base, keys_to_save, storage_options=storage_options)
    if dst is not None:
        target: Any = dst if is_url(dst) else Path(dst)
    elif is_url(source):
        target = posixpath.splitext(source)[0] + ".safetensors"
    else:
        target = source.with_suffix(".safetensors")
    if dst is None and (target == source if is_url(source) else target.resolve() == source.resolve()):
        raise ValueError(f"converting {source} in place would overwrite it; pass dst")
    return save_single_file(None, state, target, storage_options=storage_options)
