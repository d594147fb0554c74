"""Pickles hidden inside the bytes and strings of a pickle's value.

A bytes value that is itself a pickle is data to us, but whoever calls
``pickle.loads`` on it later runs it. ``pickle.loads`` reads from byte 0 and
ignores whatever follows STOP; other code may slice the value first. So a hidden
pickle may use any protocol (0 and 1 have no header) and sit at any offset, with
anything after it.

Rule: every bytes, bytearray and str payload the pickle carries is searched,
wherever it sits: the VM records each one as its opcode makes it (``payloads``),
so values dropped from the result (popped, left in the memo, given to a call
that replaces them, BUILD state on a tensor, a persistent id's fields) are
searched like those in it; a value given to :func:`search_nested` is walked too.
Payloads are searched once each (by identity) and only when they could name a
global at all (a GLOBAL/INST line pair or a STACK_GLOBAL byte). A pickle
can only name a global through GLOBAL/INST (``c``/``i`` followed by two text
lines) or STACK_GLOBAL (``\\x93`` after two strings), so candidate starts are
offset 0, every PROTO opcode, every GLOBAL/INST opcode and the string opcodes
shortly before every STACK_GLOBAL; each candidate is run by the no-execution VM
(with its limits) from there. One that names a global before STOP or before it
breaks (``pickle.loads`` has run that far by then) is reported with what it
names (past offset 0 only when that is dangerous: text can parse as a GLOBAL by chance), and what it holds is searched in turn, :data:`MAX_DEPTH` levels deep.
The work is bounded: the bytes the candidates consume, and a fixed cost per
candidate run, are charged to a :class:`Budget` proportional to the file; when it runs out the search stops with
a "suspicious" finding, never a silent "safe".
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict
from typing import Any

from ..errors import CheckpointFormatError
from ..limits import Limits
from ..refs import OpaqueObject
from .vm import Report, SymbolicUnpickler

__all__ = ["Budget", "search_nested", "search_payloads"]

MAX_DEPTH = 3  # pickles inside bytes inside pickles, searched this deep
MIN_LEN = 8  # the shortest pickle that names a global ("cos\nsystem\n" is 11 bytes)
_PROTO = re.compile(rb"\x80[\x00-\x05]")
_GLOBAL = re.compile(rb"[ci][A-Za-z_][A-Za-z0-9_.]{0,200}\n[A-Za-z_][A-Za-z0-9_.]{0,200}\n")
_STACK_GLOBAL = re.compile(rb"\x93")
_STRING_OP = re.compile(rb"[\x8cXVUTSB]")
_LOOKBACK = 512  # STACK_GLOBAL: string opcodes this far back are candidate starts
_PER_STACK_GLOBAL = 32
_READ_AHEAD = 256
_RUN_COST = 64  # bytes of budget one candidate costs besides those it reads (starting the VM is not free)


class Budget:
    """Bytes the search may still read: ``factor`` times the file plus ``slack``."""

    def __init__(self, file_size: int, factor: int = 4, slack: int = 1 << 20) -> None:
        self.left = factor * file_size + slack
        self.exhausted = False

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left <= 0:
            self.left = 0
            self.exhausted = True


class _Window:
    """A read-only file over ``data[start:end]`` (absolute positions)."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self._data = data
        self._pos = start
        self._end = end
        self.high = start  # the furthest byte handed out

    def read(self, n: int = -1) -> bytes:
        stop = self._end if n is None or n < 0 else min(self._end, self._pos + n)
        out = self._data[self._pos : stop]
        self._pos = max(self._pos, stop)
        self.high = max(self.high, self._pos)
        return out

    def readline(self, limit: int | None = -1) -> bytes:
        stop = self._end if limit is None or limit < 0 else min(self._end, self._pos + limit)
        newline = self._data.find(b"\n", self._pos, stop)
        return self.read((stop if newline < 0 else newline + 1) - self._pos)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._end + pos
        return self._pos


def _candidates(data: bytes) -> list[int]:
    """Offsets a hidden pickle may start at; none when ``data`` cannot name a global at all."""
    stack_globals = [m.start() for m in _STACK_GLOBAL.finditer(data)]
    if not stack_globals and _GLOBAL.search(data) is None:
        return []
    starts = {0}
    starts.update(m.start() for m in _PROTO.finditer(data))
    starts.update(m.start() for m in _GLOBAL.finditer(data))
    if stack_globals:
        string_ops = [m.start() for m in _STRING_OP.finditer(data)]
        for at in stack_globals:  # the string opcodes just before it, nearest first (bisect: no byte walked twice per hit)
            hi = bisect.bisect_left(string_ops, at)
            lo = max(bisect.bisect_left(string_ops, at - _LOOKBACK), hi - _PER_STACK_GLOBAL)
            starts.update(string_ops[lo:hi])
    return sorted(starts)


def _strings(value: Any, limit: int) -> list[bytes]:
    """Every distinct bytes/str value inside ``value`` (an iterative walk, each container once)."""
    out: list[bytes] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen or depth > limit:
            continue
        seen.add(id(item))
        if isinstance(item, (bytes, bytearray)):
            if len(item) >= MIN_LEN:
                out.append(bytes(item))
            continue
        if isinstance(item, str):
            if len(item) >= MIN_LEN:
                out.append(item.encode("latin-1", "replace"))
            continue
        if isinstance(item, OpaqueObject):
            children: Any = (*item.args, *item.kwargs.values(), item.state, *(item.list_items or ()))
            children = (*children, *(x for pair in item.dict_items or () for x in pair))
        elif isinstance(item, (dict, OrderedDict)):
            children = (*item.keys(), *item.values())
        elif type(item) in (list, tuple, set, frozenset):
            children = item
        else:
            continue
        stack.extend((child, depth + 1) for child in children)
    return out


def search_nested(value: Any, report: Report, limits: Limits, budget: Budget, depth: int = 0) -> None:
    """Search the bytes and strings inside ``value`` for pickles; record what they name in ``report``."""
    search_payloads(_strings(value, limits.max_depth), report, limits, budget, depth)


def search_payloads(payloads: list[Any], report: Report, limits: Limits, budget: Budget, depth: int = 0) -> None:
    """Search ``payloads`` (bytes, bytearray or str values a pickle carried) for pickles, and the
    payloads of those in turn; record what they name in ``report``."""
    if depth >= MAX_DEPTH:
        return
    seen: set[int] = set()
    for payload in payloads:
        if id(payload) in seen:
            continue
        seen.add(id(payload))
        if len(payload) < MIN_LEN:
            continue
        data = payload.encode("latin-1", "replace") if type(payload) is str else bytes(payload)
        covered = -1
        for start in _candidates(data):
            if budget.exhausted:
                report.find(
                    "nested-search-incomplete", "suspicious",
                    "the search for pickles hidden in bytes values ran out of its budget; parts were not searched",
                )
                return
            if start < covered:
                continue
            window = _Window(data, start, min(len(data), start + budget.left))
            nested = Report()
            ok = False
            unpickler = SymbolicUnpickler(window, nested, limits, {}, None, nested_depth=MAX_DEPTH)
            unpickler.payloads = []
            unpickler.read_ahead = _READ_AHEAD  # most candidates break within bytes: copy little
            try:
                unpickler.load()
                ok = True
            except CheckpointFormatError:
                pass
            budget.spend(_RUN_COST + max(1, getattr(unpickler, "bytes_read", window.high - start)))
            if not nested.uses or (start and not nested.dangerous):
                continue  # no global; or text mid-value that parses by chance and names nothing dangerous
            covered = window.tell() if ok else covered
            for name, how in nested.uses.items():
                report.uses.setdefault(name, set()).update(how)
            dangerous = nested.dangerous_globals
            severity = "dangerous" if nested.dangerous else "suspicious"
            names = ", ".join(dangerous or sorted(nested.uses))
            report.find("nested-pickle", severity, f"a bytes value holds a pickle at byte {start} naming {names:.500}")
            # what it carried, even if it broke later: pickle.loads ran its calls up to there
            search_payloads(unpickler.payloads, report, limits, budget, depth + 1)
