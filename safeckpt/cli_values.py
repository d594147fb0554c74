"""Walking and summarising values for the ``safeckpt`` command line.

Small formatting helpers (:func:`shape_text`, :func:`json_key`, :func:`jsonable`,
:func:`short_repr`), the walk over a loaded state (:func:`children`, :func:`walk`,
:class:`Cycle`, :class:`Attr`, :func:`slash_path`) and one-line :func:`summary`
of a value. Nothing here reads files or prints; :mod:`safeckpt.cli_report` builds
file views and ``verify`` on top of it and re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .cli_output import plural
from .errors import LimitExceededError
from .limits import DEFAULT_LIMITS
from .refs import GlobalRef, OpaqueObject
from .tensors import dtype_name
from .text import int_fits_text, segment, show

__all__ = [
    "Attr",
    "Cycle",
    "children",
    "json_key",
    "jsonable",
    "shape_text",
    "short_repr",
    "slash_path",
    "summary",
    "walk",
]


# --------------------------------------------------------------------------- small formatting helpers


def shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    """``(16, 8)`` -> ``"[16, 8]"``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def json_key(key: Any) -> Any:
    """A component key as JSON can hold it: str, int, float, bool and None as is, anything else as text
    (an int too long for ``str`` too, as ``<int of about N digits>``)."""
    if key is None or type(key) in (str, bool) or (type(key) is float and math.isfinite(key)):
        return key
    if type(key) is int and int_fits_text(key):
        return key
    return segment(key)


def jsonable(value: Any) -> Any:
    """Metadata values (str, numbers, nested dicts and lists) as JSON can hold them."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return json_key(value)


def short_repr(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, bounded and never raising (see :func:`safeckpt.text.show`)."""
    return show(value, width)


# --------------------------------------------------------------------------- walking a state


@dataclass(frozen=True)
class Attr:
    """A path segment inside an :class:`OpaqueObject` (its ``state``, ``args``...), shown as ``<state>``."""

    name: str

    def __str__(self) -> str:
        return f"<{self.name}>"


def children(value: Any) -> list[tuple[Any, Any]] | None:
    """The ``(segment, child)`` pairs of a container, or ``None`` for a leaf.

    Mappings, lists and tuples (not ``torch.Size``) are containers, and so is an
    inert :class:`OpaqueObject` (its constructor arguments and state).
    """
    if isinstance(value, dict):
        return list(dict.items(value))
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return list(enumerate(value))
    if isinstance(value, OpaqueObject):
        parts = [
            ("args", value.args),
            ("kwargs", value.kwargs),
            ("state", value.state),
            ("list_items", value.list_items),
            ("dict_items", value.dict_items),
        ]
        return [(Attr(name), part) for name, part in parts if not _empty_part(part)]
    return None


@dataclass(frozen=True)
class Cycle:
    """Where :func:`walk` meets a container inside itself: shown in its place, not descended into.

    Attributes:
        kind: the container's type name.
        target: the path where the walk entered that container.
    """

    kind: str
    target: tuple[Any, ...]


_LEAVE = object()  # a stack marker: the walk is done with a container's children


def _empty_part(part: Any) -> bool:
    """An absent part of an OpaqueObject (``None``, ``()``, ``{}``), tested without ``==`` on the value."""
    return part is None or (type(part) in (tuple, list, dict) and not part)


def walk(
    value: Any, path: tuple[Any, ...] = (), *, max_shared: int = DEFAULT_LIMITS.max_shared_values
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every node of ``value`` as ``(path, node)``, depth first, a container before its children.

    Iterative, so a deeply nested state cannot exhaust the Python stack. A value read
    from a pickle may share containers and contain itself: a container met again inside
    itself is yielded as a :class:`Cycle` naming where it was entered, and not descended
    into; a container met again elsewhere is walked again at each place (as saving
    writes it), but at most ``max_shared`` nodes are visited that way.

    Raises:
        LimitExceededError: (``limit="max_shared_values"``) when shared containers
            expand to more than ``max_shared`` repeated nodes.
    """
    stack: list[Any] = [(path, value)]
    active: dict[int, tuple[Any, ...]] = {}  # containers being walked (the current branch) -> their path
    seen: dict[int, Any] = {}  # every container walked so far (kept alive, so ids stay unique)
    repeating = 0  # how many containers on the current branch were walked before
    repeated = 0
    while stack:
        item = stack.pop()
        if item[0] is _LEAVE:
            active.pop(item[1], None)
            repeating -= item[2]
            continue
        here, node = item
        kids = children(node)
        if kids is None:
            yield here, node
            continue
        key = id(node)
        if key in active:
            yield here, Cycle(type(node).__name__, active[key])
            continue
        again = key in seen
        repeating += again
        if repeating:
            repeated += 1 + len(kids)
            if repeated > max_shared:
                raise LimitExceededError(
                    f"the value shares containers that expand to more than {max_shared} repeated values "
                    f"(at {slash_path(here)[:200]}); a pickle's memo can multiply a small file many times over",
                    limit="max_shared_values",
                    maximum=max_shared,
                    actual=repeated,
                )
        seen[key] = node
        active[key] = here
        yield here, node
        stack.append((_LEAVE, key, again))
        stack.extend(((*here, seg), child) for seg, child in reversed(kids))


def slash_path(path: tuple[Any, ...]) -> str:
    """``("optimizer_state_dict", "state", 0, "exp_avg")`` -> ``"optimizer_state_dict/state/0/exp_avg"``: a
    value's place as the CLI prints it (errors use :func:`safeckpt.codec.render_path`, ``state['a'][0]``)."""
    return "/".join(segment(seg) for seg in path) if path else "(root)"


def summary(value: Any) -> str:
    """One line saying what a value is, without its contents (``"dict, 3 keys"``, ``"tensor float32 [4, 3]"``)."""
    if isinstance(value, Cycle):
        return f"{value.kind} containing itself (the one at {slash_path(value.target)})"
    if isinstance(value, torch.Tensor):
        return f"tensor {dtype_name(value.dtype)} {shape_text(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype} {shape_text(value.shape)}"
    if isinstance(value, GlobalRef):
        return f"reference {value.name}"
    if isinstance(value, OpaqueObject):
        return f"object {value.cls.name}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}, {plural(len(value), 'key')}"
    if isinstance(value, (list, tuple, set, frozenset)) and not isinstance(value, torch.Size):
        return f"{type(value).__name__}, {plural(len(value), 'item')}"
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__}, {len(value)} bytes"
    return f"{type(value).__name__} {short_repr(value, 50)}"
