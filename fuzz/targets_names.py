"""Targets for the ``names`` harness: global names however they are spelled.

Input: one mode byte, then ``module\\nqualname`` in UTF-8.

- mode % 3 == 0, structured: the bytes pick a dangerous target, a prefix of plain
  attributes, a Python 2 spelling and a split point, so the name is dangerous by
  construction; safeckpt must class it dangerous, scan must say so, and loading with
  the name allowed must raise ``UnsafeCheckpointError`` without running anything.
- mode % 3 == 1, free form: the fuzzed name as a STACK_GLOBAL / GLOBAL pickle. If the
  name, as Python 3's unpickler spells it (``policy.canonical``), contains a curated
  dangerous target as a window of its dotted parts, safeckpt must class it dangerous
  (decided from the spelling only, nothing is imported); reading it raises only
  ``SafeCkptError`` and never runs it.
- mode % 3 == 2, resolve: the fuzzed qualname under a fixed, harmless, already imported
  module; ``GlobalRef.resolve`` must never return a module.
"""

from __future__ import annotations

import os
import struct
import types
from pathlib import Path

import targets

from safeckpt import load, scan
from safeckpt.errors import SafeCkptError, UnsafeCheckpointError
from safeckpt.policy import canonical, classify
from safeckpt.refs import GlobalRef

# canonical dotted spelling of what would run code; every one is a documented blocklist entry
DANGEROUS_TARGETS = (
    "os.system", "posix.system", "nt.system", "subprocess.Popen", "subprocess.getoutput", "builtins.eval",
    "builtins.exec", "builtins.getattr", "builtins.__import__", "builtins.open", "pickle.loads", "marshal.loads",
    "importlib.import_module", "runpy.run_path", "pydoc.pipepager", "torch.hub.load", "torch.load",
    "torch.storage._load_from_bytes", "torch.utils.collect_env.run", "shutil.rmtree", "pty.spawn", "ctypes.CDLL",
    "numpy.testing._private.utils.runstring", "types.CodeType", "operator.methodcaller", "functools.partial",
    "_operator.attrgetter", "_functools.partial", "_frozen_importlib._gcd_import", "logging.FileHandler",
    "numpy._core.memmap.memmap", "numpy.lib._npyio_impl.load", "torch.utils.model_zoo.load_url",
    "torch.UntypedStorage.from_file", "torch.classes.load_library", "faulthandler._sigsegv",
)
PY2 = {"builtins": "__builtin__", "subprocess": "commands", "pickle": "cPickle", "os": "posix"}
PREFIXES = ("", "torch.", "torch.serialization.", "torch._utils.", "numpy.", "collections.", "mod.a.b.")
RESOLVE_MODULES = ("collections", "enum", "torch.nn", "numpy", "os.path", "logging", "torch")


def _text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle(module: str, qualname: str, arg: str, stack: bool) -> bytes | None:
    if stack:
        return b"\x80\x04" + _text(module) + _text(qualname) + b"\x93" + _text(arg) + b"\x85R."
    if "\n" in module or "\n" in qualname:
        return None
    return b"c" + f"{module}\n{qualname}\n".encode("utf-8", "surrogatepass") + b"(" + _text(arg) + b"tR."


def _canonically_dangerous(module: str, qualname: str) -> bool:
    try:
        GlobalRef(module, qualname)
    except ValueError:  # not dotted Python names: pickle could not import it either
        return False
    parts = canonical(module, qualname).replace(":", ".").split(".")
    dotted = "." + ".".join(parts) + "."
    return any(f".{t}." in dotted for t in DANGEROUS_TARGETS)


def _check_file(module: str, qualname: str, stack: bool, dangerous: bool) -> None:
    work = Path(targets.workdir())
    sentinel = work / "PWNED"
    data = _pickle(module, qualname, f"touch {sentinel}", stack)
    if data is None:
        return
    path = work / "names.pkl"
    path.write_bytes(data)
    try:
        verdict = scan(path).verdict
    except SafeCkptError:  # a malformed call (range("x")): the scanner may refuse the whole file
        verdict = "error"
    if dangerous and verdict not in ("dangerous",):
        raise AssertionError(f"scan says {verdict!r} for {module}:{qualname}")
    name = f"{module}:{qualname}"
    try:
        allowed = [GlobalRef(module, qualname)]
    except ValueError:  # not a dotted Python name: the caller could not allow it anyway
        allowed = []
    try:
        load(path, allowed_globals=allowed)
    except UnsafeCheckpointError:
        pass
    except SafeCkptError:
        if dangerous:
            raise AssertionError(f"{name} was not refused as unsafe") from None
    else:
        if dangerous:
            raise AssertionError(f"{name} loaded")
    if sentinel.exists():
        os.unlink(sentinel)
        raise AssertionError(f"{name} ran")


def names(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, rest = data[0], data[1:]
    if mode % 3 == 0:
        target = DANGEROUS_TARGETS[rest[0] % len(DANGEROUS_TARGETS)]
        prefix = PREFIXES[(rest[1] if len(rest) > 1 else 0) % len(PREFIXES)]
        head, _, tail = target.partition(".")
        if len(rest) > 2 and rest[2] & 1 and head in PY2:
            target = f"{PY2[head]}.{tail}"
        parts = (prefix + target).split(".")
        cut = 1 + (rest[3] if len(rest) > 3 else 0) % (len(parts) - 1)
        module, qualname = ".".join(parts[:cut]), ".".join(parts[cut:])
        if classify(module, qualname) != "dangerous":
            raise AssertionError(f"{module}:{qualname} is not dangerous")
        _check_file(module, qualname, bool(mode & 4), True)
        return
    text = rest.decode("utf-8", "replace")
    module, _, qualname = text.partition("\n")
    if mode % 3 == 1:
        status = classify(module, qualname)
        if status not in ("allowed", "dangerous", "unknown"):
            raise AssertionError(status)
        dangerous = _canonically_dangerous(module, qualname)
        if dangerous and status != "dangerous":
            raise AssertionError(f"{module}:{qualname} resolves to a dangerous target but is {status}")
        _check_file(module, qualname, bool(mode & 4), dangerous)
        return
    base = RESOLVE_MODULES[(rest[0]) % len(RESOLVE_MODULES)]
    try:
        ref = GlobalRef(base, qualname)
    except (ValueError, TypeError):
        return
    try:
        found = ref.resolve()
    except (ImportError, AttributeError, ValueError):
        return
    if isinstance(found, types.ModuleType):
        raise AssertionError(f"{ref.name} resolved to a module")
