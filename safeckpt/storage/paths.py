"""Locations: the one place that decides whether a path is a URL, and how a path is shown."""

from __future__ import annotations

import os
import posixpath
from typing import Any

__all__ = ["is_url", "display_path", "split_location"]


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs: ``s3://``, ``gs://``, ``memory://``, ``file://``)."""
    return isinstance(path, str) and "://" in path


def display_path(path: Any) -> str:
    """A path or URL as text for messages and return values (a URL as given, a local path as ``os.fspath``)."""
    if is_url(path):
        return str(path)
    return os.fspath(path)


def split_location(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(parent, name)`` of a local path or URL; the parent is ``"."`` for a bare local name."""
    text = os.fspath(path)
    if is_url(text):
        parent, _, name = text.rstrip("/").rpartition("/")
        return parent, name
    parent, name = os.path.split(text)
    return parent or ".", name


def join(location: str, name: str) -> str:
    """``name`` inside the directory ``location`` (a local path or URL)."""
    return posixpath.join(location, name) if is_url(location) else os.path.join(location, name)
