"""The seed checkpoint API: ``save_single_file``, ``save_multi_files``, ``save_multi_from_single``.

Same names and positional parameters as ``nn_handler.checkpointing.saving``:
replacing that import with ``from safeckpt.saving import ...`` is the whole
migration. Unlike the seed, the caller's state is never modified.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UnsupportedValueError
from .handler import Reporter, logger
from .loading import load_single_file
from .multifile import DEFAULT_KEYS, MANIFEST_SUFFIX, check_keys, split_base
from .refs import GlobalRef
from .storage import is_url, locate, display_path
from .writer import FORMATS, check_format, plan_multi, plan_single, write_files, write_set

__all__ = ["FORMATS", "fold_model_kwargs", "save_multi_files", "save_multi_from_single", "save_single_file"]


FOLDED_KEYS = ("seed", "sde_class", "sde_kwargs", "nn_handler_version", "pytorch_version")
"""Top-level keys whose values the seed's folding copies into a saved ``model_kwargs``."""


def _check_left_out(reporter: Reporter, state: Mapping[Any, Any], keys_to_save: Iterable[str] | None) -> None:
    """Log the top-level keys a multi-file save leaves out; refuse a save that would keep none of them.

    A key is kept when it is saved as a component, or folded into a saved ``model_kwargs``.
    """
    if not isinstance(state, Mapping) or isinstance(keys_to_save, str):
        return  # refused with a clear error further on
    keys = list(DEFAULT_KEYS if keys_to_save is None else keys_to_save)
    folded = FOLDED_KEYS if "model_kwargs" in keys else ()
    present = [k for k, v in state.items() if v is not None]
    kept = [k for k in present if k in keys or k in folded]
    left_out = [k for k in present if k not in kept]
    if present and not kept:
        message = (
            f"Rank {reporter.rank}: none of the components {keys} is in the state, which has "
            f"{[str(k) for k in present][:20]}; nothing would be saved. Pass keys_to_save (or convert the "
            "whole state with safeckpt.convert)"
        )
        reporter.fail(ValueError(message), message)
    if left_out:
        logger.warning(  # the logger only: nn_handler.log receives the seed's lines, unchanged
            f"Rank {reporter.rank}: not saved (not in keys_to_save {keys}): {[str(k) for k in left_out][:20]}"
            + (f" and {len(left_out) - 20} more" if len(left_out) > 20 else "")
        )


def _returned(path: str | os.PathLike[str], written: str) -> Any:
    """What a save returns for a file: a ``Path`` for a local path, the URL for a URL."""
    return written if is_url(path) else Path(written)


def save_single_file(
    nn_handler: Any,
    state: Mapping[Any, Any],
    path: str | os.PathLike[str],
    *,
    format: str = "safe",
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Save a whole training state to one file.

    Args:
        nn_handler: any object or ``None``; its ``log``, ``raise_error`` and
            ``_rank`` are used as :mod:`safeckpt.handler` describes.
        state: a dict (or OrderedDict) of the training state; never modified.
        path: the file to write; its parent directory is created if missing.
        format: ``"safe"`` (safetensors + msgpack, no pickle), ``"torch"``
            (exactly ``torch.save``) or ``"auto"`` (safe when the state allows it,
            else ``torch.save`` with a :class:`FallbackWarning`).
        storage_options: for an fsspec URL (``s3://...``, ``memory://...``), the
            filesystem's options.

    Returns:
        The path written (the URL, for a remote path).

    Raises:
        UnsupportedValueError: with ``format="safe"``, naming the path in the state
            of a value the safe format cannot hold.
        OSError: if the file cannot be written; a previous file at ``path`` is left intact.
        Errors go through ``nn_handler.raise_error`` when it has one.
    """
    check_format(format)
    reporter = Reporter(nn_handler)
    shown = display_path(path)
    try:
        storage, name = locate(path, storage_options)
        storage.makedirs("")
        write_files(storage, plan_single(state, name, format), format=format, record=False)
    except Exception as exc:
        reporter.fail(exc, f"Rank {reporter.rank} failed to save NNHandler state to {shown}: {exc}")
    reporter.log(f"NNHandler state saved successfully by Rank {reporter.rank} to: {shown}")
    return _returned(path, shown)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- multi files


def _class_name(value: Any) -> str:
    if isinstance(value, GlobalRef):
        return value.short_name
    return str(getattr(value, "__name__", type(value).__name__))


def fold_model_kwargs(state: Mapping[Any, Any]) -> dict[Any, Any]:
    """The seed's folding of metadata into ``model_kwargs``, on a copy.

    ``seed``, ``sde_class`` (as ``sde_class_name``, the class's ``__name__``),
    ``sde_kwargs``, ``nn_handler_version`` and ``pytorch_version`` are added to a
    copy of ``model_kwargs`` (``{}`` when it is missing or ``None``). The state
    and its ``model_kwargs`` are left untouched.
    """
    kwargs = state.get("model_kwargs")
    kwargs = {} if kwargs is None else copy.copy(kwargs)
    if state.get("seed") is not None:
        kwargs["seed"] = state["seed"]
    if state.get("sde_class") is not None:
        kwargs["sde_class_name"] = _class_name(state["sde_class"])
        kwargs["sde_kwargs"] = state.get("sde_kwargs")
    kwargs["nn_handler_version"] = state.get("nn_handler_version")
    kwargs["pytorch_version"] = state.get("pytorch_version")
    folded = dict(state)
    folded["model_kwargs"] = kwargs
    return folded


def _write_multi(
    state: Mapping[Any, Any], path: str | os.PathLike[str], keys_to_save: Iterable[str] | None, format: str,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    keys = check_keys(DEFAULT_KEYS if keys_to_save is None else keys_to_save)
    folded = fold_model_kwargs(state)
    present = [key for key in keys if folded.get(key) is not None]
    storage, name = locate(path, storage_options)
    storage.makedirs("")
    files = plan_multi(folded, name, present, format)
    write_set(storage, files, present, split_base(name) + MANIFEST_SUFFIX, format=format)
    return {key: _returned(path, storage.display(rel)) for key, (rel, _) in zip(present, files)}


def save_multi_files(
    nn_handler: Any,
    state: Mapping[Any, Any],
    path: str | os.PathLike[str],
    keys_to_save: Iterable[str] | None = None,
    *,
    format: str = "safe",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Save chosen components of a state to one file each, plus a manifest.

    For base ``models/m.pth``: ``models/m_<key>.safetensors`` for a component with
    tensors (a ``model_state_dict`` file holds exactly the state-dict keys, so
    ``safetensors.torch.load_file`` + ``load_state_dict(strict=True)`` works),
    ``models/m_<key>.msgpack`` for one without, then ``models/m.safeckpt.json``.
    As in the seed, ``seed``, ``sde_class`` (its name), ``sde_kwargs``,
    ``nn_handler_version`` and ``pytorch_version`` are folded into the saved
    ``model_kwargs`` (on a copy).

    Args:
        nn_handler: any object or ``None`` (see :func:`save_single_file`).
        state: the training state; never modified.
        path: the base path; its parent directory is created if missing.
        keys_to_save: components to save (default ``model_state_dict``,
            ``optimizer_state_dict``, ``model_kwargs``); keys missing from the state
            or whose value is ``None`` are skipped.
        format: ``"safe"``, ``"torch"`` (``torch.save`` per component, named
            ``{base}_{key}{ext}`` as the seed did, no manifest, on every backend) or
            ``"auto"`` (safe, else the whole set as ``"torch"``, with one warning).
        storage_options: for an fsspec URL, the filesystem's options.

    Returns:
        ``{key: path}`` of the component files written.

    Raises:
        ValueError: if a key is not a safe file-name fragment (before anything is written).
        UnsupportedValueError: with ``format="safe"``, naming the offending path.
        OSError: if a file cannot be written.

    Files a previous set at this base listed in its manifest and this one does
    not are removed once the new manifest is written (never any other file).
    """
    check_format(format)
    reporter = Reporter(nn_handler)
    shown = display_path(path)
    _check_left_out(reporter, state, keys_to_save)
    try:
        written = _write_multi(state, path, keys_to_save, format, storage_options)
    except Exception as exc:
        reporter.fail(exc, f"Rank {reporter.rank} failed to save NNHandler state to {shown}: {exc}")
    reporter.log(f"NNHandler state saved successfully by Rank {reporter.rank} to: {shown}")
    return written


def save_multi_from_single(
    path: str | os.PathLike[str],
    keys_to_save: Iterable[str] | None = None,
    *,
    allowed_globals: Iterable[Any] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Split a single-file checkpoint into a multi-file set next to it.

    The set is based at ``path`` (``models/m.safeckpt`` gives ``models/m_<key>.*``
    and ``models/m.safeckpt.json``), with the seed's ``model_kwargs`` folding.
    Class references stay inert ``GlobalRef``s unless listed in ``allowed_globals``.

    Args:
        path: the single file (a local path or an fsspec URL); the set is written next to it.
        keys_to_save: the components to write (default: the seed's three).
        allowed_globals: names to import and rebuild while reading.
        storage_options: for an fsspec URL, the filesystem's options.

    Returns:
        ``{key: path}`` of the component files written.
    """
    state = load_single_file(path, allowed_globals=allowed_globals, storage_options=storage_options)
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(f"{path} does not hold a dict state", path_in_state="state")
    return save_multi_files(None, state, path, keys_to_save, storage_options=storage_options)
