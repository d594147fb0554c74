"""The on-disk records of a :class:`~safeckpt.CheckpointManager` step: names, the ``COMMITTED``
marker (its format and validation) and the metrics a step may record.

A marker is JSON: ``format`` (``"safeckpt-step"``), ``format_version``, ``step``,
``metrics``, ``created``, ``library_version``, ``layout`` (``"single"`` or
``"multi"``), ``entry`` and ``files`` (each ``name``, ``size``, ``sha256``: the
shared :class:`~safeckpt.storage.FileRecord`).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from .storage import FileRecord
from .text import show
from .version import __version__

__all__ = [
    "BASE",
    "LOCK",
    "MARKER",
    "MAX_MARKER_BYTES",
    "MAX_METRICS_BYTES",
    "as_float",
    "STEP_DIR",
    "clean_metrics",
    "make_marker",
    "step_dir",
    "valid_marker",
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


def valid_marker(doc: Any, step: int) -> bool:
    """Whether ``doc`` is a well-formed marker of ``step`` (anything else: the step is incomplete)."""
    if type(doc) is not dict or doc.get("format") != MARKER_FORMAT or doc.get("step") != step:
        return False
    if type(doc.get("format_version")) is not int or doc["format_version"] > MARKER_VERSION:
        return False
    files = doc.get("files")
    if type(files) is not list or doc.get("layout") not in ("single", "multi") or type(doc.get("metrics")) is not dict:
        return False
    names = []
    for item in files:
        if type(item) is not dict or type(item.get("name")) is not str or not FILE_NAME.match(item["name"]):
            return False
        if type(item.get("size")) is not int or type(item.get("sha256")) is not str:
            return False
        names.append(item["name"])
    return doc.get("entry") in names


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
