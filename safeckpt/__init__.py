"""safeckpt: PyTorch training checkpoints without pickle.

Tensors go to safetensors, everything else to msgpack with typed extensions;
class references are stored by name and imported only when the caller allows it.
"""

__version__ = "0.1.0"

from . import distributed as distributed  # the subpackage, importable as safeckpt.distributed
from .checkpoint import Checkpoint
from .convert import convert
from .errors import (
    CheckpointFormatError,
    ComponentNotFoundError,
    FallbackWarning,
    IntegrityError,
    LimitExceededError,
    SafeCkptError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .legacy import ScanReport, scan
from .limits import Limits
from .loading import load, load_multi_files, load_single_file, open
from .manager import CheckpointManager
from .refs import GlobalRef, OpaqueObject
from .saving import save_multi_files, save_multi_from_single, save_single_file

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
