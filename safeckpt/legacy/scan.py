"""``scan``: what would ``torch.load(weights_only=False)`` or ``pickle.load`` do with a file?

Nothing is executed, no tensor byte is read, and torch is never imported: this
is bytes plus the no-execution VM with no constructor run (every allowed global
stays an inert placeholder).

- A file is scanned as every format it parses as, and the worst verdict wins: a
  safetensors header that also starts a zip archive is what ``torch.load`` opens
  as a zip, and any file is what ``pickle.load`` reads from byte 0.
- Archives are read by :mod:`.archive`, exactly as torch reads them; an archive
  that zip readers read differently is dangerous.
- The pre-1.6 stream is read pickle by pickle as ``torch.load`` does (magic
  number, protocol, sys info, main pickle, storage keys); a bare pickle is one.
- Pickles hidden in bytes values are searched for in any protocol at any offset
  (:mod:`.nested`).
- A TorchScript archive's pickles are scanned like any other; its code, which
  runs when the model is called, is reported (never run) and makes it suspicious.
- A multi-file manifest's components are scanned too; other JSON is "not a checkpoint".
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import policy
from ..errors import CheckpointFormatError, LimitExceededError, SafeCkptError
from ..limits import DEFAULT_LIMITS, Limits
from ..refs import GlobalRef, OpaqueObject
from ..storage import local_text, open_file, open_source
from .archive import open_archive
from .nested import Budget, search_payloads
from .tarscan import scan_tar
from .torchscript import code_module, forgive_jit_helpers, is_torchscript, parse_code
from .vm import Finding, Report, SymbolicUnpickler

__all__ = ["NOT_A_CHECKPOINT", "GlobalUse", "ScanReport", "scan"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
NOT_A_CHECKPOINT = "not-a-checkpoint"  # ScanReport.format of a file that is no checkpoint (e.g. config.json)
MANIFEST_FORMAT = "safeckpt-multi"
_SEVERITY = {"safe": 0, "suspicious": 1, "dangerous": 2}


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
        format: ``"safeckpt"``, ``"safetensors"``, ``"safeckpt-component"``, ``"safeckpt-multi"``,
            ``"torch-zip"``, ``"torchscript"``, ``"torch-legacy"``, ``"pickle"``, several of them
            joined by ``"+"`` for a file that parses as each (a polyglot), or
            ``"not-a-checkpoint"`` (JSON that is no safeckpt manifest).
        verdict: ``"safe"`` (only allowlisted constructors, or no pickle at all),
            ``"suspicious"`` (unknown globals kept inert, TorchScript code, odd constructs)
            or ``"dangerous"`` (loading it with ``torch.load(weights_only=False)`` or
            ``pickle.load`` can run code or touch the system; safeckpt refuses it).
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


@dataclass
class _Scan:
    path: str
    limits: Limits
    budget: Budget
    report: Report = field(default_factory=Report)
    formats: list[str] = field(default_factory=list)


# bytes per element of each storage type torch.save names (no torch import needed)
_ITEMSIZE = {
    **dict.fromkeys(("ByteStorage", "CharStorage", "BoolStorage", "QUInt8Storage", "QInt8Storage", "UntypedStorage",
                     "QUInt4x2Storage", "QUInt2x4Storage"), 1),
    **dict.fromkeys(("ShortStorage", "HalfStorage", "BFloat16Storage"), 2),
    **dict.fromkeys(("IntStorage", "FloatStorage", "QInt32Storage"), 4),
    **dict.fromkeys(("LongStorage", "DoubleStorage", "ComplexFloatStorage"), 8),
    "ComplexDoubleStorage": 16,
}


def _persistent(itemsizes: dict[str, int]) -> Any:
    """Storages stay placeholders (scanning reads no tensor bytes); their element sizes are
    recorded. A pre-1.6 ``('module', cls, file, source)`` id stands for the class, as in torch."""

    def load(pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], GlobalRef):
            return pid[1]
        if type(pid) is tuple and len(pid) >= 5 and type(pid[2]) is str and isinstance(pid[1], GlobalRef):
            itemsizes.setdefault(pid[2], _ITEMSIZE.get(pid[1].qualname, 1))
        return OpaqueObject(GlobalRef("torch", "UntypedStorage"))

    return load


def _pickle(s: _Scan, source: Any, persistent: Any = None) -> Any:
    """Run one pickle inertly; search every bytes and str value it carried for hidden pickles
    (those it dropped too, and those made before it broke: ``pickle.load`` ran that far)."""
    vm = SymbolicUnpickler(source, s.report, s.limits, {}, persistent)
    vm.payloads = []
    try:
        return vm.load()
    finally:
        search_payloads(vm.payloads, s.report, s.limits, s.budget)


# --------------------------------------------------------------------------- formats


def _safetensors(s: _Scan, head: bytes, size: int) -> str | None:
    """``"safeckpt"``/``"safetensors"`` when the file parses as safetensors (header only)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length < 2 or length > min(s.limits.max_header_bytes, size - 8):
        return None
    with open(s.path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if type(header) is not dict:
        return None
    meta = header.get("__metadata__")
    return "safeckpt" if type(meta) is dict and "safeckpt.format_version" in meta else "safetensors"


def _zip(s: _Scan) -> str:
    archive = open_archive(s.path, s.limits)
    if archive.ambiguous:
        s.report.find("ambiguous-archive", "dangerous", "zip readers disagree on this archive: " + "; ".join(archive.problems[:5]))
    records = archive.records()
    script = is_torchscript(records)
    wanted = ["data.pkl"] + (["constants.pkl"] + [r for r in records if r.endswith(".pkl") and r not in ("data.pkl", "constants.pkl")] if script else [])
    if archive.find("data.pkl") is None and not script:
        raise CheckpointFormatError(f"{s.path}: the archive has no {archive.prefix}data.pkl", file=s.path)
    for record in wanted:
        member = archive.find(record)
        if member is None:
            continue
        s.limits.check("max_skeleton_bytes", member.size, what=f"the size of {record}", file=s.path)
        _pickle(s, io.BytesIO(archive.read(member, s.limits)), _persistent({}))
    if not script:
        return "torch-zip"
    forgive_jit_helpers(s.report)
    code = {}
    for record in records:
        if code_module(record) is not None and (member := archive.find(record)) is not None:
            code[record] = archive.read(member, s.limits).decode("utf-8", "replace")
    classes = sorted(c.split(":", 1)[0] + "." + c.split(":", 1)[1] for c in parse_code(code, s.path))
    shown = ", ".join(classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    s.report.find(
        "torchscript", "suspicious",
        f"TorchScript: code present, not executed ({len(code)} code files, {len(classes)} classes: {shown}); "
        "it runs when the model is called after torch.jit.load",
    )
    return "torchscript"


def _stream(s: _Scan) -> str:
    """The pickles ``torch.load`` (pre-1.6 path) or ``pickle.load`` read, in order."""
    with open(s.path, "rb") as f:
        first = _pickle(s, f)
        if type(first) is not int or first != MAGIC_NUMBER:
            return "pickle"
        for _ in range(2):  # protocol version, sys info
            _pickle(s, f)
        itemsizes: dict[str, int] = {}
        _pickle(s, f, _persistent(itemsizes))  # the main pickle: storages are persistent ids
        keys = _pickle(s, f)  # storage keys; each storage's raw bytes follow, which torch reads
        if type(keys) is not list:
            raise CheckpointFormatError(f"{s.path}: malformed legacy storage key list", file=s.path)
        size = os.path.getsize(s.path)
        for key in keys:
            head = f.read(8)
            if len(head) != 8 or type(key) is not str or key not in itemsizes:
                raise CheckpointFormatError(f"{s.path}: storage {key!r:.50} is truncated or unreferenced", file=s.path)
            (count,) = struct.unpack("<q", head)
            end = f.tell() + count * itemsizes[key]
            if count < 0 or end > size:
                raise CheckpointFormatError(f"{s.path}: storage {key!r:.50} runs past the end of the file", file=s.path)
            f.seek(end)
    return "torch-legacy"


def _manifest(s: _Scan, raw: bytes, scan_components: bool) -> tuple[str, list[ScanReport]]:
    """JSON: a safeckpt manifest's components are scanned; any other JSON is not a checkpoint.

    Every ``file`` a component names is scanned when it is a plain name in the manifest's
    directory and a regular file (a superset of what a loader would read; a symlink or
    anything else is reported, not followed)."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return NOT_A_CHECKPOINT, []
    if type(document) is not dict or document.get("format") != MANIFEST_FORMAT:
        return NOT_A_CHECKPOINT, []
    components = document.get("components")
    if type(components) is not list or not scan_components:
        return MANIFEST_FORMAT, []
    s.limits.check("max_components", len(components), what="the number of components", file=s.path)
    folder = os.path.dirname(os.path.abspath(s.path))
    reports = []
    for item in components:
        name = item.get("file") if type(item) is dict else None
        if type(name) is not str or not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
            s.report.find("manifest-entry", "suspicious", f"the manifest names {name!r:.200}, which is not a file beside it")
            continue
        target = os.path.join(folder, name)
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            s.report.find("manifest-entry", "suspicious", f"component {name!r:.200} is missing")
            continue
        if not stat.S_ISREG(mode):
            s.report.find("manifest-entry", "suspicious", f"component {name!r:.200} is not a regular file (not followed)")
            continue
        reports.append(_scan_file(target, s.limits, scan_components=False))
    return MANIFEST_FORMAT, reports


# --------------------------------------------------------------------------- the verdict


def _uses(report: Report) -> tuple[GlobalUse, ...]:
    return tuple(
        GlobalUse(n, frozenset(how), policy.classify(*n.split(":", 1))) for n, how in sorted(report.uses.items())
    )


def _verdict(report: Report, uses: tuple[GlobalUse, ...]) -> str:
    if report.dangerous:
        return "dangerous"
    if any(u.status == "unknown" for u in uses) or report.findings:
        return "suspicious"
    return "safe"


def _scan_file(name: str, limits: Limits, *, scan_components: bool = True) -> ScanReport:
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        head = f.read(16)
    s = _Scan(name, limits, Budget(size))
    parts: list[ScanReport] = []
    errors: list[SafeCkptError] = []
    tensors = _safetensors(s, head, size)
    if tensors is not None:
        s.formats.append(tensors)
    elif head[1:8] == b"\xa6format" and 0x81 <= head[0] <= 0x8F:
        s.formats.append("safeckpt-component")
    if head.startswith(b"PK\x03\x04"):  # torch.load opens exactly these as archives
        try:
            s.formats.append(_zip(s))
        except LimitExceededError:
            raise
        except CheckpointFormatError as exc:
            errors.append(exc)
    tar = scan_tar(name, s.report, s.limits, s.budget)  # torch.load tries a tar archive first
    if tar is not None:
        s.formats.append(tar)
    before = s.report.dangerous
    try:
        s.formats.append(_stream(s))  # pickle.load reads any file from byte 0
    except LimitExceededError as exc:
        if not head.startswith(b"PK\x03\x04") and not s.formats:
            raise
        errors.append(exc)
    except CheckpointFormatError as exc:
        if s.report.dangerous and not before:  # pickle.load ran what it names before it broke
            s.formats.append("pickle")
            s.report.find("malformed", "suspicious", f"a pickle breaks after naming globals: {exc}")
        errors.append(exc)
    if head.lstrip()[:1] == b"{" and size <= limits.max_header_bytes:
        with open(name, "rb") as f:
            fmt, parts = _manifest(s, f.read(), scan_components)
        s.formats.append(fmt)
    if not s.formats:
        limit = next((e for e in errors if isinstance(e, LimitExceededError)), None)
        if limit is not None:
            raise limit
        if errors and head.startswith(b"PK\x03\x04"):
            raise errors[0]  # an archive torch cannot read either: say why
        raise CheckpointFormatError(
            f"{name} is not a checkpoint (neither safetensors, a torch.save file, a pickle nor a safeckpt manifest)",
            file=name,
        )
    if len(s.formats) > 1 and NOT_A_CHECKPOINT not in s.formats:
        s.report.find("polyglot", "suspicious", f"the file parses as {' and '.join(s.formats)}; each was scanned")
    findings = list(s.report.findings)
    for part in parts:
        for use in part.globals:
            s.report.uses.setdefault(use.name, set()).update(use.uses)
        findings.extend(Finding(f.kind, f.severity, f"{os.path.basename(part.path)}: {f.message}", f.offset) for f in part.findings)
    uses = _uses(s.report)
    verdict = _verdict(s.report, uses)
    for part in parts:
        if _SEVERITY[part.verdict] > _SEVERITY[verdict]:
            verdict = part.verdict
    fmt = "+".join(f for f in s.formats if f != NOT_A_CHECKPOINT or len(s.formats) == 1)
    return ScanReport(name, fmt, verdict, uses, tuple(findings))


def scan(
    path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS, storage_options: Mapping[str, Any] | None = None
) -> ScanReport:
    """Say what loading ``path`` with ``torch.load(weights_only=False)`` or ``pickle.load`` would do.

    safeckpt and safetensors files hold no pickle and are ``"safe"``, unless their bytes
    also parse as an archive or a pickle. For a ``torch.save`` file or a bare pickle,
    every pickle torch would read is interpreted symbolically; tensor bytes are not read.
    A manifest's components are scanned with it. JSON that is no safeckpt manifest gives
    a ``"safe"`` report whose format is ``"not-a-checkpoint"``.

    Args:
        path: the file.
        limits: bounds on what is read.
        storage_options: fsspec options when ``path`` is a URL (``s3://...``).

    Returns:
        A :class:`ScanReport`.

    Raises:
        FileNotFoundError: if there is no such file.
        CheckpointFormatError: if it parses as no checkpoint format at all.
    """
    name = local_text(path)
    if name is None:
        return _scan_url(str(path), limits, storage_options)
    with open_file(name):  # a regular file (a link to one is followed); never blocks on a FIFO
        pass
    return _scan_file(name, limits)


def _scan_url(url: str, limits: Limits, storage_options: Mapping[str, Any] | None) -> ScanReport:
    """Scan a remote file from a temporary local copy; the report and any error name the URL."""
    with open_source(url, storage_options) as source, source.local_copy() as local:
        temp = os.fspath(local)
        try:
            return dataclasses.replace(scan(temp, limits=limits), path=url)
        except SafeCkptError as exc:
            exc.args = (str(exc).replace(temp, url), *exc.args[1:])
            exc.file = url
            raise
