"""The interpreter's bookkeeping: work budget, value stack, MARKs and memo.

:class:`VMState` is the base of :class:`.vm.SymbolicUnpickler`: charging work
against the budget of :mod:`.budget`, pushing and popping the stack within
``Limits``, and the memo opcodes (PUT/GET and their indexed slots). It also owns
the pending-object type (``_Pending``: a value completed by a later BUILD, made by
:func:`.vm.make_pending`) and the constants the opcode handlers share.
Nothing here executes anything from a pickle.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import LimitExceededError
from ..keyhash import EqualHashes, count_equal_hashes
from ..limits import Limits
from ..refs import OpaqueObject
from .budget import COSTS, work_error
from .source import _U4, PickleSource


class _Pending:
    """A value whose real form depends on a later BUILD (numpy arrays)."""

    def __init__(self, finish: Callable[[Any], Any], placeholder: OpaqueObject) -> None:
        self.finish = finish
        self.placeholder = placeholder


class _Stop(Exception):
    """Raised by STOP: the end of the loop."""


def _short(value: Any) -> str:
    """A bounded description of a value for a message (never formats a huge int)."""
    if type(value) is str:
        return repr(value[:50])
    return type(value).__name__


#: allowed calls that hash what they are given: "set" hashes its argument's items, "dict" the first of each pair
_HASHING_CALLS = {"builtins:set": "set", "builtins:frozenset": "set", "collections:OrderedDict": "dict"}
_MODULUS = sys.hash_info.modulus
_SIZED = frozenset({str, bytes, bytearray, tuple, list, dict, OrderedDict, set, frozenset})
_NO_VALUE = object()
_C = COSTS


class VMState(PickleSource):
    """Budget, stack, MARK and memo bookkeeping (attributes are set by :class:`.vm.SymbolicUnpickler`)."""

    def __init__(self, source: Any, limits: Limits) -> None:
        super().__init__(source, limits)
        self._hashes = EqualHashes(limits.max_equal_hash_keys)  # keys of one hash, per container (see ..keyhash)
        #: a list to record every str, bytes and bytearray value the opcodes make (scanning
        #: searches them all for hidden pickles, see .nested); None: not recorded
        self.payloads: list[Any] | None = None

    # budget -----------------------------------------------------------------------

    def _charge(self, units: int, what: str) -> None:
        """Spend ``units`` of work, or refuse the pickle (before the work is done)."""
        spent = self.spent + units
        if spent > self._cap:
            self._over(spent, what)
        self.spent = spent

    def _over(self, spent: int, what: str) -> None:
        limits = self._limits
        if self._grows:
            self._cap = limits.max_pickle_work + limits.max_pickle_work_per_byte * self.bytes_read
        if spent > self._cap:
            raise work_error(spent, self._cap, limits, what)

    def _key_cost(self, values: Any, container: Any, counts: dict[int, int] | None = None) -> int:
        """Units to insert every item of ``values`` as a key of ``container`` (charging the walks
        it remembers, and the comparisons with keys of an equal hash, whose number per hash is
        bounded by ``Limits.max_equal_hash_keys``: see :mod:`..keyhash`). ``container`` is
        ``None`` for one made once from all its keys; ``counts`` (then) keeps their counts."""
        keys = self._keys
        before = keys.cached
        total = 0
        odd = None  # keys whose hash a file may choose
        for value in values:
            kind = type(value)
            if kind is str or kind is bytes:
                total += 1
                continue
            total += keys.cost(value)
            if kind is not int or not -_MODULUS < value < _MODULUS:
                if odd is None:
                    odd = [value]
                else:
                    odd.append(value)
        if odd is not None:
            hashes = self._hashes
            if counts is None:
                counts = hashes.counts_of(container)
            total += _C["entry"] * len(odd) + count_equal_hashes(counts, odd, hashes.limit, keys.cost)
        return total + _C["key"] * (keys.cached - before)

    # stack ------------------------------------------------------------------------

    def _push(self, value: Any) -> None:
        stack = self._stack
        if len(stack) >= self._room:
            self._stack_full()
        stack.append(value)

    def _stack_full(self) -> None:
        maximum = self._limits.max_pickle_stack
        raise LimitExceededError(
            f"the pickle's stack would hold more than Limits.max_pickle_stack={maximum} values",
            limit="max_pickle_stack",
            maximum=maximum,
            actual=maximum + 1,
        )

    def _pop(self) -> Any:
        if not self._stack:
            raise self._error("stack underflow")
        return self._stack.pop()

    def _pop_mark(self) -> list[Any]:
        if not self._marks:
            raise self._error("no MARK to pop to")
        items = self._stack
        self._stack = self._marks.pop()
        self._room += len(self._stack)
        return items

    def _top(self) -> Any:
        if not self._stack:
            raise self._error("stack underflow")
        return self._stack[-1]

    def _check_len(self, n: int) -> None:
        if n > self._limits.max_container_len:
            raise LimitExceededError(
                f"a pickle container of {n} items is over Limits.max_container_len",
                limit="max_container_len",
                maximum=self._limits.max_container_len,
                actual=n,
            )

    def _settled(self, items: list[Any]) -> list[Any]:
        if self._pending:
            return [v.placeholder if type(v) is _Pending else v for v in items]
        return items

    @staticmethod
    def _settle(value: Any) -> Any:
        return value.placeholder if type(value) is _Pending else value


    # memo -----------------------------------------------------------------------------

    def _put(self, index: int) -> None:
        memo = self._memo
        if not self._stack:
            raise self._error("stack underflow")
        value = self._stack[-1]
        if index in memo:
            self._report.find("memo-overwrite", "suspicious", f"memo slot {index} is written twice", self._pos)
        elif len(memo) >= self._limits.max_pickle_memo:
            maximum = self._limits.max_pickle_memo
            raise LimitExceededError(
                f"the pickle's memo would hold more than Limits.max_pickle_memo={maximum} values",
                limit="max_pickle_memo",
                maximum=maximum,
                actual=len(memo) + 1,
            )
        self.spent += _C["memo"]
        if self.spent > self._cap:
            self._over(self.spent, "a memo entry")
        memo[index] = value
        if type(value) in self._tracked:
            self._slots.setdefault(id(value), []).append(index)

    def op_BINPUT(self) -> None:
        self._put(self._u1())

    def op_LONG_BINPUT(self) -> None:
        i = self._i
        if i + 4 > self._n:
            i = self._need(4)
        self._i = i + 4
        self._put(_U4.unpack_from(self._buf, i)[0])

    def op_PUT(self) -> None:
        index = self._decimal(self._line())
        if index < 0:
            raise self._error("negative PUT argument")
        if index >= _MODULUS:  # the only memo key a file writes in full: it may be chosen to collide
            self._charge(self._key_cost((index,), self._memo), "a memo key")
        self._put(index)

    def op_MEMOIZE(self) -> None:
        self._put(len(self._memo))

    def _get(self, index: int) -> None:
        try:
            value = self._memo[index]
        except KeyError:
            raise self._error(f"memo slot {index} read before it was written") from None
        stack = self._stack
        if len(stack) >= self._room:
            self._stack_full()
        stack.append(value)

    def op_BINGET(self) -> None:
        i = self._i
        if i >= self._n:
            i = self._need(1)
        self._i = i + 1
        self._get(self._buf[i])

    def op_LONG_BINGET(self) -> None:
        i = self._i
        if i + 4 > self._n:
            i = self._need(4)
        self._i = i + 4
        self._get(_U4.unpack_from(self._buf, i)[0])

    def op_GET(self) -> None:
        self._get(self._decimal(self._line()))
