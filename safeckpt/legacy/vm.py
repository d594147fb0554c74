"""A pickle interpreter that builds data and never executes anything.

Why our own interpreter rather than a restricted ``pickle.Unpickler``: a
subclass still lets pickle run ``BUILD``/``__setstate__`` on real objects, the
``EXT`` opcodes' registry lookups and ``persistent_load`` as pickle sees fit,
and it cannot tell *how* a global is used (called, instantiated, or merely
named), which scanning needs. Here every opcode of protocols 0-5 is handled
explicitly, by a dispatch table of handlers (the bytes are decoded by
:mod:`.source` as Python's ``pickle`` decodes them). Globals are looked up in
:mod:`..policy` by name only:

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


The implementation is split by responsibility: :mod:`.vm_report` (findings and
the report), :mod:`.vm_state` (budget, stack, memo, pending values),
:mod:`.vm_values` (plain-value opcodes) and :mod:`.vm_objects` (globals, calls,
BUILD, persistent ids). This module owns the driver, the dispatch table,
:func:`make_pending` and :func:`check_depth`.
"""

from __future__ import annotations

import gc
import pickletools
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointFormatError, LimitExceededError
from ..limits import Limits
from ..refs import GlobalRef, OpaqueObject
from .budget import KeyCosts
from .vm_objects import ObjectOps
from .vm_report import Finding, Report
from .vm_state import _Pending, _Stop

__all__ = ["Finding", "Report", "SymbolicUnpickler"]


class SymbolicUnpickler(ObjectOps):
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
        bound = {name: getattr(self, name) for name in _HANDLER_NAMES}  # each handler bound once, not per byte value
        self._table = [bound[name] for name in _TABLE_NAMES]

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


_HANDLERS = {op.code.encode("latin-1")[0]: "op_" + op.name for op in pickletools.opcodes}
_TABLE_NAMES = [_HANDLERS.get(code, "_unknown") for code in range(256)]
_HANDLER_NAMES = frozenset(_TABLE_NAMES)


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
