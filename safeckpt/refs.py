"""Class and function references that are stored by name and never imported by accident.

A checkpoint names classes (``model_class``, ``sde_class``), functions
(``loss_fn``) and enum members. safeckpt stores each as a :class:`GlobalRef`
``("module", "qualname")`` and instances of plain-data classes as an
:class:`OpaqueObject` (a class reference plus the instance's state). On load they
stay inert unless the caller lists the name in ``allowed_globals``; only then is
the module imported and the object rebuilt.
"""

from __future__ import annotations

import enum
import importlib
import logging
import re
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedValueError
from .policy import classify

__all__ = ["AllowList", "GlobalRef", "OpaqueObject", "import_allowed", "ref_of"]

logger = logging.getLogger("safeckpt")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
MAX_NAME_LEN = 1024
#: what a module-level name may resolve to; attributes of a class may be anything but a module.
_NAMEABLE = (type, types.FunctionType, types.BuiltinFunctionType, enum.Enum)


@dataclass(frozen=True)
class GlobalRef:
    """An inert reference to a module-level class, function or enum member.

    Attributes:
        module: the module the object lives in, e.g. ``"torch.optim.adam"``.
        qualname: its qualified name inside the module, e.g. ``"Adam"`` or ``"Color.RED"``.
    """

    module: str
    qualname: str

    def __post_init__(self) -> None:
        for part in (self.module, self.qualname):
            if not isinstance(part, str) or len(part) > MAX_NAME_LEN or not _DOTTED.match(part):
                raise ValueError(f"not a valid dotted Python name: {part!r}")

    @classmethod
    def parse(cls, name: str) -> GlobalRef:
        """Build a reference from ``"module:qualname"``.

        Raises:
            ValueError: if ``name`` is not of that form.
        """
        module, sep, qualname = name.partition(":")
        if not sep:
            raise ValueError(f"expected 'module:qualname', got {name!r}")
        return cls(module, qualname)

    @property
    def name(self) -> str:
        """``"module:qualname"``, the form ``allowed_globals`` accepts."""
        return f"{self.module}:{self.qualname}"

    @property
    def short_name(self) -> str:
        """The last part of the qualname: what ``__name__`` was (``"VPSDE"`` for ``"sde:VPSDE"``)."""
        return self.qualname.rpartition(".")[2]

    def resolve(self) -> Any:
        """Import the module and return the object. This runs the module's import-time code.

        Only ``module`` is imported; ``qualname`` is walked with getattr and every step must
        be a class, a function or a plain attribute of a class: a module reached as an
        attribute (``torch:serialization.os.system``) is refused, so a name can never reach
        further than it says.

        Raises:
            ImportError: if the module cannot be imported.
            AttributeError: if the qualname does not exist in it.
            ValueError: if a step of the qualname is a module or not a class/function.
        """
        obj: Any = importlib.import_module(self.module)
        parts = self.qualname.split(".")
        for i, part in enumerate(parts):
            if part.startswith("__") and part.endswith("__"):
                raise ValueError(f"{self.name}: dunder attribute {part!r} is never followed")
            owner = obj
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType):
                raise ValueError(f"{self.name}: {part!r} is a module reached as an attribute; name it by its own module")
            last = i == len(parts) - 1
            if not last and not isinstance(obj, type):
                raise ValueError(f"{self.name}: {part!r} is not a class, so the name cannot go through it")
            if not isinstance(owner, type) and not isinstance(obj, _NAMEABLE):
                raise ValueError(f"{self.name}: {part!r} is not a class, function or enum member")
        return obj

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class OpaqueObject:
    """An instance whose class was not allowed: its class reference and state, inert.

    It mirrors pickle's reduce protocol: ``constructor`` is ``"new"`` for
    ``cls.__new__(cls, *args, **kwargs)`` or ``"call"`` for ``cls(*args, **kwargs)``;
    then ``state`` is applied (``__setstate__`` or ``__dict__``), then
    ``list_items`` appended and ``dict_items`` set.
    """

    cls: GlobalRef
    constructor: str = "new"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    state: Any = None
    list_items: list[Any] | None = None
    dict_items: list[tuple[Any, Any]] | None = None

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    def rebuild(self) -> Any:
        """Import the class and rebuild the instance. This runs the class's code."""
        return build_object(self.cls.resolve(), self)


def build_object(factory: Any, spec: OpaqueObject) -> Any:
    """Rebuild an instance from an imported class or callable and its stored parts."""
    if spec.constructor == "new":
        obj = factory.__new__(factory, *spec.args, **spec.kwargs)
    else:
        obj = factory(*spec.args, **spec.kwargs)
    state = spec.state
    if state is not None:
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            slots: dict[str, Any] = {}
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                obj.__dict__.update(state)
            for name, value in (slots or {}).items():
                setattr(obj, name, value)
    for item in spec.list_items or ():
        obj.append(item)
    for key, value in spec.dict_items or ():
        obj[key] = value
    return obj


def ref_of(obj: Any, *, path: str | None = None) -> GlobalRef:
    """The reference that names ``obj``: a module-level class, function or enum member.

    Raises:
        UnsupportedValueError: if ``obj`` cannot be found again by its name
            (a lambda, a local function or class, a bound method).
    """
    if isinstance(obj, enum.Enum):
        owner = ref_of(type(obj), path=path)
        return GlobalRef(owner.module, f"{owner.qualname}.{obj.name}")
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    where = f" at {path} (or its class)" if path and not isinstance(obj, (type, types.FunctionType)) else f" at {path}" if path else ""
    if not isinstance(module, str) or not isinstance(qualname, str) or not _DOTTED.match(module) or not _DOTTED.match(qualname):
        raise UnsupportedValueError(
            f"{obj!r}{where} is not a module-level class or function (a lambda, a local "
            f"definition or a bound method); define it at module level or leave it out of the state",
            path_in_state=path,
            value_type=type(obj).__qualname__,
        )
    found: Any = sys.modules.get(module)
    try:
        if found is None:
            found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        found = None
    if found is not obj:
        raise UnsupportedValueError(
            f"{obj!r}{where} cannot be found again as {module}:{qualname}; "
            f"define it at module level under that name or leave it out of the state",
            path_in_state=path,
            value_type=type(obj).__qualname__,
        )
    return GlobalRef(module, qualname)


def import_allowed(names: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Import ``"module:qualname"`` names as :meth:`GlobalRef.resolve` does (the one resolution of
    ``allowed_globals`` strings, for the API and the command line's ``--allow-global`` alike).

    A name on safeckpt's blocklist is never imported; it is reported with its reason.

    Returns:
        ``({name: object}, {name: why it was not found})``.
    """
    found: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name in names:
        module, sep, qualname = name.partition(":")
        if not sep or not module or not qualname:
            problems[name] = "not of the form module:qualname"
            continue
        if classify(module, qualname) == "dangerous":
            problems[name] = "safeckpt never imports it (it can run code)"
            continue
        try:
            found[name] = GlobalRef(module, qualname).resolve()
        except ImportError as exc:
            problems[name] = f"module {module!r} not found ({exc})"
        except AttributeError:
            problems[name] = f"{module} has no {qualname!r}"
        except ValueError as exc:
            problems[name] = str(exc)
    return found, problems


class AllowList:
    """The caller's ``allowed_globals``: objects, ``GlobalRef``s or ``"module:qualname"`` strings.

    A name is allowed when listed; an enum member is also allowed when its enum
    class is listed. Names on safeckpt's blocklist (:mod:`safeckpt.policy`) can
    never be allowed: they stay inert, with a warning. A string naming nothing that
    can be imported (no such module or attribute) is ignored with a warning naming
    it (:func:`import_allowed`, the command line's resolution too); ``unresolved``
    maps each such name to the reason. Nothing else is imported to build it.
    """

    names: frozenset[str]
    refused: frozenset[str]
    unresolved: dict[str, str]

    def __init__(self, allowed: Iterable[Any] | AllowList = ()) -> None:
        if isinstance(allowed, AllowList):  # already resolved (and warned about) once for this read
            self.names, self.refused, self.unresolved = allowed.names, allowed.refused, dict(allowed.unresolved)
            return
        if isinstance(allowed, (str, GlobalRef)) or callable(allowed):
            allowed = (allowed,)
        names: set[str] = set()
        strings: set[str] = set()
        for item in allowed:
            if isinstance(item, str):
                names.add(GlobalRef.parse(item).name)
                strings.add(GlobalRef.parse(item).name)
            elif isinstance(item, GlobalRef):
                names.add(item.name)
            else:
                names.add(ref_of(item).name)
        refused = {n for n in names if classify(*n.split(":", 1)) == "dangerous"}
        if refused:
            logger.warning("allowed_globals lists %s, which safeckpt never imports; ignored", ", ".join(sorted(refused)))
        _, unresolved = import_allowed(sorted(strings - refused))
        if unresolved:
            logger.warning(
                "allowed_globals: %s; ignored (what the file names stays an inert GlobalRef)",
                "; ".join(f"{name}: {why}" for name, why in unresolved.items()),
            )
        self.names = frozenset(names - refused - set(unresolved))
        self.refused = frozenset(refused)
        self.unresolved = unresolved

    def __bool__(self) -> bool:
        return bool(self.names)

    def resolve(self, ref: GlobalRef) -> Any:
        """The real object when ``ref`` is allowed, else ``ref`` itself (inert).

        Raises:
            ImportError, AttributeError: if an allowed name cannot be imported.
            ValueError: if an allowed name resolves to a module.
        """
        if ref.name in self.names:
            found = ref.resolve()
            if isinstance(found, types.ModuleType):
                raise ValueError(f"{ref.name} is a module, not a class or function")
            return found
        owner_name, dot, member = ref.qualname.rpartition(".")
        if dot and f"{ref.module}:{owner_name}" in self.names:
            owner = GlobalRef(ref.module, owner_name).resolve()
            if isinstance(owner, type) and issubclass(owner, enum.Enum) and member in owner.__members__:
                return owner[member]
        return ref


def resolve_allowed(value: Any, allow: AllowList, *, max_depth: int = 1000) -> Any:
    """Replace the ``GlobalRef``/``OpaqueObject`` placeholders in ``value`` that ``allow`` names.

    Mutable containers and inert ``OpaqueObject``s are updated in place (keeping
    shared references shared and cycles intact); tuples, sets and frozensets are
    rebuilt. A value from a pickle may contain itself: each container is visited
    once, and a tuple met again inside itself is left as it was.

    Raises:
        UnsupportedValueError: for an instance of an allowed class that contains
            itself (it would have to exist before its own arguments); leave its class
            out of ``allowed_globals`` to get it as an inert ``OpaqueObject``.
        ValueError: for nesting deeper than ``max_depth`` (never ``RecursionError``).
    """
    done: dict[int, Any] = {}
    building: set[int] = set()  # immutable values and allowed objects whose parts are being resolved

    def walk(item: Any, depth: int) -> Any:
        if depth > max_depth:
            raise ValueError(f"value nested deeper than {max_depth}")
        key = id(item)
        if key in done:
            return done[key]
        kind = type(item)
        if key in building:  # met again inside itself
            if kind is OpaqueObject:
                raise UnsupportedValueError(
                    f"an instance of the allowed class {item.cls.name} contains itself; safeckpt rebuilds "
                    "objects from their parts, so it cannot rebuild this one: leave the class out of "
                    "allowed_globals to load it as an inert OpaqueObject",
                    value_type=item.cls.name,
                )
            return item
        if kind is GlobalRef:
            out: Any = allow.resolve(item)
        elif kind is OpaqueObject:
            factory = allow.resolve(item.cls)
            if factory is item.cls:  # not allowed: stays inert, its parts resolved in place
                done[key] = item
                _resolve_parts(item, item, lambda v: walk(v, depth + 1))
                return item
            building.add(key)
            spec = OpaqueObject(item.cls, item.constructor)
            _resolve_parts(item, spec, lambda v: walk(v, depth + 1))
            building.discard(key)
            out = build_object(factory, spec)
        elif isinstance(item, dict):
            done[key] = item
            for k in list(dict.keys(item)):
                dict.__setitem__(item, k, walk(dict.__getitem__(item, k), depth + 1))
            return item
        elif kind is list:
            done[key] = item
            item[:] = [walk(v, depth + 1) for v in item]
            return item
        elif kind in (tuple, set, frozenset):
            building.add(key)
            out = kind(walk(v, depth + 1) for v in item)
            building.discard(key)
        else:
            return item
        done[key] = out
        return out

    try:
        return walk(value, 0) if allow else value
    except RecursionError as exc:
        raise ValueError(f"value nested deeper than the interpreter's stack allows (max_depth={max_depth})") from exc


def _resolve_parts(source: OpaqueObject, target: OpaqueObject, resolve: Any) -> None:
    """Set ``target``'s parts to ``source``'s, each passed through ``resolve``."""
    parts = {
        "args": tuple(resolve(a) for a in source.args),
        "kwargs": {k: resolve(v) for k, v in source.kwargs.items()},
        "state": resolve(source.state),
        "list_items": None if source.list_items is None else [resolve(v) for v in source.list_items],
        "dict_items": None
        if source.dict_items is None
        else [(resolve(k), resolve(v)) for k, v in source.dict_items],
    }
    for name, part in parts.items():
        object.__setattr__(target, name, part)
