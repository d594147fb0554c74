"""Split a state tree into its tensors and the rest, and put them back together.

A sharded checkpoint stores the tensors through ``torch.distributed.checkpoint``
(which wants a flat ``{str: tensor}`` dict) and everything else with safeckpt's
msgpack codec. :func:`split_tensors` walks dicts, ``OrderedDict``s, lists and
tuples, replaces every tensor (``DTensor`` included) by ``None`` and records a
:class:`Slot` for it: its path of keys, a flat storage key and its global dtype
and shape. :func:`merge_tensors` rebuilds the tree with tensors in those places.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointFormatError, UnsupportedValueError

__all__ = ["Slot", "merge_tensors", "split_tensors"]

_MAX_DEPTH = 200


@dataclass(frozen=True)
class Slot:
    """Where one tensor sits in the state.

    Attributes:
        path: the keys (and list indices) leading to it from the top of the state.
        key: its flat storage key: the path's segments as text joined by ``/``
            (``%`` and ``/`` inside a segment escaped), made unique with ``#n``.
        dtype: its dtype.
        shape: its global shape (a ``DTensor``'s full shape, not its local shard's).
    """

    path: tuple[Any, ...]
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _segment(key: Any) -> str:
    return str(key).replace("%", "%25").replace("/", "%2F")


def _rebuild(value: Any, path: tuple[Any, ...], walk: Callable[[Any, tuple[Any, ...]], Any]) -> Any:
    """A container the tree walks into (dict, ``OrderedDict`` with its attributes, list, tuple) rebuilt
    with ``walk(child, child's path)`` for each child; any other value as it is."""
    if type(value) is OrderedDict:
        out: Any = OrderedDict((k, walk(v, (*path, k))) for k, v in value.items())
        out.__dict__.update(vars(value))  # e.g. a state_dict()'s _metadata
        return out
    if type(value) is dict:
        return {k: walk(v, (*path, k)) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(walk(v, (*path, i)) for i, v in enumerate(value))
    return value


def split_tensors(state: Mapping[Any, Any]) -> tuple[Any, list[Slot], dict[str, torch.Tensor]]:
    """Take the tensors out of ``state`` (which is not modified).

    Args:
        state: a dict tree whose leaves may be tensors or ``DTensor``s.

    Returns:
        ``(skeleton, slots, tensors)``: a copy of the tree with ``None`` where each
        tensor was, one :class:`Slot` per tensor in walk order, and ``{slot.key: tensor}``.

    Raises:
        UnsupportedValueError: if the tree nests deeper than 200 levels.
    """
    slots: list[Slot] = []
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if len(path) > _MAX_DEPTH:
            raise UnsupportedValueError(f"the state nests deeper than {_MAX_DEPTH} levels", path_in_state=repr(path[:5]))
        if isinstance(value, torch.Tensor):
            key = base = "/".join(_segment(k) for k in path) or "tensor"
            n = 1
            while key in tensors:
                key, n = f"{base}#{n}", n + 1
            slots.append(Slot(path, key, value.dtype, tuple(value.shape)))
            tensors[key] = value
            return None
        return _rebuild(value, path, walk)

    return walk(state, ()), slots, tensors


def merge_tensors(skeleton: Any, tensors: Mapping[tuple[Any, ...], torch.Tensor]) -> Any:
    """The tree ``skeleton`` with ``tensors[path]`` at each of their paths.

    Args:
        skeleton: a tree as :func:`split_tensors` returns it.
        tensors: ``{path: tensor}``.

    Returns:
        A new tree (containers are copied; other leaves are shared).

    Raises:
        CheckpointFormatError: if a path does not lead to a ``None`` leaf of the tree.
    """
    placed = 0

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        nonlocal placed
        if path in tensors:
            if value is not None:
                raise CheckpointFormatError(f"tensor slot {path!r:.200} holds a {type(value).__name__}, not a placeholder")
            placed += 1
            return tensors[path]
        if len(path) > _MAX_DEPTH:
            raise CheckpointFormatError(f"the state nests deeper than {_MAX_DEPTH} levels")
        return _rebuild(value, path, walk)

    merged = walk(skeleton, ())
    if placed != len(tensors):
        raise CheckpointFormatError(f"{len(tensors) - placed} tensor slot(s) do not lead to a place in the state")
    return merged
