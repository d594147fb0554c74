"""A pickle interpreter that builds data and never executes anything.

Why our own interpreter rather than a restricted ``pickle.Unpickler``: a
subclass still lets pickle run ``BUILD``/``__setstate__`` on real objects, the
``EXT`` opcodes' registry lookups and ``persistent_load`` as pickle sees fit,
and it cannot tell *how* a global is used (called, instantiated, or merely
named), which scanning needs. Here every opcode of protocols 0-5 is handled
explicitly, by a dispatch table of handlers (the bytes are decoded by
:mod:`.source` as Python's ``pickle`` decodes them). Globals are looked up in
:mod:`.policy` by name only:

- allowed names run safeckpt's own re-implementation (:mod:`.rebuild`);
- dangerous names are recorded (all of them, so the error can list every one)
  and replaced by inert placeholders; the caller refuses the file afterwards;
- unknown names become ``GlobalRef``, calls on them ``OpaqueObject``.

Anything the interpreter cannot represent faithfully is either a format error
or a finding (memo reuse, BUILD on a global, calling the result of a call,
extension-registry opcodes, globals built from computed strings).

Reading costs O(N) time and memory for a pickle of N bytes: every value the
interpreter creates, copies, hashes or walks is charged before it is made to the
budget of :mod:`.budget` (proportional to the bytes read), the stack, MARKs and
memo are counted against ``Limits``, a shared key is walked once and then known
by identity, and nothing is rebuilt per opcode (appends to an inert object
extend its list in place, BUILD finds the memo slots to update through an index).
"""

from __future__ import annotations

import codecs
import gc
import pickletools
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import policy
from ..errors import CheckpointFormatError, LimitExceededError
from ..limits import Limits
from ..refs import MAX_NAME_LEN, GlobalRef, OpaqueObject
from .budget import COSTS, KeyCosts, shallow_units, work_error
from .source import _U4, PickleSource

__all__ = ["Finding", "Report", "SymbolicUnpickler"]

MAX_NESTED_DEPTH = 3  # pickles inside strings inside pickles, scanned this deep


@dataclass(frozen=True)
class Finding:
    """Something a pickle does that deserves attention.

    Attributes:
        kind: a short identifier (``"dangerous-global"``, ``"memo-overwrite"``, ...).
        severity: ``"suspicious"`` or ``"dangerous"``.
        message: what was seen and where.
        offset: byte offset of the opcode in its pickle, when known.
    """

    kind: str
    severity: str
    message: str
    offset: int | None = None


@dataclass
class Report:
    """What reading one file found: every global named and how, and findings."""

    uses: dict[str, set[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def use(self, ref: GlobalRef, how: str) -> None:
        self.uses.setdefault(ref.name, set()).add(how)

    def find(self, kind: str, severity: str, message: str, offset: int | None = None) -> None:
        if len(self.findings) < 1000:
            self.findings.append(Finding(kind, severity, message, offset))

    @property
    def dangerous_globals(self) -> list[str]:
        return sorted(name for name in self.uses if policy.classify(*name.split(":", 1)) == "dangerous")

    @property
    def dangerous(self) -> bool:
        return bool(self.dangerous_globals) or any(f.severity == "dangerous" for f in self.findings)


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


_HASHING_CALLS = frozenset({"builtins:set", "builtins:frozenset", "collections:OrderedDict"})
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, tuple, list, dict, OrderedDict, set, frozenset})
_SIZED = frozenset({str, bytes, bytearray, tuple, list, dict, OrderedDict, set, frozenset})
_NO_VALUE = object()
_C = COSTS


class SymbolicUnpickler(PickleSource):
    """Interprets one pickle into inert data, in time and memory proportional to its size.

    Args:
        source: the pickle's bytes, or a file-like object positioned at it with ``read``,
            ``tell`` and ``seek`` (read ahead in chunks; put back right after STOP).
        report: where globals and findings are recorded.
        limits: ``max_str_len`` bounds every string, bytes value and big integer (on its declared
            length, before it is read), ``max_container_len`` every container, ``max_depth`` dict
            keys and set elements, and the ``max_pickle_*`` fields the stack, the MARKs, the
            memo and the work (see :mod:`.budget`).
        calls: implementations of allowed callables, by ``"module:qualname"``.
        persistent_load: maps a persistent id to a value (torch storages); ``None``
            refuses persistent ids.
        values: allowed globals that stand for a value rather than a callable (dtypes).
        build: BUILD on other real values (numpy dtypes): returns the built value, or
            ``None`` to refuse.

    Attributes:
        spent: units of work charged so far (the budget's counter; see :mod:`.budget`).
    """

    def __init__(
        self,
        source: Any,
        report: Report,
        limits: Limits,
        calls: dict[str, Callable[..., Any]],
        persistent_load: Callable[[Any], Any] | None = None,
        values: dict[str, Any] | None = None,
        build: Callable[[Any, Any], Any] | None = None,
        nested_depth: int = 0,
        _allowance: int | None = None,
    ) -> None:
        super().__init__(source, limits)
        self._report = report
        self._calls = calls
        self._values = values or {}
        self._persistent_load = persistent_load
        self._build_hook = build
        self._nested_depth = nested_depth
        self._stack: list[Any] = []
        self._marks: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._globals: dict[str, tuple[GlobalRef, Any, bool]] = {}  # name -> (ref, value or _NO_VALUE, dangerous)
        self._factories: dict[int, tuple[GlobalRef, str, Any, bool]] = {}  # id(ref) -> (ref, name, impl, hashes)
        self._keys = KeyCosts(limits.max_depth)
        self._room = limits.max_pickle_stack  # values the stack may still hold beyond those under MARKs
        self._pending = False  # a value awaiting its BUILD exists: containers settle their items
        self._tracked: set[type] = {_Pending}  # types BUILD may replace: their memo slots are indexed
        self._slots: dict[int, list[int]] = {}  # id(value) -> memo keys holding it
        self.spent = 0
        self._grows = _allowance is None  # a nested pickle spends what its outer one allows
        self._cap = limits.max_pickle_work if _allowance is None else _allowance
        self._table = [getattr(self, _HANDLERS.get(code, "_unknown")) for code in range(256)]

    # driver -----------------------------------------------------------------------

    def load(self) -> Any:
        """Interpret the pickle and return its value.

        Raises:
            CheckpointFormatError: for malformed pickles (``LimitExceededError`` past limits).
        """
        collecting = gc.isenabled()
        gc.disable()  # a read makes many containers and no garbage cycles: the collector would walk them all again and again
        try:
            return self._run()
        except CheckpointFormatError:
            raise
        except Exception as exc:  # malformed input surfaces as anything: wrap it
            raise self._error(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> Any:
        table = self._table
        try:
            while True:
                i = self._i
                if i >= self._n:
                    if not self._fill(1):
                        raise self._error("pickle ended without STOP")
                    i = self._i
                self._pos = self._origin + i
                self._i = i + 1
                table[self._buf[i]]()
        except _Stop:
            pass
        value = self._pop()
        self._end()
        if self._stack or self._marks:
            self._report.find("extra-stack", "suspicious", "values left on the stack at STOP", self._pos)
        return self._settle(value)

    def _unknown(self) -> None:
        raise self._error(f"opcode 0x{self._buf[self._i - 1]:02x} is not a pickle opcode")

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

    def _key_cost(self, values: Any) -> int:
        """Units to hash every item of ``values`` (charging the walks it remembers)."""
        keys = self._keys
        before = keys.cached
        total = 0
        for value in values:
            kind = type(value)
            total += 1 if kind is str or kind is bytes else keys.cost(value)
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
        self._push(bytearray(data))

    def _py2_string(self, raw: bytes) -> None:
        self._charge(12 + (len(raw) >> 2), "a string")
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
        inner = SymbolicUnpickler(
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
        self._charge(_C["dict"] + _C["entry"] * len(keys) + self._key_cost(keys), "a dict")
        self._push(dict(zip(keys, items[1::2])))

    def op_FROZENSET(self) -> None:
        items = self._settled(self._pop_mark())
        self._check_len(len(items))
        self._charge(_C["set"] + _C["element"] * len(items) + self._key_cost(items), "a frozenset")
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
            self._charge(_C["entry"] * len(keys) + self._key_cost(keys), "dict items")
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
        self._charge(_C["element"] * len(items) + self._key_cost(items), "set items")
        target.update(items)

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

    # globals ------------------------------------------------------------------------------

    def _global(self, module: Any, qualname: Any) -> None:
        if type(module) is not str or type(qualname) is not str:
            self._report.find(
                "computed-global",
                "dangerous",
                "a global's name is computed at load time, so it cannot be checked before running",
                self._pos,
            )
            self._push(OpaqueObject(GlobalRef("safeckpt", "ComputedGlobal")))
            return
        if len(module) > MAX_NAME_LEN or len(qualname) > MAX_NAME_LEN:
            raise self._error(f"invalid global name: longer than {MAX_NAME_LEN} characters")
        name = module + ":" + qualname
        entry = self._globals.get(name)
        if entry is None:
            entry = self._new_global(module, qualname, name)
        ref, value, dangerous = entry
        if dangerous:
            self._report.find("dangerous-global", "dangerous", f"names {name}", self._pos)
        self._push(ref if value is _NO_VALUE else value)

    def _new_global(self, module: str, qualname: str, name: str) -> tuple[GlobalRef, Any, bool]:
        self._charge(_C["object"] + len(name), "a global name")
        try:
            ref = GlobalRef(module, qualname)
        except ValueError as exc:
            raise self._error(f"invalid global name {name!r:.200}") from exc
        self._report.use(ref, "referenced")
        dangerous = policy.classify(module, qualname) == "dangerous"
        value_name = name if name in self._values else policy.canonical(module, qualname)
        entry = (ref, self._values.get(value_name, _NO_VALUE), dangerous)
        self._globals[name] = entry
        return entry

    def op_GLOBAL(self) -> None:
        module, qualname = self._line().decode("utf-8"), self._line().decode("utf-8")
        self._global(module, qualname)

    def op_STACK_GLOBAL(self) -> None:
        qualname, module = self._pop(), self._pop()
        self._global(module, qualname)

    def _ext(self, code: int) -> None:
        self._report.find("extension-registry", "dangerous", f"EXT opcode (code {code}) names a global through copyreg's registry", self._pos)
        self._push(OpaqueObject(GlobalRef("copyreg", "_extension_registry")))

    def op_EXT1(self) -> None:
        self._ext(self._u1())

    def op_EXT2(self) -> None:
        self._ext(self._u2())

    def op_EXT4(self) -> None:
        self._ext(self._i4())

    # calls --------------------------------------------------------------------------------

    def _factory(self, factory: GlobalRef) -> tuple[GlobalRef, str, Any, bool]:
        entry = self._factories.get(id(factory))
        if entry is not None and entry[0] is factory:
            return entry
        name = factory.name
        canonical = policy.canonical(factory.module, factory.qualname)
        implementation = None
        if policy.classify(factory.module, factory.qualname) == "allowed":
            implementation = self._calls.get(name) or self._calls.get(canonical)
        entry = (factory, name, implementation, canonical in _HASHING_CALLS or name in _HASHING_CALLS)
        self._factories[id(factory)] = entry
        return entry

    def _call(self, factory: Any, args: Any, how: str, constructor: str, kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(factory, GlobalRef):
            self._report.find(
                "call-on-result",
                "dangerous",
                f"calls a {type(factory).__name__} that is not a named global (a __reduce__ chain)",
                self._pos,
            )
            self._push(OpaqueObject(GlobalRef("safeckpt", "Unresolvable")))
            return
        _, name, implementation, hashes = self._factory(factory)
        uses = self._report.uses.get(name)
        if uses is None:
            uses = self._report.uses[name] = set()
        uses.add(how)
        if type(args) is not tuple:
            raise self._error(f"arguments of {name} are a {type(args).__name__}, not a tuple")
        if self._pending:
            args = tuple(self._settled(list(args)))
        units = _C["object"]
        for arg in args:
            if type(arg) in _SIZED:
                units += shallow_units(arg)
        if implementation is not None and not kwargs:
            if hashes:  # set(), frozenset(), OrderedDict() hash what they get
                for arg in args:
                    if type(arg) in _PLAIN and type(arg) is not str and type(arg) is not bytes:
                        for item in arg:
                            units += self._key_cost(item) if type(item) is list else self._key_cost((item,))
            self._charge(2 * units, f"a call of {name}")
            try:
                value = implementation(*args)
            except CheckpointFormatError:
                raise
            except Exception as exc:
                raise self._error(f"bad arguments for {name}: {type(exc).__name__}: {str(exc)[:200]}") from exc
            if type(value) is _Pending:
                self._pending = True
            self._push(value)
            return
        kwargs = dict(kwargs or {})
        self._charge(units + len(kwargs), f"an instance of {name}")
        self._push(OpaqueObject(factory, constructor, args, kwargs))

    def op_REDUCE(self) -> None:
        args = self._pop()
        self._call(self._pop(), args, "called", "call")

    def op_NEWOBJ(self) -> None:
        args = self._pop()
        self._call(self._pop(), args, "instantiated", "new")

    def op_NEWOBJ_EX(self) -> None:
        kwargs, args = self._pop(), self._pop()
        if type(kwargs) is not dict:
            raise self._error("NEWOBJ_EX keyword arguments are not a dict")
        self._charge(len(kwargs), "keyword arguments")
        if not all(type(k) is str for k in kwargs):
            raise self._error("NEWOBJ_EX keyword arguments are not a str-keyed dict")
        self._call(self._pop(), args, "instantiated", "new", kwargs)

    def op_INST(self) -> None:
        module, qualname = self._line().decode("utf-8"), self._line().decode("utf-8")
        args = tuple(self._pop_mark())
        self._global(module, qualname)
        self._call(self._pop(), args, "instantiated", "call")

    def op_OBJ(self) -> None:
        items = self._pop_mark()
        if not items:
            raise self._error("OBJ without a class")
        self._call(items[0], tuple(items[1:]), "instantiated", "call")

    def op_BUILD(self) -> None:
        state = self._settle(self._pop())
        target = self._pop()
        units = 1 + shallow_units(state)
        if type(state) is tuple:  # numpy states hold their bytes one level down
            for item in state:
                units += shallow_units(item)
        self._charge(units, "a BUILD")
        self._push(self._build(target, state))

    def _build(self, target: Any, state: Any) -> Any:
        if type(target) is _Pending:
            built = target.finish(state)
            self._replace(target, built)
            return built
        if isinstance(target, OpaqueObject):
            if target.state is not None:
                self._report.find("double-build", "suspicious", f"BUILD twice on {target.cls.name}", self._pos)
            object.__setattr__(target, "state", state)
            return target
        if isinstance(target, GlobalRef):
            self._report.use(target, "build")
            self._report.find(
                "build-on-global",
                "dangerous",
                f"BUILD sets attributes on the global {target.name} (the module/class itself)",
                self._pos,
            )
            return target
        torch = sys.modules.get("torch")  # no tensor exists unless torch was imported (scanning never imports it)
        if torch is not None and isinstance(target, torch.Tensor):
            if state:
                self._report.find("tensor-state", "suspicious", "BUILD state on a tensor was dropped", self._pos)
            return target
        if self._build_hook is not None:
            built = self._build_hook(target, state)
            if built is not None:
                if built is not target:
                    self._replace(target, built)
                return built
        raise self._error(f"BUILD on a {type(target).__name__}")

    def _replace(self, old: Any, new: Any) -> None:
        """Point the memo slots that held ``old`` at ``new`` (indexed: no scan of the memo per BUILD)."""
        memo = self._memo
        kind = type(old)
        if kind not in self._tracked:  # the first replacement of this type: index the slots of its values once
            self._tracked.add(kind)
            self._charge(len(memo), "indexing the memo")
            for key, value in memo.items():
                if type(value) is kind:
                    self._slots.setdefault(id(value), []).append(key)
        for key in self._slots.pop(id(old), ()):
            if memo.get(key) is old:
                memo[key] = new
                if type(new) in self._tracked:
                    self._slots.setdefault(id(new), []).append(key)

    # persistent ids -------------------------------------------------------------------------

    def op_PERSID(self) -> None:
        self._persistent(self._line().decode("ascii"))

    def op_BINPERSID(self) -> None:
        self._persistent(self._settle(self._pop()))

    def _persistent(self, pid: Any) -> None:
        if self._persistent_load is None:
            raise self._error("a persistent id outside a torch archive")
        self._charge(_C["object"] + shallow_units(pid), "a persistent id")
        self._push(self._persistent_load(pid))


_HANDLERS = {op.code.encode("latin-1")[0]: "op_" + op.name for op in pickletools.opcodes}


def make_pending(finish: Callable[[Any], Any], placeholder: OpaqueObject) -> _Pending:
    """A value completed by a later BUILD (``finish(state)``), or ``placeholder`` if none comes."""
    return _Pending(finish, placeholder)


def check_depth(value: Any, limit: int) -> None:
    """Refuse a value nested deeper than ``limit`` (an iterative walk, each container once).

    Raises:
        LimitExceededError: naming ``max_depth``.
    """
    seen: set[int] = set()
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, OpaqueObject):
            if id(item) in seen:  # before listing its children: a value shared a million times is listed once
                continue
            children: Any = (*item.args, *item.kwargs.values(), item.state, *(item.list_items or ()))
            children = (*children, *(x for pair in item.dict_items or () for x in pair))
        elif isinstance(item, dict):
            if id(item) in seen:
                continue
            children = (*item.keys(), *item.values())
        elif type(item) in (list, tuple, set, frozenset):
            children = item
        else:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth >= limit:
            raise LimitExceededError(
                f"the pickle's value is nested deeper than Limits.max_depth={limit}",
                limit="max_depth",
                maximum=limit,
                actual=depth + 1,
            )
        stack.extend((child, depth + 1) for child in children)
