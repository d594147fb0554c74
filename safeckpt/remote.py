"""Checkpoints on fsspec storage: the documented names, kept as a thin facade.

The seed API (:func:`safeckpt.save_single_file`, :func:`safeckpt.load`,
:func:`safeckpt.open`...) takes fsspec URLs itself: local and remote files go
through one reader and one writer over the storage layer
(:mod:`safeckpt.storage`, which documents atomicity per backend). These names
stay for code written against earlier versions (``RemoteCheckpoint`` is gone:
:func:`open` gives a :class:`~safeckpt.Checkpoint` on every backend).
"""

from __future__ import annotations

from .loading import load, load_multi_files, load_single_file, open
from .saving import save_multi_files, save_single_file
from .storage import FileRecord, is_url
from .writer import stream_single

__all__ = [
    "FileRecord",
    "is_url",
    "load",
    "load_multi_files",
    "load_single_file",
    "open",
    "save_multi_files",
    "save_single_file",
    "stream_single",
]
