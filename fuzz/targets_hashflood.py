"""The hash-flood fuzz target: no container a file builds holds more keys of one hash than the limit.

:func:`hashflood` reads its input twice, both as a legacy pickle (the no-execution
VM) and as a skeleton (the msgpack decoder), once as given and once as a program
that builds a pickle and a skeleton from keys chosen to collide (byte pairs
choose the opcode and ``k`` of a key ``k * (2**61 - 1) + c``). Under
:data:`LIMITS` it fails (an ``AssertionError``, a crash) when

- anything but ``SafeCkptError`` escapes, or
- a dict, OrderedDict, set or frozenset in what was read holds more than
  ``max_equal_hash_keys`` counted keys of one hash (an independent walk of the
  result that groups keys by ``hash()``; str, bytes and ints inside
  ``+-(2**61 - 2)`` are not counted, as in ``safeckpt/keyhash.py``).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import msgpack
import torch

from safeckpt import Limits, SafeCkptError
from safeckpt.codec.decode import Decoder
from safeckpt.codec.types import Ext, Tag
from safeckpt.legacy.rebuild import Rebuilder
from safeckpt.legacy.vm import Report, SymbolicUnpickler
from safeckpt.refs import AllowList

__all__ = ["LIMITS", "hashflood", "seeds"]

LIMITS = Limits(max_equal_hash_keys=8, max_container_len=1 << 14, max_pickle_work=1 << 20)
P = sys.hash_info.modulus
_KEYED = (dict, OrderedDict, set, frozenset)


def _long(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _counted(key: Any) -> bool:
    kind = type(key)
    return not (kind is str or kind is bytes or (kind is int and -P < key < P))


def _check(value: Any) -> None:
    seen: set[int] = set()
    todo = [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _KEYED):
            counts: dict[int, int] = {}
            for key in item:
                if _counted(key):
                    counts[hash(key)] = counts.get(hash(key), 0) + 1
            worst = max(counts.values(), default=0)
            assert worst <= LIMITS.max_equal_hash_keys, f"a {type(item).__name__} holds {worst} keys of one hash"
            todo.extend(item.values() if isinstance(item, dict) else ())
            todo.extend(k for k in item if isinstance(k, (tuple, frozenset)))
        elif isinstance(item, (list, tuple)):
            todo.extend(item)


def _program(data: bytes) -> tuple[bytes, bytes]:
    """A pickle and a skeleton of keyed containers whose keys the byte pairs of ``data`` choose."""
    pickle_ops = [b"\x80\x04("]
    groups: list[list[Any]] = [[]]
    for i in range(0, len(data) - 1, 2):
        op, k = data[i], data[i + 1]
        key = (k % 16 + 1) * P + (op >> 5)  # few hash classes: collisions are common
        kind = op & 7
        if kind == 0:
            pickle_ops.append(b"}(" + _long(key) + b"Nu")  # a new dict
        elif kind == 1:
            pickle_ops.append(b"(" + _long(key) + b"Nu")  # SETITEMS into the dict on top (if one)
        elif kind == 2:
            pickle_ops.append(b"\x8f(" + _long(key) + b"\x90")
        elif kind == 3:
            pickle_ops.append(b"(" + _long(key) + b"\x85N" + _long(key + P) + b"\x85Nd")
        elif kind == 4:
            pickle_ops.append(b"(" + _long(key) + _long(key + P) + b"\x91")
        elif kind == 5:
            pickle_ops.append(b"p%d\n" % key)
        else:
            pickle_ops.append(b"\x8c\x08builtins\x8c\x03set\x93(" + _long(key) + _long(key + 2 * P) + b"l\x85R")
        groups[-1].append(key)
        if kind == 0:
            groups.append([])
    pickle_ops.append(b"l.")
    tag = msgpack.ExtType(Ext.TAG, bytes([int(Tag.SET)]))
    big = [[msgpack.ExtType(Ext.BIGINT, k.to_bytes((k.bit_length() + 8) // 8, "big", signed=True)) for k in g] for g in groups]
    skeleton = msgpack.packb([[tag, *g] for g in big] + [{x: 0 for x in g} for g in big])
    return b"".join(pickle_ops), skeleton


def _read(data: bytes) -> None:
    rebuild = Rebuilder(LIMITS)
    try:
        _check(SymbolicUnpickler(data, Report(), LIMITS, rebuild.calls, None, rebuild.values, rebuild.build).load())
    except SafeCkptError:
        pass
    try:
        _check(Decoder(lambda name: torch.zeros(0), AllowList(), LIMITS).unpack(data))
    except SafeCkptError:
        pass


def hashflood(data: bytes) -> None:
    """Read ``data`` as given and as a key-collision program; check every container's hash counts."""
    _read(data)
    for built in _program(data[:4096]):
        _read(built)


def seeds() -> list[tuple[str, bytes]]:
    """Programs (even-length byte strings) and collision pickles at and past the limit."""
    out = [(f"program_{kind}", bytes(b for i in range(12) for b in (kind | (i % 3) << 5, i))) for kind in range(8)]
    for n in (8, 9):
        keys = b"".join(_long(k * P) + b"N" for k in range(1, n + 1))
        out.append((f"setitems_{n}", b"\x80\x04}(" + keys + b"u."))
        out.append((f"additems_{n}", b"\x80\x04\x8f(" + b"".join(_long(k * P) for k in range(1, n + 1)) + b"\x90."))
    return out
