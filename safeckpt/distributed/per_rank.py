"""One checkpoint per rank, for state that differs between ranks (RNG states, data-loader position...).

File names carry the rank and the world size, zero-padded:
``ckpt/m.safeckpt`` becomes ``ckpt/m.rank00001-of-00004.safeckpt`` on rank 1 of 4.
Two ranks of one job never share a name, and neither do two jobs of different
world sizes saving to the same base path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..handler import Reporter
from ..limits import DEFAULT_LIMITS, Limits
from ..multifile import MANIFEST_SUFFIX, split_base
from ..storage import is_url, join, locate, split_location
from ._comm import all_gather_outcomes, dist_ready, raise_own, world
from .rank0 import _LogOnly, _result_json, _save, load_on_all_ranks

__all__ = ["load_per_rank", "per_rank_path", "save_per_rank"]


def _split_name(path: str | os.PathLike[str]) -> tuple[str, str]:
    _, name = split_location(path)
    stem, suffix = os.path.splitext(name)
    return (stem, suffix) if stem else (name, "")


def per_rank_path(path: str | os.PathLike[str], rank: int | None = None, world_size: int | None = None) -> Path:
    """The file of one rank: ``{base}.rank{RANK:05d}-of-{WORLD:05d}{ext}``.

    Args:
        path: the base path, e.g. ``ckpt/m.safeckpt``.
        rank: the rank (default: this process's rank, 0 without a process group).
        world_size: the number of ranks (default: this job's, 1 without a process group).

    Returns:
        E.g. ``ckpt/m.rank00001-of-00004.safeckpt``.

    Raises:
        ValueError: if ``rank`` is not in ``[0, world_size)``.
    """
    own_rank, own_world = world()
    rank = own_rank if rank is None else rank
    world_size = own_world if world_size is None else world_size
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    parent, _ = split_location(path)
    stem, suffix = _split_name(path)
    name = f"{stem}.rank{rank:05d}-of-{world_size:05d}{suffix}"
    if is_url(path):
        return join(parent, name)  # type: ignore[return-value]  # a URL stays a URL
    return Path(path).with_name(name)


def save_per_rank(
    nn_handler: Any,
    state: Mapping[Any, Any],
    path: str | os.PathLike[str],
    *,
    multi: bool = False,
    keys_to_save: Iterable[str] | None = None,
    format: str = "safe",
) -> Path | dict[str, Path]:
    """Every rank saves its own state to its own file (:func:`per_rank_path`); every rank must call it.

    Collective: after saving, the ranks exchange their outcomes (without pickle),
    so if any rank failed every rank raises and none goes on believing the set is complete.

    Args:
        nn_handler: any object or ``None`` (see :func:`~safeckpt.save_single_file`).
        state: this rank's state; never modified.
        path: the base path; each rank writes ``per_rank_path(path)``.
        multi, keys_to_save, format: as for :func:`save_on_rank0`.

    Returns:
        This rank's path (a ``{component: path}`` dict with ``multi=True``).

    Raises:
        Exception: a failing rank raises its own error; the others raise the same
            class (allowlisted, else ``RuntimeError``) naming the first failed rank,
            with ``source_rank`` and ``remote_type`` attributes.
    """
    target = per_rank_path(path)
    if not dist_ready():
        return _save(nn_handler, state, target, multi, keys_to_save, format)
    reporter = Reporter(nn_handler)
    rank, _ = world()
    error: BaseException | None = None
    result: Path | dict[str, Path] | None = None
    try:
        result = _save(_LogOnly(reporter), state, target, multi, keys_to_save, format)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank before it propagates
        error = exc
    outcomes = all_gather_outcomes(error, None if result is None else _result_json(result))
    raise_own(error, reporter, f"save NNHandler state to {target}")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        remote_error = failed[0].exception(rank, f"save its part of {path}")
        ranks = ", ".join(str(o.rank) for o in failed)
        reporter.fail(
            remote_error, f"Rank {reporter.rank}: per-rank save to {path} failed on rank(s) {ranks}: {remote_error}"
        )
    assert result is not None
    return result


def load_per_rank(
    path: str | os.PathLike[str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device | int | None = None,
    allowed_globals: Iterable[Any] = (),
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Load one rank's file of a set written by :func:`save_per_rank`. Not collective.

    Args:
        path: the base path given to ``save_per_rank``.
        rank, world_size: whose file (default: this process's rank and world size).
        device: where tensors go (default ``cuda:LOCAL_RANK`` or CPU).
        allowed_globals, verify, limits: as for :func:`safeckpt.load_single_file`.

    Returns:
        That rank's state.

    Raises:
        FileNotFoundError: if that rank's file is missing; the message lists the
            world sizes the base path has per-rank files for.
    """
    target = per_rank_path(path, rank, world_size)
    storage, name = locate(target)
    if not storage.exists(name) and not storage.exists(split_base(name) + MANIFEST_SUFFIX):
        stem, suffix = _split_name(path)
        pattern = re.compile(rf"{re.escape(stem)}\.rank\d{{5,}}-of-(\d{{5,}}){re.escape(suffix)}\Z")
        try:
            sizes = sorted({int(m.group(1)) for p in storage.listdir() if (m := pattern.match(p))})
        except OSError:
            sizes = []
        hint = f"; per-rank files exist for world size(s) {sizes}" if sizes else ""
        raise FileNotFoundError(f"no per-rank checkpoint {target}{hint}")
    return load_on_all_ranks(target, device=device, allowed_globals=allowed_globals, verify=verify, limits=limits)
