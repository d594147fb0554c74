"""``safeckpt diff``: two loaded checkpoints compared component by component and tensor by tensor.

Both states are flattened into ``path -> node`` (see :func:`safeckpt.cli_report.walk`).
Mappings of any kind (``dict``, ``OrderedDict``) compare alike, so a state dict
read from a plain safetensors file matches the one in a ``.pth``; lists and
tuples are told apart. Class references compare by name, so a legacy file's
inert ``GlobalRef`` equals the one its converted file stores.
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .cli_report import children, json_key, slash_path, summary, walk
from .refs import OpaqueObject

__all__ = ["DiffResult", "Difference", "diff_states"]


@dataclass(frozen=True)
class Difference:
    """One difference between A and B.

    Attributes:
        path: where, as ``component/inner/path``.
        kind: ``"missing"`` (in A only), ``"extra"`` (in B only), ``"type"``,
            ``"dtype"``, ``"shape"`` or ``"value"``.
        a, b: one-line summaries of each side (``None`` for the absent side).
        max_abs_diff: for numbers, tensors and arrays of equal shape, the largest
            absolute difference (``None`` when it does not apply or is not finite).
    """

    path: str
    kind: str
    a: str | None
    b: str | None
    max_abs_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "a": self.a, "b": self.b, "max_abs_diff": self.max_abs_diff}


@dataclass
class ComponentDiff:
    """Per top-level key: ``status`` is ``"same"``, ``"different"``, ``"missing"`` or ``"extra"``."""

    key: Any
    status: str = "same"
    tensors: int = 0
    differences: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "key": json_key(self.key),
            "status": self.status,
            "tensors": self.tensors,
            "differences": self.differences,
        }


@dataclass
class DiffResult:
    """The whole comparison; ``identical`` when there is no difference."""

    components: list[ComponentDiff] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    values: int = 0
    tensors: int = 0

    @property
    def identical(self) -> bool:
        return not self.differences


def _kind(node: Any) -> str:
    """Structural kind: containers by what they are, leaves by their type."""
    if isinstance(node, Mapping):
        return "mapping"
    if isinstance(node, OpaqueObject):
        return f"object {node.cls.name}/{node.constructor}"
    if children(node) is not None:
        return type(node).__name__
    if isinstance(node, torch.Tensor):
        return "tensor"
    return type(node).__name__


def _finite(x: Any) -> float | None:
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _within(delta: Any, b: Any, atol: float, rtol: float) -> bool:
    """``delta <= atol + rtol * |b|`` for any numbers, exactly when ints are too large for floats."""
    try:
        return bool(delta <= atol + rtol * abs(b))
    except OverflowError:  # an int beyond float range (10**400): compare as exact fractions
        if not (math.isfinite(atol) and math.isfinite(rtol)):
            return math.inf in (atol, rtol)
        return Fraction(delta) <= Fraction(atol) + Fraction(rtol) * abs(b)


def _compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float | None]:
    """(close, max abs difference) of two tensors of one shape; NaNs in the same places are equal."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.numel() == 0 or (a.dtype == b.dtype and torch.equal(a, b)):
        return True, 0.0  # the common case of a conversion check, without wide copies
    if not any(t.is_floating_point() or t.is_complex() for t in (a, b)):  # integers and bools, exactly
        x, y = a.long(), b.long()
        delta = (x - y).abs()
        return bool((delta <= atol + rtol * y.abs()).all()), _finite(delta.max())
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    x, y = a.to(wide), b.to(wide)
    same = bool(torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True).all())
    delta = (x - y).abs()
    delta = torch.where(x.isnan() & y.isnan(), torch.zeros_like(delta), delta)
    return same, _finite(delta.max())


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A numeric array as a tensor of its own dtype when torch has it (integers stay exact), else float64/complex128."""
    native = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(native)
    except TypeError:
        return torch.from_numpy(np.asarray(array, dtype=np.complex128 if array.dtype.kind == "c" else np.float64))


def _compare_leaf(a: Any, b: Any, atol: float, rtol: float) -> tuple[str | None, float | None]:
    """The kind of difference between two leaves of one type (``None`` when equal) and the max abs diff."""
    if isinstance(a, (torch.Tensor, np.ndarray)):
        if a.shape != b.shape:
            return "shape", None
        dtypes_differ = a.dtype != b.dtype
        if isinstance(a, np.ndarray):
            if a.dtype.kind not in "biufc" or b.dtype.kind not in "biufc":  # strings, objects...
                return ("dtype" if dtypes_differ else None if np.array_equal(a, b) else "value"), None
            a, b = _as_tensor(a), _as_tensor(b)
        same, delta = _compare_tensors(a, b, atol, rtol)
        if dtypes_differ:
            return "dtype", delta
        return (None if same else "value"), delta
    if isinstance(a, (int, float, complex)) and not isinstance(a, bool):
        if isinstance(a, float) and math.isnan(a) and math.isnan(b):
            return None, None
        delta = abs(a - b)
        if a == b or _within(delta, b, atol, rtol):
            return None, None
        return "value", _finite(delta)
    try:
        same = bool(a == b)
    except Exception:  # noqa: BLE001  # an __eq__ without a truth value (numpy-like)
        same = repr(a) == repr(b)
    return (None if same else "value"), None


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


def diff_states(
    a: Any, b: Any, *, atol: float = 0.0, rtol: float = 0.0, advance: Callable[[int], None] | None = None
) -> DiffResult:
    """Compare two loaded checkpoints.

    Args:
        a, b: the states (usually dicts of components; any other value is compared as one root).
        atol, rtol: tolerances for numbers, tensors and arrays (``|a-b| <= atol + rtol*|b|``); exact by default.
        advance: called with ``1`` per node compared (for a progress bar).

    Returns:
        A :class:`DiffResult`; a subtree that is missing or changes type is reported once, at its root.
    """
    flat_a = dict(walk(a))
    flat_b = dict(walk(b))
    rooted = isinstance(a, Mapping) and isinstance(b, Mapping)
    keys = list(a) + [k for k in b if k not in a] if rooted else ["(root)"]
    result = DiffResult(components=[ComponentDiff(k) for k in keys])
    per_key = {c.key: c for c in result.components} if rooted else {}
    skipped: set[tuple[Any, ...]] = set()  # roots of subtrees already reported as a whole
    paths = list(flat_a) + [p for p in flat_b if p not in flat_a]
    if rooted:
        paths.remove(())  # the two top-level mappings: their keys are the components
    for path in paths:
        if advance is not None:
            advance(1)
        if any(path[:i] in skipped for i in range(len(path))):
            continue
        component = per_key[path[0]] if rooted else result.components[0]
        x, y = flat_a.get(path, _ABSENT), flat_b.get(path, _ABSENT)
        result.values += 1
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            result.tensors += 1
            component.tensors += 1
        kind: str | None
        if x is _ABSENT or y is _ABSENT:
            kind, delta = ("missing" if y is _ABSENT else "extra"), None
        elif _kind(x) != _kind(y):
            kind, delta = "type", None
        elif children(x) is not None:
            continue
        else:
            kind, delta = _compare_leaf(x, y, atol, rtol)
            if kind is None:
                continue
        if kind in ("missing", "extra", "type"):
            skipped.add(path)
        result.differences.append(
            Difference(
                slash_path(path),
                kind,
                None if x is _ABSENT else summary(x),
                None if y is _ABSENT else summary(y),
                delta,
            )
        )
        component.differences += 1
        if kind in ("missing", "extra") and rooted and len(path) == 1:
            component.status = kind
        elif component.status == "same":
            component.status = "different"
    return result
