"""The skeleton's vocabulary: extension codes, tags, flags and helpers shared by both directions.

See FORMAT.md section 2 for what each code means on disk.
"""

from __future__ import annotations

import re
import types
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np

from ..errors import CheckpointFormatError
from ..tensors import INDEX_BOUND
from ..text import segment, show

__all__ = [
    "ATTR_NAME",
    "FUNCTION_TYPES",
    "INT_MAX",
    "INT_MIN",
    "NUMPY_DTYPE",
    "NUMPY_KINDS_AS_TENSOR",
    "PARAMETER",
    "REQUIRES_GRAD",
    "TAGS",
    "Ext",
    "Tag",
    "array_from_bytes",
    "fail",
    "numpy_dtype",
    "pack",
    "render_path",
    "tensor_hint",
]

class Ext(IntEnum):
    """msgpack extension type codes (leaves, and the tag marker)."""

    TAG = 1  # 1 byte: a Tag, only as the first element of an array
    BIGINT = 2  # signed big-endian two's complement, for ints outside [-2**63, 2**64)
    COMPLEX = 3  # two little-endian float64: real, imag
    DTYPE = 4  # ASCII torch dtype name, "float32"
    DEVICE = 5  # ASCII torch device string, "cuda:0"
    TORCH_VERSION = 6  # UTF-8 torch.torch_version.TorchVersion
    NUMPY_SCALAR = 7  # ASCII numpy dtype str, NUL, the scalar's bytes
    GLOBAL = 8  # UTF-8 "module:qualname"
    BYTEARRAY = 9  # raw bytes


class Tag(IntEnum):
    """Kinds of tagged arrays ``[TAG(kind), *body]``."""

    TUPLE = 1  # items
    SET = 2  # items
    FROZENSET = 3  # items
    DICT = 4  # k1, v1, k2, v2, ... (dicts whose keys msgpack maps cannot hold)
    ORDERED_DICT = 5  # attrs (map or nil), k1, v1, ...
    SIZE = 6  # ints
    TENSOR = 7  # entry, flags, view (nil or [dtype, shape, stride, offset])
    NDARRAY = 8  # entry, numpy dtype str, view
    NDARRAY_BYTES = 9  # numpy dtype str, shape, bytes
    OBJECT = 10  # callable (GLOBAL), "new"|"call", args, kwargs, state, list items, flat dict items


PARAMETER = 1  # tensor flag: an nn.Parameter
REQUIRES_GRAD = 2  # tensor flag

TAGS = {tag: msgpack.ExtType(Ext.TAG, bytes([tag])) for tag in Tag}
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1
NUMPY_DTYPE = re.compile(r"[<>|=]?[biufcSUMm][0-9]{1,9}(\[[A-Za-z0-9]{1,10}\])?\Z")
NUMPY_KINDS_AS_TENSOR = "biufc"
FUNCTION_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType)
ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def render_path(path: tuple[Any, ...]) -> str:
    """``("a", 0)`` -> ``"state['a'][0]"``, the way errors name a value."""
    return "state" + "".join(f"[{show(seg)}]" for seg in path)


def tensor_hint(prefix: str, path: tuple[Any, ...]) -> str:
    name = "/".join([prefix, *(segment(seg) for seg in path[1:])] if prefix else [segment(seg) for seg in path[1:]])
    return (name or "tensor").encode("utf-8", "backslashreplace").decode("utf-8")



def pack(value: Any) -> bytes:
    """msgpack bytes of an encoded value (after the tensor plan is finalized)."""
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


def fail(message: str) -> CheckpointFormatError:
    """A format error about the skeleton (the caller adds the file)."""
    return CheckpointFormatError(message)


def array_from_bytes(raw: bytes, dtype: np.dtype[Any], shape: Any, *, max_dims: int, fortran: bool = False) -> np.ndarray:
    """A writable numpy array of ``dtype`` and ``shape`` from its raw bytes, sizes checked first.

    Raises:
        CheckpointFormatError: if the shape is malformed or does not match the bytes.
    """
    if type(shape) not in (list, tuple) or len(shape) > max_dims or not all(type(v) is int and v >= 0 for v in shape):
        raise fail("malformed numpy shape")
    count, nonzero = 1, max(dtype.itemsize, 4 if dtype.kind == "U" else 1)  # numpy sizes an empty U0 as U1
    for size in shape:
        count *= size
        nonzero *= size or 1
    if nonzero >= INDEX_BOUND:  # numpy cannot make it, even with no element ([0, 2**70])
        raise fail("malformed numpy shape: its non-zero dims times its item size reach 2**63")
    if count * dtype.itemsize != len(raw):
        raise fail("numpy array bytes do not match its shape")
    flat = np.frombuffer(raw, dtype=dtype, count=count) if count else np.empty(0, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def numpy_dtype(code: Any) -> np.dtype[Any]:
    if type(code) is not str or not NUMPY_DTYPE.match(code):
        raise fail(f"unsupported numpy dtype {code!r:.50}")
    try:
        return np.dtype(code)
    except TypeError as exc:
        raise fail(f"unsupported numpy dtype {code!r:.50}") from exc
