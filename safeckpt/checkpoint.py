"""The lazy reader: open a single file, list what is inside, read only what is asked for."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .attrs import set_data_attrs
from .codec import Decoder
from .container import (
    META_CREATED,
    META_LIBRARY,
    META_TORCH,
    META_VERSION,
    Root,
    TensorInfo,
    parse_root,
    skeleton_bytes,
    verified_digests,
)
from .detect import Kind
from .errors import CheckpointFormatError, ComponentNotFoundError, IntegrityError
from .header import read_header_from
from .limits import DEFAULT_LIMITS, Limits
from .refs import AllowList
from .storage import ByteSource, is_url, open_source
from .tensors import ViewScope, dtype_name, empty_tensor, entry_tensor
from .text import show

__all__ = ["Checkpoint", "ComponentInfo"]

def _is_key(key: Any, depth: int = 0) -> bool:
    """A usable component key: hashable, and no tensor or array anywhere inside it."""
    if isinstance(key, (torch.Tensor, np.ndarray)) or depth > 100:
        return False
    if type(key) in (tuple, frozenset):
        return all(_is_key(k, depth + 1) for k in key)
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _same_key(a: Any, b: Any) -> bool:
    """Key equality that also matches nan with nan."""
    return a is b or (type(a) is type(b) and (a == b or (a != a and b != b)))


@dataclass(frozen=True)
class ComponentInfo:
    """What one component holds, read from the header alone.

    Attributes:
        tensors: number of tensor entries stored under the component.
        bytes: their total size in bytes.
        dtypes: their dtype names, sorted.
    """

    tensors: int
    bytes: int
    dtypes: tuple[str, ...]


class Checkpoint:
    """A checkpoint file opened for lazy reading; use it as a context manager.

    Opening reads and validates the header and the skeleton (small); tensor bytes
    are mapped from the file (local) or fetched by range request (remote storage)
    and read only when a tensor is asked for.

    Args:
        path: a safeckpt single file or any safetensors file: a local path or an
            fsspec URL (``s3://...``, ``memory://...``).
        device: where tensors are placed (``"cpu"``, ``"cuda:0"``, a ``torch.device``...).
        allowed_globals: classes, functions or ``"module:qualname"`` strings that may
            be imported; everything else comes back as inert ``GlobalRef``/``OpaqueObject``.
        verify: check SHA-256 digests of the skeleton and of each tensor read.
        limits: bounds on what the file may declare.
        copy: copy each CPU tensor into fresh memory instead of returning a view of a
            private copy-on-write mapping of the file. Views are free until touched and
            share the page cache with other processes; a copy is independent of the file
            (choose it when the file may be changed in place or truncated while tensors live:
            safeckpt's own saves replace files by rename and never do that).
        storage_options: for an fsspec URL, the filesystem's options.
        source: the file, already opened through :mod:`safeckpt.storage` (the reader
            passes it so that a file is opened, and checked, once); ``path`` then only names it.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointFormatError: if it is not a safetensors file.
        IntegrityError: with ``verify=True``, if the skeleton's digest does not match.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | int = "cpu",
        allowed_globals: Iterable[Any] = (),
        verify: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        copy: bool = False,
        storage_options: Any = None,
        source: ByteSource | None = None,
    ) -> None:
        self.path = path if is_url(path) else Path(path)  # type: ignore[assignment]
        self._source = open_source(path, storage_options) if source is None else source
        self._copy = copy
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        self._allow = AllowList(allowed_globals)
        self._verify = verify
        self._limits = limits
        self._handle: Any = None  # safetensors' reader, for loads straight to CUDA
        self._mapping: np.ndarray | None = None  # the file, mapped copy-on-write (local files)
        self._data: memoryview | None = None  # the data section, fetched whole by load() (remote files)
        self._handed_out: set[str] = set()
        self._keys: list[Any] | None = None
        self._root: Root | None = None
        self._digests: dict[str, str] = {}
        kind, self._header, raw_skeleton = read_header_from(self._source, limits)
        if kind is Kind.SKELETON:  # a multi-file component without tensors
            assert raw_skeleton is not None
            self._root = parse_root(raw_skeleton, limits, str(self.path), standalone=True)
            return
        if self._header.is_safeckpt:
            raw = skeleton_bytes(self._header, limits)
            if verify:
                self._digests = verified_digests(self._header, raw)
            self._root = parse_root(raw, limits, str(self.path))
        elif verify:
            raise IntegrityError(
                f"{self.path} is a plain safetensors file: it records no digests to verify",
                file=str(self.path),
            )

    # context manager ------------------------------------------------------------

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file and its mapping. Tensors already returned stay valid."""
        self._handle = self._mapping = self._data = None
        self._handed_out.clear()
        self._source.close()

    def __repr__(self) -> str:
        kind = "safeckpt" if self._root is not None else "safetensors"
        return f"<Checkpoint {kind} {str(self.path)!r}: {len(self._header.entries)} tensors>"

    # listing ----------------------------------------------------------------------

    @property
    def is_safeckpt(self) -> bool:
        """True for a file written by safeckpt, False for a plain safetensors file."""
        return self._root is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """Versions and creation time for a safeckpt file; the raw ``__metadata__`` otherwise."""
        meta = self._header.metadata
        if self._root is None or not meta:
            return dict(meta)
        return {
            "format_version": int(meta[META_VERSION]),  # validated when the skeleton was read
            "library_version": meta.get(META_LIBRARY),
            "torch_version": meta.get(META_TORCH),
            "created": meta.get(META_CREATED),
        }

    def components(self) -> list[Any]:
        """The top-level keys of the state, in order."""
        if self._root is None:
            return list(self._header.entries)
        if self._keys is None:
            decoder = self._decoder()
            keys = [decoder.unpack(key, "a component key") for key, _, _ in self._root.components]
            for key in keys:
                if not _is_key(key):
                    raise CheckpointFormatError(
                        f"{self.path}: a component key is a {type(key).__name__}, not a hashable value", file=str(self.path)
                    )
            self._keys = keys
        return list(self._keys)

    def _index(self, component: Any) -> int:
        for i, key in enumerate(self.components()):
            if _same_key(key, component):
                return i
        raise ComponentNotFoundError(
            f"no component {show(component)} in {self.path}; it has {show(self.components(), 300)}",
            name=component,
            available=self.components(),
            file=str(self.path),
        )

    @property
    def has_digests(self) -> bool:
        """True when the file records SHA-256 digests that ``verify=True`` can check."""
        return self._header.digests() is not None

    def tensor_info(self, name: str) -> TensorInfo:
        """Dtype, shape and byte range of one stored tensor, from the header alone.

        Raises:
            ComponentNotFoundError: if there is no tensor of that name.
        """
        info = self._header.entries.get(name)
        if info is None:
            raise ComponentNotFoundError(
                f"no tensor {name!r} in {self.path}", name=name, available=list(self._header.entries)[:20], file=str(self.path)
            )
        return info

    def tensor_names(self) -> list[str]:
        """Names of the stored tensors (``component/path``), in file order."""
        return list(self._header.entries)

    def info(self) -> dict[Any, ComponentInfo]:
        """Per component: tensor count, bytes and dtypes, from the header alone."""
        entries = self._header.entries.values()
        if self._root is None:
            return {e.name: ComponentInfo(1, e.nbytes, (dtype_name(e.dtype),)) for e in entries}
        owned: dict[str, list[Any]] = {segment: [] for _, segment, _ in self._root.components}
        for e in entries:
            segment = "" if "" in owned else e.name.partition("/")[0]
            if segment not in owned:  # a top-level tensor whose name got a "#n" suffix
                segment = segment.rpartition("#")[0]
            if segment in owned:
                owned[segment].append(e)
        out: dict[Any, ComponentInfo] = {}
        for key, (_, segment, _) in zip(self.components(), self._root.components):
            mine = owned[segment]
            out[key] = ComponentInfo(
                len(mine), sum(e.nbytes for e in mine), tuple(sorted({dtype_name(e.dtype) for e in mine}))
            )
        return out

    # reading ---------------------------------------------------------------------

    def get_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor by name, reading only its bytes.

        Raises:
            ComponentNotFoundError: if there is no tensor of that name.
        """
        return self._read(name, self.device)

    def _read(self, name: str, device: torch.device) -> torch.Tensor:
        if name not in self._header.entries:
            raise ComponentNotFoundError(
                f"no tensor {name!r} in {self.path}", name=name, available=list(self._header.entries)[:20], file=str(self.path)
            )
        if name in self._handed_out:  # the mapping is private copy-on-write: a caller may have written to it
            self._handle = self._mapping = None
            self._handed_out.clear()
        self._handed_out.add(name)
        if device.type == "cuda" and self._source.local_path is not None:  # safetensors copies file -> GPU
            tensor = self._open().get_tensor(name)
            if self._verify and self._root is not None:
                self._check_digest(name, tensor.reshape(-1).view(torch.uint8).cpu().numpy(), self._digests[name])
            return tensor
        info = self._header.entries[name]
        start = self._header.data_start + info.begin
        fetched = False
        if self._data is not None:
            raw = np.frombuffer(self._data[info.begin : info.end], dtype=np.uint8)
            fetched = True
        else:
            if self._mapping is None:
                self._mapping = self._source.mapping()
            if self._mapping is not None:
                raw = self._mapping[start : start + info.nbytes]
            else:
                raw = np.frombuffer(self._source.read(start, start + info.nbytes), dtype=np.uint8)
                fetched = True
        if self._verify and self._root is not None:  # every entry has a digest (verified_digests)
            self._check_digest(name, raw, self._digests[name])
        if fetched:  # bytes fetched from remote storage: a fresh, aligned, writable tensor of their own
            tensor = empty_tensor(info.shape, info.dtype)  # shape checked when the header was parsed
            if info.nbytes:
                tensor.reshape(-1).view(torch.uint8).numpy()[:] = raw
            return tensor if device.type == "cpu" else tensor.to(device)
        tensor = entry_tensor(raw, info.dtype, info.shape, limits=self._limits, where=name, file=self._header.path)
        if device.type != "cpu":
            return tensor.to(device)
        return tensor.clone() if self._copy else tensor

    def get(self, component: Any) -> Any:
        """One component of the state, decoding only its part of the skeleton and reading only its tensors.

        Raises:
            ComponentNotFoundError: if the state has no such top-level key.
        """
        if self._root is None:
            return self.get_tensor(component)
        _, _, value = self._root.components[self._index(component)]
        return self._decoder().unpack(value, f"component {show(component)}")

    def load(self) -> Any:
        """The whole state, with the types it was saved with (a plain safetensors file gives a dict of tensors;
        a file written from a root that is not a dict gives that value back).

        On remote storage the data section is fetched in one request.
        """
        if self._source.local_path is None and self._header.entries and self._data is None:
            self._data = memoryview(self._source.read(self._header.data_start, self._header.file_size))
            try:
                return self._load()
            finally:
                self._data = None
        return self._load()

    def _load(self) -> Any:
        if self._root is None:
            return {name: self.get_tensor(name) for name in self._header.entries}
        decoder = self._decoder()
        if self._root.kind == "value":  # a root that is not a dict (FORMAT.md section 2)
            return decoder.unpack(self._root.components[0][2], "the root value")
        state: dict[Any, Any] = OrderedDict() if self._root.kind == "ordered_dict" else {}
        for name, (_, _, value) in zip(self.components(), self._root.components):
            if name in state:
                raise CheckpointFormatError(f"{self.path}: component {show(name)} appears twice", file=str(self.path))
            state[name] = decoder.unpack(value, f"component {show(name)}")
        if self._root.attrs is not None:
            if self._root.kind != "ordered_dict":
                raise CheckpointFormatError(f"{self.path}: a plain dict state cannot carry attributes", file=str(self.path))
            attrs = decoder.unpack(self._root.attrs, "the state's attributes")
            set_data_attrs(state, attrs, what=f"{self.path}: the state's attributes", file=str(self.path))
        return state

    # internals ---------------------------------------------------------------------

    def _open(self) -> Any:
        if self._handle is None:
            try:
                self._handle = safe_open(str(self._source.local_path), framework="pt", device=str(self.device))
            except Exception as exc:
                raise CheckpointFormatError(f"{self.path}: safetensors could not open it: {exc}", file=str(self.path)) from exc
        return self._handle

    def _decoder(self) -> Decoder:
        cpu = torch.device("cpu")
        return Decoder(
            self.get_tensor,
            self._allow,
            self._limits,
            file=str(self.path),
            array_source=lambda name: self._read(name, cpu),
            views=ViewScope(self._limits, self._header.file_size, str(self.path)),
        )

    def _check_digest(self, name: str, data: Any, expected: str) -> None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise IntegrityError(
                f"{self.path}: {name} does not match its recorded SHA-256 digest (the file is corrupt or was modified)",
                tensor_name=name,
                expected=expected,
                actual=actual,
                file=str(self.path),
            )
