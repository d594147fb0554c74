"""Decoding: skeleton bytes -> values, in msgpack's single C pass (hooks, no Python recursion)."""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
from torch.torch_version import TorchVersion

from ..attrs import set_data_attrs
from ..errors import CheckpointFormatError, LimitExceededError, SafeCkptError
from ..keyhash import count_equal_hashes
from ..limits import Limits
from ..refs import AllowList, GlobalRef, OpaqueObject, build_object, ref_of
from ..tensors import DTYPES_BY_NAME, ViewScope, torch_size, view_tensor
from .types import PARAMETER, REQUIRES_GRAD, Ext, Tag, array_from_bytes, fail, numpy_dtype

__all__ = ["Decoder"]



class _TagMark:
    __slots__ = ("tag",)

    def __init__(self, tag: Tag) -> None:
        self.tag = tag


_MARKS = {int(tag): _TagMark(tag) for tag in Tag}




class Decoder:
    """Rebuilds values from skeleton bytes, fetching tensors by entry name.

    Args:
        tensor_source: returns the entry tensor for a name (on the target device).
        allow: which globals may be imported.
        limits: bounds checked while decoding.
        file: the file being read, for error messages.
        array_source: returns the entry as a CPU tensor, for numpy arrays (numpy has
            no devices); defaults to ``tensor_source``.
        views: the scope of the views this decoder makes (what they may hold in all); by default
            ``limits.max_expansion`` times the bytes of the entries they view.
    """

    def __init__(
        self,
        tensor_source: Callable[[str], torch.Tensor],
        allow: AllowList,
        limits: Limits,
        file: str | None = None,
        array_source: Callable[[str], torch.Tensor] | None = None,
        views: ViewScope | None = None,
    ) -> None:
        self._views = views if views is not None else ViewScope(limits, file=file)
        self._source = tensor_source
        self._array_source = array_source or tensor_source
        self._allow = allow
        self._limits = limits
        self._file = file
        self._tensors: dict[Any, Any] = {}
        self._builders: dict[Tag, Callable[[list[Any]], Any]] = {
            Tag.TUPLE: tuple,
            Tag.SET: self._set,
            Tag.FROZENSET: self._frozenset,
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
            raise fail(f"{what} is a bare tag")
        return value

    # hooks ------------------------------------------------------------------------

    def _ext(self, code: int, data: bytes) -> Any:
        if code == Ext.TAG:
            mark = _MARKS.get(data[0]) if len(data) == 1 else None
            if mark is None:
                raise fail(f"unknown tag {data!r:.20}")
            return mark
        if code == Ext.BIGINT:
            if not data:
                raise fail("empty big integer")
            return int.from_bytes(data, "big", signed=True)
        if code == Ext.COMPLEX:
            real, imag = struct.unpack("<dd", data)
            return complex(real, imag)
        if code == Ext.DTYPE:
            dtype = DTYPES_BY_NAME.get(data.decode("ascii"))
            if dtype is None:
                raise fail(f"unknown dtype {data!r:.50}")
            return dtype
        if code == Ext.DEVICE:
            if len(data) > 64:
                raise fail("device string too long")
            return torch.device(data.decode("ascii"))
        if code == Ext.TORCH_VERSION:
            return TorchVersion(data.decode("utf-8", "surrogatepass"))
        if code == Ext.NUMPY_SCALAR:
            code_bytes, sep, raw = data.partition(b"\0")
            scalar_dtype = numpy_dtype(code_bytes.decode("ascii"))
            if not sep or len(raw) != scalar_dtype.itemsize:
                raise fail("malformed numpy scalar")
            if not raw:  # an empty np.str_ / np.bytes_
                return scalar_dtype.type()
            return np.frombuffer(raw, dtype=scalar_dtype, count=1)[0]
        if code == Ext.GLOBAL:
            ref = GlobalRef.parse(data.decode("utf-8"))
            return self._resolve(ref)
        if code == Ext.BYTEARRAY:
            return bytearray(data)
        raise fail(f"unknown msgpack extension code {code}; this file may need a newer safeckpt")

    def _list(self, items: list[Any]) -> Any:
        if items and type(items[0]) is _TagMark:
            body = items[1:]
            if any(type(x) is _TagMark for x in body):
                raise fail("a tag inside a tagged array")
            return self._builders[items[0].tag](body)
        if any(type(x) is _TagMark for x in items):
            raise fail("a tag that does not start its array")
        return items

    def _hashed(self, keys: Any) -> None:
        """Refuse keys chosen to collide before they are inserted (see :mod:`..keyhash`)."""
        count_equal_hashes({}, keys, self._limits.max_equal_hash_keys)

    def _set(self, body: list[Any]) -> set[Any]:
        self._hashed(body)
        return set(body)

    def _frozenset(self, body: list[Any]) -> frozenset[Any]:
        self._hashed(body)
        return frozenset(body)

    def _map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._hashed([k for k, _ in pairs])
        out = dict(pairs)
        if len(out) != len(pairs):
            raise fail("duplicate keys in a map")
        if any(type(k) is _TagMark or type(v) is _TagMark for k, v in pairs):
            raise fail("a tag used as a map key or value")
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
            raise fail("odd number of items in a dict")
        return list(zip(body[0::2], body[1::2]))

    def _dict(self, body: list[Any]) -> dict[Any, Any]:
        return self._map(self._pairs(body))

    def _ordered_dict(self, body: list[Any]) -> OrderedDict[Any, Any]:
        if not body or not (body[0] is None or type(body[0]) is dict):
            raise fail("malformed OrderedDict")
        pairs = self._pairs(body[1:])
        self._hashed(body[1::2])
        out = OrderedDict(pairs)
        if len(out) != len(pairs):
            raise fail("duplicate keys in an OrderedDict")
        set_data_attrs(out, body[0] or {}, what="an OrderedDict in the skeleton")
        return out

    def _size(self, body: list[Any]) -> torch.Size:
        try:
            return torch_size(body, limits=self._limits)
        except CheckpointFormatError as exc:
            raise fail(str(exc)) from None

    def _entry_tensor(self, entry: Any, view: Any, *, for_array: bool = False) -> torch.Tensor:
        if type(entry) is not str:
            raise fail("tensor entry name is not a string")
        key = (entry, repr(view), for_array)
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors.get((entry, for_array))
            if tensor is None:  # one read per entry, so that all its views share it
                source = self._array_source if for_array else self._source
                tensor = self._tensors[(entry, for_array)] = source(entry)
            if view is not None:
                tensor = view_tensor(tensor, view, limits=self._limits, scope=self._views, where=entry)
            self._tensors[key] = tensor
        return tensor

    def _tensor(self, body: list[Any]) -> torch.Tensor:
        if len(body) != 3 or type(body[1]) is not int:
            raise fail("malformed tensor reference")
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
            raise fail("malformed numpy array reference")
        entry, code, view = body
        dtype = numpy_dtype(code)
        array = self._entry_tensor(entry, view, for_array=True).cpu().numpy()
        if array.dtype != dtype:
            if array.dtype != dtype.newbyteorder("="):
                raise fail(f"numpy dtype {code} does not match the stored tensor")
            array = array.astype(dtype)
        return array

    def _ndarray_bytes(self, body: list[Any]) -> np.ndarray:
        if len(body) != 3 or type(body[0]) is not str or type(body[1]) is not list or type(body[2]) is not bytes:
            raise fail("malformed inline numpy array")
        code, shape, raw = body
        return array_from_bytes(raw, numpy_dtype(code), shape, max_dims=self._limits.max_dims)

    def _object(self, body: list[Any]) -> Any:
        if len(body) != 7:
            raise fail("malformed object")
        factory, constructor, args, kwargs, state, list_items, dict_items = body
        if (
            constructor not in ("new", "call")
            or type(args) is not list
            or type(kwargs) is not dict
            or not all(type(k) is str for k in kwargs)
            or not (list_items is None or type(list_items) is list)
            or not (dict_items is None or type(dict_items) is list)
        ):
            raise fail("malformed object")
        spec_cls = factory if isinstance(factory, GlobalRef) else None
        if spec_cls is None and not callable(factory):
            raise fail("object constructor is not a class reference")
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
