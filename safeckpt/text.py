"""Text for messages and reports about values that came from a file.

A value read from a checkpoint is data, and formatting it must not fail or
blow up: ``str()`` and ``repr()`` of an ``int`` over 4,300 digits raise
``ValueError`` (Python's integer-string limit), ``repr()`` of a deep list
recurses, of a long one allocates its whole text, and of an object runs that
object's code. :func:`show` and :func:`segment` are the only way safeckpt puts
such a value into an error message, a tensor name or a report line: they are
bounded in time and length, never convert a huge integer to decimal, never
recurse and never raise.
"""

from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["DEFAULT_WIDTH", "int_fits_text", "segment", "show"]

DEFAULT_WIDTH = 100
_LOG10_2 = math.log10(2)
_ITEMS_SHOWN = 6  # items of a container shown before "..."


def _max_digits() -> int:
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    return limit if limit > 0 else 1 << 62


def int_fits_text(value: int) -> bool:
    """True when ``str(value)`` works under this interpreter's integer-string limit (checked without converting)."""
    digits_upper = int(abs(value).bit_length() * _LOG10_2) + 1  # the digit count, or one more
    limit = _max_digits()
    if digits_upper <= limit:
        return True
    if digits_upper - 1 > limit:
        return False
    return abs(value) < 10**limit  # the one ambiguous digit count: compare exactly


def _int_text(value: int) -> str:
    if int_fits_text(value):
        return int.__repr__(value)
    digits = int(abs(value).bit_length() * _LOG10_2) + 1
    return f"<{'-' if value < 0 else ''}int of about {digits} digits>"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def _leaf(value: Any, width: int) -> str | None:
    """Bounded text for a scalar, or ``None`` for anything else."""
    kind = type(value)
    if value is None or kind is bool:
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _cut(_int_text(int(value)), width)
    if kind is float or kind is complex:
        return repr(value)
    if isinstance(value, str):
        return _cut(str.__repr__(value[: width + 2]), width) if len(value) > width else str.__repr__(value)
    if isinstance(value, (bytes, bytearray)):
        head = bytes(value[: width + 2])
        text = repr(head) if kind is bytes else f"bytearray({head!r})"
        return _cut(text, width) if len(value) > width else text
    return None


_BRACKETS = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"), frozenset: ("frozenset({", "})")}


def show(value: Any, width: int = DEFAULT_WIDTH) -> str:
    """A ``repr``-like text of ``value`` of at most ``width`` characters that never raises.

    Scalars read as ``repr`` does (an integer too long for ``str`` reads
    ``<int of about N digits>``); lists, tuples, sets and dicts show their
    first items one level deep; anything else shows its type name (no
    ``__repr__`` of a value from a file runs).

    Args:
        value: anything.
        width: the most characters returned (at least 8 are used).

    Returns:
        The text.
    """
    width = max(8, width)
    try:
        text = _leaf(value, width)
        if text is not None:
            return text
        return _cut(_container(value, width), width)
    except Exception:  # noqa: BLE001  # a formatter for error messages must not raise
        return f"<{type(value).__name__}>"


def _container(value: Any, width: int) -> str:
    kind = type(value)
    if isinstance(value, dict):
        parts = []
        for i, (k, v) in enumerate(dict.items(value)):
            if i == _ITEMS_SHOWN:
                parts.append("...")
                break
            parts.append(f"{_brief(k, width)}: {_brief(v, width)}")
        inner = "{" + ", ".join(parts) + "}"
        return inner if kind is dict else f"{kind.__name__}({inner})"
    for base, (open_, close) in _BRACKETS.items():
        if isinstance(value, base):
            items = []
            for i, item in enumerate(value):
                if i == _ITEMS_SHOWN:
                    items.append("...")
                    break
                items.append(_brief(item, width))
            trail = "," if base is tuple and len(items) == 1 else ""
            return open_ + ", ".join(items) + trail + close
    return _named(value)


def _brief(value: Any, width: int) -> str:
    """An item inside a container: a scalar's text, or only the type of a nested value."""
    text = _leaf(value, min(width, 40))
    return text if text is not None else _named(value, nested=True)


def _named(value: Any, *, nested: bool = False) -> str:
    kind = type(value)
    if nested and isinstance(value, (dict, list, tuple, set, frozenset)):
        return f"<{kind.__name__} of {len(value)}>"
    name = None
    if kind.__name__ == "GlobalRef":
        name = getattr(value, "name", None)
    elif kind.__name__ == "OpaqueObject":
        name = getattr(getattr(value, "cls", None), "name", None)
    if type(name) is str:
        return f"<{kind.__name__} {_cut(name, 60)}>"
    return f"<{kind.__name__}>"


def segment(value: Any) -> str:
    """A dict key or index as it appears in a name or a path: ``str(value)``, except that an integer
    too long for ``str`` reads ``<int of about N digits>`` and a value whose ``str`` fails reads as
    :func:`show` gives it.

    Not truncated (a tensor's name is its path in the state); never raises.
    """
    if type(value) is str:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_text(int(value))
    try:
        return str(value)
    except Exception:  # noqa: BLE001
        return show(value)
