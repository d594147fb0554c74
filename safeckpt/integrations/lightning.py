"""Lightning checkpoints in the safe format: ``Trainer(plugins=[SafeCheckpointIO()])``.

Every checkpoint the Trainer writes (``ModelCheckpoint``, ``trainer.save_checkpoint``)
becomes a safeckpt single file under the name Lightning chose (``epoch=3-step=40.ckpt``:
safeckpt detects formats from bytes, not extensions), and resuming with
``trainer.fit(..., ckpt_path=...)`` reads it back without unpickling. What Lightning
puts in a checkpoint round-trips with its types: ``state_dict``, optimizer and
scheduler states (``int`` keys, tensors), loop progress, callback states under their
state keys (strings such as ``"ModelCheckpoint{'monitor': None, ...}"``),
``pytorch-lightning_version``, and ``hyper_parameters``: Lightning's
``AttributeDict`` is rebuilt by default, classes in the hyperparameters come back
as inert ``GlobalRef`` unless listed in ``allowed_globals``.

A legacy ``.ckpt`` (written by ``torch.save``) loads through safeckpt's no-execution
reader, so old runs resume too.

The plugin derives from the ``CheckpointIO`` of every Lightning installed
(``lightning`` and the standalone ``pytorch_lightning``/``lightning_fabric``), so both
Trainers accept it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import torch

from ..loading import load
from ..saving import save_single_file
from ..storage import is_url

__all__ = ["DEFAULT_ALLOWED_GLOBALS", "SafeCheckpointIO", "load_from_checkpoint"]

DEFAULT_ALLOWED_GLOBALS = (
    "lightning.fabric.utilities.data:AttributeDict",
    "lightning_fabric.utilities.data:AttributeDict",
    "pytorch_lightning.utilities.parsing:AttributeDict",
)
"""Lightning's own plain-data types, rebuilt by default (imported only when a checkpoint holds one)."""

_BASES = ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io")


def _checkpoint_io_bases() -> tuple[type, ...]:
    bases = []
    for name in _BASES:
        try:
            bases.append(importlib.import_module(name).CheckpointIO)
        except ImportError:
            continue
    if not bases:
        raise ImportError("SafeCheckpointIO needs Lightning: pip install 'safeckpt[lightning]'")
    return tuple(bases)


def _installed(names: Iterable[str]) -> list[str]:
    """The names whose top-level package is installed (found without importing it)."""
    return [name for name in names if importlib.util.find_spec(name.split(".")[0]) is not None]


def _device(map_location: Any) -> str | torch.device:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return "cpu"  # functions and remapping dicts apply to torch.load's storages; safeckpt loads onto one device
    return torch.device(map_location) if isinstance(map_location, (str, int)) else map_location


class _SafeCheckpointIO:
    """Save and load Lightning checkpoints as safeckpt files (see the module docstring).

    Args:
        allowed_globals: classes/functions (or ``"module:qualname"``) that may be imported
            when loading, e.g. classes held in ``hyper_parameters``; others stay inert.
            Lightning's ``AttributeDict`` is always allowed.
        verify: check the recorded SHA-256 digests when loading.
    """

    def __init__(self, allowed_globals: Iterable[Any] = (), *, verify: bool = False) -> None:
        super().__init__()
        self.allowed_globals = (*_installed(DEFAULT_ALLOWED_GLOBALS), *allowed_globals)
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` as a safeckpt single file, atomically."""
        if storage_options is not None:
            raise TypeError(
                f"SafeCheckpointIO takes no storage_options, got {storage_options!r}; pass a custom "
                "CheckpointIO for options"
            )
        save_single_file(None, checkpoint, os.fspath(path))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Read a safeckpt checkpoint, or a legacy ``torch.save`` ``.ckpt`` without unpickling it.

        ``weights_only`` is accepted for Lightning's interface and has no effect: nothing
        is ever unpickled. ``map_location`` may be a device; a function or dict loads on CPU.
        """
        if not is_url(path) and not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load(os.fspath(path), device=_device(map_location), allowed_globals=self.allowed_globals,
                    verify=self.verify)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint file (``ModelCheckpoint``'s ``save_top_k`` retention)."""
        if is_url(path):
            import fsspec

            fs, target = fsspec.core.url_to_fs(os.fspath(path))
            if fs.exists(target):
                fs.rm(target, recursive=True)
        elif os.path.lexists(path):
            os.remove(path)

    def teardown(self) -> None:
        """Nothing to release."""


SafeCheckpointIO = type("SafeCheckpointIO", (_SafeCheckpointIO, *_checkpoint_io_bases()), {
    "__doc__": _SafeCheckpointIO.__doc__,
    "__module__": __name__,
    "__qualname__": "SafeCheckpointIO",
})


def load_from_checkpoint(
    cls: type, path: Any, *, allowed_globals: Iterable[Any] = (), map_location: Any | None = None,
    strict: bool | None = None, **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for safeckpt (and legacy) checkpoints, without unpickling.

    Args:
        cls: the ``LightningModule`` or ``LightningDataModule`` class.
        path: the checkpoint.
        allowed_globals: as for :class:`SafeCheckpointIO` (list the classes your hyperparameters hold).
        map_location: a device.
        strict: as for Lightning's ``load_from_checkpoint``.
        **kwargs: hyperparameters overriding the saved ones.
    """
    checkpoint = SafeCheckpointIO(allowed_globals).load_checkpoint(path, map_location)
    standalone = any(c.__module__.split(".")[0] == "pytorch_lightning" for c in cls.__mro__)
    package = "pytorch_lightning" if standalone else "lightning.pytorch"
    saving = importlib.import_module(f"{package}.core.saving")
    return saving._load_state(cls, checkpoint, strict=strict, **kwargs)
