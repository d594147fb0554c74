"""``convert``: turn a legacy ``torch.save`` file into a safeckpt checkpoint without running it.

Rules (SPEC section 5 and 7):

- Everything is kept: every top-level component of the source (``multi=True``
  writes one file per component unless ``keys_to_save`` names them), and a
  source whose root is not a dict (a tensor, a list, a pickled module) is
  written as a single file whose root is that value, which ``load`` returns.
- Nothing is overwritten by accident: a destination that is the source itself
  is refused unless ``in_place=True``.

(This module is not called ``convert.py``: a submodule of that name would
shadow the function ``safeckpt.convert`` once imported.)
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .container import encode_state
from .limits import DEFAULT_LIMITS, Limits
from .loading import load_single_file
from .multifile import check_keys, component_path, manifest_path
from .saving import save_multi_files, save_single_file
from .storage import is_url, locate
from .writer import write_files

__all__ = ["convert", "default_destination", "read_source"]

logger = logging.getLogger("safeckpt")


def read_source(
    source: Any, *, allowed_globals: Iterable[Any], limits: Limits, storage_options: Mapping[str, Any] | None = None
) -> Any:
    """The value held by ``source``, read without executing anything (the one reader ``convert`` uses)."""
    return load_single_file(source, allowed_globals=allowed_globals, limits=limits, storage_options=storage_options)


def default_destination(source: Any, *, multi: bool) -> Any:
    """Where ``convert(source)`` writes by default: ``source`` with ``.safetensors``, or (``multi``) the base path ``source``."""
    if multi:
        return source
    if is_url(source):
        return posixpath.splitext(str(source))[0] + ".safetensors"
    return source.with_suffix(".safetensors")


def _same_file(a: Any, b: Any) -> bool:
    if is_url(a) or is_url(b):
        return str(a) == str(b)
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _multi_keys(source: Path, state: Any, keys_to_save: Iterable[str] | None) -> list[str]:
    """The components of the set: ``keys_to_save``, or every top-level key (all of which must be file-name-safe)."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{source} holds a {type(state).__name__}, not a dict of components: a multi-file set cannot hold it; "
            "convert it to a single file (without multi)"
        )
    if keys_to_save is not None:
        keys = check_keys(keys_to_save)
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"{source} has no component {missing[0]!r}; it has {[str(k) for k in state][:50]}")
        left_out = [str(k) for k in state if k not in keys]
        if left_out:
            logger.info("convert %s: components not in keys_to_save, not written: %s", source, left_out)
        return keys
    unnamed = [k for k in state if not isinstance(k, str)]
    if unnamed:
        raise ValueError(
            f"{source} has components whose keys are not str ({[repr(k) for k in unnamed][:10]}): a multi-file "
            "set names a file after each key; convert it to a single file, or pass keys_to_save"
        )
    try:
        return check_keys(list(state))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}; convert it to a single file, or pass keys_to_save") from exc


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    multi: bool = False,
    keys_to_save: Iterable[str] | None = None,
    allowed_globals: Iterable[Any] = (),
    limits: Limits = DEFAULT_LIMITS,
    in_place: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | dict[str, Path]:
    """Convert a checkpoint (typically a legacy ``.pth``/``.pt``/``.bin``) to the safe format.

    The source is read without executing anything (see :func:`safeckpt.load`):
    class and function references become inert ``GlobalRef``s and are written
    as such, so the classes need not even be importable. Every top-level
    component is kept; a source whose value is not a dict (a tensor, a list, a
    pickled module) is written as a single file that :func:`safeckpt.load`
    returns as that value.

    Args:
        src: the file to convert: a ``torch.save`` file, a bare pickle, or any
            file safeckpt reads.
        dst: where to write; by default ``src`` with the suffix ``.safetensors``
            (a single file) or, with ``multi``, the base path ``src`` itself.
        multi: write a multi-file set as ``save_multi_files`` does (with the
            seed's ``model_kwargs`` folding) instead of one file.
        keys_to_save: components of the multi-file set (default: every
            top-level key of the source).
        allowed_globals: names to import and rebuild while reading (rarely useful
            for conversion: inert references convert as well).
        limits: bounds on what the source may declare.
        in_place: allow the destination to be the source itself (replaced
            atomically once the new file is complete).
        storage_options: fsspec options when ``src`` or ``dst`` is a URL.

    Returns:
        The file written, or with ``multi=True`` the ``{key: path}`` of the set.

    Raises:
        UnsafeCheckpointError: if ``src`` names dangerous globals; nothing is written.
        CheckpointFormatError: if ``src`` is malformed.
        FileExistsError: if the destination is ``src`` and ``in_place`` is false.
        ValueError: with ``multi``, if the source is not a dict, or a key cannot name a file.
    """
    source: Any = src if is_url(src) else Path(src)
    target: Any = (dst if is_url(dst) else Path(dst)) if dst is not None else default_destination(source, multi=multi)
    outputs = [target if is_url(target) else manifest_path(target)] if multi else [target]
    if not in_place and any(_same_file(source, out) for out in outputs):
        raise FileExistsError(
            f"converting {source} to {target} would overwrite the source; pass another destination, "
            "or in_place=True (CLI: --in-place) to replace it"
        )
    state = read_source(source, allowed_globals=allowed_globals, limits=limits, storage_options=storage_options)
    if multi:
        keys = _multi_keys(source, state, keys_to_save)
        if not in_place and not is_url(target):  # a component file may not be the source either
            for key in keys:
                for has_tensors in (True, False):
                    if _same_file(source, component_path(target, key, has_tensors=has_tensors)):
                        raise FileExistsError(f"converting {source} would overwrite it with component {key!r}")
        return save_multi_files(None, state, target, keys, storage_options=storage_options)
    if type(state) in (dict, OrderedDict):
        return save_single_file(None, state, target, storage_options=storage_options)
    encoded = encode_state(state, limits, any_root=True)
    storage, name = locate(target, storage_options)
    storage.makedirs("")
    write_files(storage, [(name, encoded)], format="safe")
    return target

