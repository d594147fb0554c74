"""Which bytes go into the file for the tensors of a state, and how they come back.

Tensors are gathered while the state is encoded, grouped by the storage they
live in, and turned into *entries*: contiguous byte ranges of the safetensors
file. Each tensor in the skeleton points at an entry and, when it is not that
entry exactly, carries a *view* ``[dtype, shape, stride, offset]`` into it:

- a tensor alone in its storage becomes its own entry (a contiguous copy when it
  was not contiguous; only its own elements, never the rest of the storage);
- tensors that are the same view of one storage (tied weights) share one entry;
- overlapping views of one storage are stored once: as the member that covers
  them all when there is one, otherwise as the storage's byte span (``U8``);
- a tensor whose elements overlap in its storage (a stride-0 ``expand``) is stored
  as the bytes it spans plus a view, never materialised;
- dtypes that safetensors cannot name (complex128, ...) are stored as ``U8``
  bytes with a view that reinterprets them.

Reading goes the other way, through the checks of the last section: every tensor
made over file bytes (whole entries, views, legacy storages) is validated there
before it exists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CheckpointFormatError, LimitExceededError
from .limits import Limits
from .text import show

__all__ = [
    "empty_tensor",
    "DTYPES_BY_NAME",
    "INDEX_BOUND",
    "SAFETENSORS_DTYPES",
    "Entry",
        "NameAllocator",
    "TensorPlan",
    "ViewScope",
    "check_dims",
    "contiguous_strides",
    "dtype_name",
    "entry_tensor",
    "view_tensor",
]

#: torch dtype -> safetensors dtype code, for the dtypes safetensors can name.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
DTYPES_FROM_SAFETENSORS: dict[str, torch.dtype] = {code: dt for dt, code in SAFETENSORS_DTYPES.items()}

#: every torch dtype by its name without the ``torch.`` prefix ("float32", "bfloat16", ...).
DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


class NameAllocator:
    """Hands out unique entry names, suffixing ``#2``, ``#3``... on collisions."""

    RESERVED = frozenset({"__metadata__"})

    def __init__(self) -> None:
        self._taken: set[str] = set(self.RESERVED)

    def claim(self, hint: str) -> str:
        name, n = hint, 1
        while name in self._taken:
            n += 1
            name = f"{hint}#{n}"
        self._taken.add(name)
        return name


@dataclass
class Entry:
    """One tensor of the safetensors file: its header fields and where its bytes come from."""

    name: str
    code: str  # safetensors dtype code
    shape: list[int]
    nbytes: int
    alignment: int
    source: Callable[[], torch.Tensor]  # -> contiguous tensor holding exactly nbytes, on any device

    def cpu_bytes(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Bytes ``[begin, end)`` of the entry as a flat contiguous CPU ``uint8`` tensor (a view of
        a CPU tensor; only those bytes are copied from an accelerator).

        Raises:
            RuntimeError: the tensor no longer holds ``nbytes`` (it was resized during the save).
        """
        if self.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        data = self.source()  # contiguous, though size-1 dims may carry any stride
        flat = data.as_strided((data.numel(),), (1,)).view(torch.uint8)
        self._check_size(flat.numel())
        return flat[begin:end].to("cpu")

    def cpu_array(self, begin: int = 0, end: int | None = None) -> np.ndarray:
        """:meth:`cpu_bytes` as a ``numpy`` array, without the intermediate tensors where numpy
        has the dtype (saves of many small tensors spend their time in allocations)."""
        if self.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        data = self.source()
        if not data.is_cpu or data.dtype not in _NUMPY_VIEWABLE:
            return self.cpu_bytes(begin, end).numpy()
        flat = data.numpy().reshape(-1).view(np.uint8)  # a view: the array is contiguous
        self._check_size(flat.size)
        return flat[begin:end]

    def _check_size(self, nbytes: int) -> None:
        if nbytes != self.nbytes:
            raise RuntimeError(f"tensor {self.name} changed size while it was being saved")


_NUMPY_VIEWABLE = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
     torch.bool, torch.complex64, torch.complex128}
)


@dataclass
class _Member:
    tensor: torch.Tensor
    payload: list[Any]  # the skeleton list whose [1] (entry) and [3] (view) are filled in
    hint: str


def contiguous_strides(shape: Any) -> list[int]:
    """Row-major strides (in elements) of a tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(list(shape)):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the bytes ``t`` can touch in its storage."""
    start = int(t.storage_offset()) * t.element_size()
    if t.numel() == 0:
        return start, start
    last = sum((int(size) - 1) * int(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _overlaps(t: torch.Tensor) -> bool:
    """Whether some elements of ``t`` share bytes (it spans fewer bytes than it has elements)."""
    start, end = _byte_extent(t)
    return end - start < t.numel() * t.element_size()


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.stride(), t.storage_offset())


def _contiguous(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.detach().contiguous()


class TensorPlan:
    """Collects the tensors of one file while the state is encoded, then lays out its entries.

    Args:
        dedupe: store tensors that are the same view of one storage once (single
            files). With ``False`` each still gets an entry under its own name, so
            a plain safetensors reader sees every state-dict key, while the
            skeleton still points all of them at the first (multi-file components).
    """

    def __init__(self, names: NameAllocator, *, dedupe: bool = True) -> None:
        self._names = names
        self.dedupe = dedupe
        self._groups: dict[Any, list[_Member]] = {}

    def add(self, tensor: torch.Tensor, hint: str, payload: list[Any]) -> None:
        """Register ``tensor`` (named ``hint`` if it gets an entry of its own) and the payload to fill in."""
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or tensor.numel() == 0:
            key: Any = ("own", id(payload))
        else:
            key = (tensor.device, storage.data_ptr())
        self._groups.setdefault(key, []).append(_Member(tensor, payload, hint))

    def finalize(self) -> list[Entry]:
        """Fill every payload and return the entries in file order (widest alignment first)."""
        entries: list[Entry] = []
        for members in self._groups.values():
            entries.extend(self._lay_out(members))
        entries.sort(key=lambda e: -e.alignment)  # stable: keeps state order within an alignment
        return entries

    def _own_entry(self, member: _Member, name: str | None = None) -> Entry:
        t = member.tensor
        name = name or self._names.claim(member.hint)
        nbytes = t.numel() * t.element_size()
        code = SAFETENSORS_DTYPES.get(t.dtype)
        member.payload[1] = name
        if code is not None:
            member.payload[3] = None
            return Entry(name, code, list(t.shape), nbytes, t.element_size(), _contiguous(t))
        # A dtype safetensors cannot name: its bytes as U8, reinterpreted by the view.
        member.payload[3] = [dtype_name(t.dtype), list(t.shape), contiguous_strides(t.shape), 0]
        return Entry(name, "U8", [nbytes], nbytes, t.element_size(), _contiguous(t))

    def _lay_out(self, members: list[_Member]) -> list[Entry]:
        first = members[0]
        if not first.tensor.is_contiguous() and _overlaps(first.tensor):
            # its elements overlap (a stride-0 expand): store the bytes it spans and views, never a copy
            return self._lay_out_overlapping(members)
        if len(members) == 1:
            return [self._own_entry(first)]
        if all(_signature(m.tensor) == _signature(first.tensor) for m in members):
            entries = [self._own_entry(first)]
            for m in members[1:]:
                if not self.dedupe:  # a copy under its own name, for plain readers only
                    entries.append(self._own_entry(m))
                m.payload[1], m.payload[3] = first.payload[1], first.payload[3]
            return entries
        return self._lay_out_overlapping(members)

    def _lay_out_overlapping(self, members: list[_Member]) -> list[Entry]:
        extents = [_byte_extent(m.tensor) for m in members]
        lo = min(start for start, _ in extents)
        hi = max(end for _, end in extents)
        for base, (start, end) in zip(members, extents):
            t = base.tensor
            if (
                start == lo
                and end == hi
                and t.is_contiguous()
                and t.dtype in SAFETENSORS_DTYPES
                and all((s - lo) % m.tensor.element_size() == 0 for m, (s, _) in zip(members, extents))
            ):
                entry = self._own_entry(base)
                for m, (s, _) in zip(members, extents):
                    if m is not base:
                        self._set_view(m, entry.name, (s - lo) // m.tensor.element_size())
                return [entry]
        # No member covers the others: store the storage's byte span once.
        align = max(m.tensor.element_size() for m in members)
        storage = members[0].tensor.untyped_storage()
        lo -= lo % align
        hi = min(hi + (-hi) % align, storage.nbytes())
        device = members[0].tensor.device
        name = self._names.claim(members[0].hint + "@storage")

        def span() -> torch.Tensor:
            return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, lo, (hi - lo,), (1,))

        for m, (s, _) in zip(members, extents):
            self._set_view(m, name, (s - lo) // m.tensor.element_size())
        return [Entry(name, "U8", [hi - lo], hi - lo, align if (hi - lo) % align == 0 else 1, span)]

    @staticmethod
    def _set_view(member: _Member, entry: str, offset: int) -> None:
        t = member.tensor
        member.payload[1] = entry
        member.payload[3] = [dtype_name(t.dtype), list(t.shape), list(t.stride()), offset]


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

    def charge(self, base: torch.Tensor, nbytes: int, where: str) -> None:
        """Count a view of ``nbytes`` bytes made of ``base``.

        Raises:
            LimitExceededError: (``limit="max_expansion"``) when the views would hold more than the allowance.
        """
        if id(base) not in self._bases:  # held, so that ids are never reused while the scope lives
            self._bases[id(base)] = (base, None)
            self._based += base.numel() * base.element_size()
        if self.used + nbytes > self.allowance:
            what = "file" if self._source is not None else "storages they view"
            raise LimitExceededError(
                f"the view of {where} would bring the views of this load to {self.used + nbytes} bytes, over "
                f"Limits.max_expansion={self._limits.max_expansion} times the bytes of the {what} "
                f"({self.allowance} bytes); pass limits=Limits(max_expansion=...) to read it if you trust this file",
                limit="max_expansion",
                maximum=self.allowance,
                actual=self.used + nbytes,
                file=self.file,
            )
        self.used += nbytes

    def bytes_of(self, base: torch.Tensor, itemsize: int) -> torch.Tensor:
        """``base`` (charged before) as flat ``uint8``, in fresh memory when it is misaligned for ``itemsize``."""
        flat = base.reshape(-1).view(torch.uint8)
        if not _misaligned(flat, itemsize):
            return flat
        held, copy = self._bases[id(base)]
        if copy is None:
            copy = _fresh_copy(flat)
            self._bases[id(base)] = (held, copy)
        return copy


def _address(flat: torch.Tensor) -> int:
    """Absolute address of a tensor's first byte (0 on the meta device, which has no memory)."""
    if flat.device.type == "meta":
        return 0
    return int(flat.untyped_storage().data_ptr()) + int(flat.storage_offset()) * flat.element_size()


def _misaligned(flat: torch.Tensor, itemsize: int) -> bool:
    """Whether elements of ``itemsize`` bytes starting at ``flat``'s first byte (``uint8``) would be
    misaligned in memory, or in the elements of its storage (which ``set_`` counts in)."""
    return bool(_address(flat) % itemsize or int(flat.storage_offset()) % itemsize)


def _fresh_copy(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s bytes in fresh memory (torch's allocator aligns to 64 bytes)."""
    copy = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    copy.copy_(flat)
    return copy


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
    return empty_tensor((0,), dtype, flat.device).set_(
        flat.untyped_storage(), int(flat.storage_offset()) // dtype.itemsize, shape, contiguous_strides(shape)
    )


def view_tensor(base: torch.Tensor, view: Any, *, limits: Limits, scope: ViewScope, where: str) -> torch.Tensor:
    """Rebuild a tensor from an entry (or storage) and a ``[dtype, shape, stride, offset]`` view.

    Checks the view (see the rules above this function) before any tensor exists, charges its
    bytes to ``scope``, and reads a copy of ``base`` when its bytes are misaligned in memory.

    Raises:
        CheckpointFormatError: if the view is malformed or reaches outside ``base``.
        LimitExceededError: over ``max_dims``, or over the load's expansion allowance.
    """
    if not (isinstance(view, list) and len(view) == 4):
        raise CheckpointFormatError(f"malformed tensor view for {where}: {show(view, 200)}", file=scope.file)
    name, shape, stride, offset = view
    dtype = DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(f"unknown dtype {name!r:.100} in the view of {where}", file=scope.file)
    if dtype in _NO_VIEWS:
        raise CheckpointFormatError(
            f"the view of {where} has dtype {name}, whose tensors torch cannot make or copy from bytes", file=scope.file
        )
    numel = check_dims(shape, what=f"the view of {where}", limits=limits, file=scope.file)
    if not (
        type(stride) in (list, tuple)
        and len(stride) == len(shape)
        and all(type(v) is int and 0 <= v < INDEX_BOUND for v in (*stride, offset))
    ):
        raise CheckpointFormatError(f"malformed stride/offset in the view of {where}", file=scope.file)
    itemsize = dtype.itemsize
    last = sum((size - 1) * st for size, st in zip(shape, stride)) if numel else -1
    begin, end = offset * itemsize, (offset + last + 1) * itemsize
    available = base.numel() * base.element_size()
    if end > available:
        raise CheckpointFormatError(
            f"the view of {where} reaches byte {end} of an entry of {available} bytes", file=scope.file
        )
    if base.device.type != "meta":  # meta tensors (a scan, a survey pass) hold no memory to bound
        scope.charge(base, numel * itemsize, where)
    if not numel:
        return empty_tensor(shape, dtype, base.device).as_strided(shape, stride)
    flat = scope.bytes_of(base, itemsize)
    return empty_tensor((0,), dtype, base.device).set_(
        flat.untyped_storage(), (int(flat.storage_offset()) + begin) // itemsize, shape, stride
    )
