"""safeckpt: PyTorch training checkpoints without pickle.

Tensors go to safetensors, everything else to msgpack with typed extensions;
class references are stored by name and imported only when the caller allows it.

The public names are imported on first use (module ``__getattr__``, PEP 562), so
``import safeckpt`` and ``safeckpt --help`` do not pay for ``import torch``.
"""

import importlib as _importlib
import typing as _typing

from .version import __version__

# public name -> the module that defines it (``distributed`` is the subpackage itself, not in ``__all__``)
_EXPORTS: dict[str, str] = {
    "Checkpoint": "checkpoint",
    "CheckpointFormatError": "errors",
    "CheckpointManager": "manager",
    "ComponentNotFoundError": "errors",
    "FallbackWarning": "errors",
    "GlobalRef": "refs",
    "IntegrityError": "errors",
    "LimitExceededError": "errors",
    "Limits": "limits",
    "OpaqueObject": "refs",
    "SafeCkptError": "errors",
    "ScanReport": "legacy",
    "UnsafeCheckpointError": "errors",
    "UnsupportedValueError": "errors",
    "convert": "conversion",
    "distributed": "distributed",
    "load": "loading",
    "load_multi_files": "loading",
    "load_single_file": "loading",
    "open": "loading",
    "save_multi_files": "saving",
    "save_multi_from_single": "saving",
    "save_single_file": "saving",
    "scan": "legacy",
}

__all__ = [
    "Checkpoint",
    "CheckpointFormatError",
    "CheckpointManager",
    "ComponentNotFoundError",
    "FallbackWarning",
    "GlobalRef",
    "IntegrityError",
    "LimitExceededError",
    "Limits",
    "OpaqueObject",
    "SafeCkptError",
    "ScanReport",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "__version__",
    "convert",
    "load",
    "load_multi_files",
    "load_single_file",
    "open",
    "save_multi_files",
    "save_multi_from_single",
    "save_single_file",
    "scan",
]

if _typing.TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports on first use
    from . import distributed as distributed
    from .checkpoint import Checkpoint as Checkpoint
    from .conversion import convert as convert
    from .errors import (
        CheckpointFormatError as CheckpointFormatError,
        ComponentNotFoundError as ComponentNotFoundError,
        FallbackWarning as FallbackWarning,
        IntegrityError as IntegrityError,
        LimitExceededError as LimitExceededError,
        SafeCkptError as SafeCkptError,
        UnsafeCheckpointError as UnsafeCheckpointError,
        UnsupportedValueError as UnsupportedValueError,
    )
    from .legacy import ScanReport as ScanReport
    from .legacy import scan as scan  # type: ignore[no-redef]
    from .limits import Limits as Limits
    from .loading import load as load, load_multi_files as load_multi_files, load_single_file as load_single_file
    from .loading import open as open
    from .manager import CheckpointManager as CheckpointManager
    from .refs import GlobalRef as GlobalRef, OpaqueObject as OpaqueObject
    from .saving import (
        save_multi_files as save_multi_files,
        save_multi_from_single as save_multi_from_single,
        save_single_file as save_single_file,
    )


def __getattr__(name: str) -> _typing.Any:
    """Import a public name (or a submodule, ``safeckpt.saving``...) the first time it is used."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        if name.startswith("_"):
            raise AttributeError(f"module 'safeckpt' has no attribute {name!r}")
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'safeckpt' has no attribute {name!r}") from None
    module = _importlib.import_module(f"{__name__}.{module_name}")
    value = module if name == "distributed" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
