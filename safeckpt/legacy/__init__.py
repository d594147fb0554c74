"""Reading ``torch.save`` files and bare pickles without executing a byte of them.

:func:`read_torch_file` interprets their pickles symbolically (see :mod:`.vm`),
against the allowlist and blocklist of :mod:`safeckpt.policy`; :func:`scan` reports what
a file references without loading its tensors.
"""

from .scan import GlobalUse, ScanReport, scan
from .torchfile import LegacyFile, read_torch_file
from .vm import Finding

__all__ = ["Finding", "GlobalUse", "LegacyFile", "ScanReport", "read_torch_file", "scan"]
