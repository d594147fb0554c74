"""A pickle interpreter that builds data and never executes anything.

Why our own interpreter rather than a restricted ``pickle.Unpickler``: a
subclass still lets pickle run ``BUILD``/``__setstate__`` on real objects, the
``EXT`` opcodes' registry lookups and ``persistent_load`` as pickle sees fit,
and it cannot tell *how* a global is used (called, instantiated, or merely
named), which scanning needs. Here every opcode of protocols 0-5 is handled
explicitly (the opcode parsing is ``pickletools.genops``, which only decodes
arguments). Globals are looked up in :mod:`.policy` by name only:

- allowed names run safeckpt's own re-implementation (:mod:`.rebuild`);
- dangerous names are recorded (all of them, so the error can list every one)
  and replaced by inert placeholders; the caller refuses the file afterwards;
- unknown names become ``GlobalRef``, calls on them ``OpaqueObject``.

Anything the interpreter cannot represent faithfully is either a format error
or a finding (memo reuse, BUILD on a global, calling the result of a call,
extension-registry opcodes, globals built from computed strings).
"""

from __future__ import annotations

import io
import pickletools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import policy
from ..errors import CheckpointFormatError, LimitExceededError
from ..limits import Limits
from ..refs import GlobalRef, OpaqueObject

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


class _Capped:
    """The pickle's byte source, refusing an argument longer than ``Limits.max_str_len`` before reading it.

    ``pickletools`` reads an opcode's fixed-size fields with ``read(n)`` for ``n <= 8`` and a
    string, bytes or big integer with one ``read(declared length)``; protocol 0 text arguments
    with ``readline()``.
    """

    def __init__(self, source: Any, limits: Limits) -> None:
        self._source = source
        self._limits = limits

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise CheckpointFormatError("a pickle read without a length")  # pickletools never does this
        if n > 8:
            self._limits.check("max_str_len", n, what="the declared length of a pickled string, bytes or integer")
        return self._source.read(n)  # type: ignore[no-any-return]

    def readline(self) -> bytes:
        cap = self._limits.max_str_len + 1  # the text and its newline
        line: bytes = self._source.readline(cap)
        if len(line) == cap and not line.endswith(b"\n"):
            self._limits.check("max_str_len", cap, what="a protocol 0 text argument")
        return line

    def tell(self) -> int:
        return self._source.tell()  # type: ignore[no-any-return]


class SymbolicUnpickler:
    """Interprets one pickle into inert data.

    Args:
        source: the pickle's bytes, or a file-like object positioned at it (read
            until its STOP opcode; it must refuse reads past its end).
        report: where globals and findings are recorded.
        limits: ``max_container_len`` bounds the memo and every container, ``max_str_len``
            every string, bytes value and big integer (checked on its declared length,
            before it is read).
        calls: implementations of allowed callables, by ``"module:qualname"``.
        persistent_load: maps a persistent id to a value (torch storages); ``None``
            refuses persistent ids.
        values: allowed globals that stand for a value rather than a callable (dtypes).
        build: BUILD on other real values (numpy dtypes): returns the built value, or
            ``None`` to refuse.
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
    ) -> None:
        self._source = _Capped(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, limits)
        self._report = report
        self._limits = limits
        self._calls = calls
        self._values = values or {}
        self._persistent_load = persistent_load
        self._build_hook = build
        self._nested_depth = nested_depth
        self._stack: list[Any] = []
        self._marks: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._refs: dict[str, GlobalRef] = {}
        self._pos: int | None = None

    # driver -----------------------------------------------------------------------

    def load(self) -> Any:
        """Interpret the pickle and return its value.

        Raises:
            CheckpointFormatError: for malformed pickles (``LimitExceededError`` past limits).
        """
        try:
            with warnings.catch_warnings():  # protocol 0 strings with odd escapes warn inside pickletools
                warnings.simplefilter("ignore", DeprecationWarning)
                return self._run()
        except CheckpointFormatError:
            raise
        except Exception as exc:  # malformed input surfaces as anything: wrap it
            raise self._error(f"{type(exc).__name__}: {exc}") from exc

    def _run(self) -> Any:
        for opcode, arg, pos in pickletools.genops(self._source):  # type: ignore[arg-type]  # read, readline, tell: all it uses
            self._pos = pos
            handler = getattr(self, "op_" + opcode.name, None)
            if handler is None:
                raise self._error(f"opcode {opcode.name} is not supported")
            if opcode.name == "STOP":
                return self._finish(self._pop())
            handler(arg)
        raise self._error("pickle ended without STOP")

    def _error(self, message: str) -> CheckpointFormatError:
        where = f" at byte {self._pos}" if self._pos is not None else ""
        return CheckpointFormatError(f"malformed pickle{where}: {message}", offset=self._pos)

    def _finish(self, value: Any) -> Any:
        if self._stack or self._marks:
            self._report.find("extra-stack", "suspicious", "values left on the stack at STOP", self._pos)
        return self._settle(value)

    # stack helpers ------------------------------------------------------------------

    def _push(self, value: Any) -> None:
        self._stack.append(value)

    def _pop(self) -> Any:
        if not self._stack:
            raise self._error("stack underflow")
        return self._stack.pop()

    def _pop_mark(self) -> list[Any]:
        if not self._marks:
            raise self._error("no MARK to pop to")
        items = self._stack
        self._stack = self._marks.pop()
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

    def _check_hashable_depth(self, values: Any) -> None:
        """Refuse keys and set elements nested deeper than ``Limits.max_depth``: hashing a
        million-deep tuple recurses in C and would crash the interpreter."""
        stack = [(v, 1) for v in values]
        limit = self._limits.max_depth
        while stack:
            value, depth = stack.pop()
            if type(value) in (tuple, frozenset, list):
                if depth > limit:
                    raise LimitExceededError(
                        f"a dict key or set element is nested deeper than Limits.max_depth={limit}",
                        limit="max_depth",
                        maximum=limit,
                        actual=depth,
                    )
                stack.extend((item, depth + 1) for item in value)

    @staticmethod
    def _settle(value: Any) -> Any:
        return value.placeholder if isinstance(value, _Pending) else value

    # protocol, framing, stack manipulation --------------------------------------------

    def op_PROTO(self, arg: int) -> None:
        if not 0 <= arg <= 5:
            raise self._error(f"unsupported pickle protocol {arg}")

    def op_FRAME(self, arg: int) -> None:
        pass

    def op_STOP(self, arg: None) -> None:  # handled in load()
        pass

    def op_MARK(self, arg: None) -> None:
        self._marks.append(self._stack)
        self._stack = []

    def op_POP(self, arg: None) -> None:
        self._pop()

    def op_POP_MARK(self, arg: None) -> None:
        self._pop_mark()

    def op_DUP(self, arg: None) -> None:
        self._push(self._top())

    # scalars ------------------------------------------------------------------------

    def _scalar(self, arg: Any) -> None:
        self._push(arg)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = _scalar
    op_FLOAT = op_BINFLOAT = _scalar

    def _data(self, arg: Any) -> None:
        if len(arg) >= 4 and arg[-1:] in (b".", ".") and self._nested_depth < MAX_NESTED_DEPTH:
            head = arg[:2].encode("latin-1", "replace") if isinstance(arg, str) else arg[:2]
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                self._scan_nested(arg.encode("latin-1", "replace") if isinstance(arg, str) else arg)
        self._push(arg)

    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _data
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = _data

    def _scan_nested(self, data: bytes) -> None:
        """A string that is itself a pickle is data to us, but whoever unpickles it later runs
        it: interpret it too and report what it names."""
        nested = Report()
        try:
            SymbolicUnpickler(
                io.BytesIO(data), nested, self._limits, self._calls, None, self._values, self._build_hook,
                nested_depth=self._nested_depth + 1,
            ).load()
        except CheckpointFormatError:
            if not nested.uses:
                return  # data that merely starts like a pickle
        for name, how in nested.uses.items():
            for use in how:
                self._report.uses.setdefault(name, set()).add(use)
        dangerous = nested.dangerous_globals
        severity = "dangerous" if nested.dangerous else "suspicious"
        detail = f": it names {', '.join(dangerous)}" if dangerous else ""
        self._report.find("nested-pickle", severity, f"a string holds a pickle{detail}", self._pos)

    def op_NONE(self, arg: None) -> None:
        self._push(None)

    def op_NEWTRUE(self, arg: None) -> None:
        self._push(True)

    def op_NEWFALSE(self, arg: None) -> None:
        self._push(False)

    def _py2_string(self, arg: Any) -> None:
        raw = arg.encode("latin-1") if isinstance(arg, str) else arg
        try:
            self._push(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._push(raw)

    op_STRING = op_BINSTRING = op_SHORT_BINSTRING = _py2_string

    def op_BYTEARRAY8(self, arg: bytes) -> None:
        self._push(bytearray(arg))

    def op_NEXT_BUFFER(self, arg: None) -> None:
        raise self._error("out-of-band buffers (protocol 5 NEXT_BUFFER) cannot appear in a file")

    def op_READONLY_BUFFER(self, arg: None) -> None:
        raise self._error("out-of-band buffers (protocol 5 READONLY_BUFFER) cannot appear in a file")

    # containers -----------------------------------------------------------------------

    def op_EMPTY_LIST(self, arg: None) -> None:
        self._push([])

    def op_EMPTY_TUPLE(self, arg: None) -> None:
        self._push(())

    def op_EMPTY_DICT(self, arg: None) -> None:
        self._push({})

    def op_EMPTY_SET(self, arg: None) -> None:
        self._push(set())

    def op_LIST(self, arg: None) -> None:
        self._push([self._settle(v) for v in self._pop_mark()])

    def op_TUPLE(self, arg: None) -> None:
        self._push(tuple(self._settle(v) for v in self._pop_mark()))

    def op_TUPLE1(self, arg: None) -> None:
        self._push((self._settle(self._pop()),))

    def op_TUPLE2(self, arg: None) -> None:
        b, a = self._pop(), self._pop()
        self._push((self._settle(a), self._settle(b)))

    def op_TUPLE3(self, arg: None) -> None:
        c, b, a = self._pop(), self._pop(), self._pop()
        self._push((self._settle(a), self._settle(b), self._settle(c)))

    def op_DICT(self, arg: None) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self._error("odd number of items for DICT")
        self._check_hashable_depth(items[0::2])
        self._push({self._settle(k): self._settle(v) for k, v in zip(items[0::2], items[1::2])})

    def op_FROZENSET(self, arg: None) -> None:
        items = self._pop_mark()
        self._check_hashable_depth(items)
        self._push(frozenset(self._settle(v) for v in items))

    def op_APPEND(self, arg: None) -> None:
        value = self._pop()
        self._extend(self._top(), [value])

    def op_APPENDS(self, arg: None) -> None:
        items = self._pop_mark()
        self._extend(self._top(), items)

    def _extend(self, target: Any, items: list[Any]) -> None:
        items = [self._settle(v) for v in items]
        if type(target) is list:
            self._check_len(len(target) + len(items))
            target.extend(items)
        elif isinstance(target, OpaqueObject):
            current = target.list_items or []
            self._check_len(len(current) + len(items))
            object.__setattr__(target, "list_items", current + items)
        else:
            raise self._error(f"APPEND to a {type(target).__name__}")

    def op_SETITEM(self, arg: None) -> None:
        value, key = self._pop(), self._pop()
        self._set_items(self._top(), [key, value])

    def op_SETITEMS(self, arg: None) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self._error("odd number of items for SETITEMS")
        self._set_items(self._top(), items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        pairs = [(self._settle(k), self._settle(v)) for k, v in zip(items[0::2], items[1::2])]
        if type(target) in (dict, OrderedDict):
            self._check_hashable_depth(items[0::2])
            self._check_len(len(target) + len(pairs))
            for key, value in pairs:
                target[key] = value
        elif isinstance(target, OpaqueObject):
            current = target.dict_items or []
            self._check_len(len(current) + len(pairs))
            object.__setattr__(target, "dict_items", current + pairs)
        else:
            raise self._error(f"SETITEM on a {type(target).__name__}")

    def op_ADDITEMS(self, arg: None) -> None:
        items = [self._settle(v) for v in self._pop_mark()]
        target = self._top()
        if type(target) is not set:
            raise self._error(f"ADDITEMS on a {type(target).__name__}")
        self._check_hashable_depth(items)
        self._check_len(len(target) + len(items))
        target.update(items)

    # memo -----------------------------------------------------------------------------

    def _put(self, index: int) -> None:
        if index in self._memo:
            self._report.find("memo-overwrite", "suspicious", f"memo slot {index} is written twice", self._pos)
        elif len(self._memo) >= self._limits.max_container_len:
            self._check_len(len(self._memo) + 1)
        self._memo[index] = self._top()

    def op_PUT(self, arg: int) -> None:
        self._put(arg)

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, arg: None) -> None:
        self._put(len(self._memo))

    def op_GET(self, arg: int) -> None:
        if arg not in self._memo:
            raise self._error(f"memo slot {arg} read before it was written")
        self._push(self._memo[arg])

    op_BINGET = op_LONG_BINGET = op_GET

    # globals ------------------------------------------------------------------------------

    def _global(self, module: Any, qualname: Any, computed: bool = False) -> None:
        if type(module) is not str or type(qualname) is not str:
            self._report.find(
                "computed-global",
                "dangerous",
                "a global's name is computed at load time, so it cannot be checked before running",
                self._pos,
            )
            self._push(OpaqueObject(GlobalRef("safeckpt", "ComputedGlobal")))
            return
        name = f"{module}:{qualname}"
        ref = self._refs.get(name)
        if ref is None:
            try:
                ref = GlobalRef(module, qualname)
            except ValueError as exc:
                raise self._error(f"invalid global name {name!r:.200}") from exc
            self._refs[name] = ref
        self._report.use(ref, "referenced")
        if policy.classify(module, qualname) == "dangerous":
            self._report.find("dangerous-global", "dangerous", f"names {name}", self._pos)
        value_name = name if name in self._values else policy.canonical(module, qualname)
        if value_name in self._values:
            self._push(self._values[value_name])
        else:
            self._push(ref)

    def op_GLOBAL(self, arg: str) -> None:
        module, _, qualname = arg.partition(" ")
        self._global(module, qualname)

    def op_STACK_GLOBAL(self, arg: None) -> None:
        qualname, module = self._pop(), self._pop()
        self._global(module, qualname)

    def op_EXT1(self, arg: int) -> None:
        self._report.find("extension-registry", "dangerous", f"EXT opcode (code {arg}) names a global through copyreg's registry", self._pos)
        self._push(OpaqueObject(GlobalRef("copyreg", "_extension_registry")))

    op_EXT2 = op_EXT4 = op_EXT1

    # calls --------------------------------------------------------------------------------

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
        self._report.use(factory, how)
        if type(args) is not tuple:
            raise self._error(f"arguments of {factory.name} are a {type(args).__name__}, not a tuple")
        args = tuple(self._settle(a) for a in args)
        status = policy.classify(factory.module, factory.qualname)
        implementation = None
        if status == "allowed":
            implementation = self._calls.get(factory.name) or self._calls.get(
                policy.canonical(factory.module, factory.qualname)
            )
        if implementation is not None and not kwargs:
            self._check_hashable_depth(args)  # set(), frozenset(), OrderedDict() hash what they get
            try:
                self._push(implementation(*args))
            except CheckpointFormatError:
                raise
            except Exception as exc:
                raise self._error(f"bad arguments for {factory.name}: {type(exc).__name__}: {exc}") from exc
            return
        self._push(OpaqueObject(factory, constructor, args, dict(kwargs or {})))

    def op_REDUCE(self, arg: None) -> None:
        args = self._pop()
        self._call(self._pop(), args, "called", "call")

    def op_NEWOBJ(self, arg: None) -> None:
        args = self._pop()
        self._call(self._pop(), args, "instantiated", "new")

    def op_NEWOBJ_EX(self, arg: None) -> None:
        kwargs, args = self._pop(), self._pop()
        if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise self._error("NEWOBJ_EX keyword arguments are not a str-keyed dict")
        self._call(self._pop(), args, "instantiated", "new", kwargs)

    def op_INST(self, arg: str) -> None:
        module, _, qualname = arg.partition(" ")
        args = tuple(self._pop_mark())
        self._global(module, qualname)
        self._call(self._pop(), args, "instantiated", "call")

    def op_OBJ(self, arg: None) -> None:
        items = self._pop_mark()
        if not items:
            raise self._error("OBJ without a class")
        self._call(items[0], tuple(items[1:]), "instantiated", "call")

    def op_BUILD(self, arg: None) -> None:
        state = self._settle(self._pop())
        target = self._pop()
        self._push(self._build(target, state))

    def _build(self, target: Any, state: Any) -> Any:
        if isinstance(target, _Pending):
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
        if isinstance(target, torch.Tensor):
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
        for key, value in self._memo.items():
            if value is old:
                self._memo[key] = new

    # persistent ids -------------------------------------------------------------------------

    def op_PERSID(self, arg: str) -> None:
        self._persistent(arg)

    def op_BINPERSID(self, arg: None) -> None:
        self._persistent(self._settle(self._pop()))

    def _persistent(self, pid: Any) -> None:
        if self._persistent_load is None:
            raise self._error("a persistent id outside a torch archive")
        self._push(self._persistent_load(pid))


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
            children: Any = (*item.args, *item.kwargs.values(), item.state, *(item.list_items or ()))
            children = (*children, *(x for pair in item.dict_items or () for x in pair))
        elif isinstance(item, dict):
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
