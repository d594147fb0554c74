"""State tree <-> msgpack skeleton plus tensors.

Every value that is not a tensor is written to msgpack. Values msgpack has no
type for are written either as an *extension* (a leaf: ``Ext`` codes below) or
as a *tagged array*: an array whose first element is the ``Ext.TAG`` extension
holding one ``Tag`` byte (``[TAG(TUPLE), 1, 2]`` is the tuple ``(1, 2)``). Tagged
arrays are rebuilt by msgpack's ``list_hook`` in the C decoder's single pass, so
decoding never recurses in Python however deep the state is. Tensors become
``[TAG(TENSOR), entry, flags, view]`` and their bytes go to a :class:`TensorPlan`.

Decoding never imports a module or calls a constructor unless the caller's
:class:`AllowList` names it; unknown extension codes and tags are errors.
"""

from __future__ import annotations

import copyreg
import enum
import re
import struct
import types
from collections import OrderedDict
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np
import torch
from torch.torch_version import TorchVersion

from .errors import CheckpointFormatError, LimitExceededError, SafeCkptError, UnsupportedValueError
from . import policy
from .limits import Limits
from .refs import AllowList, GlobalRef, OpaqueObject, build_object, ref_of
from .tensors import DTYPES_BY_NAME, TensorPlan, dtype_name, view_tensor

__all__ = ["Decoder", "Encoder", "Ext", "Tag", "array_from_bytes", "pack", "render_path"]


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

_TAGS = {tag: msgpack.ExtType(Ext.TAG, bytes([tag])) for tag in Tag}
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_NUMPY_DTYPE = re.compile(r"[<>|=]?[biufcSUMm][0-9]{1,9}(\[[A-Za-z0-9]{1,10}\])?\Z")
_NUMPY_KINDS_AS_TENSOR = "biufc"
_FUNCTION_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType)
_ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def render_path(path: tuple[Any, ...]) -> str:
    """``("a", 0)`` -> ``"state['a'][0]"``, the way errors name a value."""
    return "state" + "".join(f"[{seg!r}]" for seg in path)


def _tensor_hint(prefix: str, path: tuple[Any, ...]) -> str:
    name = "/".join([prefix, *(str(seg) for seg in path[1:])] if prefix else [str(seg) for seg in path[1:]])
    return (name or "tensor").encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- encoding


class Encoder:
    """Turns values into msgpack-ready structures, sending tensors to a :class:`TensorPlan`.

    Args:
        plan: where tensors go.
        limits: ``max_depth`` bounds the nesting of what is saved.
    """

    def __init__(self, plan: TensorPlan, limits: Limits) -> None:
        self._plan = plan
        self.prefix = ""  # entry names start with this in place of the path's first segment
        self._limits = limits
        self._tensors: dict[int, tuple[Any, list[Any]]] = {}  # id -> (object kept alive, payload)
        self._active: set[int] = set()  # containers being encoded, to catch cycles

    def encode(self, value: Any, path: tuple[Any, ...], depth: int = 0) -> Any:
        """Encode one value found at ``path``.

        Raises:
            UnsupportedValueError: naming ``path`` when the value cannot be stored.
        """
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is float or kind is bytes:
            return value
        if kind is int:
            return value if _INT_MIN <= value <= _INT_MAX else self._bigint(value)
        if depth >= self._limits.max_depth:
            raise UnsupportedValueError(
                f"{render_path(path)} is nested deeper than Limits.max_depth={self._limits.max_depth}",
                path_in_state=render_path(path),
                value_type=kind.__qualname__,
            )
        encoder = _ENCODERS.get(kind)
        if encoder is not None:
            return encoder(self, value, path, depth + 1)
        return self._encode_other(value, path, depth + 1)

    # containers ---------------------------------------------------------------

    def _enter(self, value: Any, path: tuple[Any, ...]) -> None:
        if id(value) in self._active:
            raise UnsupportedValueError(
                f"{render_path(path)} contains itself (a reference cycle); the safe format stores trees",
                path_in_state=render_path(path),
                value_type=type(value).__qualname__,
            )
        self._active.add(id(value))

    def _items(self, value: Any, path: tuple[Any, ...], depth: int) -> list[Any]:
        self._enter(value, path)
        try:
            return [self.encode(item, (*path, i), depth) for i, item in enumerate(value)]
        finally:
            self._active.discard(id(value))

    def _pairs(self, pairs: Any, path: tuple[Any, ...], depth: int) -> list[tuple[Any, Any]]:
        return [
            (self.encode(key, (*path, key), depth), self.encode(item, (*path, key), depth)) for key, item in pairs
        ]

    def _list(self, value: list[Any], path: tuple[Any, ...], depth: int) -> Any:
        return self._items(value, path, depth)

    def _tuple(self, value: tuple[Any, ...], path: tuple[Any, ...], depth: int) -> Any:
        return [_TAGS[Tag.TUPLE], *self._items(value, path, depth)]

    def _set(self, value: Any, path: tuple[Any, ...], depth: int) -> Any:
        tag = Tag.SET if type(value) is set else Tag.FROZENSET
        return [_TAGS[tag], *self._items(value, path, depth)]

    def _dict(self, value: dict[Any, Any], path: tuple[Any, ...], depth: int) -> Any:
        self._enter(value, path)
        try:
            pairs = self._pairs(value.items(), path, depth)
        finally:
            self._active.discard(id(value))
        try:
            encoded = dict(pairs)
        except TypeError:  # a key encoded as an array (a tuple key, ...)
            encoded = None
        if encoded is not None and len(encoded) == len(pairs):
            return encoded
        if encoded is not None:  # distinct keys that encode equally
            self._check_distinct_keys(value, pairs, path)
        # keep the pairs: keys msgpack maps cannot hold, or nan keys that encode equally
        return [_TAGS[Tag.DICT], *(x for pair in pairs for x in pair)]

    @staticmethod
    def _check_distinct_keys(value: dict[Any, Any], pairs: list[tuple[Any, Any]], path: tuple[Any, ...]) -> None:
        """Refuse keys that would load as equal (a class and its GlobalRef); nan keys stay distinct."""
        seen: dict[Any, Any] = {}
        for key, (encoded_key, _) in zip(value, pairs):
            if encoded_key in seen and key == key:
                where = render_path(path)
                raise UnsupportedValueError(
                    f"{where} has keys {seen[encoded_key]!r} and {key!r}, which would load as the same key",
                    path_in_state=where,
                    value_type="dict",
                )
            seen.setdefault(encoded_key, key)

    def _ordered_dict(self, value: OrderedDict[Any, Any], path: tuple[Any, ...], depth: int) -> Any:
        self._enter(value, path)
        try:
            pairs = self._pairs(value.items(), path, depth)
            attrs = vars(value)
            encoded_attrs = self._dict(attrs, (*path, "__dict__"), depth) if attrs else None
        finally:
            self._active.discard(id(value))
        return [_TAGS[Tag.ORDERED_DICT], encoded_attrs, *(x for pair in pairs for x in pair)]

    # leaves -------------------------------------------------------------------

    @staticmethod
    def _bigint(value: int) -> msgpack.ExtType:
        size = (value + (value < 0)).bit_length() // 8 + 1
        return msgpack.ExtType(Ext.BIGINT, value.to_bytes(size, "big", signed=True))

    def _complex(self, value: complex, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.COMPLEX, struct.pack("<dd", value.real, value.imag))

    def _bytearray(self, value: bytearray, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.BYTEARRAY, bytes(value))

    def _dtype(self, value: torch.dtype, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.DTYPE, dtype_name(value).encode())

    def _device(self, value: torch.device, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.DEVICE, str(value).encode())

    def _size(self, value: torch.Size, path: tuple[Any, ...], depth: int) -> Any:
        return [_TAGS[Tag.SIZE], *value]

    def _torch_version(self, value: TorchVersion, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.TORCH_VERSION, str.__str__(value).encode("utf-8", "surrogatepass"))

    def _global(self, value: GlobalRef, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.GLOBAL, value.name.encode())

    # tensors and arrays ---------------------------------------------------------

    def _tensor(self, value: torch.Tensor, path: tuple[Any, ...], depth: int) -> Any:
        seen = self._tensors.get(id(value))
        if seen is not None and self._plan.dedupe:  # else each path gets its own entry too
            return seen[1]
        where = render_path(path)
        problem = _unsupported_tensor(value)
        if problem:
            raise UnsupportedValueError(
                f"{where} is {problem}, which the safe format cannot store; convert it to a dense tensor first",
                path_in_state=where,
                value_type=type(value).__qualname__,
            )
        flags = (PARAMETER if isinstance(value, torch.nn.Parameter) else 0) | (
            REQUIRES_GRAD if value.requires_grad else 0
        )
        stored = value.detach()
        if stored.is_conj() or stored.is_neg():
            stored = stored.resolve_conj().resolve_neg()
        payload: list[Any] = [_TAGS[Tag.TENSOR], None, flags, None]
        self._plan.add(stored, _tensor_hint(self.prefix, path), payload)
        self._tensors[id(value)] = (value, payload)
        return payload

    def _ndarray(self, value: np.ndarray, path: tuple[Any, ...], depth: int) -> Any:
        seen = self._tensors.get(id(value))
        if seen is not None:
            return seen[1]
        dtype = value.dtype
        where = render_path(path)
        if dtype.kind in _NUMPY_KINDS_AS_TENSOR and dtype.fields is None and dtype.subdtype is None:
            native = value if dtype.isnative else value.astype(dtype.newbyteorder("="))
            try:
                as_tensor = torch.from_numpy(native if native.flags.c_contiguous else native.copy(order="C"))
            except TypeError:  # a numpy dtype torch lacks (float128, ...): inline bytes below
                pass
            else:
                payload: list[Any] = [_TAGS[Tag.NDARRAY], None, dtype.str, None]
                self._plan.add(as_tensor, _tensor_hint(self.prefix, path), payload)
                self._tensors[id(value)] = (value, payload)
                return payload
        if not _NUMPY_DTYPE.match(dtype.str) or dtype.fields is not None:
            raise UnsupportedValueError(
                f"{where} is a numpy array of dtype {dtype!r}, which the safe format cannot store "
                "(object and structured arrays may hold arbitrary objects)",
                path_in_state=where,
                value_type="numpy.ndarray",
            )
        return [_TAGS[Tag.NDARRAY_BYTES], dtype.str, list(value.shape), value.tobytes(order="C")]

    def _numpy_scalar(self, value: np.generic, path: tuple[Any, ...], depth: int) -> Any:
        code = value.dtype.str
        if not _NUMPY_DTYPE.match(code):
            where = render_path(path)
            raise UnsupportedValueError(
                f"{where} is a numpy scalar of dtype {value.dtype!r}, which the safe format cannot store",
                path_in_state=where,
                value_type=type(value).__qualname__,
            )
        raw = value.tobytes()[: value.dtype.itemsize]  # an empty np.str_ still gives 4 bytes
        return msgpack.ExtType(Ext.NUMPY_SCALAR, code.encode() + b"\0" + raw)

    # everything else ------------------------------------------------------------

    def _encode_other(self, value: Any, path: tuple[Any, ...], depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, depth)
        if isinstance(value, np.generic):
            return self._numpy_scalar(value, path, depth)
        if isinstance(value, enum.Enum) or isinstance(value, _FUNCTION_TYPES):
            return self._global(ref_of(value, path=render_path(path)), path, depth)
        if isinstance(value, OpaqueObject):
            return self._opaque(value, path, depth)
        return self._reduce(value, path, depth)

    def _opaque(self, value: OpaqueObject, path: tuple[Any, ...], depth: int) -> Any:
        dict_items = None
        if value.dict_items is not None:
            dict_items = [x for pair in value.dict_items for x in pair]
        return self._object(
            value.cls, value.constructor, value.args, value.kwargs, value.state, value.list_items, dict_items, path, depth
        )

    def _reduce(self, value: Any, path: tuple[Any, ...], depth: int) -> Any:
        where = render_path(path)
        try:
            reduced = value.__reduce_ex__(4)
        except Exception as exc:
            raise UnsupportedValueError(
                f"{where} ({type(value).__qualname__}) cannot be saved: {exc}; remove it from the state "
                'or save with format="torch"',
                path_in_state=where,
                value_type=type(value).__qualname__,
            ) from exc
        if isinstance(reduced, str):  # a module-level singleton, named like a global
            return self._global(ref_of(value, path=where), path, depth)
        factory, args, state, list_items, dict_items = (*reduced, None, None, None)[:5]
        kwargs: dict[str, Any] = {}
        constructor = "call"
        if factory is copyreg.__newobj__:
            factory, args, constructor = args[0], args[1:], "new"
        elif factory is copyreg.__newobj_ex__:
            (factory, args, kwargs), constructor = args, "new"
        ref = ref_of(factory, path=where)
        if policy.classify(ref.module, ref.qualname) == "dangerous":
            raise UnsupportedValueError(
                f"{where} ({type(value).__qualname__}) would be rebuilt by calling {ref.name}, which safeckpt "
                "never stores (a bound method or similar); store the object or a plain value instead",
                path_in_state=where,
                value_type=type(value).__qualname__,
            )
        self._enter(value, path)
        try:
            items = list(list_items) if list_items is not None else None
            pairs = [x for pair in dict_items for x in pair] if dict_items is not None else None
            return self._object(ref, constructor, tuple(args), kwargs, state, items, pairs, path, depth)
        finally:
            self._active.discard(id(value))

    def _object(
        self,
        ref: GlobalRef,
        constructor: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        state: Any,
        list_items: list[Any] | None,
        dict_items: list[Any] | None,
        path: tuple[Any, ...],
        depth: int,
    ) -> Any:
        return [
            _TAGS[Tag.OBJECT],
            self._global(ref, path, depth),
            constructor,
            self._items(args, (*path, "__args__"), depth),
            self._dict(dict(kwargs), (*path, "__kwargs__"), depth),
            self.encode(state, path, depth),
            None if list_items is None else self._items(list_items, path, depth),
            None if dict_items is None else self._items(dict_items, path, depth),
        ]


def _unsupported_tensor(t: torch.Tensor) -> str | None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"a tensor subclass ({type(t).__qualname__})"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if t.is_quantized:
        return "a quantized tensor"
    if t.device.type == "meta":
        return "a meta tensor (it has no data)"
    return None


_ENCODERS: dict[type, Callable[[Encoder, Any, tuple[Any, ...], int], Any]] = {
    list: Encoder._list,
    tuple: Encoder._tuple,
    set: Encoder._set,
    frozenset: Encoder._set,
    dict: Encoder._dict,
    OrderedDict: Encoder._ordered_dict,
    complex: Encoder._complex,
    bytearray: Encoder._bytearray,
    torch.dtype: Encoder._dtype,
    torch.device: Encoder._device,
    torch.Size: Encoder._size,
    TorchVersion: Encoder._torch_version,
    GlobalRef: Encoder._global,
    torch.Tensor: Encoder._tensor,
    torch.nn.Parameter: Encoder._tensor,
    np.ndarray: Encoder._ndarray,
}


def pack(value: Any) -> bytes:
    """msgpack bytes of an encoded value (after the tensor plan is finalized)."""
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


# --------------------------------------------------------------------------- decoding


class _TagMark:
    __slots__ = ("tag",)

    def __init__(self, tag: Tag) -> None:
        self.tag = tag


_MARKS = {int(tag): _TagMark(tag) for tag in Tag}


def _fail(message: str) -> CheckpointFormatError:
    return CheckpointFormatError(message)


class Decoder:
    """Rebuilds values from skeleton bytes, fetching tensors by entry name.

    Args:
        tensor_source: returns the entry tensor for a name (on the target device).
        allow: which globals may be imported.
        limits: bounds checked while decoding.
        file: the file being read, for error messages.
    """

    def __init__(
        self,
        tensor_source: Callable[[str], torch.Tensor],
        allow: AllowList,
        limits: Limits,
        file: str | None = None,
    ) -> None:
        self._source = tensor_source
        self._allow = allow
        self._limits = limits
        self._file = file
        self._tensors: dict[Any, Any] = {}
        self._builders: dict[Tag, Callable[[list[Any]], Any]] = {
            Tag.TUPLE: tuple,
            Tag.SET: set,
            Tag.FROZENSET: frozenset,
            Tag.DICT: self._dict,
            Tag.ORDERED_DICT: self._ordered_dict,
            Tag.SIZE: self._size,
            Tag.TENSOR: self._tensor,
            Tag.NDARRAY: self._ndarray,
            Tag.NDARRAY_BYTES: self._ndarray_bytes,
            Tag.OBJECT: self._object,
        }

    def unpack(self, data: bytes, what: str = "the skeleton") -> Any:
        """Decode one packed value.

        Raises:
            CheckpointFormatError: for any malformed input (``LimitExceededError`` for limits).
        """
        limits = self._limits
        try:
            value = msgpack.unpackb(
                data,
                ext_hook=self._ext,
                list_hook=self._list,
                object_pairs_hook=self._map,
                strict_map_key=False,
                raw=False,
                unicode_errors="surrogatepass",
                max_str_len=limits.max_str_len,
                max_bin_len=limits.max_str_len,
                max_array_len=limits.max_container_len,
                max_map_len=limits.max_container_len,
                max_ext_len=limits.max_str_len,
            )
        except SafeCkptError as exc:
            exc.file = exc.file or self._file
            raise
        except msgpack.StackError as exc:
            raise LimitExceededError(
                f"{what} is nested deeper than msgpack's decoder allows",
                limit="max_depth",
                maximum=self._limits.max_depth,
                file=self._file,
            ) from exc
        except Exception as exc:  # anything else from untrusted bytes is a format error
            raise CheckpointFormatError(f"{what} is corrupt: {type(exc).__name__}: {exc}", file=self._file) from exc
        if type(value) is _TagMark:
            raise _fail(f"{what} is a bare tag")
        return value

    # hooks ------------------------------------------------------------------------

    def _ext(self, code: int, data: bytes) -> Any:
        if code == Ext.TAG:
            mark = _MARKS.get(data[0]) if len(data) == 1 else None
            if mark is None:
                raise _fail(f"unknown tag {data!r:.20}")
            return mark
        if code == Ext.BIGINT:
            if not data:
                raise _fail("empty big integer")
            return int.from_bytes(data, "big", signed=True)
        if code == Ext.COMPLEX:
            real, imag = struct.unpack("<dd", data)
            return complex(real, imag)
        if code == Ext.DTYPE:
            dtype = DTYPES_BY_NAME.get(data.decode("ascii"))
            if dtype is None:
                raise _fail(f"unknown dtype {data!r:.50}")
            return dtype
        if code == Ext.DEVICE:
            if len(data) > 64:
                raise _fail("device string too long")
            return torch.device(data.decode("ascii"))
        if code == Ext.TORCH_VERSION:
            return TorchVersion(data.decode("utf-8", "surrogatepass"))
        if code == Ext.NUMPY_SCALAR:
            code_bytes, sep, raw = data.partition(b"\0")
            dtype = _numpy_dtype(code_bytes.decode("ascii"))
            if not sep or len(raw) != dtype.itemsize:
                raise _fail("malformed numpy scalar")
            if not raw:  # an empty np.str_ / np.bytes_
                return dtype.type()
            return np.frombuffer(raw, dtype=dtype, count=1)[0]
        if code == Ext.GLOBAL:
            ref = GlobalRef.parse(data.decode("utf-8"))
            return self._resolve(ref)
        if code == Ext.BYTEARRAY:
            return bytearray(data)
        raise _fail(f"unknown msgpack extension code {code}; this file may need a newer safeckpt")

    def _list(self, items: list[Any]) -> Any:
        if items and type(items[0]) is _TagMark:
            body = items[1:]
            if any(type(x) is _TagMark for x in body):
                raise _fail("a tag inside a tagged array")
            return self._builders[items[0].tag](body)
        if any(type(x) is _TagMark for x in items):
            raise _fail("a tag that does not start its array")
        return items

    def _map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise _fail("duplicate keys in a map")
        if any(type(k) is _TagMark or type(v) is _TagMark for k, v in pairs):
            raise _fail("a tag used as a map key or value")
        return out

    # builders -----------------------------------------------------------------------

    def _resolve(self, ref: GlobalRef) -> Any:
        if not self._allow:
            return ref
        try:
            return self._allow.resolve(ref)
        except Exception as exc:
            raise CheckpointFormatError(f"allowed global {ref.name} could not be imported: {exc}") from exc

    @staticmethod
    def _pairs(body: list[Any]) -> list[tuple[Any, Any]]:
        if len(body) % 2:
            raise _fail("odd number of items in a dict")
        return list(zip(body[0::2], body[1::2]))

    def _dict(self, body: list[Any]) -> dict[Any, Any]:
        return self._map(self._pairs(body))

    def _ordered_dict(self, body: list[Any]) -> OrderedDict[Any, Any]:
        if not body or not (body[0] is None or type(body[0]) is dict):
            raise _fail("malformed OrderedDict")
        pairs = self._pairs(body[1:])
        out = OrderedDict(pairs)
        if len(out) != len(pairs):
            raise _fail("duplicate keys in an OrderedDict")
        for name, value in (body[0] or {}).items():
            if not (type(name) is str and _ATTR_NAME.match(name) and not name.startswith("__")):
                raise _fail(f"invalid OrderedDict attribute {name!r:.50}")
            setattr(out, name, value)
        return out

    def _size(self, body: list[Any]) -> torch.Size:
        if len(body) > self._limits.max_dims or not all(type(v) is int for v in body):
            raise _fail("malformed torch.Size")
        return torch.Size(body)

    def _entry_tensor(self, entry: Any, view: Any) -> torch.Tensor:
        if type(entry) is not str:
            raise _fail("tensor entry name is not a string")
        key = (entry, repr(view))
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors.get(entry)
            if tensor is None:  # one read per entry, so that all its views share it
                tensor = self._tensors[entry] = self._source(entry)
            if view is not None:
                tensor = view_tensor(tensor, view, max_dims=self._limits.max_dims, where=entry)
            self._tensors[key] = tensor
        return tensor

    def _tensor(self, body: list[Any]) -> torch.Tensor:
        if len(body) != 3 or type(body[1]) is not int:
            raise _fail("malformed tensor reference")
        entry, flags, view = body
        key = (entry, flags, repr(view))
        if key in self._tensors:
            return self._tensors[key]
        tensor = self._entry_tensor(entry, view)
        if flags & PARAMETER:
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(flags & REQUIRES_GRAD))
        elif flags & REQUIRES_GRAD:
            tensor = tensor.detach().requires_grad_(True)
        self._tensors[key] = tensor
        return tensor

    def _ndarray(self, body: list[Any]) -> np.ndarray:
        if len(body) != 3 or type(body[1]) is not str:
            raise _fail("malformed numpy array reference")
        entry, code, view = body
        dtype = _numpy_dtype(code)
        array = self._entry_tensor(entry, view).cpu().numpy()
        if array.dtype != dtype:
            if array.dtype != dtype.newbyteorder("="):
                raise _fail(f"numpy dtype {code} does not match the stored tensor")
            array = array.astype(dtype)
        return array

    def _ndarray_bytes(self, body: list[Any]) -> np.ndarray:
        if len(body) != 3 or type(body[0]) is not str or type(body[1]) is not list or type(body[2]) is not bytes:
            raise _fail("malformed inline numpy array")
        code, shape, raw = body
        return array_from_bytes(raw, _numpy_dtype(code), shape, max_dims=self._limits.max_dims)

    def _object(self, body: list[Any]) -> Any:
        if len(body) != 7:
            raise _fail("malformed object")
        factory, constructor, args, kwargs, state, list_items, dict_items = body
        if (
            constructor not in ("new", "call")
            or type(args) is not list
            or type(kwargs) is not dict
            or not all(type(k) is str for k in kwargs)
            or not (list_items is None or type(list_items) is list)
            or not (dict_items is None or type(dict_items) is list)
        ):
            raise _fail("malformed object")
        spec_cls = factory if isinstance(factory, GlobalRef) else None
        if spec_cls is None and not callable(factory):
            raise _fail("object constructor is not a class reference")
        spec = OpaqueObject(
            cls=spec_cls or ref_of(factory),
            constructor=constructor,
            args=tuple(args),
            kwargs=kwargs,
            state=state,
            list_items=list_items,
            dict_items=None if dict_items is None else self._pairs(dict_items),
        )
        if spec_cls is not None:
            return spec
        try:
            return build_object(factory, spec)
        except Exception as exc:
            raise CheckpointFormatError(f"could not rebuild allowed {spec.cls.name}: {exc}") from exc


def array_from_bytes(raw: bytes, dtype: np.dtype[Any], shape: Any, *, max_dims: int, fortran: bool = False) -> np.ndarray:
    """A writable numpy array of ``dtype`` and ``shape`` from its raw bytes, sizes checked first.

    Raises:
        CheckpointFormatError: if the shape is malformed or does not match the bytes.
    """
    if type(shape) not in (list, tuple) or len(shape) > max_dims or not all(type(v) is int and v >= 0 for v in shape):
        raise _fail("malformed numpy shape")
    count = 1
    for size in shape:
        count *= size
    if count * dtype.itemsize != len(raw):
        raise _fail("numpy array bytes do not match its shape")
    flat = np.frombuffer(raw, dtype=dtype, count=count) if count else np.empty(0, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _numpy_dtype(code: Any) -> np.dtype[Any]:
    if type(code) is not str or not _NUMPY_DTYPE.match(code):
        raise _fail(f"unsupported numpy dtype {code!r:.50}")
    try:
        return np.dtype(code)
    except TypeError as exc:
        raise _fail(f"unsupported numpy dtype {code!r:.50}") from exc
