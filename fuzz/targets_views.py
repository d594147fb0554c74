"""Fuzz target for tensor views: what a file may claim about a tensor over its bytes.

The input is a view spec: a mode, a dtype, a shape, strides, an offset, an alignment shift
and the bytes of the entry (or storage) the view is made of. Mode 0 writes a safeckpt
single file whose skeleton points a tensor at a ``U8`` entry of those bytes through the
view, with its data section ``shift`` bytes past a multiple of 64, and loads it (eager and
lazy). Mode 1 hands the same numbers to the legacy reader's ``_rebuild_tensor_v2`` over a
storage at an address ``shift`` bytes past a multiple of 64.

Either a ``SafeCkptError`` comes back, or a tensor that
- is aligned in memory for its dtype,
- reads only the entry's bytes: every element equals the bytes the spec points at,
  computed independently here,
- holds at most ``Limits.max_expansion`` times the file's (storage's) bytes.
Anything else is a crash.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import torch

import safeckpt
from safeckpt import Limits, SafeCkptError
from safeckpt.container import encode_state, single_header
from safeckpt.legacy.rebuild import Rebuilder, StorageRef
from safeckpt.tensors import DTYPES_BY_NAME

__all__ = ["LIMITS", "TARGETS", "encode_spec", "seeds", "views"]

#: small enough that an accepted view can be checked element by element
LIMITS = Limits(max_dims=6, max_expansion=64)
DTYPE_NAMES = sorted(DTYPES_BY_NAME)
#: values a selector byte can pick: the edges of int64 and of the checks
SPECIAL = (0, 1, 2, 3, 7, 8, 255, 256, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1)
_CHECKED_ELEMENTS = 1 << 14  # beyond this only the bounds are checked, not every element


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def byte(self) -> int:
        value = self._data[self._at] if self._at < len(self._data) else 0
        self._at += 1
        return value

    def take(self, n: int) -> bytes:
        chunk = self._data[self._at : self._at + n]
        self._at += n
        return chunk.ljust(n, b"\0")

    def number(self) -> int:
        """A selector byte, then: a byte, a little-endian u16, a u64, or a SPECIAL value."""
        kind = self.byte()
        if kind % 4 == 0:
            return self.byte()
        if kind % 4 == 1:
            return int.from_bytes(self.take(2), "little")
        if kind % 4 == 2:
            return int.from_bytes(self.take(8), "little")
        return SPECIAL[(kind >> 2) % len(SPECIAL)]

    def rest(self) -> bytes:
        return self._data[self._at :]


def _spec(data: bytes) -> tuple[int, str, list[int], list[int], int, int, bytes]:
    r = _Reader(data)
    mode, name, ndim, shift, length = r.byte() % 2, DTYPE_NAMES[r.byte() % len(DTYPE_NAMES)], r.byte() % 5, r.byte() % 64, r.byte()
    shape = [r.number() for _ in range(ndim)]
    stride = [r.number() for _ in range(ndim)]
    offset = r.number()
    return mode, name, shape, stride, offset, shift, r.rest()[:length].ljust(length, b"\xa5")


def encode_spec(mode: int, name: str, shape: list[int], stride: list[int], offset: int, shift: int, base: bytes) -> bytes:
    """The input bytes of a spec (selectors: u64 for every number), for seeds and tests."""
    out = bytes([mode, DTYPE_NAMES.index(name), len(shape), shift, len(base)])
    for value in (*shape, *stride, offset):
        out += bytes([2]) + (value % (1 << 64)).to_bytes(8, "little")
    return out + base


def _expected(base: bytes, name: str, shape: list[int], stride: list[int], offset: int) -> torch.Tensor | None:
    """The spec's elements, read from a private aligned copy of ``base`` (``None`` when too many to check)."""
    dtype = DTYPES_BY_NAME[name]
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0 or numel > _CHECKED_ELEMENTS:
        return None
    begin = offset * dtype.itemsize
    end = begin + (sum((n - 1) * s for n, s in zip(shape, stride)) + 1) * dtype.itemsize
    assert 0 <= begin and end <= len(base), f"accepted a view reaching bytes [{begin}, {end}) of {len(base)}"
    raw = torch.frombuffer(bytearray(base[begin:end]), dtype=torch.uint8).clone()  # fresh, aligned
    return raw.view(dtype).as_strided(shape, stride)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Every element's bytes, in order (a fresh row-major copy: size-1 dims may carry any stride)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def _check(t: Any, name: str, shape: list[int], stride: list[int], offset: int, base: bytes, allowance: int) -> None:
    dtype = DTYPES_BY_NAME[name]
    assert isinstance(t, torch.Tensor) and t.dtype == dtype and list(t.shape) == shape, (type(t), getattr(t, "shape", None))
    assert t.data_ptr() % dtype.itemsize == 0, f"misaligned {name} view at {t.data_ptr():#x}"
    assert t.numel() * dtype.itemsize <= allowance, f"a view of {t.numel() * dtype.itemsize} bytes, allowance {allowance}"
    expected = _expected(base, name, shape, stride, offset)
    if expected is not None:  # compare the bytes each element reads (NaN-proof)
        assert torch.equal(_bytes(t), _bytes(expected)), "a view read other bytes"


def _safe_file(path: Path, name: str, shape: list[int], stride: list[int], offset: int, shift: int, base: bytes) -> int:
    """Write the spec as a safeckpt single file; returns its size."""
    encoded = encode_state({"t": torch.frombuffer(bytearray(base), dtype=torch.uint8) if base else torch.empty(0, dtype=torch.uint8)}, LIMITS)
    entry = encoded.entries[0].name
    view = [name, shape, stride, offset]
    value = msgpack.packb([msgpack.ExtType(1, bytes([7])), entry, 0, view])
    encoded.root["components"][0][2] = value
    head = single_header(encoded, [hashlib.sha256(base).hexdigest()])
    text = head[8:].rstrip(b" ")
    pad = (shift - 8 - len(text)) % 64
    data = struct.pack("<Q", len(text) + pad) + text + b" " * pad + base
    path.write_bytes(data)
    return len(data)


def _safe(work: Path, name: str, shape: list[int], stride: list[int], offset: int, shift: int, base: bytes) -> None:
    try:
        size = _safe_file(work / "view.safetensors", name, shape, stride, offset, shift, base)
    except (OverflowError, ValueError):  # msgpack cannot hold the number: no such file exists
        return
    allowance = LIMITS.max_expansion * size
    for load in (
        lambda: safeckpt.load(work / "view.safetensors", limits=LIMITS)["t"],
        lambda: safeckpt.open(work / "view.safetensors", limits=LIMITS).get("t"),
    ):
        try:
            t = load()
        except SafeCkptError:
            continue
        _check(t, name, shape, stride, offset, base, allowance)


def _legacy(name: str, shape: list[int], stride: list[int], offset: int, shift: int, base: bytes) -> None:
    buffer = torch.empty(len(base) + 64, dtype=torch.uint8)
    at = (shift - buffer.data_ptr()) % 64
    raw = buffer[at : at + len(base)]
    raw.copy_(torch.frombuffer(bytearray(base), dtype=torch.uint8) if base else raw)
    dtype = DTYPES_BY_NAME[name]
    storage = StorageRef("0", dtype, len(base), lambda: raw)
    try:
        t = Rebuilder(LIMITS).rebuild_tensor_v2(storage, offset, tuple(shape), tuple(stride), False, OrderedDict())
    except SafeCkptError:
        return
    _check(t, name, shape, stride, offset, base, LIMITS.max_expansion * len(base))
    if t.numel() and raw.data_ptr() % dtype.itemsize == 0:  # aligned bytes are viewed, never copied
        assert t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr(), "an aligned storage was copied"


_WORK: list[Path] = []


def _workdir() -> Path:
    if not _WORK:
        _WORK.append(Path(tempfile.mkdtemp(prefix="safeckpt-fuzz-views-")))
        atexit.register(shutil.rmtree, _WORK[0], True)
    return _WORK[0]


def views(data: bytes) -> None:
    """One view spec through the safe format (mode 0) or the legacy rebuild (mode 1)."""
    mode, name, shape, stride, offset, shift, base = _spec(data)
    if mode == 0:
        _safe(_workdir(), name, shape, stride, offset, shift, base)
    else:
        _legacy(name, shape, stride, offset, shift, base)


def seeds() -> Iterator[tuple[str, bytes]]:
    """Seed specs: valid views of every element size at aligned and shifted addresses, and the
    attacks of issue 14 (stride 0, huge empty dims, misaligned complex128)."""
    base = bytes(range(256))[:96]
    for mode in (0, 1):
        for name in ("uint8", "int16", "float32", "float64", "complex128", "bfloat16", "bool"):
            size = DTYPES_BY_NAME[name].itemsize
            n = len(base) // size
            for shift in (0, 1, 3):
                yield f"m{mode}_{name}_s{shift}", encode_spec(mode, name, [n], [1], 0, shift, base)
            yield f"m{mode}_{name}_2d", encode_spec(mode, name, [2, n // 4], [n // 4, 1], n // 2, 0, base)
            yield f"m{mode}_{name}_transposed", encode_spec(mode, name, [n // 4, 2], [1, n // 4], 1, 0, base)
        yield f"m{mode}_stride0", encode_spec(mode, "float32", [1 << 26], [0], 0, 0, base[:4])
        yield f"m{mode}_stride0_at_limit", encode_spec(mode, "uint8", [64 * 4], [0], 0, 0, base[:4])
        yield f"m{mode}_empty_huge", encode_spec(mode, "float32", [0, 1 << 62], [1, 1], 0, 0, b"")
        yield f"m{mode}_empty_overflow", encode_spec(mode, "float32", [1 << 40, 1 << 40, 0], [1, 1, 1], 0, 0, b"")
        yield f"m{mode}_complex_odd", encode_spec(mode, "complex128", [6], [1], 0, 1, base)
        yield f"m{mode}_past_end", encode_spec(mode, "float64", [13], [1], 0, 0, base)


TARGETS = {"views": views}
