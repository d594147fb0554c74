"""Telling fsspec URLs from local paths, without importing fsspec."""

from __future__ import annotations

from typing import Any

__all__ = ["is_url"]


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs: ``s3://``, ``gs://``, ``memory://``, ``file://``)."""
    return isinstance(path, str) and "://" in path
