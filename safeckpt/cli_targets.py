"""What a path given to ``safeckpt inspect`` or ``verify`` names, beyond a checkpoint file.

- A JSON file is a safeckpt manifest only when it carries the manifest's format
  marker; a manager's ``COMMITTED`` marker names a step; a Hugging Face
  ``*.index.json`` (a ``weight_map``) is reported as a shard index; any other
  JSON is "not a checkpoint" (:class:`~safeckpt.errors.CheckpointFormatError`, exit 2).
- A :class:`~safeckpt.CheckpointManager` directory (``step_*`` directories) and
  one of its step directories are read from their markers, never modifying
  anything (a manager object would clean up incomplete steps).

Nothing read here is trusted: sizes are bounded before reading, symlinks and
non-regular files inside a step are refused, names are checked before use.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .container import read_header
from .detect import Kind, detect
from .errors import CheckpointFormatError, IntegrityError, SafeCkptError
from .limits import DEFAULT_LIMITS
from .steps import FILE_NAME, MARKER, MARKER_FORMAT, MAX_MARKER_BYTES, STEP_DIR, marker_problem, marker_records
from .multifile import MANIFEST_FORMAT, file_digest

__all__ = [
    "HF_INDEX",
    "MANAGER",
    "STEP",
    "HfIndex",
    "Step",
    "classify",
    "read_hf_index",
    "read_step",
    "step_dirs",
    "verify_hf_index",
    "verify_step",
]

MANAGER, STEP, HF_INDEX = "safeckpt-manager", "safeckpt-step", "hf-shard-index"
MAX_JSON_BYTES = 64 << 20


def _not_a_checkpoint(path: Path, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: not a checkpoint ({what})", file=str(path))


def _read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_checkpoint(path, "not a regular file")
        if info.st_size > limit:
            raise _not_a_checkpoint(path, f"a {info.st_size}-byte text file, larger than any index or marker")
        raw = f.read(limit + 1)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _not_a_checkpoint(path, f"starts like JSON but is not valid JSON: {exc}") from exc


def classify(path: Path) -> str | None:
    """``MANAGER``, ``STEP``, ``HF_INDEX``, or ``None`` for what the file readers handle (checkpoints, manifests).

    Raises:
        CheckpointFormatError: for a JSON file that is none of these ("not a checkpoint").
        IsADirectoryError: for a directory that is neither a manager directory nor a step.
    """
    if path.is_dir():
        if STEP_DIR.match(path.name):
            return STEP
        if step_dirs(path):
            return MANAGER
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint manager's directory or step; name a file")
    if not path.is_file() or detect(path) is not Kind.MANIFEST:
        return None
    document = _read_json(path)
    kind = document.get("format") if type(document) is dict else None
    if kind == MANIFEST_FORMAT:
        return None
    if kind == MARKER_FORMAT:
        return STEP
    if type(document) is dict and type(document.get("weight_map")) is dict:
        return HF_INDEX
    raise _not_a_checkpoint(path, "a JSON file without safeckpt's format marker")


def step_dirs(directory: Path) -> dict[int, Path]:
    """The ``step_*`` directories of a manager directory, by step (symlinks are not steps)."""
    found = {}
    for entry in sorted(directory.iterdir()):
        match = STEP_DIR.match(entry.name)
        if match and stat.S_ISDIR(entry.lstat().st_mode):
            found[int(match.group(1))] = entry
    return found


# --------------------------------------------------------------------------- manager steps


@dataclass
class Step:
    """A step directory as its ``COMMITTED`` marker describes it (``marker`` is ``None`` when incomplete)."""

    directory: Path
    step: int | None
    marker: dict[str, Any] | None
    problem: str | None = None  # why the step is incomplete

    @property
    def entry(self) -> Path | None:
        return None if self.marker is None else self.directory / self.marker["entry"]

    def to_json(self) -> dict[str, Any]:
        m = self.marker or {}
        return {
            "directory": str(self.directory),
            "step": self.step,
            "complete": self.marker is not None,
            "problem": self.problem,
            "metrics": m.get("metrics"),
            "created": m.get("created"),
            "layout": m.get("layout"),
            "entry": m.get("entry"),
            "files": m.get("files", []),
        }


def read_step(path: Path) -> Step:
    """The step at ``path`` (a step directory or its ``COMMITTED`` marker)."""
    directory = path.parent if path.is_file() else path
    match = STEP_DIR.match(directory.name)
    step = int(match.group(1)) if match else None
    marker_file = directory / MARKER
    try:
        if stat.S_ISLNK(marker_file.lstat().st_mode):
            return Step(directory, step, None, f"its {MARKER} marker is a symlink")
        doc = _read_json(marker_file, MAX_MARKER_BYTES)
    except FileNotFoundError:
        return Step(directory, step, None, f"no {MARKER} marker: the save did not finish")
    except CheckpointFormatError as exc:
        return Step(directory, step, None, str(exc))
    problem = marker_problem(doc, step)
    if problem is not None:
        return Step(directory, step, None, problem)
    return Step(directory, doc["step"], doc)


def verify_step(step: Step) -> int:
    """Check every file of a complete step against its marker (regular file, size, digest); returns the file count.

    Raises:
        IntegrityError: for an incomplete step, or a file missing, replaced by a link, or not as recorded.
    """
    if step.marker is None:
        raise IntegrityError(f"{step.directory}: incomplete step: {step.problem}", file=str(step.directory))
    for record in marker_records(step.marker):
        file = step.directory / record.name
        try:
            info = file.lstat()
        except FileNotFoundError:
            raise IntegrityError(f"{file} is listed in the {MARKER} marker but missing", file=str(file)) from None
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{file} is not a regular file (a symlink?); refused", file=str(file))
        if info.st_size != record.size:
            raise IntegrityError(
                f"{file} is {info.st_size} bytes, its {MARKER} marker says {record.size}: modified after the commit",
                file=str(file),
            )
        actual = file_digest(file, DEFAULT_LIMITS)
        if actual != record.sha256:
            raise IntegrityError(
                f"{file} does not match the SHA-256 digest in its {MARKER} marker: modified after the commit",
                file=str(file),
                expected=record.sha256,
                actual=actual,
            )
    return len(step.marker["files"])


# --------------------------------------------------------------------------- Hugging Face shard indexes


@dataclass
class HfIndex:
    """A Hugging Face ``*.index.json``: tensor name -> shard file."""

    path: Path
    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shards(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            out.setdefault(shard, []).append(name)
        return out


def read_hf_index(path: Path) -> HfIndex:
    """Read a Hugging Face shard index; shard names must be files beside it."""
    document = _read_json(path)
    weight_map = document.get("weight_map") if type(document) is dict else None
    if type(weight_map) is not dict or not all(type(k) is str and type(v) is str for k, v in weight_map.items()):
        raise _not_a_checkpoint(path, "a JSON file whose weight_map is not a map of tensor names to shard files")
    for shard in set(weight_map.values()):
        if not FILE_NAME.match(shard) or Path(shard).name != shard:
            raise CheckpointFormatError(f"{path}: shard {shard!r:.100} is not a file beside the index", file=str(path))
    metadata = document.get("metadata")
    return HfIndex(path, weight_map, metadata if type(metadata) is dict else {})


def verify_hf_index(index: HfIndex) -> dict[str, Any]:
    """Check that every shard exists, is a regular file, and (safetensors shards) holds the tensors mapped to it.

    Returns:
        ``{shard: problem or None}``.
    """
    results: dict[str, Any] = {}
    for shard, names in index.shards.items():
        file = index.path.parent / shard
        try:
            info = file.lstat()
        except FileNotFoundError:
            results[shard] = "missing"
            continue
        if not stat.S_ISREG(info.st_mode):
            results[shard] = "not a regular file"
            continue
        problem = None
        if detect(file) is Kind.SAFETENSORS:
            try:
                held = read_header(file, DEFAULT_LIMITS).entries
            except SafeCkptError as exc:
                problem = f"unreadable: {exc}"
            else:
                absent = [n for n in names if n not in held]
                if absent:
                    problem = f"lacks {len(absent)} tensor(s) the index maps to it, e.g. {absent[0]!r:.100}"
        results[shard] = problem
    return results
