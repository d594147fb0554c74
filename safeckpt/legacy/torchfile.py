"""The containers ``torch.save`` writes, read without executing anything.

- the zip archive of torch >= 1.6: ``<name>/data.pkl`` plus one member per storage
  (``<name>/data/<key>``), stored uncompressed; storages are memory-mapped
  copy-on-write straight from the file (a deflated one, which torch also reads, is
  inflated within ``Limits.max_inflated_bytes``);
- the pre-1.6 stream: a magic-number pickle, a protocol pickle, a sys-info
  pickle, the main pickle, a pickle listing storage keys, then each storage as
  an int64 element count followed by its bytes; read in one pass over its
  pickles, storages in fresh memory (see :mod:`.storages`);
- a bare pickle (no storages).

Every pickle in them, including the magic number and sys info, goes through
:class:`~safeckpt.legacy.vm.SymbolicUnpickler`. Archives are read by
:mod:`.archive` (as torch reads them; ambiguous ones are refused). A TorchScript
archive gives its state dict (:mod:`.torchscript`); its code is never run.
"""

from __future__ import annotations

import io
import os
import pickletools
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import numpy as np
import torch

from ..detect import Kind, detect
from ..errors import CheckpointFormatError, SafeCkptError, UnsafeCheckpointError
from ..limits import Limits, check_in_file
from ..storage import open_file
from .archive import Archive, Member, open_archive
from .rebuild import Rebuilder, StorageRef, swap_size
from .storages import StreamStorages, element_size, storage_pid
from .torchscript import code_module, forgive_jit_helpers, is_torchscript, parse_code, script_state_dict
from .vm import Report, SymbolicUnpickler, check_depth

__all__ = ["LegacyFile", "read_torch_file"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


@dataclass
class LegacyFile:
    """What a legacy file held: its value, the format it was in, and the report of its globals."""

    value: Any
    format: str
    report: Report


class _Bounded(io.RawIOBase):
    """A read-only window on a file that never reads (or allocates) past ``end``."""

    def __init__(self, f: BinaryIO, end: int) -> None:
        self._f = f
        self._end = end

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._end - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int | None = -1) -> bytes:
        left = max(0, self._end - self._f.tell())
        return self._f.readline(min(left, 1 << 20) if limit is None or limit < 0 else min(left, limit))


def _finish(report: Report, path: str) -> None:
    """Refuse the file when it named anything dangerous."""
    if report.dangerous:
        names = report.dangerous_globals
        tricks = sorted({f.kind for f in report.findings if f.severity == "dangerous"} - {"dangerous-global"})
        detail = ", ".join(names) if names else "no dangerous name but " + ", ".join(tricks)
        raise UnsafeCheckpointError(
            f"{path} references code that could run when unpickled ({detail}); refused. "
            "Nothing in it was executed. If you trust its author, load it with trust_pickle=True",
            globals=names,
            file=path,
        )


class _Reader:
    def __init__(self, path: str, limits: Limits, device: torch.device, report: Report, copy: bool = False) -> None:
        self.copy = copy
        self.path = path
        self.limits = limits
        self.device = device
        self.report = report
        self.rebuild = Rebuilder(limits, source_bytes=os.path.getsize(path), file=path)  # expansion: bounded by the file
        self._mapping: np.ndarray | None = None
        self._meta = device.type == "meta"
        self._cpu = device.type == "cpu"

    def unpickler(self, source: Any, persistent_load: Any = None) -> SymbolicUnpickler:
        return SymbolicUnpickler(
            source,
            self.report,
            self.limits,
            self.rebuild.calls,
            persistent_load,
            values=self.rebuild.values,
            build=self.rebuild.build,
        )

    def file_bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the file at ``offset`` as a uint8 tensor over one private copy-on-write
        mapping of the whole file (writes to tensors never reach the file)."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if self._mapping is None:
            with open_file(self.path) as source:  # a regular file only; the mapping outlives the descriptor
                self._mapping = source.mapping()
        if offset < 0:
            raise CheckpointFormatError(f"{self.path}: storage bytes at negative offset {offset}", file=self.path)
        check_in_file(offset + nbytes, self._mapping.size, lambda: f"{self.path}: storage bytes [{offset}, {offset + nbytes})", file=self.path)
        data = torch.from_numpy(self._mapping[offset : offset + nbytes])
        return data.clone() if self.copy else data

    def place(self, data: torch.Tensor) -> torch.Tensor:
        return data if self._cpu else data.to(self.device)

    def placed_bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        """:meth:`file_bytes` on the target device."""
        data = self.file_bytes(offset, nbytes)
        return data if self._cpu else data.to(self.device)

    def meta_or(self, nbytes: int, load: Any) -> Any:
        if self._meta:  # scanning: no bytes are read
            return lambda: torch.empty(nbytes, dtype=torch.uint8, device="meta")
        return lambda: self.place(load())


# --------------------------------------------------------------------------- zip archives


def _refuse_ambiguous(reader: _Reader, archive: Archive) -> None:
    """An archive that two zip readers read differently is refused (see :mod:`.archive`)."""
    if not archive.ambiguous:
        return
    detail = "; ".join(archive.problems[:5])
    reader.report.find("ambiguous-archive", "dangerous", f"zip readers disagree on this archive: {detail}")
    raise UnsafeCheckpointError(
        f"{reader.path}: zip readers would read different members of this archive ({detail}); refused. "
        "Re-save it with torch.save from a trusted copy",
        globals=(),
        file=reader.path,
    )


def _read_zip(reader: _Reader) -> tuple[Any, str]:
    path, limits = reader.path, reader.limits
    archive = open_archive(path, limits)
    _refuse_ambiguous(reader, archive)
    records = archive.records()
    script = is_torchscript(records)
    info = archive.find("data.pkl")
    if info is None:
        raise CheckpointFormatError(f"{path}: the archive has no {archive.prefix}data.pkl", file=path)
    order_info = archive.find("byteorder")
    if order_info is not None and order_info.size > 16:
        raise CheckpointFormatError(f"{path}: byteorder member is {order_info.size} bytes", file=path)
    order = archive.read(order_info, limits).decode("ascii", "replace") if order_info is not None else "little"
    if order not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder {order!r:.20}", file=path)
    limits.check("max_skeleton_bytes", info.size, what="the size of data.pkl", file=path)
    data = archive.read(info, limits)
    storages: dict[str, StorageRef] = {}
    plain = order == "little" and not reader._meta

    def member_bytes(member: Member, itemsize: int) -> torch.Tensor:
        if member.size == 0:
            return torch.empty(0, dtype=torch.uint8)
        if member.method != 0:  # torch.save never deflates storages, torch.load reads them: inflated within limits
            tensor = torch.frombuffer(bytearray(archive.read(member, limits)), dtype=torch.uint8)
        else:
            tensor = reader.file_bytes(member.data_offset, member.size)
        if order == "big" and itemsize > 1:
            swapped = tensor.numpy().reshape(-1, itemsize)[:, ::-1].copy().reshape(-1)
            tensor = torch.from_numpy(swapped)
        return tensor

    def persistent_load(pid: Any) -> StorageRef:
        kind, key, location, numel, _ = storage_pid(pid, path)
        ref = storages.get(key)
        if ref is not None:
            return ref
        member = archive.find(f"data/{key}")
        if member is None:
            raise CheckpointFormatError(f"{path}: storage {key!r:.50} is missing from the archive", file=path)
        nbytes = numel * element_size(kind)
        if member.size != nbytes:
            raise CheckpointFormatError(
                f"{path}: storage {key!r:.50} holds {member.size} bytes, its reference says {nbytes}", file=path
            )
        if plain and member.method == 0 and nbytes:  # the common case: one slice of the mapping, no swap
            load: Any = partial(reader.placed_bytes, member.data_offset, nbytes)
        else:
            load = reader.meta_or(nbytes, partial(member_bytes, member, swap_size(kind.dtype)))
        ref = storages[key] = StorageRef(key, kind.dtype, nbytes, load)
        return ref

    value = reader.unpickler(io.BytesIO(data), persistent_load).load()
    if not script:
        return value, "torch-zip"
    forgive_jit_helpers(reader.report)
    code = {}
    for record in records:
        if code_module(record) is not None:
            member = archive.find(record)
            assert member is not None
            code[record] = archive.read(member, limits).decode("utf-8", "replace")
    classes = parse_code(code, path)
    tensors = script_state_dict(
        value, classes, lambda v: isinstance(v, torch.Tensor), max_depth=limits.max_depth, max_entries=limits.max_tensors,
        path=path,
    )
    return OrderedDict((k, v.detach() if v.requires_grad else v) for k, v in tensors.items()), "torchscript"


# --------------------------------------------------------------------------- pre-1.6 stream and bare pickles


def _read_stream(reader: _Reader) -> tuple[Any, str]:
    path = reader.path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        window = _Bounded(f, size)
        first = reader.unpickler(window).load()
        if type(first) is not int or first != MAGIC_NUMBER:  # not a torch file: a bare pickle
            f.seek(0)
            return reader.unpickler(window).load(), "pickle"
        if reader.unpickler(window).load() != PROTOCOL_VERSION:
            raise CheckpointFormatError(f"{path}: unsupported legacy torch protocol version", file=path)
        sys_info = reader.unpickler(window).load()
        if type(sys_info) is not dict:
            raise CheckpointFormatError(f"{path}: malformed legacy sys info", file=path)
        if sys_info.get("little_endian") is False:
            raise CheckpointFormatError(f"{path}: big-endian legacy files are not supported", file=path)
        storages = StreamStorages(path, reader.device, f, size)
        value = reader.unpickler(window, storages.persistent_load).load()
        keys = reader.unpickler(window).load()
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise CheckpointFormatError(f"{path}: malformed legacy storage key list", file=path)
        reader.limits.check("max_tensors", len(keys), what="the number of storages", file=path)
        storages.fill(keys, f.tell())
        return value, "torch-legacy"


# --------------------------------------------------------------------------- entry point


def _starts_like_pickle(path: str) -> bool:
    """Protocol 0/1 pickles have no header: ``pickle.load`` tries any file whose first byte is
    an opcode, and so does the reader (it stops at STOP; trailing bytes are ignored)."""
    with open(path, "rb") as f:
        first = f.read(1)
    return bool(first) and first.decode("latin-1") in getattr(pickletools, "code2op")


def _name_in_message(exc: SafeCkptError, name: str, *, bare: bool) -> None:
    """Every error reading a file names it; bytes that are no torch.save file and do not parse
    as a pickle (a text file whose first byte happens to be an opcode) are "not a checkpoint"."""
    text = str(exc.args[0]) if exc.args else str(exc)
    if bare and type(exc) is CheckpointFormatError:
        text = f"{name} is not a checkpoint safeckpt can read (not a torch.save file, and not a pickle: {text})"
    elif name not in text:
        text = f"{name}: {text}"
    exc.args = (text, *exc.args[1:])


def read_torch_file(
    path: str | os.PathLike[str],
    *,
    device: torch.device,
    limits: Limits,
    report: Report | None = None,
    copy: bool = False,
) -> LegacyFile:
    """Read a ``torch.save`` file or bare pickle without executing anything.

    ``device="meta"`` reads no tensor bytes (scanning). ``report`` collects globals
    and findings (a fresh one by default). Storages are views of a copy-on-write
    mapping of the file, or with ``copy`` copies in fresh memory.

    Raises:
        UnsafeCheckpointError: listing every dangerous global the file names.
        CheckpointFormatError: if the file is malformed.
    """
    name = os.fspath(path)
    report = Report() if report is None else report
    reader = _Reader(name, limits, device, report, copy)
    kind = detect(name)
    if kind is Kind.UNKNOWN and not _starts_like_pickle(name):
        raise CheckpointFormatError(
            f"{name} is not a checkpoint safeckpt can read (neither safetensors, a torch.save file nor a pickle)",
            file=name,
        )
    try:
        if kind is Kind.TORCH_ZIP:
            value, fmt = _read_zip(reader)
        else:
            value, fmt = _read_stream(reader)
    except SafeCkptError as exc:
        _finish(report, name)  # a dangerous name found before the error wins
        exc.file = exc.file or name
        _name_in_message(exc, name, bare=kind is Kind.UNKNOWN)
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:  # zlib/lzma errors, OSError, struct.error...: all malformed input
        _finish(report, name)
        raise CheckpointFormatError(f"{name}: {type(exc).__name__}: {exc}", file=name) from exc
    _finish(report, name)
    check_depth(value, limits.max_depth)
    return LegacyFile(value, fmt, report)
