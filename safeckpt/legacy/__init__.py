"""Reading ``torch.save`` files and bare pickles without executing a byte of them.

:func:`read_torch_file` interprets their pickles symbolically (see :mod:`.vm`),
against the allowlist and blocklist of :mod:`safeckpt.policy`; :func:`scan` reports what
a file references without loading its tensors.

``scan`` needs no torch: the torch-using names are imported on first use (PEP 562),
so ``from safeckpt.legacy import scan`` does not import torch; ``read_torch_file`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .scan import GlobalUse, ScanReport, scan  # torch-free; binds ``scan`` to the function, not the submodule
from .vm import Finding

if TYPE_CHECKING:
    from .torchfile import LegacyFile, read_torch_file

__all__ = ["Finding", "GlobalUse", "LegacyFile", "ScanReport", "read_torch_file", "scan"]

_EXPORTS = {  # what imports torch, on first use
    "LegacyFile": "torchfile",
    "read_torch_file": "torchfile",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
