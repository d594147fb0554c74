"""safeckpt's own implementations of the allowlisted pickle constructors.

Each function receives the arguments a pickle supplies and builds the value with
code from this module, validating every argument; none of them imports or calls
the global the pickle named.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from ..attrs import set_data_attrs
from ..codec import array_from_bytes
from ..errors import CheckpointFormatError
from ..limits import Limits
from ..policy import ALLOWED
from ..refs import GlobalRef, OpaqueObject
from ..tensors import ViewScope, make_view, torch_size
from .vm import make_pending

__all__ = ["Rebuilder", "StorageRef", "StorageType", "swap_size"]

_STORAGE_DTYPES = {
    "Double": torch.float64,
    "Float": torch.float32,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
    "ComplexDouble": torch.complex128,
    "ComplexFloat": torch.complex64,
    "QUInt8": torch.quint8,
    "QInt8": torch.qint8,
    "QInt32": torch.qint32,
    "QUInt4x2": torch.quint4x2,
    "QUInt2x4": torch.quint2x4,
}
_NUMPY_CODE = re.compile(r"[<>|=]?[biufcSUMm?][0-9]{0,9}\Z")
_TEXT_CODECS = {"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"}


@dataclass(frozen=True)
class StorageType:
    """The storage class named in a persistent id; ``dtype`` is ``None`` for untyped storage."""

    dtype: torch.dtype | None


@dataclass
class StorageRef:
    """One storage of a torch archive: its dtype and a loader for its bytes (memoized)."""

    key: str
    dtype: torch.dtype | None
    nbytes: int
    load: Callable[[], torch.Tensor]
    _data: torch.Tensor | None = field(default=None, repr=False)

    def where(self) -> str:
        """This storage, named for an error message."""
        return f"storage {self.key!r:.50}"

    def bytes(self) -> torch.Tensor:
        """The storage's bytes as a flat ``uint8`` tensor, shared by every tensor viewing it."""
        if self._data is None:
            data = self.load()
            if data.numel() != self.nbytes or data.dtype != torch.uint8:
                raise CheckpointFormatError(f"storage {self.key!r} holds {data.numel()} bytes, expected {self.nbytes}")
            self._data = data
        return self._data


def swap_size(dtype: torch.dtype | None) -> int:
    """The byte-swap unit of a storage of ``dtype`` in a big-endian archive, as ``torch.load`` swaps it:
    each element, but each half of a complex one (real and imaginary parts stay in order); an
    untyped storage (``dtype`` ``None``) is not swapped."""
    if dtype is None:
        return 1
    return max(1, dtype.itemsize // 2) if dtype.is_complex else dtype.itemsize


def _ints(value: Any, what: str) -> list[int]:
    if type(value) not in (tuple, list, torch.Size):
        raise CheckpointFormatError(f"{what} is not a sequence of ints")
    for v in value:
        if type(v) is not int:
            raise CheckpointFormatError(f"{what} is not a sequence of ints")
    return list(value)


class Rebuilder:
    """The allowlisted constructors for one read, bound to a target device and limits."""

    def __init__(self, limits: Limits, source_bytes: int | None = None, file: str | None = None) -> None:
        self._limits = limits
        self._views = ViewScope(limits, source_bytes, file)  # every tensor of a legacy file is a view
        self.values: dict[str, Any] = {}
        for name in list(_STORAGE_DTYPES):
            self.values[f"torch:{name}Storage"] = StorageType(_STORAGE_DTYPES[name])
            self.values[f"torch.cuda:{name}Storage"] = StorageType(_STORAGE_DTYPES[name])
        self.values["torch.storage:UntypedStorage"] = self.values["torch:UntypedStorage"] = StorageType(None)
        self.values["builtins:Ellipsis"] = Ellipsis
        self.values["builtins:NotImplemented"] = NotImplemented


        for name in ALLOWED:
            module, _, attr = name.partition(":")
            if module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype):
                self.values[name] = getattr(torch, attr)
        self.calls: dict[str, Callable[..., Any]] = {
            "collections:OrderedDict": self.ordered_dict,
            "builtins:set": lambda items=(): set(items),
            "builtins:frozenset": lambda items=(): frozenset(items),
            "builtins:complex": self.complex,
            "builtins:bytearray": self.bytearray,
            "builtins:slice": self.slice,
            "builtins:range": self.range,
            "__builtin__:xrange": self.range,
            "__builtin__:set": lambda items=(): set(items),
            "__builtin__:frozenset": lambda items=(): frozenset(items),
            "__builtin__:complex": self.complex,
            "_codecs:encode": self.encode,
            "copyreg:_reconstructor": self.reconstructor,
            "copy_reg:_reconstructor": self.reconstructor,
            "torch._utils:_rebuild_tensor": self.rebuild_tensor,
            "torch._utils:_rebuild_tensor_v2": self.rebuild_tensor_v2,
            "torch._utils:_rebuild_tensor_v3": self.rebuild_tensor_v3,
            "torch._utils:_rebuild_parameter": self.rebuild_parameter,
            "torch._utils:_rebuild_parameter_with_state": self.rebuild_parameter_with_state,
            "torch._utils:_rebuild_from_type_v2": self.rebuild_from_type_v2,
            "torch._tensor:_rebuild_from_type_v2": self.rebuild_from_type_v2,
            "torch:Size": lambda dims=(): torch_size(dims, limits=self._limits),
            "torch:device": self.device,
            "torch.torch_version:TorchVersion": self.torch_version,
            "numpy.core.multiarray:_reconstruct": self.ndarray,
            "numpy._core.multiarray:_reconstruct": self.ndarray,
            "numpy.core.multiarray:scalar": self.numpy_scalar,
            "numpy._core.multiarray:scalar": self.numpy_scalar,
            "numpy:dtype": self.numpy_dtype,
            "numpy.core.numeric:_frombuffer": self.frombuffer,
            "numpy._core.numeric:_frombuffer": self.frombuffer,
        }

    # plain values ------------------------------------------------------------------------

    @staticmethod
    def range(*args: Any) -> range:
        if not 1 <= len(args) <= 3 or any(type(a) is not int for a in args):
            raise CheckpointFormatError("range of something other than 1 to 3 ints")
        if len(args) == 3 and args[2] == 0:
            raise CheckpointFormatError("range with a zero step")
        return range(*args)

    @staticmethod
    def ordered_dict(items: Any = ()) -> OrderedDict[Any, Any]:
        if type(items) not in (list, tuple):
            raise CheckpointFormatError("OrderedDict items are not a list")
        return OrderedDict(items)

    @staticmethod
    def complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
        if type(real) not in (int, float) or type(imag) not in (int, float):
            raise CheckpointFormatError("complex() of non-numbers")
        return complex(real, imag)

    @staticmethod
    def bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
        if type(data) is str and encoding in ("latin-1", "latin1"):
            return bytearray(data.encode("latin-1"))
        if type(data) is bytes and encoding is None:
            return bytearray(data)
        raise CheckpointFormatError("bytearray() of unexpected arguments")

    @staticmethod
    def slice(*args: Any) -> slice:
        if len(args) > 3 or not all(a is None or type(a) is int for a in args):
            raise CheckpointFormatError("slice() of unexpected arguments")
        return slice(*args)

    @staticmethod
    def encode(text: Any, encoding: Any = "utf-8") -> bytes:
        if type(text) is not str or type(encoding) is not str or encoding.lower() not in _TEXT_CODECS:
            raise CheckpointFormatError("_codecs.encode with a non-text codec")
        return text.encode(encoding)

    @staticmethod
    def reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
        if not isinstance(cls, GlobalRef) or not isinstance(base, GlobalRef):
            raise CheckpointFormatError("copyreg._reconstructor of non-globals")
        if cls.name == "torch.torch_version:TorchVersion" and base.qualname == "str" and type(state) is str:
            return TorchVersion(state)
        return OpaqueObject(cls, "new", () if state is None else (state,))

    @staticmethod
    def device(*args: Any) -> torch.device:
        if not 1 <= len(args) <= 2 or type(args[0]) is not str or len(args[0]) > 64:
            raise CheckpointFormatError("torch.device() of unexpected arguments")
        if len(args) == 2 and type(args[1]) is not int:
            raise CheckpointFormatError("torch.device() of unexpected arguments")
        return torch.device(*args)

    @staticmethod
    def torch_version(text: Any) -> TorchVersion:
        if type(text) is not str or len(text) > 256:
            raise CheckpointFormatError("TorchVersion of a non-string")
        return TorchVersion(text)

    # tensors -----------------------------------------------------------------------------

    def _view(self, storage: Any, dtype: torch.dtype | None, offset: Any, size: Any, stride: Any) -> torch.Tensor:
        if type(storage) is not StorageRef:
            raise CheckpointFormatError("a tensor rebuilt from something that is not a storage")
        if dtype is None or type(offset) is not int:
            raise CheckpointFormatError(f"tensor on storage {storage.key!r:.50} has no dtype or offset")
        return make_view(
            storage.bytes(), dtype, _ints(size, "tensor size"), _ints(stride, "tensor stride"), offset,
            limits=self._limits, scope=self._views, where=storage.where,
        )

    @staticmethod
    def _grad(tensor: torch.Tensor, requires_grad: Any) -> torch.Tensor:
        if type(requires_grad) is not bool:
            raise CheckpointFormatError("requires_grad is not a bool")
        return tensor.requires_grad_(True) if requires_grad else tensor

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
        return self._view(storage, getattr(storage, "dtype", None), offset, size, stride)

    def rebuild_tensor_v2(
        self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
    ) -> torch.Tensor:
        tensor = self._view(storage, getattr(storage, "dtype", None), offset, size, stride)
        return self._grad(tensor, requires_grad)

    def rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype):
            raise CheckpointFormatError("_rebuild_tensor_v3 without a dtype")
        return self._grad(self._view(storage, dtype, offset, size, stride), requires_grad)

    @staticmethod
    def rebuild_parameter(data: Any, requires_grad: Any, hooks: Any = None) -> torch.nn.Parameter:
        if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool:
            raise CheckpointFormatError("_rebuild_parameter of a non-tensor")
        return torch.nn.Parameter(data.detach(), requires_grad=requires_grad)

    def rebuild_parameter_with_state(self, data: Any, requires_grad: Any, hooks: Any, state: Any) -> torch.nn.Parameter:
        return self.rebuild_parameter(data, requires_grad, hooks)

    def rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        rebuild = self.calls.get(func.name) if isinstance(func, GlobalRef) else None
        if rebuild is None or type(args) is not tuple:
            raise CheckpointFormatError("_rebuild_from_type_v2 with a helper outside the allowlist")
        tensor = rebuild(*args)
        kind = new_type.name if isinstance(new_type, GlobalRef) else None
        if kind in ("torch._tensor:Tensor", "torch:Tensor"):
            return tensor
        if kind == "torch.nn.parameter:Parameter":
            return torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
        return OpaqueObject(GlobalRef("torch._tensor", "_rebuild_from_type_v2"), "call", (func, new_type, tensor, state))

    # numpy ---------------------------------------------------------------------------------

    @staticmethod
    def numpy_dtype(code: Any, align: Any = False, copy: Any = False) -> np.dtype[Any]:
        if type(code) is not str or not _NUMPY_CODE.match(code):
            raise CheckpointFormatError(f"numpy dtype {code!r:.50} is not a plain scalar type")
        return np.dtype(code)

    @staticmethod
    def build_dtype(dtype: np.dtype[Any], state: Any) -> np.dtype[Any]:
        if type(state) is not tuple or len(state) < 8 or any(state[i] is not None for i in (2, 3, 4)):
            raise CheckpointFormatError("numpy dtype state describes a structured or sub-array dtype")
        order = state[1]
        if order not in ("<", ">", "|", "="):
            raise CheckpointFormatError("numpy dtype state has no byte order")
        if len(state) > 8 and type(state[8]) is tuple and dtype.kind in "Mm":
            unit, count = state[8][0], state[8][1]
            if type(unit) not in (str, bytes) or type(count) is not int:
                raise CheckpointFormatError("numpy datetime dtype with malformed metadata")
            unit = unit.decode("ascii") if type(unit) is bytes else unit
            dtype = np.dtype(f"{dtype.str[:2]}8[{count if count != 1 else ''}{unit}]")
        return dtype.newbyteorder(order) if order in "<>" else dtype

    def ndarray(self, subtype: Any, shape: Any, code: Any) -> Any:
        placeholder = OpaqueObject(GlobalRef("numpy.core.multiarray", "_reconstruct"), "call", (subtype, shape, code))
        if not isinstance(subtype, GlobalRef) or subtype.name != "numpy:ndarray":
            return placeholder
        return make_pending(self._array_from_state, placeholder)

    def _array_from_state(self, state: Any) -> np.ndarray:
        if type(state) is not tuple or len(state) not in (4, 5):
            raise CheckpointFormatError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcSUMm" or type(fortran) is not bool:
            raise CheckpointFormatError("numpy array of an unsupported dtype (object arrays are not read)")
        if type(raw) is str:
            raw = raw.encode("latin-1")
        if type(raw) is not bytes:
            raise CheckpointFormatError("numpy array data is not bytes")
        return array_from_bytes(raw, dtype, _ints(shape, "numpy shape"), max_dims=self._limits.max_dims, fortran=fortran)

    def frombuffer(self, raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        """numpy's protocol 5 reducer: ``frombuffer(raw, dtype).reshape(shape, order=order)``."""
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcSUMm" or order not in ("C", "F"):
            raise CheckpointFormatError("numpy _frombuffer of an unsupported dtype or order (object arrays are not read)")
        if type(raw) is bytearray:
            raw = bytes(raw)
        if type(raw) is not bytes:
            raise CheckpointFormatError("numpy _frombuffer data is not bytes (out-of-band buffers are not read)")
        return array_from_bytes(raw, dtype, _ints(shape, "numpy shape"), max_dims=self._limits.max_dims, fortran=order == "F")

    @staticmethod
    def numpy_scalar(dtype: Any, raw: Any) -> Any:
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcSUMm":
            raise CheckpointFormatError("numpy scalar of an unsupported dtype")
        if type(raw) is str:
            raw = raw.encode("latin-1")
        if type(raw) is not bytes or len(raw) != dtype.itemsize:
            raise CheckpointFormatError("numpy scalar data does not match its dtype")
        return np.frombuffer(raw, dtype=dtype, count=1)[0] if raw else dtype.type()

    def build(self, target: Any, state: Any) -> Any:
        """BUILD on real values: attributes of an ``OrderedDict`` (data only, see :mod:`safeckpt.attrs`)
        and numpy dtypes; ``None`` refuses."""
        if type(target) is OrderedDict:
            set_data_attrs(target, state, what="a BUILD on an OrderedDict")
            return target
        if isinstance(target, np.dtype):
            return self.build_dtype(target, state)
        return None
