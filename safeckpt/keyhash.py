"""Keys of one hash: the bound that keeps a keyed container built from a file linear.

A dict or set finds a key by its hash. Unequal keys with equal hashes share one
probe sequence, so inserting the n-th of them compares it with the n-1 before:
n such keys cost n**2/2 comparisons. A file chooses the hash of most key types:
an int ``n`` hashes like ``n + k * (2**61 - 1)`` (``sys.hash_info.modulus``), a
float like the int of its value modulo that, a tuple or frozenset by a fixed mix
of its items' hashes, so a 60 KiB pickle of 5,000 such keys costs seconds and a
1 MiB one minutes. Keys that are never counted: ``str`` and ``bytes`` (their
hash is keyed by a random per-process secret that a file cannot know), and ints
within ``+-(2**61 - 2)`` (each hashes to itself; only -1 and -2 share a hash).

Rule: a keyed container built from a file (dict, OrderedDict, set, frozenset,
and the legacy reader's memo) holds at most ``Limits.max_equal_hash_keys``
inserted keys of one hash, counted before they are inserted; past it
:class:`~safeckpt.errors.LimitExceededError` names the limit. Each insert then
compares at most that many keys. The legacy reader charges the comparisons to
its work budget too (see :mod:`safeckpt.legacy.budget`); the skeleton decoder
counts each map, set and OrderedDict it builds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from .errors import LimitExceededError

__all__ = ["EqualHashes", "count_equal_hashes"]

_MODULUS = sys.hash_info.modulus  # ints strictly inside +-modulus hash to themselves (-1 to -2)


def _unit(_: Any) -> int:
    return 1


def count_equal_hashes(
    counts: dict[int, int], keys: Iterable[Any], limit: int, cost: Callable[[Any], int] = _unit
) -> int:
    """Count ``keys`` (about to be inserted) by hash into ``counts``; return the work they add.

    Args:
        counts: keys counted so far per hash, for one container (updated in place).
        keys: the keys or set elements about to be inserted.
        limit: the most keys of one hash the container may hold (``Limits.max_equal_hash_keys``).
        cost: units one hash or one comparison of a key costs.

    Returns:
        Units of work: hashing each counted key once more, and comparing it with every key of
        its hash before it (what the insert will do).

    Raises:
        LimitExceededError: naming ``max_equal_hash_keys`` when a hash would hold more than ``limit``.
        TypeError: for an unhashable key (as the insert itself would).
    """
    units = 0
    for key in keys:
        kind = type(key)
        if kind is str or kind is bytes or (kind is int and -_MODULUS < key < _MODULUS):
            continue
        h = hash(key)
        n = counts.get(h, 0)
        if n >= limit:
            raise LimitExceededError(
                f"a dict or set read from the file would hold more than Limits.max_equal_hash_keys={limit} "
                f"keys of one hash (keys chosen to collide make every insert slower); "
                "raise it only for a file you trust",
                limit="max_equal_hash_keys",
                maximum=limit,
                actual=n + 1,
            )
        counts[h] = n + 1
        units += (n + 1) * cost(key)
    return units


class EqualHashes:
    """Counts of keys per hash for the containers one reader fills over several opcodes.

    Containers are remembered by identity and kept alive while counted (so an id is never
    reused for another), and only once a key that may collide is inserted into them.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[int, tuple[Any, dict[int, int]]] = {}

    def counts_of(self, container: Any) -> dict[int, int]:
        """The counts of ``container`` (empty the first time; ``None``: a container used once)."""
        if container is None:
            return {}
        entry = self._counts.get(id(container))
        if entry is None or entry[0] is not container:
            entry = self._counts[id(container)] = (container, {})
        return entry[1]

    def adopt(self, container: Any, counts: dict[int, int]) -> None:
        """Make ``counts`` (kept while building ``container``) the container's own from now on."""
        if counts:
            self._counts[id(container)] = (container, counts)
