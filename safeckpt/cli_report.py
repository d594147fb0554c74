"""What the ``safeckpt`` command line reads and shows: file views and the checks of ``verify``.

Value walks and summaries live in :mod:`safeckpt.cli_values`, sizes and the
progress bar in :mod:`safeckpt.cli_output`; their names are re-exported here.

Nothing here prints to stdout; :mod:`safeckpt.cli` decides what goes where.
A :class:`FileView` describes any checkpoint safeckpt reads (safeckpt single
file, multi-file set, plain safetensors, ``torch.save`` file) without reading
tensor bytes where the format allows it: legacy files go through the no-exec
reader on the ``meta`` device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .cli_output import Progress, collect_files, human_bytes, plural
from .cli_values import Cycle, children, json_key, jsonable, slash_path, shape_text, summary, walk
from .container import read_header
from .detect import Kind, detect
from .errors import CheckpointFormatError, IntegrityError
from .legacy import read_torch_file
from .limits import DEFAULT_LIMITS
from .loading import load_multi_files
from .multifile import check_entry, discover, find_manifest, manifest_path, read_manifest, split_base
from .refs import GlobalRef, OpaqueObject
from .tensors import dtype_name
from .text import segment, show

__all__ = [
    "ComponentView",
    "Cycle",
    "FileView",
    "Progress",
    "TensorRow",
    "children",
    "collect_files",
    "component_keys",
    "count_tensors",
    "format_of",
    "human_bytes",
    "is_multi",
    "json_key",
    "plural",
    "slash_path",
    "summary",
    "verify_file",
    "view_file",
    "walk",
]

META = torch.device("meta")
ProgressFactory = Callable[..., "Progress"]  # (label, total, unit) -> a Progress
TORCH_KINDS = (Kind.TORCH_ZIP, Kind.TORCH_LEGACY)


# --------------------------------------------------------------------------- file views


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a component: its path inside the component, dtype, shape and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes}


@dataclass
class ComponentView:
    """One top-level key of a checkpoint.

    Attributes:
        key: the key.
        summary: what its value is (see :func:`summary`).
        tensors: its tensors as they appear in the state (tied weights under each name).
        count, nbytes, dtypes: what is stored: for safetensors-based files from the
            header (tied weights once), for legacy files from ``tensors``.
        file: the component's file in a multi-file set.
    """

    key: Any
    summary: str
    tensors: list[TensorRow]
    count: int
    nbytes: int
    dtypes: list[str]
    file: str | None = None

    def to_json(self, with_tensors: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": json_key(self.key),
            "summary": self.summary,
            "tensors": self.count,
            "bytes": self.nbytes,
            "dtypes": self.dtypes,
            "file": self.file,
        }
        if with_tensors:
            out["tensor_list"] = [row.to_json() for row in self.tensors]
        return out


@dataclass
class FileView:
    """What ``safeckpt inspect`` reports about one checkpoint."""

    path: str
    format: str
    metadata: dict[str, Any]
    components: list[ComponentView] = field(default_factory=list)
    class_refs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def tensor_count(self) -> int:
        return sum(c.count for c in self.components)

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.components)

    def add(
        self, key: Any, value: Any, *, stored: tuple[int, int, list[str]] | None = None, file: str | None = None
    ) -> None:
        """Add component ``key`` holding ``value`` (tensors may be on ``meta``), collecting its class references.

        ``stored`` is ``(count, bytes, dtypes)`` when the header knows them.
        """
        rows = []
        for path, node in walk(value):
            if isinstance(node, torch.Tensor):
                rows.append(
                    TensorRow(
                        slash_path(path) if path else segment(key),
                        dtype_name(node.dtype),
                        tuple(node.shape),
                        node.numel() * node.element_size(),
                    )
                )
            elif isinstance(node, (GlobalRef, OpaqueObject)):
                name = node.name if isinstance(node, GlobalRef) else node.cls.name
                self.class_refs.setdefault(name, []).append(slash_path((key, *path)))
        if stored is None:
            stored = (len(rows), sum(r.nbytes for r in rows), sorted({r.dtype for r in rows}))
        count, nbytes, dtypes = stored
        self.components.append(ComponentView(key, summary(value), rows, count, nbytes, list(dtypes), file))

    def to_json(self, with_tensors: bool) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "metadata": jsonable(self.metadata),
            "tensor_count": self.tensor_count,
            "total_bytes": self.total_bytes,
            "components": [c.to_json(with_tensors) for c in self.components],
            "class_references": [{"name": n, "paths": p} for n, p in sorted(self.class_refs.items())],
        }


def is_multi(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a multi-file set (its manifest, or a base path that is not a file), as ``load`` decides.

    Raises:
        FileNotFoundError: if ``path`` is neither a file nor the base path of a set.
        IsADirectoryError: for a directory.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory; name a checkpoint file")
    if p.is_file():
        return detect(p) is Kind.MANIFEST
    if find_manifest(p) is not None or discover(p):
        return True
    raise FileNotFoundError(f"{p}: no such file, and no multi-file set ({manifest_path(p)} or {split_base(p)}_*)")


def _add_safe_file(view: FileView, path: Path, progress: Progress | None, *, file: str | None = None) -> None:
    """Add the components of a safeckpt or plain safetensors file (a multi-file component file: its one key)."""
    with Checkpoint(path, device=META) as ckpt:
        view.metadata = view.metadata or ckpt.metadata
        if not ckpt.is_safeckpt:  # a plain safetensors file: every tensor is a component, all in the header
            for entry in read_header(path, DEFAULT_LIMITS).entries.values():
                row = TensorRow(entry.name, dtype_name(entry.dtype), entry.shape, entry.nbytes)
                view.components.append(
                    ComponentView(
                        entry.name,
                        f"tensor {row.dtype} {shape_text(row.shape)}",
                        [row],
                        1,
                        row.nbytes,
                        [row.dtype],
                        file,
                    )
                )
            return
        info = ckpt.info()
        cpu: Checkpoint | None = None
        try:
            for key in ckpt.components():
                try:
                    value = ckpt.get(key)
                except CheckpointFormatError:  # numpy arrays need real bytes: decode this component on the CPU
                    cpu = cpu or Checkpoint(path)
                    value = cpu.get(key)
                i = info[key]
                view.add(key, value, stored=(i.tensors, i.bytes, list(i.dtypes)), file=file)
                if progress is not None:
                    progress.advance()
        finally:
            if cpu is not None:
                cpu.close()


def _add_legacy_value(view: FileView, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            view.add(key, item)
    else:
        view.add("(root)", value)


def view_file(path: str | os.PathLike[str], progress: Progress | None = None) -> FileView:
    """Describe any checkpoint safeckpt reads, reading as few tensor bytes as the format allows.

    Raises:
        FileNotFoundError, IsADirectoryError: if there is nothing at ``path``.
        CheckpointFormatError: if it is not a checkpoint.
        UnsafeCheckpointError: for a legacy file that names dangerous globals.
        IntegrityError: for a multi-file set whose files do not have the sizes its manifest records.
    """
    p = Path(path)
    if is_multi(p):
        return _view_multi(p, progress)
    kind = detect(p)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON):
        with Checkpoint(p, device=META) as ckpt:
            fmt = "safeckpt-component" if kind is Kind.SKELETON else "safeckpt" if ckpt.is_safeckpt else "safetensors"
            if progress is not None:
                progress.total = len(ckpt.components()) if ckpt.is_safeckpt else 0
        view = FileView(str(p), fmt, {})
        _add_safe_file(view, p, progress)
        return view
    legacy = read_torch_file(p, device=META, limits=DEFAULT_LIMITS)
    view = FileView(str(p), legacy.format, {})
    _add_legacy_value(view, legacy.value)
    return view


def _view_multi(path: Path, progress: Progress | None) -> FileView:
    manifest_file = find_manifest(path)
    if manifest_file is not None:
        manifest = read_manifest(manifest_file, DEFAULT_LIMITS)
        view = FileView(str(path), "safeckpt-multi", {"manifest": str(manifest_file), **manifest.metadata})
        files = {e.key: check_entry(manifest, e, verify=False, limits=DEFAULT_LIMITS) for e in manifest.entries}
    else:
        files = discover(path)
        view = FileView(str(path), "safeckpt-multi", {"manifest": None})
    if progress is not None:
        progress.total = len(files)
    for key, file in files.items():
        kind = detect(file)
        if kind in TORCH_KINDS:
            view.add(key, read_torch_file(file, device=META, limits=DEFAULT_LIMITS).value, file=str(file))
        else:
            with Checkpoint(file, device=META) as ckpt:
                has_key = ckpt.is_safeckpt and ckpt.components() == [key]
            if has_key:
                meta = view.metadata
                _add_safe_file(view, file, None, file=str(file))
                view.metadata = meta
            else:  # a plain safetensors component file: a state dict
                with Checkpoint(file, device=META) as ckpt:
                    view.add(key, ckpt.load(), file=str(file))
        if progress is not None:
            progress.advance()
    return view


# --------------------------------------------------------------------------- checks shared by several commands


def format_of(path: Path) -> str:
    """The format name ``inspect`` reports, from the bytes (and the set's files for a multi-file set)."""
    if is_multi(path):
        return "safeckpt-multi"
    kind = detect(path)
    if kind is Kind.SAFETENSORS:
        with Checkpoint(path, device=META) as ckpt:
            return "safeckpt" if ckpt.is_safeckpt else "safetensors"
    return "safeckpt-component" if kind is Kind.SKELETON else kind.value


def component_keys(path: Path) -> list[Any]:
    """The top-level keys of a single file (safe or legacy), reading no tensor bytes."""
    kind = detect(path)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON):
        with Checkpoint(path, device=META) as ckpt:
            return ckpt.components()
    value = read_torch_file(path, device=META, limits=DEFAULT_LIMITS).value
    if not isinstance(value, dict):
        raise TypeError(f"{path} holds a {type(value).__name__}, not a dict of components")
    return list(value)


def count_tensors(value: Any) -> int:
    """How many tensors ``value`` holds, at any depth."""
    return sum(isinstance(node, torch.Tensor) for _, node in walk(value))


def verify_file(path: Path, progress: ProgressFactory) -> dict[str, Any]:
    """Check ``path`` as ``safeckpt verify`` does.

    Returns:
        ``format``, ``digests`` (whether digests were recorded and checked), ``components`` and ``tensors``.

    Raises:
        IntegrityError: on a digest mismatch, or a file missing from a set.
        CheckpointFormatError: if the structure does not decode.
    """
    if is_multi(path):
        manifest_file = find_manifest(path)
        keys = (
            [e.key for e in read_manifest(manifest_file, DEFAULT_LIMITS).entries]
            if manifest_file
            else list(discover(path))
        )
        tensors = 0
        with progress(f"verifying {path}", len(keys)) as bar:
            for key in keys:
                try:
                    value = load_multi_files(path, [key], verify=manifest_file is not None)[key]
                except FileNotFoundError as exc:  # the manifest names a file that is gone: an incomplete set
                    raise IntegrityError(
                        f"{manifest_file} lists component {show(key)}, whose file {exc.filename} is "
                        "missing: the set is incomplete",
                        tensor_name=key,
                        file=exc.filename,
                    ) from exc
                tensors += count_tensors(value)
                bar.advance()
        return {
            "format": "safeckpt-multi",
            "digests": manifest_file is not None,
            "components": len(keys),
            "tensors": tensors,
        }
    kind = detect(path)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON):
        header = read_header(path, DEFAULT_LIMITS) if kind is Kind.SAFETENSORS else None
        entries = header.entries if header is not None else {}
        digests = header is not None and header.digests() is not None
        with Checkpoint(path, verify=digests) as ckpt:  # the skeleton's digest is checked on opening
            fmt = "safeckpt" if ckpt.is_safeckpt else "safetensors"
            with progress(f"verifying {path}", sum(e.nbytes for e in entries.values()), "bytes") as bar:
                for name in ckpt.tensor_names():
                    ckpt.get_tensor(name)
                    bar.advance(entries[name].nbytes)
        with Checkpoint(path) as ckpt:  # structure: every component decodes
            loaded = ckpt.load()
            components = len(loaded) if isinstance(loaded, Mapping) else 1  # a root that is not a dict: one value
        return {
            "format": fmt if kind is Kind.SAFETENSORS else "safeckpt-component",
            "digests": digests,
            "components": components,
            "tensors": len(entries),
        }
    legacy = read_torch_file(path, device=torch.device("cpu"), limits=DEFAULT_LIMITS)  # the no-exec reader
    state = legacy.value
    return {
        "format": legacy.format,
        "digests": False,
        "components": len(state) if isinstance(state, Mapping) else 1,
        "tensors": count_tensors(state),
    }
