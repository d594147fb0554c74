"""The on-disk records of a :class:`~safeckpt.CheckpointManager` step: names, the ``COMMITTED``
marker (its format and validation), the ``WRITING`` lock and the metrics a step may record.

A marker is JSON: ``format`` (``"safeckpt-step"``), ``format_version``, ``step``,
``metrics``, ``created``, ``library_version``, ``layout`` (``"single"`` or
``"multi"``), ``entry`` and ``files`` (each ``name``, ``size``, ``sha256``: the
shared :class:`~safeckpt.storage.FileRecord`).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import socket
from collections.abc import Mapping
from typing import Any

from .storage import FileRecord, pid_alive, unmatched
from .text import show
from .version import __version__

__all__ = [
    "BASE",
    "LOCK",
    "MARKER",
    "MAX_MARKER_BYTES",
    "MAX_METRICS_BYTES",
    "as_float",
    "changed_file",
    "STEP_DIR",
    "clean_metrics",
    "lock_abandoned",
    "lock_bytes",
    "make_marker",
    "marker_problem",
    "marker_records",
    "step_dir",
]

MARKER = "COMMITTED"
LOCK = "WRITING"
MARKER_FORMAT = "safeckpt-step"
MARKER_VERSION = 1
MAX_MARKER_BYTES = 16 << 20  # a marker or lock larger than this is not one safeckpt wrote (the step is incomplete)
MAX_METRICS_BYTES = 1 << 20  # what a save may record as metrics: its marker stays far below MAX_MARKER_BYTES
BASE = "checkpoint"
STEP_DIR = re.compile(r"step_([0-9]{12,})\Z")
FILE_NAME = re.compile(r"[A-Za-z0-9_.%#-][A-Za-z0-9_.%#+ -]{0,254}\Z")


def step_dir(step: int) -> str:
    return f"step_{step:012d}"


def as_float(value: Any) -> float | None:
    """A metric as a float, or ``None`` if it is not a real number within float range (``10**400``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def clean_metrics(metrics: Mapping[str, Any] | None, ranked: str | None = None) -> dict[str, Any]:
    """Check what a save records: str names; numbers (within float range) or str values; and the
    metric the manager ranks by (``ranked``) present, a real number, and finite."""
    out: dict[str, Any] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str, got {show(name)}")
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()  # a 0-d tensor or numpy scalar
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"metric {show(name)} must be a number or str, got {type(value).__name__}")
        if isinstance(value, int) and as_float(value) is None:
            raise ValueError(f"metric {show(name)} is {show(value, 40)}, outside the range of a float")
        out[name] = value
    if ranked is not None:
        if ranked not in out:
            given = ", ".join(show(n, 40) for n in out) or "none"
            raise ValueError(
                f"this manager ranks steps by metric {show(ranked)}: pass it to save(), e.g. "
                f"metrics={{{ranked!r:.60}: 0.25}} (metrics given: {given})"
            )
        number = as_float(out[ranked])
        if number is None:
            raise TypeError(f"metric {show(ranked)} ranks steps: it must be a real number, got {type(out[ranked]).__name__}")
        if not math.isfinite(number):
            raise ValueError(f"metric {show(ranked)} is {number}; it ranks steps, so it must be finite")
    size = len(json.dumps(out).encode())
    if size > MAX_METRICS_BYTES:
        raise ValueError(f"the metrics take {size} bytes as JSON; a step records at most {MAX_METRICS_BYTES}")
    return out


def marker_problem(doc: Any, step: int | None = None) -> str | None:
    """Why ``doc`` is not a well-formed marker (of ``step``, when given), or ``None`` when it is one.

    A step without a well-formed marker is incomplete: the manager ignores it and
    ``safeckpt inspect`` reports this reason.
    """
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
        if type(item) is not dict or type(item.get("name")) is not str or not FILE_NAME.match(item["name"]):
            return "its marker lists a file with an invalid name"
        if type(item.get("size")) is not int or item["size"] < 0 or type(item.get("sha256")) is not str:
            return "its marker lists a file without a valid size and digest"
    if doc.get("entry") not in [item["name"] for item in files]:
        return "its marker's entry is not one of its files"
    return None


def marker_records(marker: dict[str, Any]) -> list[FileRecord]:
    """The files a well-formed marker records (names relative to the step's directory)."""
    return [FileRecord(item["name"], item["size"], item["sha256"]) for item in marker["files"]]


def changed_file(marker: dict[str, Any], present: Mapping[str, int | None]) -> FileRecord | None:
    """The first file of a well-formed marker that ``present`` (the step directory's listing) lacks
    or holds at another size; ``None`` when every file is there as recorded."""
    changed, _ = unmatched(marker_records(marker), present)
    return changed[0] if changed else None


def lock_bytes(created: str) -> bytes:
    """The ``WRITING`` lock of a step being saved by this process."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": created}).encode()


def lock_abandoned(lock: Any) -> bool:
    """Whether a step's ``WRITING`` lock names this host and a process that is not writing it (gone,
    or this process, which calls this only for steps other than the save in flight)."""
    if type(lock) is not dict or lock.get("host") != socket.gethostname() or type(lock.get("pid")) is not int:
        return False
    return lock["pid"] == os.getpid() or not pid_alive(lock["pid"])


def make_marker(step: int, metrics: dict[str, Any], created: str, layout: str, records: list[FileRecord]) -> bytes:
    """The ``COMMITTED`` marker of a step: what it holds, every file's size and digest (its last file is its entry)."""
    marker = {
        "format": MARKER_FORMAT,
        "format_version": MARKER_VERSION,
        "step": step,
        "metrics": metrics,
        "created": created,
        "library_version": __version__,
        "layout": layout,
        "entry": posixpath.basename(records[-1].name),
        "files": [{"name": posixpath.basename(r.name), "size": r.size, "sha256": r.sha256} for r in records],
    }
    return json.dumps(marker, indent=2).encode()
