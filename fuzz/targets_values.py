"""Targets of the ``values`` harness: hostile *values* in well-formed files.

The input's first byte picks a container format (a bare pickle or a safeckpt
skeleton); the rest is the file. Each input is loaded, scanned, converted and
walked by the command line's report functions (inspect, verify, diff) in
process. Seeds build OrderedDicts with attrs/BUILD states, self-references,
shared containers and huge integers. Only SafeCkptError is expected.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack

import safeckpt
from safeckpt.cli_diff import diff_states
from safeckpt.cli_report import verify_file, view_file
from safeckpt.codec.decode import Decoder
from safeckpt.limits import Limits
from safeckpt.refs import AllowList

_LIMITS = Limits(max_shared_values=10_000)
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-values-"))


class _Bar:
    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def _od_build(names: list[str]) -> bytes:
    items = b"".join(b"X" + len(n).to_bytes(4, "little") + n.encode() + b"K\x01" for n in names)
    return b"\x80\x02}X\x05\x00\x00\x00modelccollections\nOrderedDict\n)R}(" + items + b"ubs."


def seeds() -> list[bytes]:
    """Seed inputs: tag byte 0 = pickle file, 1 = skeleton bytes."""
    out = [b"\x00" + _od_build([n]) for n in ("keys", "items", "get", "_metadata", "__class__")]
    out.append(b"\x00\x80\x02]q\x00h\x00a.")  # a list containing itself
    shared: list[Any] = [1]
    for _ in range(20):
        shared = [shared, shared]
    out.append(b"\x00" + pickle.dumps({"x": shared}, protocol=2))
    out.append(b"\x00" + pickle.dumps({10**5000: 1, "n": [10**4300, -(10**4299)]}, protocol=2))
    od: OrderedDict[str, int] = OrderedDict(a=1)
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    out.append(b"\x00" + pickle.dumps({"m": od}, protocol=2))
    from safeckpt.codec.types import TAGS, Tag, pack

    out.append(b"\x01" + pack([TAGS[Tag.ORDERED_DICT], {"keys": 1}, "a", 1]))
    out.append(b"\x01" + pack([TAGS[Tag.ORDERED_DICT], {"_metadata": {"x": 1}}, "a", 1]))
    out.append(b"\x01" + pack([TAGS[Tag.SIZE], msgpack.ExtType(2, (2**100).to_bytes(14, "big")), -(2**63)]))  # torch.Size past int64
    out.append(b"\x00\x80\x02}X\x01\x00\x00\x00xctorch\nSize\n\x8a\x0e" + b"\xff" * 13 + b"\x7f\x85\x85Rs.")
    return out


def run(data: bytes) -> None:
    """Load, scan, convert and report one input; ``SafeCkptError`` is the expected outcome."""
    try:
        _run(data)
    except safeckpt.SafeCkptError:
        pass


def _run(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 2, data[1:]
    if kind == 1:
        value = Decoder(lambda n: (_ for _ in ()).throw(safeckpt.ComponentNotFoundError(n)), AllowList(()), _LIMITS).unpack(body)
        diff_states({"v": value}, {"v": value})
        return
    path = _DIR / "in.pkl"
    path.write_bytes(body)
    try:
        value = safeckpt.load(path, limits=_LIMITS)
        safeckpt.scan(path, limits=_LIMITS)
        view_file(path)
        verify_file(path, lambda *a, **k: _Bar())
        diff_states(value, value)
        if isinstance(value, dict):
            out = _DIR / "out.safetensors"
            safeckpt.convert(path, out, limits=_LIMITS)
            safeckpt.load(out)
    finally:
        for name in ("in.pkl", "out.safetensors"):
            try:
                os.unlink(_DIR / name)
            except FileNotFoundError:
                pass
