"""Checkpoints for ``torch.distributed`` jobs (DDP, FSDP2, ``DTensor``), without pickle.

- Data parallel (DDP): :func:`save_on_rank0` (collective: rank 0 writes, every
  rank gets rank 0's outcome, failures included) and :func:`load_on_all_ranks`
  (each rank maps the file onto its own device).
- Per-rank state: :func:`save_per_rank` / :func:`load_per_rank`, files named by
  :func:`per_rank_path` (``{base}.rank{R:05d}-of-{W:05d}{ext}``).
- Sharded (FSDP2 / ``DTensor``): :func:`save_sharded` / :func:`load_sharded`
  through ``torch.distributed.checkpoint`` with its safetensors storage layer,
  loadable on another world size, and :func:`consolidate` into one safeckpt file.

Collectives exchange outcomes as JSON bytes in tensors, never pickled objects.
The README's "Distributed training (DDP, FSDP2)" section has DDP and FSDP2 recipes.
"""

from __future__ import annotations

from .per_rank import load_per_rank, per_rank_path, save_per_rank
from .rank0 import default_device, load_on_all_ranks, save_on_rank0
from .sharded import consolidate, load_sharded, save_sharded

__all__ = [
    "consolidate",
    "default_device",
    "load_on_all_ranks",
    "load_per_rank",
    "load_sharded",
    "per_rank_path",
    "save_on_rank0",
    "save_per_rank",
    "save_sharded",
]
