"""Sharded checkpoints of ``DTensor`` / FSDP2 state through ``torch.distributed.checkpoint`` (DCP).

Layout of a sharded checkpoint directory::

    ckpt/
      safeckpt-sharded.msgpack      the non-tensor state and the tensor table; written last (the commit point)
      safeckpt-shards/
        shard-00001-model-00001-of-00001.safetensors   one file per rank that owns data
        ...

Tensors are written by every rank with DCP's own Hugging Face storage layer
(``HuggingFaceStorageWriter(save_distributed=True)`` /
``HuggingFaceStorageReader``): plain safetensors files whose ``__metadata__``
records, as JSON, where each stored chunk sits in the global tensor. DCP's
planner deduplicates replicated tensors and, on load, reads only the slices
each rank's shards need, so a checkpoint loads on any world size. That storage
layer writes no ``.metadata`` file (DCP's default ``FileSystemWriter`` pickles
one); it rebuilds DCP's global ``Metadata`` from the safetensors headers.

Everything that is not a tensor (optimizer ``param_groups``, ``model_kwargs``,
class references, the tensors' places in the state) is encoded by rank 0 with
safeckpt's msgpack codec into ``safeckpt-sharded.msgpack``, an ordinary safeckpt
skeleton file (its format and checks: :mod:`.sharded_index`). No file of a
sharded checkpoint is a pickle.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ComponentNotFoundError
from ..handler import Reporter
from ..limits import DEFAULT_LIMITS, Limits
from ..saving import save_single_file
from ..storage import atomic_write, fsync_dir, local_text
from ._comm import all_gather_outcomes, broadcast_outcome, dist_ready, raise_own, world
from .sharded_index import META_NAME, SHARD_DIR, document, index_writer, read_index, shard_records
from .tree import Slot, merge_tensors, split_tensors

__all__ = ["META_NAME", "SHARD_DIR", "consolidate", "load_sharded", "save_sharded"]


def _local_root(path: str | os.PathLike[str]) -> Path:
    """A sharded checkpoint's directory: DCP writes it with local file I/O, so a URL is refused."""
    local = local_text(path)
    if local is None:
        raise ValueError(
            f"{path}: sharded checkpoints are written by torch.distributed.checkpoint to a local (or "
            "mounted) directory every rank sees; use a path, not a URL"
        )
    return Path(local)


def _sync(error: BaseException | None, reporter: Reporter, action: str, *, everyone: bool, collective: bool = True) -> None:
    """Make every rank raise if the step failed anywhere (rank 0 only, or any rank with ``everyone``)."""
    if collective and dist_ready():
        rank, _ = world()
        outcomes = all_gather_outcomes(error) if everyone else [broadcast_outcome(error, src=0)]
        if error is None:
            failed = [o for o in outcomes if not o.ok]
            if failed:
                error = failed[0].exception(rank, action)
    raise_own(error, reporter, action)


@contextlib.contextmanager
def _single_process(quiet: bool) -> Any:
    """Silence DCP's "assuming the intent is to ... in a single process" warning when that is the intent."""
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _plain_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors safetensors can write: contiguous, and not sharing memory with another one (tied weights)."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, DTensor):
            tensor = tensor.detach()
            ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
            if not tensor.is_contiguous() or (ptr and ptr in seen):
                tensor = tensor.contiguous() if not tensor.is_contiguous() else tensor.clone()
            seen.add(ptr)
        out[key] = tensor
    return out


def _clear(root: Path) -> None:
    """Remove the commit marker first, then the shard files of an earlier save (nothing else)."""
    root.mkdir(parents=True, exist_ok=True)
    meta = root / META_NAME
    if meta.exists():
        meta.unlink()
        fsync_dir(root)
    shards = root / SHARD_DIR
    if shards.is_dir():
        for file in shards.iterdir():
            if file.suffix == ".safetensors" or file.name == "model.safetensors.index.json":
                file.unlink()


# --------------------------------------------------------------------------- save


def save_sharded(nn_handler: Any, state: Mapping[Any, Any], path: str | os.PathLike[str]) -> Path:
    """Save a sharded (``DTensor``/FSDP2) state into the directory ``path``; every rank must call it.

    Use :func:`torch.distributed.checkpoint.state_dict.get_state_dict` to get the
    model and optimizer state (sharded ``DTensor``s), and put them in ``state``
    with anything else (``model_kwargs``, epoch...). Every rank writes its own
    shards; replicated tensors are written once. Rank 0 writes the non-tensor
    part last, as the commit point. A previous sharded checkpoint in ``path`` is
    replaced (its commit marker is removed first). ``path`` must be on a file
    system every rank sees. Without a process group it is a one-process save.

    Args:
        nn_handler: any object or ``None`` (see :func:`~safeckpt.save_single_file`).
        state: the state; tensor leaves (``DTensor`` or plain) inside dicts,
            lists and tuples are stored by DCP, all other values by rank 0 with
            safeckpt's codec (rank 0's copy of them is what is saved). Not modified.
        path: the checkpoint directory; created if missing.

    Returns:
        ``path``, on every rank.

    Raises:
        UnsupportedValueError: a non-tensor value the safe format cannot hold (on every rank).
        OSError: if rank 0 cannot create or write the directory (on every rank).
        torch.distributed.checkpoint.api.CheckpointException: if a rank failed to write its shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    reporter = Reporter(nn_handler)
    rank, world_size = world()
    root = _local_root(path)
    error: BaseException | None = None
    try:
        skeleton, slots, tensors = split_tensors(state)
        if rank == 0:
            index_writer(document(skeleton, slots, world_size, []))  # fail now, before any rank writes, on a value the format cannot hold
            _clear(root)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank first
        error = exc
    _sync(error, reporter, f"prepare the sharded checkpoint {root}", everyone=True)
    writer = HuggingFaceStorageWriter(str(root / SHARD_DIR), save_distributed=True)
    try:
        with _single_process(not dist_ready()):
            dcp.save(_plain_contiguous(tensors), storage_writer=writer, no_dist=not dist_ready())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP raises on every rank when any rank failed; to nn_handler
        reporter.fail(exc, f"Rank {reporter.rank} failed to save the shards of {root}: {exc}")
    if rank == 0:
        try:
            atomic_write(root / META_NAME, index_writer(document(skeleton, slots, world_size, shard_records(root))))
        except BaseException as exc:  # noqa: BLE001
            error = exc
    _sync(error, reporter, f"commit the sharded checkpoint {root}", everyone=False)
    reporter.log(f"NNHandler sharded state saved by Rank {reporter.rank} (of {world_size}) to: {root}")
    return root


def _destinations(
    slots: list[Slot], template: Mapping[Any, Any] | None, device: torch.device, strict: bool
) -> dict[tuple[Any, ...], torch.Tensor]:
    wanted: dict[tuple[Any, ...], torch.Tensor] = {}
    if template is not None:
        _, template_slots, template_tensors = split_tensors(template)
        wanted = {slot.path: template_tensors[slot.key] for slot in template_slots}
    saved = {slot.path for slot in slots}
    missing = [path for path in wanted if path not in saved]
    if strict and missing:
        raise ComponentNotFoundError(
            f"the checkpoint has no tensor at {missing[0]!r:.200} ({len(missing)} missing); pass strict=False to leave them",
            name=missing[0],
            available=sorted(map(repr, saved))[:20],
        )
    out = {}
    for slot in slots:
        dest = wanted.get(slot.path)
        if dest is None:
            out[slot.path] = torch.zeros(slot.shape, dtype=slot.dtype, device=device)  # a crafted overlap leaves no stale memory
            continue
        if tuple(dest.shape) != slot.shape or dest.dtype != slot.dtype:
            raise ValueError(
                f"tensor at {slot.path!r:.200} is {slot.dtype} {list(slot.shape)} in the checkpoint "
                f"but {dest.dtype} {list(dest.shape)} in the state to load into"
            )
        out[slot.path] = dest
    return out


def load_sharded(
    path: str | os.PathLike[str],
    state: Mapping[Any, Any] | None = None,
    *,
    nn_handler: Any = None,
    device: str | torch.device = "cpu",
    allowed_globals: Iterable[Any] = (),
    strict: bool = True,
    limits: Limits = DEFAULT_LIMITS,
    no_dist: bool = False,
) -> dict[Any, Any]:
    """Load a sharded checkpoint, resharding to this job's layout; every rank must call it.

    Pass as ``state`` a state of the same structure from the current job (from
    ``get_state_dict(model, optimizer)``, sharded for the current world size,
    which may differ from the saving one): its tensors are filled in place by
    DCP, each rank reading only the slices its shards need. Tensors of the
    checkpoint that ``state`` has no tensor for come back whole, on ``device``.
    Afterwards apply the result with ``set_state_dict``.

    Args:
        path: the checkpoint directory written by :func:`save_sharded`.
        state: the state to load into, or ``None`` for whole tensors everywhere.
        nn_handler: any object or ``None``, for logging and error routing.
        device: where tensors that ``state`` does not provide are placed.
        allowed_globals: class references that may be imported (others stay ``GlobalRef``).
        strict: raise if ``state`` has a tensor the checkpoint lacks.
        limits: bounds on what the index and shard files may declare.
        no_dist: read in this process only, even if a process group is initialised
            (what :func:`consolidate` does).

    Returns:
        The saved state: its non-tensor values as saved, its tensors those of
        ``state`` (now loaded) or new whole tensors.

    Raises:
        FileNotFoundError: if ``path`` holds no committed sharded checkpoint.
        IntegrityError: if the shard files are not exactly those recorded.
        CheckpointFormatError: if the index file or a shard is corrupt, or the shards' chunks
            do not tile the tensors the index declares.
        ComponentNotFoundError: with ``strict``, a tensor of ``state`` the checkpoint lacks.
        ValueError: a tensor whose global shape or dtype differs from the saved one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    reporter = Reporter(nn_handler)
    root = _local_root(path)
    collective = dist_ready() and not no_dist
    error: BaseException | None = None
    try:
        skeleton, slots = read_index(root, allowed_globals, limits)
        dests = _destinations(slots, state, torch.device(device), strict)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank first
        error = exc
    _sync(error, reporter, f"load the sharded checkpoint {root}", everyone=True, collective=collective)
    by_key = {slot.key: dests[slot.path] for slot in slots}
    try:
        if by_key:
            with _single_process(not collective):
                dcp.load(by_key, storage_reader=HuggingFaceStorageReader(str(root / SHARD_DIR)), no_dist=not collective)
        merged = merge_tensors(skeleton, dests)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - routed to nn_handler, which raises
        reporter.fail(exc, f"Rank {reporter.rank} failed to load the sharded checkpoint {root}: {exc}")
    reporter.log(f"NNHandler sharded state loaded by Rank {reporter.rank} from: {root}")
    return merged  # type: ignore[no-any-return]


def consolidate(
    path: str | os.PathLike[str], out: str | os.PathLike[str], *, nn_handler: Any = None, limits: Limits = DEFAULT_LIMITS
) -> Path:
    """Merge a sharded checkpoint into one safeckpt file that loads without ``torch.distributed``.

    Runs in this process only (call it on one rank, or offline): every tensor is
    assembled whole on the CPU, so the machine needs memory for the full state.
    Class references are carried over as saved, without being imported.

    Args:
        path: the sharded checkpoint directory.
        out: the single file to write (atomically).
        nn_handler: any object or ``None``, for logging and error routing.
        limits: bounds on what the index and shard files may declare.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError, IntegrityError, CheckpointFormatError, LimitExceededError: as :func:`load_sharded`.
        OSError: if ``out`` cannot be written.
    """
    state = load_sharded(path, None, nn_handler=nn_handler, device="cpu", limits=limits, no_dist=True)
    return save_single_file(nn_handler, state, out)
