"""Attributes set on a container from a file: data only, never a method.

A ``state_dict()`` is an ``OrderedDict`` carrying a ``_metadata`` attribute, so
both the safe format (the attrs of an ``ORDERED_DICT`` tag, the state's root
attrs) and legacy pickles (``BUILD`` on an ``OrderedDict``) set instance
attributes from the file. An instance attribute named ``keys``, ``items`` or
``get`` would shadow the method of that name and break every caller (a
``TypeError`` deep inside load, scan or convert). The rule, enforced here for
every reader:

- a name must be an identifier that does not start with ``__``, and
- it must name nothing on the container's type (no method, no class attribute,
  no descriptor): only new, plain data attributes such as ``_metadata``.

Anything else is refused with :class:`~safeckpt.errors.CheckpointFormatError`
when reading, or :class:`~safeckpt.errors.UnsupportedValueError` when saving
(so that every file safeckpt writes reads back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointFormatError
from .text import show

__all__ = ["attr_problem", "check_attrs_for_save", "set_data_attrs"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def attr_problem(kind: type, name: Any) -> str | None:
    """Why ``name`` may not be an attribute set from data on an instance of ``kind``, or ``None`` if it may."""
    if type(name) is not str or not _IDENTIFIER.match(name):
        return f"attribute name {show(name, 60)} is not an identifier"
    if name.startswith("__"):
        return f"attribute {name} is a special (dunder) name"
    if hasattr(kind, name):
        return f"attribute {name} would shadow {kind.__name__}.{name}"
    return None


def set_data_attrs(target: Any, attrs: Any, *, what: str, file: str | None = None) -> None:
    """Set ``attrs`` (a ``dict`` of name -> value read from a file) on ``target`` as plain data.

    Every name is checked (see the module docstring) before any is set, so a refused
    mapping leaves ``target`` untouched.

    Args:
        target: the container being rebuilt (an ``OrderedDict``).
        attrs: the names and values the file gives.
        what: where they come from, for the message (``"a BUILD at byte 12"``).
        file: the file being read, for the error.

    Raises:
        CheckpointFormatError: if ``attrs`` is not a dict, ``target`` takes no
            attributes, or a name is refused.
    """
    if type(attrs) is not dict:
        raise CheckpointFormatError(
            f"{what}: attributes of a {type(target).__name__} must be a dict, not {type(attrs).__name__}", file=file
        )
    if not attrs:
        return
    if not hasattr(target, "__dict__"):
        raise CheckpointFormatError(f"{what}: a {type(target).__name__} takes no attributes", file=file)
    for name in attrs:
        problem = attr_problem(type(target), name)
        if problem is not None:
            raise CheckpointFormatError(
                f"{what}: {problem}; values from a file are data, never methods. The file is malformed or hostile",
                file=file,
            )
    vars(target).update(attrs)


def check_attrs_for_save(kind: type, attrs: Mapping[str, Any]) -> str | None:
    """The first problem among ``attrs`` of an instance of ``kind`` about to be saved, or ``None``."""
    for name in attrs:
        problem = attr_problem(kind, name)
        if problem is not None:
            return problem
    return None
