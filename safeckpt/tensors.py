"""Making tensors from file bytes: every tensor reading makes over bytes of a file is checked here.

:func:`check_dims` validates declared shapes, :func:`entry_tensor` makes a whole
entry, :func:`view_tensor` a view ``[dtype, shape, stride, offset]`` into one
(byte extent, alignment, dtype) and :class:`ViewScope` bounds what one load may
expand. The save side (which bytes go into the file for the tensors of a state:
:class:`TensorPlan`, :class:`Entry`, :class:`NameAllocator`, the dtype tables)
lives in :mod:`safeckpt.tensor_plan`; its names are re-exported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import CheckpointFormatError, LimitExceededError
from .limits import Limits
from .tensor_plan import (
    DTYPES_BY_NAME,
    DTYPES_FROM_SAFETENSORS,
    SAFETENSORS_DTYPES,
    Entry,
    NameAllocator,
    TensorPlan,
    contiguous_strides,
    dtype_name,
)
from .text import show

__all__ = [
    "empty_tensor",
    "DTYPES_BY_NAME",
    "DTYPES_FROM_SAFETENSORS",
    "INDEX_BOUND",
    "SAFETENSORS_DTYPES",
    "Entry",
    "NameAllocator",
    "TensorPlan",
    "ViewScope",
    "check_dims",
    "torch_size",
    "contiguous_strides",
    "dtype_name",
    "entry_tensor",
    "make_view",
    "view_tensor",
]


# --------------------------------------------------------------------------- making tensors from file bytes
#
# Every tensor that reading makes over bytes of a file goes through this section, before any
# tensor object exists:
#   - shape and stride: ints in [0, 2**63) (torch's int64), at most max_dims of them, and the
#     product of the non-zero dims below 2**63, so that torch can represent the tensor whatever
#     its element count (a zero-element [0, 2**70] or [2**40, 2**40, 0] is refused, [0, 2**63-1]
#     is made);
#   - byte extent: every element the view can reach lies inside its entry (storage);
#   - absolute alignment: the first element's address is a multiple of the element size,
#     else the bytes are copied to fresh (aligned) memory first; never handed out misaligned;
#   - expansion: the elements of the views one load makes, counted once per view, hold at most
#     ``Limits.max_expansion`` times the bytes they come from (the file), checked on declared
#     sizes before the view is made.

INDEX_BOUND = 1 << 63  # torch sizes, strides and offsets are int64

#: dtypes a view may not name: quantized ones (torch cannot make them over plain bytes) and
#: the sub-byte int1..int7/uint1..uint7 (torch cannot copy their elements).
_NO_VIEWS = frozenset(
    dtype for name, dtype in DTYPES_BY_NAME.items() if name.startswith("q") or re.fullmatch(r"u?int[1-7]", name)
)


def check_dims(dims: Any, *, what: str, limits: Limits, file: str | None = None) -> int:
    """Validate a declared shape; return its element count.

    Raises:
        CheckpointFormatError: a dim that is not an int in ``[0, 2**63)``, or non-zero dims whose
            product reaches ``2**63`` (no tensor of that shape exists, even with no element).
        LimitExceededError: more than ``limits.max_dims`` dims.
    """
    if type(dims) not in (list, tuple):
        raise CheckpointFormatError(f"{what} has a malformed shape: not a list", file=file)
    if len(dims) > limits.max_dims:
        limits.check("max_dims", len(dims), what=f"the rank of {what}", file=file)
    numel, nonzero = 1, 1
    for d in dims:
        if type(d) is not int or not 0 <= d < INDEX_BOUND:
            raise CheckpointFormatError(f"{what} has a malformed shape: a dim {d!r:.40} outside [0, 2**63)", file=file)
        numel *= d
        if d:
            nonzero *= d
    if nonzero >= INDEX_BOUND:
        raise CheckpointFormatError(
            f"{what} has a malformed shape: its non-zero dims multiply to 2**63 or more, which no tensor "
            "can have, even an empty one",
            file=file,
        )
    return numel


def torch_size(dims: Any, *, what: str = "torch.Size", limits: Limits | None = None) -> torch.Size:
    """A ``torch.Size`` from file values: ints in torch's int64 range, at most ``max_dims`` of them.

    ``torch.Size`` takes any Python int, then cannot be printed, packed or used (``10**30``).

    Raises:
        CheckpointFormatError: a value that is not an int in ``[-2**63, 2**63)``, or too many.
    """
    bound = (limits or Limits()).max_dims
    if type(dims) not in (list, tuple, torch.Size) or len(dims) > bound:
        raise CheckpointFormatError(f"malformed {what}: not a sequence of at most {bound} ints")
    for d in dims:
        if type(d) is not int or not -INDEX_BOUND <= d < INDEX_BOUND:
            raise CheckpointFormatError(f"malformed {what}: {show(d, 40)} is not an int in [-2**63, 2**63)")
    return torch.Size(dims)


class ViewScope:
    """The views of one load: what they may hold in all, and the aligned copies of their bases.

    The elements of the views one load makes may hold at most ``limits.max_expansion`` times
    the bytes of their source. A base (entry, storage) whose bytes are misaligned in memory for
    a view's dtype is copied to fresh memory once, and every such view shares that copy.

    Args:
        limits: ``max_expansion`` is the ratio.
        source_bytes: the size of the file the views come from. ``None``: the bytes of the distinct
            bases (entries, storages) views are made of, which all lie in the file (a tighter bound).
        file: for error messages.
    """

    def __init__(self, limits: Limits, source_bytes: int | None = None, file: str | None = None) -> None:
        self._limits = limits
        self._source = source_bytes
        self._bases: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id -> (base, aligned copy)
        self._based = 0
        self.used = 0
        self.file = file

    @property
    def allowance(self) -> int:
        """Bytes the views may hold in all."""
        source = self._source if self._source is not None else self._based
        return self._limits.max_expansion * source

    def charge(self, base: torch.Tensor, nbytes: int, where: str | Callable[[], str]) -> None:
        """Count a view of ``nbytes`` bytes made of ``base``.

        ``where`` names the view in the error: a string, or a function that makes it (called only then).

        Raises:
            LimitExceededError: (``limit="max_expansion"``) when the views would hold more than the allowance.
        """
        if id(base) not in self._bases:  # held, so that ids are never reused while the scope lives
            self._bases[id(base)] = (base, None)
            self._based += base.numel() * base.element_size()
        used = self.used + nbytes
        if used > self.allowance:
            what = "file" if self._source is not None else "storages they view"
            raise LimitExceededError(
                f"the view of {_named(where)} would bring the views of this load to {used} bytes, over "
                f"Limits.max_expansion={self._limits.max_expansion} times the bytes of the {what} "
                f"({self.allowance} bytes); pass limits=Limits(max_expansion=...) to read it if you trust this file",
                limit="max_expansion",
                maximum=self.allowance,
                actual=used,
                file=self.file,
            )
        self.used = used

    def bytes_of(self, base: torch.Tensor, itemsize: int) -> torch.Tensor:
        """``base`` (charged before) as flat ``uint8``, in fresh memory when it is misaligned for ``itemsize``."""
        if base.dtype is torch.uint8 and base.dim() == 1 and base.is_contiguous():
            flat = base  # already flat bytes (legacy storages, file slices): no new tensor object
        else:
            flat = base.reshape(-1).view(torch.uint8)
        if not _misaligned(flat, itemsize):
            return flat
        held, copy = self._bases[id(base)]
        if copy is None:
            copy = _fresh_copy(flat)
            self._bases[id(base)] = (held, copy)
        return copy


def _named(where: str | Callable[[], str]) -> str:
    return where if isinstance(where, str) else where()


def _misaligned(flat: torch.Tensor, itemsize: int) -> bool:
    """Whether elements of ``itemsize`` bytes starting at ``flat``'s first byte (``uint8``) would be
    misaligned in memory, or in the elements of its storage (which ``set_`` counts in).
    ``data_ptr()`` is the first byte's absolute address (0 on the meta device, which has no memory)."""
    return bool(flat.data_ptr() % itemsize or flat.storage_offset() % itemsize)


def _fresh_copy(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s bytes in fresh memory (torch's allocator aligns to 64 bytes)."""
    copy = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    copy.copy_(flat)
    return copy


def _no_elements(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new tensor of ``dtype`` with no element (to ``set_`` a storage into). ``torch.empty`` of a
    few dtypes (float4) raises in deterministic mode, even for no element: those are made as bytes."""
    try:
        return torch.empty(0, dtype=dtype, device=device)
    except NotImplementedError:
        return torch.empty(0, dtype=torch.uint8, device=device).view(dtype)


def empty_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised tensor of ``shape`` and ``dtype``, made as bytes and viewed as ``dtype``.

    ``torch.empty`` of a typed tensor fills it when deterministic algorithms are on,
    and that fill is not implemented for every dtype safetensors stores (float4);
    bytes always can be. ``shape`` must already have passed :func:`check_dims`.
    """
    numel = math.prod(shape)
    return torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device=device).view(dtype).reshape(shape)


def entry_tensor(
    raw: Any, dtype: torch.dtype, shape: tuple[int, ...], *, limits: Limits, where: str, file: str | None = None
) -> torch.Tensor:
    """A whole stored entry: the flat bytes ``raw`` (a ``uint8`` numpy array or tensor, e.g. a slice of
    a file mapping) as a contiguous tensor of ``dtype`` and ``shape``, zero-copy when aligned.

    Raises:
        CheckpointFormatError: a shape no tensor can have, or bytes that do not match it.
    """
    itemsize = dtype.itemsize
    flat = torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw
    # The common case, zero-copy: positive dims whose product is the bytes there are (so each
    # is in range), aligned in memory. Anything else takes the full checks below.
    if shape and min(shape) > 0 and len(shape) <= limits.max_dims and flat.numel() == math.prod(shape) * itemsize:
        if not flat.storage_offset() and flat.data_ptr() % itemsize == 0 and flat.dtype == torch.uint8 and flat.dim() == 1:
            return flat.view(dtype).reshape(shape)
    numel = check_dims(shape, what=where, limits=limits, file=file)
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != numel * dtype.itemsize:
        raise CheckpointFormatError(
            f"{where} holds {flat.numel()} bytes, its shape {list(shape)} needs {numel * dtype.itemsize}", file=file
        )
    if not numel:
        return empty_tensor(shape, dtype, flat.device)
    if _misaligned(flat, dtype.itemsize):
        flat = _fresh_copy(flat)
    return _no_elements(dtype, flat.device).set_(
        flat.untyped_storage(), int(flat.storage_offset()) // dtype.itemsize, shape, contiguous_strides(shape)
    )


def view_tensor(
    base: torch.Tensor, view: Any, *, limits: Limits, scope: ViewScope, where: str | Callable[[], str]
) -> torch.Tensor:
    """Rebuild a tensor from an entry (or storage) and a ``[dtype, shape, stride, offset]`` view.

    Checks the view (see the rules above this function) before any tensor exists, charges its
    bytes to ``scope``, and reads a copy of ``base`` when its bytes are misaligned in memory.
    ``where`` names the view in errors: a string, or a function that makes it (called only then).

    Raises:
        CheckpointFormatError: if the view is malformed or reaches outside ``base``.
        LimitExceededError: over ``max_dims``, or over the load's expansion allowance.
    """
    if not (isinstance(view, list) and len(view) == 4):
        raise CheckpointFormatError(f"malformed tensor view for {_named(where)}: {show(view, 200)}", file=scope.file)
    name, shape, stride, offset = view
    dtype = DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(f"unknown dtype {name!r:.100} in the view of {_named(where)}", file=scope.file)
    return make_view(base, dtype, shape, stride, offset, limits=limits, scope=scope, where=where)


def make_view(
    base: torch.Tensor,
    dtype: torch.dtype,
    shape: Any,
    stride: Any,
    offset: Any,
    *,
    limits: Limits,
    scope: ViewScope,
    where: str | Callable[[], str],
) -> torch.Tensor:
    """:func:`view_tensor` of a view whose dtype is already a ``torch.dtype`` (legacy storages):
    the same checks, in the same order, with the same errors.

    Raises:
        CheckpointFormatError: if the view is malformed or reaches outside ``base``.
        LimitExceededError: over ``max_dims``, or over the load's expansion allowance.
    """
    if dtype in _NO_VIEWS:
        raise CheckpointFormatError(
            f"the view of {_named(where)} has dtype {dtype_name(dtype)}, whose tensors torch cannot make or copy "
            "from bytes",
            file=scope.file,
        )
    numel = _plain_extent(shape, stride, offset, limits.max_dims)
    if numel < 0:  # not the plain case: the full checks, which raise the precise error
        numel = check_dims(shape, what=f"the view of {_named(where)}", limits=limits, file=scope.file)
        if not (
            type(stride) in (list, tuple)
            and len(stride) == len(shape)
            and all(type(v) is int and 0 <= v < INDEX_BOUND for v in (*stride, offset))
        ):
            raise CheckpointFormatError(f"malformed stride/offset in the view of {_named(where)}", file=scope.file)
        last = sum((size - 1) * st for size, st in zip(shape, stride)) if numel else -1
    else:
        last = _last_element(shape, stride) if numel else -1
    itemsize = dtype.itemsize
    begin, end = offset * itemsize, (offset + last + 1) * itemsize
    available = base.numel() * base.element_size()
    if end > available:
        raise CheckpointFormatError(
            f"the view of {_named(where)} reaches byte {end} of an entry of {available} bytes", file=scope.file
        )
    if not base.is_meta:  # meta tensors (a scan, a survey pass) hold no memory to bound
        scope.charge(base, numel * itemsize, where)
    if not numel:
        return empty_tensor(shape, dtype, base.device).as_strided(shape, stride)
    flat = scope.bytes_of(base, itemsize)
    return _no_elements(dtype, base.device).set_(
        flat.untyped_storage(), (flat.storage_offset() + begin) // itemsize, shape, stride
    )


def _plain_extent(shape: Any, stride: Any, offset: Any, max_dims: int) -> int:
    """The element count of a view whose shape, strides and offset all pass the checks of
    :func:`make_view` (ints in ``[0, 2**63)``, as many strides as dims, at most ``max_dims``,
    non-zero dims multiplying below ``2**63``); -1 for anything else (the full checks then run)."""
    kind = type(shape)
    if (kind is not list and kind is not tuple) or type(stride) not in (list, tuple):
        return -1
    if len(shape) != len(stride) or len(shape) > max_dims or type(offset) is not int or not 0 <= offset < INDEX_BOUND:
        return -1
    numel = nonzero = 1
    for d, st in zip(shape, stride):
        if type(d) is not int or type(st) is not int or not 0 <= d < INDEX_BOUND or not 0 <= st < INDEX_BOUND:
            return -1
        numel *= d
        if d:
            nonzero *= d
    return numel if nonzero < INDEX_BOUND else -1


def _last_element(shape: Any, stride: Any) -> int:
    """Offset, in elements, of the last element of a view with no zero dim."""
    last = 0
    for d, st in zip(shape, stride):
        last += (d - 1) * st
    return last
