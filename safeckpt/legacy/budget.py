"""What reading one pickle may cost: the legacy VM's work budget, in one place.

Reading a pickle of N bytes must cost O(N) time and O(N) memory with small
constants, whatever the bytes. The VM's loop does a bounded amount of work per
opcode and every opcode is at least one byte, so the loop itself is linear.
What is not, unless it is counted, is what an opcode does to *values*: one byte
makes an empty set (216 bytes of memory); three bytes hash again a 100,000-item
tuple shared through the memo, or copy a shared list into a new set. So every
such cost is charged, before it is spent, in *units* (8 bytes of a new value,
or one element hashed, copied or walked) against::

    Limits.max_pickle_work + Limits.max_pickle_work_per_byte * (bytes of the pickle read so far)

A pickle over it raises :class:`~safeckpt.errors.LimitExceededError` naming
``max_pickle_work``. Alongside, plain counts bound the stack
(``max_pickle_stack``), the open MARKs (``max_pickle_marks``), the memo
(``max_pickle_memo``) and every container (``max_container_len``).

:class:`KeyCosts` prices hashing: a tuple's hash walks all of it every time (it
is not cached), so each tuple or frozenset used as a key or set element is
walked once, iteratively, and its cost and depth remembered by identity; the
same walk refuses keys nested deeper than ``Limits.max_depth`` (hashing a
million-deep tuple recurses in C and would crash the interpreter).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..errors import LimitExceededError
from ..limits import Limits

__all__ = ["COSTS", "KeyCosts", "shallow_units", "work_error"]

#: units charged per construct (8 bytes of memory each, measured with ``sys.getsizeof`` on 64-bit CPython)
COSTS = {
    "list": 7,  # an empty list (EMPTY_LIST, and each MARK's own list)
    "dict": 8,  # an empty dict
    "set": 27,  # an empty set or frozenset
    "tuple": 5,  # a tuple, plus one per item
    "entry": 5,  # one dict entry (key and value references, hash, index)
    "element": 4,  # one set element
    "pair": 8,  # one (key, value) pair kept for an inert object
    "memo": 9,  # one memo entry and its integer key
    "object": 32,  # an inert object, a value an allowed constructor returns, a storage, a new global name
    "key": 16,  # remembering the hashing cost of one tuple or frozenset
}

_MAX_COST = 1 << 62  # costs saturate: a tuple DAG of shared halves has 2**depth nodes
_ITEM_UNITS: dict[type, int] = {list: 1, tuple: 1, dict: 6, OrderedDict: 10, set: 6, frozenset: 6}


def shallow_units(value: Any) -> int:
    """Units to copy ``value`` one level deep (what a constructor given it may allocate)."""
    kind = type(value)
    per_item = _ITEM_UNITS.get(kind)
    if per_item is not None:
        return per_item * len(value)
    if kind is bytes or kind is bytearray:
        return len(value) >> 3
    if kind is str:
        return len(value) >> 1  # up to 4 bytes per character
    return 0


def work_error(spent: int, cap: int, limits: Limits, what: str) -> LimitExceededError:
    """The error for a pickle that would spend ``spent`` units where ``cap`` are allowed."""
    return LimitExceededError(
        f"the pickle would cost {spent} units of work ({what}), over the {cap} its size allows "
        f"(Limits.max_pickle_work={limits.max_pickle_work} + Limits.max_pickle_work_per_byte="
        f"{limits.max_pickle_work_per_byte} per byte read); raise them only for a file you trust",
        limit="max_pickle_work",
        maximum=cap,
        actual=spent,
    )


class KeyCosts:
    """The cost of hashing a value, remembered per tuple and frozenset (by identity, kept alive)."""

    def __init__(self, max_depth: int) -> None:
        self._max_depth = max_depth
        self._known: dict[int, tuple[Any, int, int]] = {}  # id -> (value, depth, cost)
        self.cached = 0  # walks remembered: the caller charges COSTS["key"] for each

    def cost(self, value: Any) -> int:
        """Units one ``hash(value)`` costs. Raises LimitExceededError past ``max_depth``."""
        kind = type(value)
        if kind is str or kind is bytes or kind is float or kind is bool or value is None:
            return 1  # str and bytes cache their hash
        if kind is int:
            return 1 + (value.bit_length() >> 6)
        if isinstance(value, (tuple, frozenset)):
            known = self._known.get(id(value))
            if known is not None and known[0] is value:
                return known[2]
            return self._walk(value)
        return 1  # hashed in O(1) (globals, tensors, dtypes) or unhashable (TypeError)

    def _walk(self, root: Any) -> int:
        known = self._known
        todo = [root]
        while todo:
            node = todo[-1]
            waiting = False
            for child in node:
                if isinstance(child, (tuple, frozenset)):
                    entry = known.get(id(child))
                    if entry is None or entry[0] is not child:
                        todo.append(child)
                        waiting = True
            if waiting:
                continue
            todo.pop()
            entry = known.get(id(node))
            if entry is not None and entry[0] is node:
                continue
            depth, cost = 1, (1 if isinstance(node, tuple) else len(node))
            if isinstance(node, tuple):
                for child in node:
                    if isinstance(child, (tuple, frozenset)):
                        _, child_depth, child_cost = known[id(child)]
                        depth = max(depth, child_depth + 1)
                        cost += child_cost
                    else:
                        cost += self.cost(child)
            else:
                for child in node:
                    if isinstance(child, (tuple, frozenset)):
                        depth = max(depth, known[id(child)][1] + 1)
            if depth > self._max_depth:
                raise LimitExceededError(
                    f"a dict key or set element is nested deeper than Limits.max_depth={self._max_depth}",
                    limit="max_depth",
                    maximum=self._max_depth,
                    actual=depth,
                )
            known[id(node)] = (node, depth, min(cost, _MAX_COST))
            self.cached += 1
        return known[id(root)][2]
