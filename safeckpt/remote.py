"""Checkpoints on fsspec storage (``s3://``, ``gs://``, ``memory://``, ``file://``...).

Saving streams a single safe file to a write-only object without seeking: the
tensor digests are computed first, so the final header goes out before the
data (:func:`stream_single`). Reading is lazy: :class:`RemoteCheckpoint` fetches
the header with a range request and then only the byte range of each tensor
asked for; a full ``load`` fetches the data section in one request.

Atomicity, per backend (the :class:`~safeckpt.CheckpointManager` adds a commit
marker on top, so its steps are atomic on every backend):

- local paths and ``file://``: temp file, fsync, rename, directory fsync (:mod:`safeckpt.io`);
- ``s3://`` (s3fs), ``gs://`` (gcsfs): an object appears whole when its upload
  completes; a write that fails in-process is aborted (``discard``) and removed;
- ``memory://``: each file is built in memory and stored in one step;
- other fsspec backends: whatever a completed ``open(..., "wb")`` gives.

:class:`Store` is the small file API the manager needs, over a local directory
or an fsspec location.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import posixpath
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .checkpoint import Checkpoint
from .container import (
    Encoded,
    Header,
    encode_state,
    parse_header,
    parse_root,
    single_header,
    skeleton_bytes,
    skeleton_file_bytes,
    write_single,
)
from .detect import Kind, detect_bytes
from .errors import CheckpointFormatError, ComponentNotFoundError, IntegrityError, UnsupportedValueError
from .handler import Reporter
from .io import atomic_write
from .limits import DEFAULT_LIMITS, Limits, check_in_file
from .loading import load_single_file as _load_local_file
from .multifile import DEFAULT_KEYS, ManifestEntry, check_keys, file_digest, manifest_bytes, read_manifest
from .refs import AllowList
from .saving import FORMATS, fold_model_kwargs, warn_fallback
from .stream import hash_parts, pieces
from .text import show
from .urls import is_url

__all__ = [
    "FileRecord",
    "RemoteCheckpoint",
    "Store",
    "is_url",
    "load",
    "load_multi_files",
    "load_single_file",
    "open",
    "save_multi_files",
    "save_single_file",
    "store_for",
    "stream_single",
    "write_state",
]

MANIFEST_SUFFIX = ".safeckpt.json"
_HEAD_FETCH = 64 * 1024  # first range request: the length prefix and, usually, the whole header


def _url_to_fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec.core

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FileRecord:
    """A written file: name relative to its store, size, and digest.

    ``sha256`` follows the manifest convention (:class:`~safeckpt.multifile.ManifestEntry`):
    the digest of the length prefix and header for a safetensors file (the header
    records every tensor's digest), of the whole file otherwise.
    """

    name: str
    size: int
    sha256: str


def stream_single(f: BinaryIO, encoded: Encoded) -> tuple[int, str]:
    """Write a single-file checkpoint to ``f`` front to back, never seeking.

    The tensors are hashed first (one extra pass over memory, large ones in
    parallel), so the header with the final digests can be written before the data.
    Tensors are read in pieces: host memory stays bounded when they live on an accelerator.

    Returns:
        (bytes written, SHA-256 of the length prefix and header).
    """
    entries = encoded.entries
    sizes = [entry.nbytes for entry in entries]

    def read(index: int, begin: int, end: int) -> np.ndarray:
        return entries[index].cpu_array(begin, end)

    head = single_header(encoded, hash_parts(sizes, read))
    f.write(head)
    for index, nbytes in enumerate(sizes):
        for begin, end in pieces(0, nbytes):
            f.write(read(index, begin, end).data)
    return len(head) + sum(sizes), hashlib.sha256(head).hexdigest()


class Store:
    """Files under one root: a local directory or an fsspec location.

    Args:
        root: a local path, a ``file://`` URL (both local, atomic and fsynced), or any fsspec URL.
        storage_options: passed to the fsspec filesystem (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
    """

    def __init__(self, root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> None:
        text = os.fspath(root)
        text = text.removeprefix("file://")
        self.fs: Any = None
        if is_url(text) and not text.startswith("file://"):
            self.fs, path = _url_to_fs(text, storage_options)
            self.root = path.rstrip("/")
            self.url = text.rstrip("/")
            self._memory = type(self.fs).__name__ == "MemoryFileSystem"
        else:
            self.root = str(Path(text))
            self.url = self.root
            self._memory = False

    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, rel: str) -> str:
        """The full path (local) or filesystem path (fsspec, without protocol) of ``rel``."""
        return os.path.join(self.root, rel) if self.local else posixpath.join(self.root, rel)

    def display(self, rel: str) -> str:
        """``rel`` as a path or URL for messages and for the loaders."""
        return self.path(rel) if self.local else posixpath.join(self.url, rel)

    # writing -----------------------------------------------------------------------

    def write(self, rel: str, payload: bytes | Encoded) -> FileRecord:
        """Write ``payload`` (file bytes, or a state encoded as a single safe file) to ``rel``, whole or not at all."""
        target = self.path(rel)
        if self.local:
            if isinstance(payload, Encoded):
                atomic_write(target, partial(write_single, encoded=payload))
                return FileRecord(rel, os.stat(target).st_size, file_digest(Path(target), DEFAULT_LIMITS))
            atomic_write(target, lambda f: f.write(payload))
            return FileRecord(rel, len(payload), hashlib.sha256(payload).hexdigest())
        if isinstance(payload, bytes):
            self.fs.pipe_file(target, payload)
            return FileRecord(rel, len(payload), hashlib.sha256(payload).hexdigest())
        if self._memory:  # memory:// files are visible while open: build the bytes, then store them at once
            buffer = io.BytesIO()
            size, digest = stream_single(buffer, payload)
            self.fs.pipe_file(target, buffer.getvalue())
            return FileRecord(rel, size, digest)
        f = self.fs.open(target, "wb")
        try:
            size, digest = stream_single(f, payload)
        except BaseException:
            self._abandon(f, target)
            raise
        f.close()
        return FileRecord(rel, size, digest)

    def _abandon(self, f: Any, target: str) -> None:
        """Drop a half-written upload: abort it (s3fs aborts the multipart upload) and never commit it."""
        with contextlib.suppress(Exception):
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
            f.closed = True  # closing would upload what was buffered
        with contextlib.suppress(Exception):
            self.fs.rm_file(target)

    def makedirs(self, rel: str) -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        elif not self._memory or rel:
            with contextlib.suppress(Exception):
                self.fs.makedirs(self.path(rel), exist_ok=True)

    # reading -----------------------------------------------------------------------

    def read(self, rel: str, max_bytes: int = 16 << 20) -> bytes:
        """The whole of a small file (a marker, a lock), read only up to one byte past ``max_bytes``.

        Raises:
            ValueError: if the file holds more than ``max_bytes``.
        """
        if self.local:
            with builtins.open(self.path(rel), "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            data = bytes(self.fs.cat_file(self.path(rel), start=0, end=max_bytes + 1))
        if len(data) > max_bytes:
            raise ValueError(f"{self.display(rel)} is larger than {max_bytes} bytes")
        return data

    def listdir(self, rel: str = "") -> dict[str, int | None]:
        """``{name: size}`` of the entries of a directory (``None`` for subdirectories); empty if missing."""
        out: dict[str, int | None] = {}
        if self.local:
            try:
                with os.scandir(self.path(rel)) as it:
                    for entry in it:
                        out[entry.name] = None if entry.is_dir() else entry.stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                pass
            return out
        base = self.path(rel).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            listing = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return out
        for info in listing:
            name = posixpath.basename(info["name"].rstrip("/"))
            if name and info["name"].rstrip("/") != base:
                out[name] = None if info.get("type") == "directory" else int(info.get("size") or 0)
        return out

    # removing ----------------------------------------------------------------------

    def remove(self, rel: str) -> None:
        """Delete one file; missing is fine."""
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        """Delete a directory and everything under it; missing is fine."""
        if self.local:
            import shutil

            shutil.rmtree(self.path(rel), ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    # loading -----------------------------------------------------------------------

    def load(self, rel: str, *, multi: bool, **kwargs: Any) -> Any:
        """Load the single file or multi-file set (``rel`` is the base or manifest) at ``rel``."""
        if self.local:
            from .loading import load_multi_files as local_multi

            return local_multi(self.path(rel), **kwargs) if multi else _load_local_file(self.path(rel), **kwargs)
        if multi:
            return load_multi_files(self.display(rel), fs=self.fs, **kwargs)
        return load_single_file(self.display(rel), fs=self.fs, **kwargs)


def store_for(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Store:
    """A :class:`Store` rooted at ``location`` (local path, ``file://`` or fsspec URL)."""
    return Store(location, storage_options)


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _encode_or_fallback(state: Mapping[Any, Any], format: str, where: str, **options: Any) -> Encoded | None:
    """The encoded state, or ``None`` when ``format`` is torch (or auto fell back)."""
    if format == "torch":
        return None
    try:
        return encode_state(state, DEFAULT_LIMITS, **options)
    except UnsupportedValueError as exc:
        if format != "auto":
            raise
        warn_fallback(exc, Path(where))
        return None


def plan_single(state: Mapping[Any, Any], base: str, format: str) -> list[tuple[str, bytes | Encoded]]:
    """The file of a single-file checkpoint: ``(name, payload)``, encoded now (the state may change after)."""
    encoded = _encode_or_fallback(state, format, base)
    if encoded is None:
        return [(base, _torch_bytes(state))]
    return [(base, encoded)]


def plan_multi(state: Mapping[Any, Any], base: str, keys: Iterable[str], format: str) -> list[tuple[str, bytes | Encoded]]:
    """The component files of a multi-file set based at ``base`` (the manifest is added by :func:`write_state`)."""
    stem = posixpath.splitext(base)[0]
    files: list[tuple[str, bytes | Encoded]] = []
    for key in keys:
        encoded = _encode_or_fallback({key: state[key]}, format, f"{stem}_{key}", dedupe=False, prefixed=False)
        if encoded is None:
            files.append((f"{stem}_{key}.pt", _torch_bytes(state[key])))
        elif encoded.entries:
            files.append((f"{stem}_{key}.safetensors", encoded))
        else:
            files.append((f"{stem}_{key}.msgpack", skeleton_file_bytes(encoded)))
    return files


def write_state(store: Store, files: list[tuple[str, bytes | Encoded]], *, manifest: str | None) -> list[FileRecord]:
    """Write planned files into ``store``; then, for a multi-file set, its manifest (the set's commit point)."""
    records = [store.write(name, payload) for name, payload in files]
    if manifest is not None:
        stem = posixpath.basename(manifest).removesuffix(MANIFEST_SUFFIX)
        entries = []
        for record in records:
            key = posixpath.splitext(posixpath.basename(record.name))[0][len(stem) + 1 :]
            entries.append(ManifestEntry(key, posixpath.basename(record.name), record.size, record.sha256))
        records.append(store.write(manifest, manifest_bytes(entries)))
    return records


def _split_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    return parent, name


def save_single_file(
    nn_handler: Any,
    state: Mapping[Any, Any],
    url: str,
    *,
    format: str = "safe",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """:func:`safeckpt.save_single_file` for an fsspec URL (``s3://bucket/run/ckpt.safeckpt``).

    Args:
        nn_handler, state, format: as for :func:`safeckpt.save_single_file`.
        url: where to write; also a local path or ``file://`` URL (atomic, fsynced).
        storage_options: passed to the fsspec filesystem.

    Returns:
        ``url``.

    Raises:
        UnsupportedValueError: with ``format="safe"``, naming the offending path.
        OSError: if the storage refuses the write (a failed upload is aborted).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    reporter = Reporter(nn_handler)
    parent, name = _split_url(url)
    try:
        store = Store(parent, storage_options)
        store.makedirs("")
        write_state(store, plan_single(state, name, format), manifest=None)
    except Exception as exc:
        reporter.fail(exc, f"Rank {reporter.rank} failed to save NNHandler state to {url}: {exc}")
    reporter.log(f"NNHandler state saved successfully by Rank {reporter.rank} to: {url}")
    return url


def save_multi_files(
    nn_handler: Any,
    state: Mapping[Any, Any],
    url: str,
    keys_to_save: Iterable[str] | None = None,
    *,
    format: str = "safe",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """:func:`safeckpt.save_multi_files` for an fsspec URL; the manifest is written last.

    Unlike the local ``format="torch"`` set, a manifest is written for every format.

    Returns:
        ``{key: url}`` of the component files written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    reporter = Reporter(nn_handler)
    keys = check_keys(DEFAULT_KEYS if keys_to_save is None else keys_to_save)
    parent, name = _split_url(url)
    try:
        folded = fold_model_kwargs(state)
        present = [key for key in keys if folded.get(key) is not None]
        store = Store(parent, storage_options)
        store.makedirs("")
        stem = posixpath.splitext(name)[0]
        records = write_state(store, plan_multi(folded, name, present, format), manifest=stem + MANIFEST_SUFFIX)
    except Exception as exc:
        reporter.fail(exc, f"Rank {reporter.rank} failed to save NNHandler state to {url}: {exc}")
    reporter.log(f"NNHandler state saved successfully by Rank {reporter.rank} to: {url}")
    return {key: store.display(r.name) for key, r in zip(present, records)}


# --------------------------------------------------------------------------- reading


class RemoteCheckpoint(Checkpoint):
    """:class:`~safeckpt.Checkpoint` over fsspec: the header by range request, each tensor by its own range.

    Opening fetches the first 64 KiB (and the rest of the header if it is longer);
    :meth:`get_tensor` fetches exactly that tensor's bytes; :meth:`load` fetches
    the data section in one request.

    Args:
        url: an fsspec URL of a safeckpt or safetensors file (or a safeckpt skeleton file).
        device, allowed_globals, verify, limits: as for :class:`~safeckpt.Checkpoint`.
        storage_options: passed to the fsspec filesystem.
        fs: an fsspec filesystem to use instead (``url`` is then resolved by it).

    Raises:
        FileNotFoundError: if there is no such object.
        CheckpointFormatError: if it is not a safetensors (or skeleton) file.
    """

    def __init__(
        self,
        url: str,
        *,
        device: str | torch.device | int = "cpu",
        allowed_globals: Iterable[Any] = (),
        verify: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        storage_options: Mapping[str, Any] | None = None,
        fs: Any = None,
    ) -> None:
        if fs is None:
            fs, self._fspath = _url_to_fs(url, storage_options)
        else:
            self._fspath = fs._strip_protocol(url)
        self._fs = fs
        self.path = url  # type: ignore[assignment]  # a URL, not a local Path
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        self._allow = AllowList(allowed_globals)
        self._verify = verify
        self._limits = limits
        self._handle = None
        self._handed_out: set[str] = set()
        self._keys: list[Any] | None = None
        self._root = None
        self._digests: dict[str, str] = {}
        self._data: memoryview | None = None
        size = int(fs.size(self._fspath))
        head = self._range(0, min(size, _HEAD_FETCH))
        kind = detect_bytes(head[:16])
        if kind is Kind.SKELETON:
            limits.check("max_skeleton_bytes", size, what="the skeleton file size", file=url)
            raw = head if size <= len(head) else head + self._range(len(head), size)
            self._header = Header(url, {}, {}, 0, size)
            self._root = parse_root(raw, limits, url, standalone=True)
            return
        if kind is not Kind.SAFETENSORS:
            raise CheckpointFormatError(f"{url} is not a safetensors file; use load() for other formats", file=url)
        (length,) = struct.unpack("<Q", head[:8])
        limits.check("max_header_bytes", length, what="the safetensors header length", file=url)
        check_in_file(8 + length, size, lambda: f"{url}: the header length {length}", file=url)
        if 8 + length > len(head):
            head += self._range(len(head), 8 + length)
        self._header = parse_header(url, head[8 : 8 + length], size, limits)
        if self._header.is_safeckpt:
            raw_skeleton = skeleton_bytes(self._header, limits)
            recorded = self._header.digests()
            if verify and recorded is not None:
                self._check_digest("<skeleton>", raw_skeleton, recorded[0])
                self._digests = recorded[1]
            self._root = parse_root(raw_skeleton, limits, url)
        elif verify:
            raise IntegrityError(f"{url} is a plain safetensors file: it records no digests to verify", file=url)

    def _range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        data = self._fs.cat_file(self._fspath, start=start, end=end)
        if len(data) != end - start:
            raise CheckpointFormatError(f"{self.path}: short read of bytes [{start}, {end})", file=str(self.path), offset=start)
        return bytes(data)

    def close(self) -> None:
        """Forget fetched data. Tensors already returned stay valid."""
        self._data = None

    def get_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor by name, fetching only its byte range.

        Raises:
            ComponentNotFoundError: if there is no tensor of that name.
        """
        info = self.tensor_info(name)
        start, end = self._header.data_start + info.begin, self._header.data_start + info.end
        raw: Any = self._data[info.begin : info.end] if self._data is not None else self._range(start, end)
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(raw, dtype=np.uint8)
        if self._verify and name in self._digests:
            self._check_digest(name, raw, self._digests[name])
        return out if self.device.type == "cpu" else out.to(self.device)

    def load(self) -> dict[Any, Any]:
        """The whole state, fetching the data section in one request."""
        if self._header.entries and self._data is None:
            self._data = memoryview(self._range(self._header.data_start, self._header.file_size))
            try:
                return super().load()
            finally:
                self._data = None
        return super().load()


def open(url: str, *, storage_options: Mapping[str, Any] | None = None, fs: Any = None, **kwargs: Any) -> RemoteCheckpoint:
    """:func:`safeckpt.open` for an fsspec URL: a lazy reader using range requests.

    Takes ``device``, ``allowed_globals``, ``verify`` and ``limits`` as :func:`safeckpt.open` does.
    """
    return RemoteCheckpoint(url, storage_options=storage_options, fs=fs, **kwargs)


def _fs_and_path(url: str, storage_options: Mapping[str, Any] | None, fs: Any) -> tuple[Any, str]:
    if fs is None:
        return _url_to_fs(url, storage_options)
    return fs, fs._strip_protocol(url)


def _download(fs: Any, path: str, name: str, directory: str) -> Path:
    local = Path(directory) / name
    fs.get_file(path, str(local))
    return local


def load_single_file(url: str, *, storage_options: Mapping[str, Any] | None = None, fs: Any = None, **kwargs: Any) -> Any:
    """:func:`safeckpt.load_single_file` for an fsspec URL.

    Safe and safetensors files are read with range requests; ``torch.save`` files
    are downloaded to a temporary directory and read by the same no-execution reader.
    """
    fs, path = _fs_and_path(url, storage_options, fs)
    head = bytes(fs.cat_file(path, start=0, end=16))
    kind = detect_bytes(head)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON):
        options = {k: v for k, v in kwargs.items() if k != "trust_pickle"}
        with RemoteCheckpoint(url, fs=fs, **options) as ckpt:
            return ckpt.load()
    if kind is Kind.MANIFEST:
        raise CheckpointFormatError(f"{url} is a multi-file manifest; use load_multi_files() or load()", file=url)
    with tempfile.TemporaryDirectory(prefix="safeckpt-") as tmp:
        return _load_local_file(_download(fs, path, posixpath.basename(path), tmp), **kwargs)


def load_multi_files(
    url: str,
    keys: Iterable[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    fs: Any = None,
    verify: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`safeckpt.load_multi_files` for an fsspec URL (the base path or the manifest).

    A manifest is required (remote sets are always written with one). Sizes are
    always checked against it; ``verify=True`` also checks the digests.
    """
    fs, path = _fs_and_path(url, storage_options, fs)
    manifest_fspath = path if path.endswith(MANIFEST_SUFFIX) else posixpath.splitext(path)[0] + MANIFEST_SUFFIX
    if not fs.isfile(manifest_fspath):
        raise FileNotFoundError(f"no manifest {manifest_fspath} for the multi-file set {url}")
    limits.check("max_header_bytes", int(fs.size(manifest_fspath)), what="the manifest size", file=url)
    with tempfile.TemporaryDirectory(prefix="safeckpt-") as tmp:
        local_manifest = _download(fs, manifest_fspath, "manifest" + MANIFEST_SUFFIX, tmp)
        manifest = read_manifest(local_manifest, limits)
    directory = posixpath.dirname(manifest_fspath)
    available = [e.key for e in manifest.entries]
    wanted = available if keys is None else list(keys)
    missing = [key for key in wanted if key not in available]
    if missing:
        raise ComponentNotFoundError(f"{url} has no component {show(missing[0])}; it has {show(available, 300)}", name=missing[0], available=available)
    out: dict[str, Any] = {}
    for entry in manifest.entries:
        if entry.key not in wanted:
            continue
        file = posixpath.join(directory, entry.file)
        _check_remote_entry(fs, file, entry, verify=verify, limits=limits)
        value = load_single_file(fs.unstrip_protocol(file), fs=fs, verify=verify, limits=limits, **kwargs)
        if isinstance(value, dict) and list(value) == [entry.key]:
            value = value[entry.key]
        out[entry.key] = value
    return {key: out[key] for key in wanted}


def _check_remote_entry(fs: Any, file: str, entry: ManifestEntry, *, verify: bool, limits: Limits) -> None:
    size = int(fs.size(file))
    if size != entry.size:
        raise IntegrityError(
            f"{file} is {size} bytes, the manifest says {entry.size}: the set is torn or was modified",
            tensor_name=entry.key,
            file=file,
        )
    if verify:
        head = bytes(fs.cat_file(file, start=0, end=min(size, 16)))
        length = size
        if detect_bytes(head) is Kind.SAFETENSORS:
            length = min(size, 8 + struct.unpack("<Q", head[:8])[0])
            limits.check("max_header_bytes", length, what="the safetensors header length", file=file)
        actual = hashlib.sha256(bytes(fs.cat_file(file, start=0, end=length))).hexdigest()
        if actual != entry.sha256:
            raise IntegrityError(
                f"{file} does not match the digest in its manifest: the set is torn or was modified",
                tensor_name=entry.key,
                expected=entry.sha256,
                actual=actual,
                file=file,
            )


def load(url: str, *, storage_options: Mapping[str, Any] | None = None, fs: Any = None, **kwargs: Any) -> Any:
    """:func:`safeckpt.load` for an fsspec URL: a single file, a manifest, or a multi-file set's base path."""
    fs, path = _fs_and_path(url, storage_options, fs)
    if fs.isfile(path) and detect_bytes(bytes(fs.cat_file(path, start=0, end=16))) is not Kind.MANIFEST:
        return load_single_file(url, fs=fs, **kwargs)
    return load_multi_files(url, fs=fs, **kwargs)

