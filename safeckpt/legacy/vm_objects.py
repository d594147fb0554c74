"""Opcode handlers for globals, calls, BUILD and persistent ids.

:class:`ObjectOps` adds to :class:`.vm_values.ValueOps` the ``op_*`` methods that
name globals (looked up in :mod:`..policy` by name only), call them (allowed
names run safeckpt's own re-implementations, others become ``OpaqueObject``),
BUILD values (completing pending ones) and resolve persistent ids. Nothing is
ever imported or executed from the pickle.
"""

from __future__ import annotations

import sys
from typing import Any

from .. import policy
from ..errors import CheckpointFormatError
from ..refs import MAX_NAME_LEN, GlobalRef, OpaqueObject
from .budget import shallow_units
from .vm_state import _C, _HASHING_CALLS, _NO_VALUE, _SIZED, _Pending
from .vm_values import ValueOps


class ObjectOps(ValueOps):
    """The opcodes that name, call and build objects."""

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
        entry = (factory, name, implementation, _HASHING_CALLS.get(canonical) or _HASHING_CALLS.get(name))
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
            counts: dict[int, int] = {}
            if hashes and len(args) == 1:  # set(), frozenset(), OrderedDict() hash what they get
                units += self._key_cost(_hashed_keys(hashes, args[0]), None, counts)
            self._charge(2 * units, f"a call of {name}")
            try:
                value = implementation(*args)
            except CheckpointFormatError:
                raise
            except Exception as exc:
                raise self._error(f"bad arguments for {name}: {type(exc).__name__}: {str(exc)[:200]}") from exc
            if type(value) is _Pending:
                self._pending = True
            self._hashes.adopt(value, counts)  # later SETITEMS/ADDITEMS count on
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


def _hashed_keys(kind: str, arg: Any) -> list[Any]:
    """What ``set(arg)`` (``kind`` "set") or ``OrderedDict(arg)`` ("dict") will hash."""
    if type(arg) not in _SIZED or type(arg) in (str, bytes, bytearray):
        return []  # not a container (the call fails), or characters (str) or small ints (bytes)
    if kind == "set":
        return list(arg)
    keys = []
    for pair in arg:  # OrderedDict unpacks each pair: its key is what iterating it yields first
        if type(pair) in _SIZED and len(pair) == 2:
            keys.append(pair[0] if type(pair) is tuple or type(pair) is list else next(iter(pair)))
    return keys
