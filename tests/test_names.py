"""Global names: every spelling of a dangerous callable is dangerous, and allowed names never walk into modules."""

from __future__ import annotations

import logging
import pickle
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt.errors import UnsafeCheckpointError
from safeckpt.policy import classify
from safeckpt.refs import AllowList, GlobalRef

# (name, why it runs code or touches the system)
DANGEROUS_SPELLINGS = [
    "torch:serialization.os.system",  # os reached as an attribute of torch.serialization
    "torch:_utils.os.system",
    "torch.serialization:os.system",
    "torch:hub.load",  # downloads and runs hubconf.py
    "torch:storage._load_from_bytes",  # torch.load on bytes
    "torch.nn.modules.module:torch.storage._load_from_bytes",  # torch reached as an attribute
    "torch:load",
    "torch:jit.load",
    "torch:_inductor.codecache.PyCodeCache.load",
    "torch:ops.aten.sym_size",
    "torch:_ops.ops",
    "torch.utils.collect_env:run",  # runs a shell command
    "torch:utils.collect_env.run",
    "pydoc:pipepager",  # pipes into a shell command
    "pdb:run",
    "timeit:timeit",
    "cProfile:run",
    "trace:Trace.runctx",
    "idlelib.pyshell:main",
    "distutils.spawn:spawn",
    "setuptools:sandbox.run_setup",
    "os:system",
    "os.path:os.system",
    "posixpath:os.system",  # os.path's module re-exports os
    "posix:system",  # Python 2 / C spelling of os
    "nt:system",
    "commands:getoutput",  # Python 2 subprocess
    "subprocess:Popen",
    "asyncio.subprocess:create_subprocess_shell",
    "shutil:rmtree",
    "importlib:import_module",
    "runpy:run_path",
    "code:InteractiveInterpreter.runsource",
    "pty:spawn",
    "ctypes:CDLL",
    "multiprocessing.util:spawnv_passfds",
    "numpy.testing._private.utils:runstring",  # exec()s a string
    "numpy:load",  # allow_pickle loads
    "pickle:loads",
    "cPickle:loads",  # Python 2 pickle
    "_pickle:loads",
    "marshal:loads",
    "types:FunctionType",
    "types:CodeType",
    "operator:attrgetter",
    "operator:methodcaller",
    "functools:partial",
    "builtins:getattr",
    "builtins:eval",
    "builtins:exec",
    "builtins:__import__",
    "__builtin__:eval",  # Python 2 builtins
    "__builtin__:open",
    "__builtin__:execfile",
    "builtins:breakpoint",
    "sys:modules",
    "collections:OrderedDict.__reduce__",  # dunder attributes are never followed
    "webbrowser:open",
    "pathlib:Path.write_text",
    "zipfile:ZipFile.extractall",
]

HARMLESS = {
    "builtins:range": "allowed",
    "__builtin__:xrange": "allowed",
    "builtins:Ellipsis": "allowed",
    "__builtin__:Ellipsis": "allowed",
    "builtins:NotImplemented": "allowed",
    "builtins:slice": "allowed",
    "builtins:complex": "allowed",
    "builtins:bytearray": "allowed",
    "builtins:frozenset": "allowed",
    "exceptions:ValueError": "unknown",
    "builtins:bytes": "unknown",
    "collections:OrderedDict": "allowed",
    "torch.nn.modules.linear:Linear": "unknown",
    "mymodel:Mode.trace": "unknown",  # an enum member named like a module is a value
}


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def stack_global_call(module: str, qualname: str, arg: str) -> bytes:
    """PROTO 4, STACK_GLOBAL(module, qualname), called with one string argument."""
    return b"\x80\x04" + _text(module) + _text(qualname) + b"\x93" + _text(arg) + b"\x85R."


def global_call(module: str, qualname: str, arg: str) -> bytes:
    """Protocol 0 GLOBAL opcode, called with one string argument."""
    return b"c" + f"{module}\n{qualname}\n".encode() + b"(" + _text(arg) + b"tR."


@pytest.mark.parametrize("name", DANGEROUS_SPELLINGS)
def test_every_spelling_is_dangerous(name: str) -> None:
    assert classify(*name.split(":", 1)) == "dangerous"


@pytest.mark.parametrize(("name", "expected"), sorted(HARMLESS.items()))
def test_harmless_builtins_are_not_dangerous(name: str, expected: str) -> None:
    assert classify(*name.split(":", 1)) == expected


@pytest.mark.parametrize("build", [stack_global_call, global_call])
@pytest.mark.parametrize("name", DANGEROUS_SPELLINGS)
def test_allowing_a_dangerous_spelling_never_runs_it(
    name: str, build, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "payload.pkl"
    module, qualname = name.split(":", 1)
    path.write_bytes(build(module, qualname, f"touch {sentinel}"))
    assert safeckpt.scan(path).verdict == "dangerous"
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        with pytest.raises(UnsafeCheckpointError) as info:
            safeckpt.load(path, allowed_globals=[name])
    assert name in info.value.globals
    assert name in caplog.text and "ignored" in caplog.text
    assert not sentinel.exists()


@pytest.mark.parametrize("name", DANGEROUS_SPELLINGS)
def test_allowlist_refuses_every_spelling(name: str) -> None:
    allow = AllowList([name])
    assert name in allow.refused and not allow.names
    assert allow.resolve(GlobalRef.parse(name)) == GlobalRef.parse(name)


@pytest.mark.parametrize(
    "name", ["torch:serialization.os", "posixpath:os.system", "collections:abc.Mapping", "torch:nn.Linear"]
)
def test_resolve_never_walks_through_a_module(name: str) -> None:
    with pytest.raises(ValueError, match="module reached as an attribute"):
        GlobalRef.parse(name).resolve()


def test_resolve_refuses_dunders_and_non_class_steps() -> None:
    with pytest.raises(ValueError, match="dunder"):
        GlobalRef("collections", "OrderedDict.__init__").resolve()
    with pytest.raises(ValueError, match="not a class, function or enum member"):
        GlobalRef("logging", "root").resolve()  # a module-level instance
    with pytest.raises(ValueError, match="not a class, so"):
        GlobalRef("logging", "root.manager").resolve()


def test_resolve_still_finds_classes_functions_and_enum_members() -> None:
    import collections
    import enum
    import os.path

    assert GlobalRef("collections", "OrderedDict").resolve() is collections.OrderedDict
    assert GlobalRef("os.path", "join").resolve() is os.path.join
    assert GlobalRef("enum", "Enum").resolve() is enum.Enum
    assert GlobalRef("logging", "Logger.info").resolve() is logging.Logger.info


@pytest.mark.parametrize("proto", [0, 2, 5])
def test_range_ellipsis_and_friends_load(proto: int, tmp_path: Path) -> None:
    import torch

    state = {"r": range(3, 10, 2), "e": Ellipsis, "n": NotImplemented, "s": slice(1, None, 2), "z": complex(1, 2)}
    path = tmp_path / "consts.pt"
    torch.save(state, path, pickle_protocol=proto)
    assert safeckpt.scan(path).verdict == "safe"
    assert safeckpt.load(path) == state


def test_range_arguments_at_the_boundary_load(tmp_path: Path) -> None:
    path = tmp_path / "r.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nxrange\n" + pickle.dumps((1, 2, 3), protocol=2)[2:-1] + b"R.")
    assert safeckpt.load(path) == range(1, 2, 3)


@pytest.mark.parametrize("args", [(), (1, 2, 3, 4), (1.5,), (1, 2, 0), ("a",)])
def test_range_arguments_are_checked(args: tuple, tmp_path: Path) -> None:
    path = tmp_path / "r.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nxrange\n" + pickle.dumps(args, protocol=2)[2:-1] + b"R.")
    with pytest.raises(safeckpt.SafeCkptError):
        safeckpt.load(path)


# property: a dangerous target spelled through any module/qualname split, behind any prefix of
# plain attributes, in any Python 2 spelling, is dangerous.
_TARGETS = ["os.system", "subprocess.Popen", "posix.system", "builtins.eval", "pickle.loads", "torch.hub.load",
            "torch.storage._load_from_bytes", "pydoc.pipepager", "importlib.import_module", "cPickle.loads",
            "commands.getoutput", "__builtin__.exec", "runpy.run_module", "shutil.rmtree", "torch.load"]
_PREFIXES = ["", "torch.", "torch.serialization.", "numpy.", "collections.", "mymod.sub.", "torch._utils."]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_TARGETS), st.sampled_from(_PREFIXES), st.integers(min_value=1, max_value=8))
def test_every_split_of_a_dangerous_name_is_caught(target: str, prefix: str, cut: int) -> None:
    parts = (prefix + target).split(".")
    cut = min(cut, len(parts) - 1)
    module, qualname = ".".join(parts[:cut]), ".".join(parts[cut:])
    assert classify(module, qualname) == "dangerous", f"{module}:{qualname}"
