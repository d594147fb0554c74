"""Encoding: state values -> msgpack-ready structures, tensors sent to a :class:`TensorPlan`."""

from __future__ import annotations

import copyreg
import enum
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
from torch.torch_version import TorchVersion

from .. import policy
from ..attrs import check_attrs_for_save
from ..errors import UnsupportedValueError
from ..limits import Limits
from ..refs import GlobalRef, OpaqueObject, ref_of
from ..tensors import TensorPlan, dtype_name
from ..text import show
from .types import (
    FUNCTION_TYPES,
    INT_MAX,
    INT_MIN,
    NUMPY_DTYPE,
    NUMPY_KINDS_AS_TENSOR,
    PARAMETER,
    REQUIRES_GRAD,
    TAGS,
    Ext,
    Tag,
    render_path,
    tensor_hint,
)

__all__ = ["Encoder"]

_NEWOBJ = getattr(copyreg, "__newobj__")  # what object.__reduce_ex__ names for cls.__new__(cls, *args)
_NEWOBJ_EX = getattr(copyreg, "__newobj_ex__")  # ... and for cls.__new__(cls, *args, **kwargs)


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
        self._done: dict[int, Any] = {}  # containers encoded so far, to count shared ones written again
        self._repeating = 0  # shared containers being written again on the current branch
        self._repeated = 0  # values written again because of sharing

    def encode(self, value: Any, path: tuple[Any, ...], depth: int = 0) -> Any:
        """Encode one value found at ``path``.

        Raises:
            UnsupportedValueError: naming ``path`` when the value cannot be stored.
        """
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is float or kind is bytes:
            return value
        if kind is int:
            return value if INT_MIN <= value <= INT_MAX else self._bigint(value)
        if depth >= self._limits.max_depth:
            raise _refused(path, kind.__qualname__, f" is nested deeper than Limits.max_depth={self._limits.max_depth}")
        encoder = _ENCODERS.get(kind)
        if encoder is not None:
            return encoder(self, value, path, depth + 1)
        return self._encode_other(value, path, depth + 1)

    # containers ---------------------------------------------------------------

    def _enter(self, value: Any, path: tuple[Any, ...]) -> bool:
        """Start encoding a container; ``True`` when it was encoded before (shared, written out again).

        Raises:
            UnsupportedValueError: for a container inside itself (the safe format stores trees),
                or shared containers that expand past ``Limits.max_shared_values`` repeated values.
        """
        key = id(value)
        if key in self._active:
            tail = " contains itself (a reference cycle); the safe format stores trees"
            raise _refused(path, type(value).__qualname__, tail)
        again = key in self._done
        self._repeating += again
        if self._repeating:
            self._repeated += 1 + (len(value) if isinstance(value, (list, tuple, set, frozenset, dict)) else 0)
            if self._repeated > self._limits.max_shared_values:
                raise _refused(
                    path,
                    type(value).__qualname__,
                    " is a container shared at so many places that writing it out at each one (the safe "
                    "format stores trees) would repeat more than Limits.max_shared_values="
                    f"{self._limits.max_shared_values} values",
                )
        self._active.add(key)
        return again

    def _leave(self, value: Any, again: bool) -> None:
        key = id(value)
        self._active.discard(key)
        self._done[key] = value  # kept alive, so that its id is not reused while encoding
        self._repeating -= again

    def _items(self, value: Any, path: tuple[Any, ...], depth: int) -> list[Any]:
        again = self._enter(value, path)
        try:
            return [self.encode(item, (*path, i), depth) for i, item in enumerate(value)]
        finally:
            self._leave(value, again)

    def _pairs(self, pairs: Any, path: tuple[Any, ...], depth: int) -> list[tuple[Any, Any]]:
        return [
            (self.encode(key, (*path, key), depth), self.encode(item, (*path, key), depth)) for key, item in pairs
        ]

    def _list(self, value: list[Any], path: tuple[Any, ...], depth: int) -> Any:
        return self._items(value, path, depth)

    def _tuple(self, value: tuple[Any, ...], path: tuple[Any, ...], depth: int) -> Any:
        return [TAGS[Tag.TUPLE], *self._items(value, path, depth)]

    def _set(self, value: Any, path: tuple[Any, ...], depth: int) -> Any:
        tag = Tag.SET if type(value) is set else Tag.FROZENSET
        return [TAGS[tag], *self._items(value, path, depth)]

    def _dict(self, value: dict[Any, Any], path: tuple[Any, ...], depth: int) -> Any:
        again = self._enter(value, path)
        try:
            pairs = self._pairs(value.items(), path, depth)
        finally:
            self._leave(value, again)
        try:
            encoded = dict(pairs)
        except TypeError:  # a key encoded as an array (a tuple key, ...)
            encoded = None
        if encoded is not None and len(encoded) == len(pairs):
            return encoded
        if encoded is not None:  # distinct keys that encode equally
            self._check_distinct_keys(value, pairs, path)
        # keep the pairs: keys msgpack maps cannot hold, or nan keys that encode equally
        return [TAGS[Tag.DICT], *(x for pair in pairs for x in pair)]

    @staticmethod
    def _check_distinct_keys(value: dict[Any, Any], pairs: list[tuple[Any, Any]], path: tuple[Any, ...]) -> None:
        """Refuse keys that would load as equal (a class and its GlobalRef); nan keys stay distinct."""
        seen: dict[Any, Any] = {}
        for key, (encoded_key, _) in zip(value, pairs):
            if encoded_key in seen and key == key:
                tail = f" has keys {show(seen[encoded_key])} and {show(key)}, which would load as the same key"
                raise _refused(path, "dict", tail)
            seen.setdefault(encoded_key, key)

    def _ordered_dict(self, value: OrderedDict[Any, Any], path: tuple[Any, ...], depth: int) -> Any:
        again = self._enter(value, path)
        try:
            pairs = self._pairs(value.items(), path, depth)
            encoded_attrs = self.encode_attrs(value, path, depth)
        finally:
            self._leave(value, again)
        return [TAGS[Tag.ORDERED_DICT], encoded_attrs, *(x for pair in pairs for x in pair)]

    def encode_attrs(self, value: Any, path: tuple[Any, ...], depth: int = 0) -> Any:
        """The instance attributes of an ``OrderedDict`` (``_metadata``), or ``None`` when it has none.

        Raises:
            UnsupportedValueError: for an attribute that would shadow a method when read
                back (``od.keys = ...``): readers refuse those (see :mod:`safeckpt.attrs`).
        """
        attrs = vars(value)
        if not attrs:
            return None
        problem = check_attrs_for_save(type(value), attrs)
        if problem is not None:
            tail = f": {problem}; the safe format stores only data attributes (such as _metadata)"
            raise _refused(path, type(value).__qualname__, tail)
        return self._dict(dict(attrs), (*path, "__dict__"), depth)

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
        return [TAGS[Tag.SIZE], *value]

    def _torch_version(self, value: TorchVersion, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.TORCH_VERSION, str.__str__(value).encode("utf-8", "surrogatepass"))

    def _global(self, value: GlobalRef, path: tuple[Any, ...], depth: int) -> Any:
        return msgpack.ExtType(Ext.GLOBAL, value.name.encode())

    # tensors and arrays ---------------------------------------------------------

    def _tensor(self, value: torch.Tensor, path: tuple[Any, ...], depth: int) -> Any:
        seen = self._tensors.get(id(value))
        if seen is not None and self._plan.dedupe:  # else each path gets its own entry too
            return seen[1]
        problem = _unsupported_tensor(value)
        if problem:
            tail = f" is {problem}, which the safe format cannot store; convert it to a dense tensor first"
            raise _refused(path, type(value).__qualname__, tail)
        flags = (PARAMETER if isinstance(value, torch.nn.Parameter) else 0) | (
            REQUIRES_GRAD if value.requires_grad else 0
        )
        stored = value.detach()
        if stored.is_conj() or stored.is_neg():
            stored = stored.resolve_conj().resolve_neg()
        payload: list[Any] = [TAGS[Tag.TENSOR], None, flags, None]
        self._plan.add(stored, tensor_hint(self.prefix, path), payload)
        self._tensors[id(value)] = (value, payload)
        return payload

    def _ndarray(self, value: np.ndarray, path: tuple[Any, ...], depth: int) -> Any:
        seen = self._tensors.get(id(value))
        if seen is not None:
            return seen[1]
        dtype = value.dtype
        if dtype.kind in NUMPY_KINDS_AS_TENSOR and dtype.fields is None and dtype.subdtype is None:
            native = value if dtype.isnative else value.astype(dtype.newbyteorder("="))
            try:
                as_tensor = torch.from_numpy(native if native.flags.c_contiguous else native.copy(order="C"))
            except TypeError:  # a numpy dtype torch lacks (float128, ...): inline bytes below
                pass
            else:
                payload: list[Any] = [TAGS[Tag.NDARRAY], None, dtype.str, None]
                self._plan.add(as_tensor, tensor_hint(self.prefix, path), payload)
                self._tensors[id(value)] = (value, payload)
                return payload
        if not NUMPY_DTYPE.match(dtype.str) or dtype.fields is not None:
            raise _refused(
                path,
                "numpy.ndarray",
                f" is a numpy array of dtype {dtype!r}, which the safe format cannot store "
                "(object and structured arrays may hold arbitrary objects)",
            )
        return [TAGS[Tag.NDARRAY_BYTES], dtype.str, list(value.shape), value.tobytes(order="C")]

    def _numpy_scalar(self, value: np.generic, path: tuple[Any, ...], depth: int) -> Any:
        code = value.dtype.str
        if not NUMPY_DTYPE.match(code):
            tail = f" is a numpy scalar of dtype {value.dtype!r}, which the safe format cannot store"
            raise _refused(path, type(value).__qualname__, tail)
        raw = value.tobytes()[: value.dtype.itemsize]  # an empty np.str_ still gives 4 bytes
        return msgpack.ExtType(Ext.NUMPY_SCALAR, code.encode() + b"\0" + raw)

    # everything else ------------------------------------------------------------

    def _encode_other(self, value: Any, path: tuple[Any, ...], depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, depth)
        if isinstance(value, np.generic):
            return self._numpy_scalar(value, path, depth)
        if isinstance(value, enum.Enum) or isinstance(value, FUNCTION_TYPES):
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
            kind = type(value).__qualname__
            tail = f' ({kind}) cannot be saved: {exc}; remove it from the state or save with format="torch"'
            raise _refused(path, kind, tail) from exc
        if isinstance(reduced, str):  # a module-level singleton, named like a global
            return self._global(ref_of(value, path=where), path, depth)
        factory, args, state, list_items, dict_items = (*reduced, None, None, None)[:5]
        kwargs: dict[str, Any] = {}
        constructor = "call"
        if factory is _NEWOBJ:
            factory, args, constructor = args[0], args[1:], "new"
        elif factory is _NEWOBJ_EX:
            (factory, args, kwargs), constructor = args, "new"
        ref = ref_of(factory, path=where)
        if policy.classify(ref.module, ref.qualname) == "dangerous":
            raise _refused(
                path,
                type(value).__qualname__,
                f" ({type(value).__qualname__}) would be rebuilt by calling {ref.name}, which safeckpt "
                "never stores (a bound method or similar); store the object or a plain value instead",
            )
        again = self._enter(value, path)
        try:
            items = list(list_items) if list_items is not None else None
            pairs = [x for pair in dict_items for x in pair] if dict_items is not None else None
            return self._object(ref, constructor, tuple(args), kwargs, state, items, pairs, path, depth)
        finally:
            self._leave(value, again)

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
            TAGS[Tag.OBJECT],
            self._global(ref, path, depth),
            constructor,
            self._items(args, (*path, "__args__"), depth),
            self._dict(dict(kwargs), (*path, "__kwargs__"), depth),
            self.encode(state, path, depth),
            None if list_items is None else self._items(list_items, path, depth),
            None if dict_items is None else self._items(dict_items, path, depth),
        ]


def _refused(path: tuple[Any, ...], value_type: str, tail: str) -> UnsupportedValueError:
    """The error for the value at ``path`` that cannot be saved; its message is the path, then ``tail``."""
    where = render_path(path)
    return UnsupportedValueError(where + tail, path_in_state=where, value_type=value_type)


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
