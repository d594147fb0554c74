"""The scan's bookkeeping types: :class:`Finding` and the :class:`Report` a read fills.

The interpreter (:mod:`.vm`) records every global a pickle names, and how, and
every finding here; callers decide from the report whether to refuse a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import policy
from ..refs import GlobalRef

__all__ = ["Finding", "Report"]


@dataclass(frozen=True)
class Finding:
    """Something a pickle does that deserves attention.

    Attributes:
        kind: a short identifier (``"dangerous-global"``, ``"memo-overwrite"``, ...).
        severity: ``"suspicious"`` or ``"dangerous"``.
        message: what was seen and where.
        offset: byte offset of the opcode in its pickle, when known.
    """

    kind: str
    severity: str
    message: str
    offset: int | None = None


@dataclass
class Report:
    """What reading one file found: every global named and how, and findings."""

    uses: dict[str, set[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def use(self, ref: GlobalRef, how: str) -> None:
        self.uses.setdefault(ref.name, set()).add(how)

    def find(self, kind: str, severity: str, message: str, offset: int | None = None) -> None:
        if len(self.findings) < 1000:
            self.findings.append(Finding(kind, severity, message, offset))

    @property
    def dangerous_globals(self) -> list[str]:
        return sorted(name for name in self.uses if policy.classify(*name.split(":", 1)) == "dangerous")

    @property
    def dangerous(self) -> bool:
        return bool(self.dangerous_globals) or any(f.severity == "dangerous" for f in self.findings)
