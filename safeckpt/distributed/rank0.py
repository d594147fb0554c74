"""Data-parallel (DDP) checkpoints: rank 0 writes one checkpoint, every rank loads it.

:func:`save_on_rank0` is collective: rank 0 saves with the seed API, then tells
every rank how it went through a pickle-free broadcast (:mod:`._comm`), so that
a failure on rank 0 is raised on every rank instead of leaving them hung at a
barrier. :func:`load_on_all_ranks` is not collective: each rank maps the same
file (safetensors reads through ``mmap``, so the ranks of one host share one
copy in the page cache) and places the tensors on its own device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..handler import Reporter
from ..limits import DEFAULT_LIMITS, Limits
from ..loading import load
from ..saving import save_multi_files, save_single_file
from ..storage import is_url
from ._comm import broadcast_outcome, dist_ready, raise_own, world

__all__ = ["default_device", "load_on_all_ranks", "save_on_rank0"]


class _LogOnly:
    """An ``nn_handler`` stand-in that logs like the caller's but lets failures propagate untouched."""

    def __init__(self, reporter: Reporter) -> None:
        self._rank = reporter.rank
        self.log = reporter.log


def default_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    ``LOCAL_RANK`` is the variable ``torchrun`` sets (0 when it is missing).

    Returns:
        The device.
    """
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK", "0")
        return torch.device("cuda", int(local) if local.isdigit() else 0)
    return torch.device("cpu")


def _save(
    nn_handler: Any, state: Mapping[Any, Any], path: Any, multi: bool, keys_to_save: Iterable[str] | None, format: str
) -> Path | dict[str, Path]:
    if multi:
        return save_multi_files(nn_handler, state, path, keys_to_save, format=format)
    if keys_to_save is not None:
        raise ValueError("keys_to_save applies only with multi=True")
    return save_single_file(nn_handler, state, path, format=format)


def _result_json(result: Path | dict[str, Path]) -> Any:
    if isinstance(result, dict):
        return [[key, os.fspath(value)] for key, value in result.items()]
    return os.fspath(result)


def _as_returned(item: str) -> Any:
    return item if is_url(item) else Path(item)


def _result_from_json(value: Any) -> Path | dict[str, Path]:
    if isinstance(value, list):
        return {str(key): _as_returned(item) for key, item in value}
    return _as_returned(str(value))


def save_on_rank0(
    nn_handler: Any,
    state: Mapping[Any, Any],
    path: str | os.PathLike[str],
    *,
    multi: bool = False,
    keys_to_save: Iterable[str] | None = None,
    format: str = "safe",
) -> Path | dict[str, Path]:
    """Save a replicated (DDP) training state once, from rank 0; every rank must call it.

    Rank 0 writes with :func:`~safeckpt.save_single_file` (or
    :func:`~safeckpt.save_multi_files` with ``multi=True``); the other ranks
    only wait for its outcome. On success every rank returns what rank 0 wrote,
    so the file is complete on every rank once this returns (on a file system
    all ranks share). Without an initialised process group it is a plain save.

    Args:
        nn_handler: any object or ``None``; its ``log``, ``raise_error`` and
            ``_rank`` are used as :mod:`safeckpt.handler` describes (every log line names the rank).
        state: the training state; only rank 0's is read, never modified.
        path: the file (or with ``multi=True`` the base path) to write.
        multi: one file per component plus a manifest, as ``save_multi_files``.
        keys_to_save: with ``multi=True``, the components to save.
        format: ``"safe"``, ``"torch"`` or ``"auto"``, as for ``save_single_file``.

    Returns:
        The path written (a ``{component: path}`` dict with ``multi=True``), on every rank.

    Raises:
        Exception: whatever rank 0's save raised, on every rank. Rank 0 raises the
            original; the others raise the same class when it is one of safeckpt's
            errors or a common builtin (``OSError`` subclasses keep their
            ``errno``), else ``RuntimeError``, with a message naming rank 0's
            failure and their own rank, and ``source_rank``/``remote_type`` attributes.
            Errors go through ``nn_handler.raise_error`` when it has one.
    """
    target: Any = path if is_url(path) else Path(path)  # a URL is never made a local path
    if not dist_ready():
        return _save(nn_handler, state, target, multi, keys_to_save, format)
    reporter = Reporter(nn_handler)
    rank, _ = world()
    error: BaseException | None = None
    result: Path | dict[str, Path] | None = None
    if rank == 0:
        try:
            result = _save(_LogOnly(reporter), state, target, multi, keys_to_save, format)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks before it propagates
            error = exc
    outcome = broadcast_outcome(error, None if result is None else _result_json(result), src=0)
    raise_own(error, reporter, f"save NNHandler state to {target}")
    if rank == 0:
        assert result is not None
        return result
    if not outcome.ok:
        remote_error = outcome.exception(rank, f"save {target}")
        reporter.fail(
            remote_error, f"Rank {reporter.rank}: rank 0 failed to save NNHandler state to {target}: {remote_error}"
        )
    reporter.log(f"NNHandler state saved by Rank 0 to: {target} (seen by Rank {reporter.rank})")
    return _result_from_json(outcome.result)


def load_on_all_ranks(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | int | None = None,
    allowed_globals: Iterable[Any] = (),
    trust_pickle: bool = False,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Load a checkpoint on this rank, onto this rank's device; call it on every rank.

    Not collective: each rank reads on its own. Safetensors files are memory
    mapped (private, copy-on-write), so N ranks on one host share the file's
    pages in the page cache instead of holding N copies; a tensor is copied only
    when it is moved to a GPU or written to.

    Args:
        path: anything :func:`safeckpt.load` reads (a single file, a multi-file set or manifest...).
        device: where tensors go; default :func:`default_device` (``cuda:LOCAL_RANK`` or CPU).
        allowed_globals, trust_pickle, verify, limits: as for :func:`safeckpt.load_single_file`.

    Returns:
        The state.

    Raises:
        FileNotFoundError: if there is no such checkpoint.
        CheckpointFormatError: if it is corrupt or of no format safeckpt reads.
        IntegrityError: with ``verify=True``, on a digest mismatch.
    """
    return load(
        path,
        device=default_device() if device is None else device,
        allowed_globals=allowed_globals,
        trust_pickle=trust_pickle,
        verify=verify,
        limits=limits,
    )
