"""TorchScript archives (``torch.jit.save``) read as data: weights out, code never run.

A TorchScript archive is a torch zip archive with ``constants.pkl``, ``data.pkl``
(the module tree: instances of ``__torch__.*`` classes, their attributes, tensors
rebuilt like ``torch.save``'s) and ``code/`` (the classes' TorchScript source,
which ``torch.jit.load`` compiles and the model runs when called). Nothing here
compiles, imports or evaluates that code: it is read as text only for what each
class declares, in the lines the TorchScript printer writes for every module
class::

    class Linear(Module):
      __parameters__ = ["weight", "bias", ]
      __buffers__ = []

An instance whose class is such a ``Module`` is a module; its state-dict entries
are the tensor attributes named in ``__parameters__`` then ``__buffers__`` (in
attribute order, ``None`` skipped), then its submodules' entries under
``<attribute>.``: the names ``torch.jit.load(...).state_dict()`` gives. Other
tensor attributes are not part of a state dict, as in torch.

This module is torch-free (``scan`` uses it); the caller says what a tensor is.
"""

from __future__ import annotations

import ast
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointFormatError, LimitExceededError
from ..refs import OpaqueObject

__all__ = ["PURE_JIT_HELPERS", "ScriptClass", "forgive_jit_helpers", "is_torchscript", "parse_code", "script_state_dict"]

#: ``torch.jit._pickle`` functions TorchScript pickles name for typed lists: each returns its
#: first argument unchanged (torch's C++ unpickler does not even import them). ``torch.jit`` is a
#: dangerous module as a whole, so inside a TorchScript archive these exact names are forgiven.
PURE_JIT_HELPERS = frozenset(
    f"torch.jit._pickle:{n}"
    for n in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_tensor_from_id",
              "restore_type_tag")
)

_CLASS = re.compile(r"^class ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_][A-Za-z0-9_.]*)\):\s*$")
_DECL = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$")
_LIST = re.compile(r'^\[(?:\s*"(?:[^"\\\n]|\\.)*"\s*,)*\s*(?:"(?:[^"\\\n]|\\.)*"\s*)?\]$')
_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')


@dataclass(frozen=True)
class ScriptClass:
    """What one class of an archive's code declares.

    Attributes:
        name: ``"module:qualname"`` as the pickle names it (``"__torch__.foo:Net"``).
        base: the base class as written (``"Module"`` for modules).
        parameters: names listed in ``__parameters__``.
        buffers: names listed in ``__buffers__``.
    """

    name: str
    base: str
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]

    @property
    def is_module(self) -> bool:
        return self.base == "Module"


def forgive_jit_helpers(report: Any) -> None:
    """Drop :data:`PURE_JIT_HELPERS` from a TorchScript archive's report (a ``vm.Report``)."""
    for name in PURE_JIT_HELPERS & set(report.uses):
        del report.uses[name]
    report.findings[:] = [
        f for f in report.findings
        if not (f.kind == "dangerous-global" and any(f.message.endswith(n) for n in PURE_JIT_HELPERS))
    ]


def is_torchscript(records: list[str]) -> bool:
    """Whether an archive's records (prefix removed) make ``torch.load`` hand it to ``torch.jit.load``."""
    return "constants.pkl" in records


def code_module(record: str) -> str | None:
    """The Python-style module a code record defines (``code/__torch__/a/b.py`` -> ``__torch__.a.b``)."""
    if not record.startswith("code/") or not record.endswith(".py"):
        return None
    return record[len("code/") : -len(".py")].replace("/", ".")


def _names(path: str, text: str) -> tuple[str, ...]:
    if not _LIST.match(text):
        raise CheckpointFormatError(f"{path}: unreadable declaration {text!r:.200}", file=path)
    out = []
    for raw in _STRING.findall(text):
        try:
            out.append(ast.literal_eval(f'"{raw}"') if "\\" in raw else raw)  # one flat string literal
        except (ValueError, SyntaxError) as exc:
            raise CheckpointFormatError(f"{path}: unreadable name {raw!r:.200}", file=path) from exc
    return tuple(out)


def parse_code(files: Mapping[str, str], path: str = "") -> dict[str, ScriptClass]:
    """Read the class declarations of an archive's code records, as text.

    Args:
        files: record name (``code/...py``) -> its text.
        path: the archive, for error messages.

    Raises:
        CheckpointFormatError: if a declaration line cannot be read as a list of names.
    """
    classes: dict[str, ScriptClass] = {}
    for record, text in files.items():
        module = code_module(record)
        if module is None:
            continue
        current: list[Any] | None = None
        for line in text.splitlines():
            match = _CLASS.match(line)
            if match:
                current = [f"{module}:{match.group(1)}", match.group(2), (), ()]
                classes[current[0]] = ScriptClass(*current)
                continue
            if current is None or not line.startswith("  "):
                if line and not line.startswith(" "):
                    current = None
                continue
            decl = _DECL.match(line)
            if decl:
                current[2 if decl.group(1) == "__parameters__" else 3] = _names(path, decl.group(2))
                classes[current[0]] = ScriptClass(*current)
    return classes


def script_state_dict(
    root: Any,
    classes: Mapping[str, ScriptClass],
    is_tensor: Callable[[Any], bool],
    *,
    max_depth: int,
    max_entries: int,
    path: str = "",
) -> OrderedDict[str, Any]:
    """The state dict of the module tree ``root`` (``data.pkl``'s value, read inertly).

    Raises:
        CheckpointFormatError: if ``root`` is not a module of a class the code declares,
            or a declared parameter or buffer is neither a tensor nor ``None``.
        LimitExceededError: if modules nest deeper than ``max_depth`` or the walk visits more
            than ``max_entries`` modules and tensors (a module shared under many names).
    """

    def module_class(value: Any) -> ScriptClass | None:
        if not isinstance(value, OpaqueObject) or type(value.state) is not dict:
            return None
        found = classes.get(value.cls.name)
        return found if found is not None and found.is_module else None

    if module_class(root) is None:
        raise CheckpointFormatError(f"{path}: the TorchScript archive's data.pkl is not a module its code declares", file=path)
    out: OrderedDict[str, Any] = OrderedDict()
    stack: list[tuple[str, Any, int]] = [("", root, 0)]
    visits = 0
    while stack:
        prefix, obj, depth = stack.pop()
        if depth > max_depth:  # also ends a module that contains itself
            raise LimitExceededError(
                f"{path}: TorchScript modules nest deeper than Limits.max_depth={max_depth}",
                limit="max_depth", maximum=max_depth, actual=depth, file=path,
            )
        visits += 1 + len(obj.state)
        if visits > max_entries:
            raise LimitExceededError(
                f"{path}: the TorchScript module tree has more than Limits.max_tensors={max_entries} entries",
                limit="max_tensors", maximum=max_entries, actual=visits, file=path,
            )
        cls = module_class(obj)
        assert cls is not None
        state: dict[Any, Any] = obj.state
        for names in (cls.parameters, cls.buffers):
            wanted = set(names)
            for key, value in state.items():
                if key not in wanted or value is None:
                    continue
                if not is_tensor(value):
                    raise CheckpointFormatError(
                        f"{path}: {prefix}{key} is declared a parameter or buffer but holds a {type(value).__name__}",
                        file=path,
                    )
                out[f"{prefix}{key}"] = value
        children = [(f"{prefix}{k}.", v, depth + 1) for k, v in state.items() if type(k) is str and module_class(v)]
        stack.extend(reversed(children))
    return out
