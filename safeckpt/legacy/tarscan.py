"""Legacy tar checkpoints: what ``torch.load`` unpickles from a tar archive.

The oldest ``torch.save`` format is a tar archive. ``torch.load(weights_only=False)``
tries it FIRST for any file at offset 0: when Python's ``tarfile`` opens the file
(``mode="r:"``), torch extracts the members ``storages``, ``tensors`` and ``pickle``
(the last member of each name, links followed: extraction makes them) and runs
``pickle.load`` on each, where pickles sit between raw storage bytes. safeckpt never
loads this format, but ``scan`` must answer for it.

Rule: a file ``tarfile`` opens is a tar checkpoint to ``scan``. Every regular member is
searched for pickles at every offset (:func:`~safeckpt.legacy.nested.search_payloads`,
from byte 0 and at every PROTO/GLOBAL/STACK_GLOBAL start, within the scan's budget);
a ``storages``, ``tensors`` or ``pickle`` member that is a link or another non-regular
entry makes the file dangerous (torch would unpickle whatever the link reaches).
Members are read through ``tarfile`` itself, at most the file's size each.
"""

from __future__ import annotations

import os
import tarfile

from ..limits import Limits
from .nested import Budget, search_payloads
from .vm import Report

__all__ = ["TORCH_TAR_MEMBERS", "scan_tar"]

TORCH_TAR_MEMBERS = ("storages", "tensors", "pickle")
FORMAT = "torch-tar"


def scan_tar(path: str, report: Report, limits: Limits, budget: Budget) -> str | None:
    """Scan ``path`` as ``torch.load`` reads a tar archive; ``"torch-tar"``, or ``None`` when
    ``tarfile`` does not open it (then torch does not read it as one either)."""
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:", format=tarfile.PAX_FORMAT) as tar:
            members = tar.getmembers()
            limits.check("max_tensors", len(members), what="the number of tar members", file=path)
            last = {m.name: m for m in members}
            for name in TORCH_TAR_MEMBERS:
                member = last.get(name)
                if member is not None and not member.isreg():
                    report.find(
                        "tar-link", "dangerous",
                        f"tar member {name!r} is a link or special file: torch.load extracts it and unpickles "
                        "what it reaches",
                    )
            for member in members:
                if not member.isreg():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read(min(member.size, size))
                search_payloads([data], report, limits, budget)
    except (tarfile.TarError, EOFError):
        return None
    except (ValueError, UnicodeError, OverflowError) as exc:  # headers tarfile chokes on
        report.find("tar-malformed", "suspicious", f"a tar archive that Python's tarfile cannot read: {exc!s:.200}")
    report.find("tar", "suspicious", "a legacy tar checkpoint: torch.load unpickles its members")
    return FORMAT
