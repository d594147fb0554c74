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
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .container import read_header
from .detect import Kind, detect
from .errors import CheckpointFormatError, IntegrityError, SafeCkptError
from .limits import DEFAULT_LIMITS
from .steps import MARKER, MARKER_FORMAT, MARKER_VERSION, MAX_MARKER_BYTES
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
_STEP_DIR = re.compile(r"step_([0-9]{12,})\Z")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.%#-][A-Za-z0-9_.%#+ -]{0,254}\Z")
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
        if _STEP_DIR.match(path.name):
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
        match = _STEP_DIR.match(entry.name)
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


def _marker_problem(doc: Any, step: int | None) -> str | None:
    if type(doc) is not dict or doc.get("format") != MARKER_FORMAT:
        return f"its {MARKER} file is not a safeckpt step marker"
    if step is not None and doc.get("step") != step:
        return f"its marker names step {doc.get('step')!r:.40}, not {step}"
    if type(doc.get("step")) is not int or type(doc.get("format_version")) is not int:
        return "its marker has no valid step or format_version"
    if doc["format_version"] > MARKER_VERSION:
        return f"its marker is format version {doc['format_version']}; this safeckpt reads up to {MARKER_VERSION}"
    files = doc.get("files")
    if type(files) is not list or doc.get("layout") not in ("single", "multi") or type(doc.get("metrics")) is not dict:
        return "its marker is malformed"
    for item in files:
        if type(item) is not dict or type(item.get("name")) is not str or not _FILE_NAME.match(item["name"]):
            return "its marker lists a file with an invalid name"
        if type(item.get("size")) is not int or item["size"] < 0 or type(item.get("sha256")) is not str:
            return "its marker lists a file without a valid size and digest"
    if doc.get("entry") not in [item["name"] for item in files]:
        return "its marker's entry is not one of its files"
    return None


def read_step(path: Path) -> Step:
    """The step at ``path`` (a step directory or its ``COMMITTED`` marker)."""
    directory = path.parent if path.is_file() else path
    match = _STEP_DIR.match(directory.name)
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
    problem = _marker_problem(doc, step)
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
    for item in step.marker["files"]:
        file = step.directory / item["name"]
        try:
            info = file.lstat()
        except FileNotFoundError:
            raise IntegrityError(f"{file} is listed in the {MARKER} marker but missing", file=str(file)) from None
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{file} is not a regular file (a symlink?); refused", file=str(file))
        if info.st_size != item["size"]:
            raise IntegrityError(
                f"{file} is {info.st_size} bytes, its {MARKER} marker says {item['size']}: modified after the commit",
                file=str(file),
            )
        actual = file_digest(file, DEFAULT_LIMITS)
        if actual != item["sha256"]:
            raise IntegrityError(
                f"{file} does not match the SHA-256 digest in its {MARKER} marker: modified after the commit",
                file=str(file),
                expected=item["sha256"],
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
        if not _FILE_NAME.match(shard) or Path(shard).name != shard:
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
