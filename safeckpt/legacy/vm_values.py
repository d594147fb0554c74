"""Opcode handlers for plain values: protocol and framing, scalars, strings, containers.

:class:`ValueOps` adds to :class:`.vm_state.VMState` the ``op_*`` methods that
build data (numbers, strings and bytes, lists, tuples, dicts, sets) and scans
strings that are themselves pickles (on the same budget). The dispatch table of
:class:`.vm.SymbolicUnpickler` binds these methods directly.
"""

from __future__ import annotations

import codecs
from collections import OrderedDict
from typing import Any

from ..errors import CheckpointFormatError, LimitExceededError
from ..refs import OpaqueObject
from .vm_report import Report
from .vm_state import _C, VMState, _Pending, _Stop

MAX_NESTED_DEPTH = 3  # pickles inside strings inside pickles, scanned this deep


class ValueOps(VMState):
    """The opcodes that build plain values."""

    # protocol, framing, stack manipulation --------------------------------------------

    def op_PROTO(self) -> None:
        version = self._u1()
        if version > 5:
            raise self._error(f"unsupported pickle protocol {version}")

    def op_FRAME(self) -> None:
        self._u8()  # frames only group opcodes for buffering: nothing to do

    def op_STOP(self) -> None:
        raise _Stop

    def op_MARK(self) -> None:
        marks = self._marks
        if len(marks) >= self._limits.max_pickle_marks:
            maximum = self._limits.max_pickle_marks
            raise LimitExceededError(
                f"the pickle opens more than Limits.max_pickle_marks={maximum} MARKs at once",
                limit="max_pickle_marks",
                maximum=maximum,
                actual=maximum + 1,
            )
        self.spent += _C["list"]
        if self.spent > self._cap:
            self._over(self.spent, "a MARK")
        self._room -= len(self._stack)
        marks.append(self._stack)
        self._stack = []

    def op_POP(self) -> None:
        self._pop()

    def op_POP_MARK(self) -> None:
        self._pop_mark()

    def op_DUP(self) -> None:
        self._push(self._top())

    # scalars ------------------------------------------------------------------------

    def op_NONE(self) -> None:
        self._push(None)

    def op_NEWTRUE(self) -> None:
        self._push(True)

    def op_NEWFALSE(self) -> None:
        self._push(False)

    def op_BININT1(self) -> None:
        i = self._i
        if i >= self._n:
            i = self._need(1)
        self._i = i + 1
        self._push(self._buf[i])

    def op_BININT2(self) -> None:
        self._push(self._u2())

    def op_BININT(self) -> None:
        self._push(self._i4())

    def op_INT(self) -> None:
        text = self._line()
        self._push(False if text == b"00" else True if text == b"01" else self._decimal(text, 0))

    def op_LONG(self) -> None:
        text = self._line()
        self._push(self._decimal(text[:-1] if text[-1:] == b"L" else text, 0))

    def op_LONG1(self) -> None:
        self._long(self._u1())

    def op_LONG4(self) -> None:
        n = self._i4()
        if n < 0:
            raise self._error("LONG4 with a negative length")
        self._long(n)

    def _long(self, n: int) -> None:
        data = self._take(n, "integer")
        self._charge(4 + (n >> 3), "an integer")
        self._push(int.from_bytes(data, "little", signed=True))

    def op_FLOAT(self) -> None:
        self._push(float(self._line()))

    def op_BINFLOAT(self) -> None:
        self._push(self._f8())

    # strings --------------------------------------------------------------------------

    def _data(self, arg: Any) -> None:
        self._charge(6 + (len(arg) >> 3), "a string")
        if self.payloads is not None:
            self.payloads.append(arg)
        if len(arg) >= 4 and arg[-1:] in (b".", ".") and self._nested_depth < MAX_NESTED_DEPTH:
            head = arg[:2].encode("latin-1", "replace") if isinstance(arg, str) else arg[:2]
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                self._scan_nested(arg.encode("latin-1", "replace") if isinstance(arg, str) else arg)
        self._push(arg)

    def op_SHORT_BINUNICODE(self) -> None:
        self._data(str(self._take(self._u1(), "string"), "utf-8", "surrogatepass"))

    def op_BINUNICODE(self) -> None:
        self._data(str(self._take(self._u4(), "string"), "utf-8", "surrogatepass"))

    def op_BINUNICODE8(self) -> None:
        self._data(str(self._take(self._u8(), "string"), "utf-8", "surrogatepass"))

    def op_UNICODE(self) -> None:
        self._data(str(self._line(), "raw-unicode-escape"))

    def op_SHORT_BINBYTES(self) -> None:
        self._data(self._take(self._u1(), "bytes value"))

    def op_BINBYTES(self) -> None:
        self._data(self._take(self._u4(), "bytes value"))

    def op_BINBYTES8(self) -> None:
        self._data(self._take(self._u8(), "bytes value"))

    def op_BYTEARRAY8(self) -> None:
        data = self._take(self._u8(), "bytearray")
        self._charge(7 + (len(data) >> 3), "a bytearray")
        if self.payloads is not None:
            self.payloads.append(data)
        self._push(bytearray(data))

    def _py2_string(self, raw: bytes) -> None:
        self._charge(12 + (len(raw) >> 2), "a string")
        if self.payloads is not None:
            self.payloads.append(raw)
        try:
            self._push(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._push(raw)

    def op_STRING(self) -> None:
        text = self._line()
        if len(text) < 2 or text[:1] != text[-1:] or text[:1] not in (b"'", b'"'):
            raise self._error("the STRING opcode argument must be quoted")
        self._py2_string(codecs.escape_decode(text[1:-1])[0])

    def op_BINSTRING(self) -> None:
        n = self._i4()
        if n < 0:
            raise self._error("BINSTRING with a negative length")
        self._py2_string(self._take(n, "string"))

    def op_SHORT_BINSTRING(self) -> None:
        self._py2_string(self._take(self._u1(), "string"))

    def _scan_nested(self, data: bytes) -> None:
        """A string that is itself a pickle is data to us, but whoever unpickles it later runs
        it: interpret it too (on this pickle's budget) and report what it names."""
        nested = Report()
        inner = type(self)(
            data, nested, self._limits, self._calls, None, self._values, self._build_hook,
            nested_depth=self._nested_depth + 1, _allowance=self._cap - self.spent,
        )
        try:
            inner.load()
        except CheckpointFormatError:
            if not nested.uses:
                self._charge(inner.spent, "a pickle inside a string")
                return  # data that merely starts like a pickle
        self._charge(inner.spent, "a pickle inside a string")
        for name, how in nested.uses.items():
            for use in how:
                self._report.uses.setdefault(name, set()).add(use)
        dangerous = nested.dangerous_globals
        severity = "dangerous" if nested.dangerous else "suspicious"
        detail = f": it names {', '.join(dangerous)}" if dangerous else ""
        self._report.find("nested-pickle", severity, f"a string holds a pickle{detail}", self._pos)

    def op_NEXT_BUFFER(self) -> None:
        raise self._error("out-of-band buffers (protocol 5 NEXT_BUFFER) cannot appear in a file")

    def op_READONLY_BUFFER(self) -> None:
        raise self._error("out-of-band buffers (protocol 5 READONLY_BUFFER) cannot appear in a file")

    # containers -----------------------------------------------------------------------

    def op_EMPTY_LIST(self) -> None:
        self.spent += _C["list"]
        if self.spent > self._cap:
            self._over(self.spent, "a list")
        self._push([])

    def op_EMPTY_TUPLE(self) -> None:
        self._push(())

    def op_EMPTY_DICT(self) -> None:
        self.spent += _C["dict"]
        if self.spent > self._cap:
            self._over(self.spent, "a dict")
        self._push({})

    def op_EMPTY_SET(self) -> None:
        self.spent += _C["set"]
        if self.spent > self._cap:
            self._over(self.spent, "a set")
        self._push(set())

    def op_LIST(self) -> None:
        items = self._pop_mark()
        self._check_len(len(items))
        self._charge(len(items), "a list")
        self._push(self._settled(items))

    def op_TUPLE(self) -> None:
        items = self._pop_mark()
        self._check_len(len(items))
        self._charge(_C["tuple"] + len(items), "a tuple")
        self._push(tuple(self._settled(items)))

    def op_TUPLE1(self) -> None:
        stack = self._stack
        if not stack:
            raise self._error("stack underflow")
        self.spent += _C["tuple"] + 1
        if self.spent > self._cap:
            self._over(self.spent, "a tuple")
        a = stack[-1]
        stack[-1] = (a.placeholder if type(a) is _Pending else a,)

    def op_TUPLE2(self) -> None:
        stack = self._stack
        if len(stack) < 2:
            raise self._error("stack underflow")
        self.spent += _C["tuple"] + 2
        if self.spent > self._cap:
            self._over(self.spent, "a tuple")
        b = stack.pop()
        a = stack[-1]
        if self._pending:
            a, b = self._settle(a), self._settle(b)
        stack[-1] = (a, b)

    def op_TUPLE3(self) -> None:
        stack = self._stack
        if len(stack) < 3:
            raise self._error("stack underflow")
        self.spent += _C["tuple"] + 3
        if self.spent > self._cap:
            self._over(self.spent, "a tuple")
        c = stack.pop()
        b = stack.pop()
        a = stack[-1]
        if self._pending:
            a, b, c = self._settle(a), self._settle(b), self._settle(c)
        stack[-1] = (a, b, c)

    def op_DICT(self) -> None:
        items = self._settled(self._pop_mark())
        if len(items) % 2:
            raise self._error("odd number of items for DICT")
        keys = items[0::2]
        self._check_len(len(keys))
        value: dict[Any, Any] = {}
        self._charge(_C["dict"] + _C["entry"] * len(keys) + self._key_cost(keys, value), "a dict")
        value.update(zip(keys, items[1::2]))
        self._push(value)

    def op_FROZENSET(self) -> None:
        items = self._settled(self._pop_mark())
        self._check_len(len(items))
        self._charge(_C["set"] + _C["element"] * len(items) + self._key_cost(items, None), "a frozenset")
        self._push(frozenset(items))

    def op_APPEND(self) -> None:
        value = self._pop()
        self._extend(self._top(), [value])

    def op_APPENDS(self) -> None:
        items = self._pop_mark()
        self._extend(self._top(), items)

    def _extend(self, target: Any, items: list[Any]) -> None:
        items = self._settled(items)
        if type(target) is list:
            self._check_len(len(target) + len(items))
            self._charge(len(items), "list items")
            target.extend(items)
        elif isinstance(target, OpaqueObject):
            current = target.list_items
            self._check_len(len(current or ()) + len(items))
            self._charge(len(items), "list items")
            if current is None:  # the list is the object's own from now on: later appends extend it in place
                object.__setattr__(target, "list_items", list(items))
            else:
                current.extend(items)
        else:
            raise self._error(f"APPEND to a {type(target).__name__}")

    def op_SETITEM(self) -> None:
        value, key = self._pop(), self._pop()
        self._set_items(self._top(), [key, value])

    def op_SETITEMS(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self._error("odd number of items for SETITEMS")
        self._set_items(self._top(), items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        items = self._settled(items)
        keys = items[0::2]
        kind = type(target)
        if kind is dict or kind is OrderedDict:
            self._check_len(len(target) + len(keys))
            self._charge(_C["entry"] * len(keys) + self._key_cost(keys, target), "dict items")
            target.update(zip(keys, items[1::2]))
        elif isinstance(target, OpaqueObject):
            current = target.dict_items
            self._check_len(len(current or ()) + len(keys))
            self._charge(_C["pair"] * len(keys), "object items")
            pairs = list(zip(keys, items[1::2]))
            if current is None:
                object.__setattr__(target, "dict_items", pairs)
            else:
                current.extend(pairs)
        else:
            raise self._error(f"SETITEM on a {kind.__name__}")

    def op_ADDITEMS(self) -> None:
        items = self._settled(self._pop_mark())
        target = self._top()
        if type(target) is not set:
            raise self._error(f"ADDITEMS on a {type(target).__name__}")
        self._check_len(len(target) + len(items))
        self._charge(_C["element"] * len(items) + self._key_cost(items, target), "set items")
        target.update(items)
