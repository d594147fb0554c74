"""``scan``: what a checkpoint references and how, without executing or loading it."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import policy
from ..container import parse_root, read_header, read_skeleton_file
from ..detect import Kind, detect
from ..errors import CheckpointFormatError, SafeCkptError, UnsafeCheckpointError
from ..limits import DEFAULT_LIMITS, Limits
from ..storage import is_url, open_source
from .torchfile import read_torch_file
from .vm import Finding, Report

__all__ = ["GlobalUse", "ScanReport", "scan"]


@dataclass(frozen=True)
class GlobalUse:
    """One global a file names.

    Attributes:
        name: ``"module:qualname"``.
        uses: how the file uses it: ``"referenced"``, ``"called"``, ``"instantiated"``, ``"build"``.
        status: ``"allowed"`` (rebuilt by safeckpt's own code), ``"unknown"`` (kept inert)
            or ``"dangerous"`` (the file is refused).
    """

    name: str
    uses: frozenset[str]
    status: str


@dataclass(frozen=True)
class ScanReport:
    """The verdict on one file.

    Attributes:
        path: the file scanned.
        format: ``"safeckpt"``, ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or ``"pickle"``.
        verdict: ``"safe"`` (only allowlisted constructors, or no pickle at all),
            ``"suspicious"`` (unknown globals, kept inert, or odd constructs) or
            ``"dangerous"`` (refused by every loader).
        globals: every global named, sorted by name.
        findings: notable constructs, in file order.
    """

    path: str
    format: str
    verdict: str
    globals: tuple[GlobalUse, ...]
    findings: tuple[Finding, ...]

    @property
    def dangerous_globals(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.globals if g.status == "dangerous")


def _verdict(report: Report, uses: tuple[GlobalUse, ...]) -> str:
    if report.dangerous:
        return "dangerous"
    if any(u.status == "unknown" for u in uses) or report.findings:
        return "suspicious"
    return "safe"


def scan(
    path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS, storage_options: Mapping[str, Any] | None = None
) -> ScanReport:
    """Report the globals a checkpoint names and the tricks it uses, without executing it.

    safeckpt and safetensors files hold no pickle and are always ``"safe"``. For a
    ``torch.save`` file or a bare pickle, every pickle in it is interpreted
    symbolically; tensor bytes are not read.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if it is not a checkpoint (and nothing dangerous was seen first).
    """
    if is_url(path) and not str(path).startswith("file://"):
        return _scan_url(str(path), limits, storage_options)
    name = os.fspath(path).removeprefix("file://")
    kind = detect(name)
    if kind in (Kind.SAFETENSORS, Kind.SKELETON, Kind.MANIFEST):
        if kind is Kind.MANIFEST:
            fmt = "safeckpt-multi"
        elif kind is Kind.SKELETON:
            parse_root(read_skeleton_file(name, limits), limits, name, standalone=True)
            fmt = "safeckpt"
        else:
            fmt = "safeckpt" if read_header(name, limits).is_safeckpt else "safetensors"
        return ScanReport(name, fmt, "safe", (), ())
    report = Report()
    fmt = kind.value
    try:
        fmt = read_torch_file(name, device=torch.device("meta"), limits=limits, report=report).format
    except UnsafeCheckpointError:
        pass
    except CheckpointFormatError as exc:
        if not report.dangerous:
            raise
        report.find("malformed", "suspicious", f"the file is malformed after the dangerous part: {exc}")
    uses = tuple(
        GlobalUse(n, frozenset(how), policy.classify(*n.split(":", 1))) for n, how in sorted(report.uses.items())
    )
    return ScanReport(name, fmt, _verdict(report, uses), uses, tuple(report.findings))


def _scan_url(url: str, limits: Limits, storage_options: Mapping[str, Any] | None) -> ScanReport:
    """Scan a remote file from a temporary local copy; the report and any error name the URL."""
    with open_source(url, storage_options) as source, tempfile.TemporaryDirectory(prefix="safeckpt-") as tmp:
        temp = os.path.join(tmp, url.rstrip("/").rpartition("/")[2] or "file")
        with open(temp, "wb") as f:
            position = 0
            while position < source.size:
                end = min(source.size, position + (1 << 26))
                f.write(source.read(position, end))
                position = end
        try:
            return dataclasses.replace(scan(temp, limits=limits), path=url)
        except SafeCkptError as exc:
            exc.args = (str(exc).replace(temp, url), *exc.args[1:])
            exc.file = url
            raise
