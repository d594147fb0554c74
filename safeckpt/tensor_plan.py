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

This module owns the save side: the dtype tables, :class:`NameAllocator`,
:class:`Entry` and :class:`TensorPlan`. Reading goes the other way, through the
checks of :mod:`safeckpt.tensors`: every tensor made over file bytes (whole
entries, views, legacy storages) is validated there before it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DTYPES_BY_NAME",
    "DTYPES_FROM_SAFETENSORS",
    "SAFETENSORS_DTYPES",
    "Entry",
    "NameAllocator",
    "TensorPlan",
    "contiguous_strides",
    "dtype_name",
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
