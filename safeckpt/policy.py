"""Which globals a legacy pickle may name: the allowlist, the blocklist, and everything else.

Three answers, decided from the name alone and never by importing it:

- **allowed**: a pure constructor that safeckpt re-implements itself (tensor
  rebuild helpers, OrderedDict, numpy array reconstruction, dtypes, ...). Each
  entry below says why it is safe. The reader calls *its own* implementation,
  never the object the name would import.
- **dangerous**: a module or callable that can run code, touch the file system,
  the network or the interpreter when ``torch.load(weights_only=False)`` or
  ``pickle.load`` resolves it, and nothing else (see ``DANGEROUS_MODULE_REASONS``,
  ``DANGEROUS_GLOBALS``, ``DANGEROUS_PREFIXES``). It is dangerous however it is
  spelled: every window of the dotted name ``module.qualname`` (a module reached
  as an attribute: ``torch:serialization.os.system``), Python 2 names
  (``commands``, ``cPickle``, ``__builtin__``), dunder attributes, and every builtin
  outside ``HARMLESS_BUILTINS``. A file that names one *in any way* (called,
  instantiated, or merely referenced) is refused. Nothing overrides this list:
  ``allowed_globals`` entries naming one are ignored with a warning.
- **unknown**: everything else (your model classes, optimizers, enums...). It
  becomes an inert ``GlobalRef``/``OpaqueObject`` and is never imported.
"""

from __future__ import annotations

import _compat_pickle

__all__ = [
    "ALLOWED",
    "DANGEROUS_GLOBALS",
    "DANGEROUS_LEAVES",
    "DANGEROUS_MODULES",
    "DANGEROUS_MODULE_REASONS",
    "DANGEROUS_PREFIXES",
    "HARMLESS_BUILTINS",
    "canonical",
    "classify",
]

_STORAGE_TYPES = (
    "Double Float Half BFloat16 Long Int Short Char Byte Bool ComplexDouble ComplexFloat "
    "QUInt8 QInt8 QInt32 QUInt4x2 QUInt2x4"
).split()

#: "module:qualname" -> why rebuilding it (with safeckpt's own code) cannot run anything else.
ALLOWED: dict[str, str] = {
    "collections:OrderedDict": "builds an ordered dict from pairs; state_dict() containers",
    "builtins:set": "builds a set from hashable items",
    "builtins:frozenset": "builds a frozenset from hashable items",
    "builtins:complex": "builds a complex number from two numbers",
    "builtins:bytearray": "builds a bytearray from bytes or a latin-1 str",
    "builtins:slice": "builds a slice from ints or None",
    "builtins:range": "builds a lazy range from ints (no allocation)",
    "__builtin__:xrange": "Python 2 name of builtins.range",
    "builtins:Ellipsis": "the Ellipsis constant",
    "builtins:NotImplemented": "the NotImplemented constant",
    "builtins:object": "only as the base type argument of copyreg._reconstructor",
    "builtins:str": "only as the base type argument of copyreg._reconstructor",
    "builtins:int": "only as the base type argument of copyreg._reconstructor",
    "builtins:float": "only as the base type argument of copyreg._reconstructor",
    "builtins:list": "only as the base type argument of copyreg._reconstructor",
    "builtins:dict": "only as the base type argument of copyreg._reconstructor",
    "builtins:tuple": "only as the base type argument of copyreg._reconstructor",
    "__builtin__:set": "Python 2 name of builtins.set",
    "__builtin__:frozenset": "Python 2 name of builtins.frozenset",
    "__builtin__:complex": "Python 2 name of builtins.complex",
    "__builtin__:object": "Python 2 name of builtins.object",
    "_codecs:encode": "how protocol 2 writes bytes: encode(str, 'latin1'); only text codecs are accepted",
    "copyreg:_reconstructor": "protocol 0/1 instance creation; turned into an inert OpaqueObject",
    "copy_reg:_reconstructor": "Python 2 name of copyreg._reconstructor",
    "torch._utils:_rebuild_tensor": "pre-1.6 tensor: a view (offset, size, stride) of a storage, bounds-checked",
    "torch._utils:_rebuild_tensor_v2": "tensor as a bounds-checked view of a storage, plus requires_grad",
    "torch._utils:_rebuild_tensor_v3": "tensor view of an untyped storage with an explicit dtype",
    "torch._utils:_rebuild_parameter": "wraps a rebuilt tensor in nn.Parameter with requires_grad",
    "torch._utils:_rebuild_parameter_with_state": "as _rebuild_parameter; extra state is kept only if plain data",
    "torch._utils:_rebuild_from_type_v2": "a tensor of type Tensor or Parameter rebuilt by an allowed helper",
    "torch._tensor:_rebuild_from_type_v2": "same helper, where torch 2.x defines it",
    "torch.nn.parameter:Parameter": "the Parameter type, as an argument of _rebuild_from_type_v2",
    "torch._tensor:Tensor": "the Tensor type, as an argument of _rebuild_from_type_v2",
    "torch:Tensor": "the Tensor type, as an argument of _rebuild_from_type_v2",
    "torch:Size": "a tuple of ints",
    "torch:device": "a device from its string",
    "torch.torch_version:TorchVersion": "a str subclass holding torch.__version__",
    "torch.storage:UntypedStorage": "storage type tag inside a persistent id; bytes come from the archive",
    "torch:UntypedStorage": "storage type tag inside a persistent id",
    "numpy.core.multiarray:_reconstruct": "an empty ndarray whose BUILD state (shape, dtype, raw bytes) is checked",
    "numpy._core.multiarray:_reconstruct": "numpy 2 name of the same",
    "numpy.core.multiarray:scalar": "a numpy scalar from a dtype and its raw bytes",
    "numpy._core.multiarray:scalar": "numpy 2 name of the same",
    "numpy.core.numeric:_frombuffer": "protocol 5 ndarray from in-band bytes, a checked dtype, shape and order",
    "numpy._core.numeric:_frombuffer": "numpy 2 name of the same",
    "numpy:ndarray": "the ndarray type, as an argument of _reconstruct",
    "numpy:dtype": "a plain (non-object, non-structured) dtype from its code",
}
for _kind in _STORAGE_TYPES:
    ALLOWED[f"torch:{_kind}Storage"] = "typed storage tag inside a persistent id; fixes the dtype"
    ALLOWED[f"torch.cuda:{_kind}Storage"] = "CUDA typed storage tag; the bytes load onto the requested device"
for _dtype in (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool complex32 complex64 "
    "complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu double float half long "
    "int short cfloat cdouble"
).split():
    ALLOWED[f"torch:{_dtype}"] = "a torch.dtype constant"

#: why each group of modules is refused (every name in them, and their submodules).
DANGEROUS_MODULE_REASONS: dict[str, str] = {
    "os posix nt sys subprocess _posixsubprocess pty signal resource fcntl pwd grp termios platform sysconfig "
    "_multiprocessing multiprocessing concurrent threading _thread asyncio _winapi msvcrt winreg _osx_support "
    "mailcap faulthandler tty _posixshmem _xxsubinterpreters _interpreters _xxinterpchannels _testcapi "
    "_testinternalcapi": "processes, shells, signals and the interpreter's own state (faulthandler._sigsegv "
    "crashes it, _xxsubinterpreters.run_string runs source)",
    "importlib imp _imp _frozen_importlib _frozen_importlib_external pkgutil runpy zipimport site unittest "
    "_sitebuiltins": "imports or runs modules by name (_frozen_importlib is importlib's bootstrap, "
    "unittest.mock._importer and unittest.main import by name, _sitebuiltins' help runs pydoc's pager)",
    "code codeop pdb bdb timeit profile cProfile trace doctest inspect gc idlelib tkinter turtle pydoc pydoc_data "
    "ast dis compileall py_compile tokenize linecache": "compiles, runs or debugs source text (pydoc.pipepager runs a shell)",
    "pickle _pickle cPickle pickletools dill cloudpickle joblib marshal shelve yaml jsonpickle": "deserialisers that run code",
    "ctypes _ctypes cffi mmap": "native code and raw memory",
    "socket _socket ssl select selectors urllib urllib2 http httplib ftplib smtplib telnetlib poplib imaplib "
    "nntplib xmlrpc socketserver requests httpx aiohttp paramiko webbrowser antigravity": "the network (importing "
    "antigravity opens a web browser)",
    "shutil tempfile io _io fileinput posixpath ntpath genericpath pathlib glob zipfile tarfile gzip bz2 lzma dbm "
    "sqlite3 logging.config logging.handlers wave aifc sunau mailbox readline rlcompleter zipapp": "the file "
    "system (posixpath and ntpath are os.path and re-export os; wave.open, mailbox.Maildir, "
    "readline.write_history_file and logging's handlers create files)",
    "setuptools distutils pip ensurepip venv": "build tools that spawn processes",
    "torch.jit torch.hub torch.package torch.utils.cpp_extension torch._dynamo torch._inductor torch.ops torch._ops "
    "torch.fx torch.distributed.rpc torch.serialization torch.multiprocessing torch.utils.collect_env "
    "torch.utils.data.datapipes torch._export torch.export torch.compiler torch.utils.model_zoo torch.classes "
    "torch._classes torch.library torch._library torch.testing._internal torch.distributed.distributed_c10d "
    "torch.distributed.elastic torch.distributed.launcher torch.distributed.run torch.distributed.launch "
    "torch.utils.benchmark torch.utils.tensorboard torch.onnx torch.utils.show_pickle torch.cuda.memory": "torch "
    "loaders, compilers, hub downloads (model_zoo.load_url), operator and class registries "
    "(classes.load_library loads a shared library), collect_env.run and the test helpers' shell (shell "
    "commands), c10d's object collectives (they unpickle), elastic's process launchers, and writers "
    "of files (tensorboard, onnx, memory snapshots)",
    "numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.npyio numpy.lib._npyio_impl "
    "numpy.lib._datasource numpy._pytesttester": "numpy runstring, compilers, native loading, pickle-enabled "
    "loaders and file readers and writers (numpy 2 defines them in private modules), and the test runner",
}
DANGEROUS_MODULES: frozenset[str] = frozenset(n for names in DANGEROUS_MODULE_REASONS for n in names.split())

#: single names refused in modules that are otherwise merely unknown: loaders that unpickle
#: (torch.load, numpy.load, read_array), file access (from_file, memmap, codecs.open), call
#: composers (attrgetter, methodcaller, partial, reduce), code and function constructors
#: (types.*), copyreg's extension registry, compilers (torch.compile) and DataLoader workers.
DANGEROUS_GLOBALS: frozenset[str] = frozenset(
    """
    torch:load torch:save torch:from_file torch.storage:_load_from_bytes torch:_load_global_deps
    numpy:load numpy:loads numpy:save numpy:fromfile numpy:memmap numpy.core.multiarray:_reconstruct_from_file
    operator:attrgetter operator:methodcaller functools:reduce functools:partialmethod
    copyreg:add_extension copyreg:remove_extension copyreg:_reduce_ex copyreg:__reduce_ex__
    types:FunctionType types:LambdaType types:CodeType types:MethodType types:ModuleType types:new_class
    functools:partial numpy.lib.format:read_array numpy.lib.format:open_memmap torch.storage:_load_from_bytes
    codecs:open torch:compile torch:_dynamo torch.utils.data:DataLoader torch.utils.data.dataloader:DataLoader
    operator:call logging:FileHandler logging:basicConfig
    """.split()
)

#: name prefixes refused in modules that also hold harmless names (torch._C holds Generator).
DANGEROUS_PREFIXES: tuple[str, ...] = (
    "torch._C:_jit",
    "torch._C:import_ir_module",
    "torch._C:_load_for_lite_interpreter",
    "torch._C:_import_ir_module",
    "torch._C:_load",
    "torch._C._jit",
    "uuid:_",  # uuid's private helpers run ifconfig, ip, arp, netstat... (_get_command_stdout)
)

#: names dangerous in EVERY module of their package, since the package defines them in one module
#: and re-exports them from others (``numpy.memmap`` is ``numpy._core.memmap.memmap``,
#: ``torch.hub.load_state_dict_from_url`` is ``torch.utils.model_zoo.load_url``,
#: ``torch.from_file`` is also ``torch.UntypedStorage.from_file``): the last part of the name is
#: matched wherever it sits in the package. Loaders that unpickle, readers and writers of files by
#: path, shared-library loaders.
DANGEROUS_LEAVES: dict[str, frozenset[str]] = {
    "numpy": frozenset(
        """load loads save savez savez_compressed savetxt loadtxt genfromtxt fromregex fromfile tofile memmap
        open_memmap read_array DataSource test _reconstruct_from_file""".split()
    ),
    "torch": frozenset(
        """load save from_file _load_from_bytes load_url load_state_dict_from_url load_library _load_global_deps
        _tensor_to_object _object_to_tensor compile export _dump_snapshot _save_segment_usage _save_memory_usage
        _record_memory_history _load_for_lite_interpreter""".split()
    ),
}

#: builtins that are allowed (above); every other builtin is refused: eval, exec, compile,
#: getattr, setattr, delattr, __import__, open, globals, vars, input, breakpoint, type, ...
_BUILTIN_MODULES = ("builtins", "__builtin__")


def _in_module(module: str, names: frozenset[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))


def _spellings(module: str, qualname: str) -> list[tuple[str, str]]:
    """The name as written, then as Python 3's unpickler maps Python 2 names (``commands:Popen``
    is ``subprocess:Popen`` to ``pickle.load``); the last one is what would be imported."""
    names = [(module, qualname)]
    mapped = _compat_pickle.NAME_MAPPING.get((module, qualname))
    if mapped:
        names.append(mapped)
    elif module in _compat_pickle.IMPORT_MAPPING:
        names.append((_compat_pickle.IMPORT_MAPPING[module], qualname))
    return names


def canonical(module: str, qualname: str) -> str:
    """``"module:qualname"`` as Python 3's unpickler would resolve it."""
    module, qualname = _spellings(module, qualname)[-1]
    return f"{module}:{qualname}"


#: builtins that are plain values or pure constructors: never "dangerous" (allowed above when
#: safeckpt rebuilds them, else unknown). Every other builtin is dangerous.
HARMLESS_BUILTINS: frozenset[str] = frozenset(
    """
    range xrange Ellipsis NotImplemented None True False bool bytes int long float complex str unicode
    basestring tuple list dict set frozenset bytearray slice object
    BaseException Exception ArithmeticError LookupError ValueError TypeError KeyError IndexError
    RuntimeError NotImplementedError AttributeError OverflowError ZeroDivisionError StopIteration
    Warning UserWarning DeprecationWarning FutureWarning RuntimeWarning
    """.split()
)


def _module_names(module: str) -> list[str]:
    """``module``, what Python 3's unpickler imports for it (``cPickle`` -> ``pickle``), and the
    module a C accelerator ``_name`` implements (``_operator`` is ``operator``, ``_functools`` is
    ``functools``, ``_pickle`` is ``pickle``: the same callables under another module name)."""
    names = [module]
    head, dot, tail = module.partition(".")
    mapped = _compat_pickle.IMPORT_MAPPING.get(module) or _compat_pickle.IMPORT_MAPPING.get(head)
    if mapped:
        names.append(mapped if module in _compat_pickle.IMPORT_MAPPING else f"{mapped}.{tail}")
    if head.startswith("_") and not head.startswith("__") and len(head) > 1:
        names.append(f"{head[1:]}{dot}{tail}")
    return names


def _leaf_listed(module: str, qualname: str) -> bool:
    """The name's last part is one of its package's :data:`DANGEROUS_LEAVES`."""
    leaves = DANGEROUS_LEAVES.get(module.partition(".")[0])
    return leaves is not None and (qualname or module).rpartition(".")[2] in leaves


def _split_listed(module: str, qualname: str) -> bool:
    """One module/qualname split of a name, in every spelling, against the blocklist."""
    spellings = [(m, qualname) for m in _module_names(module)]
    mapped = _compat_pickle.NAME_MAPPING.get((module, qualname))
    if mapped:
        spellings.append(mapped)
    for m, q in spellings:
        name = f"{m}:{q}"
        if _in_module(m, DANGEROUS_MODULES) or name in DANGEROUS_GLOBALS or name.startswith(DANGEROUS_PREFIXES):
            return True
        if _leaf_listed(m, q):
            return True
        if m in _BUILTIN_MODULES and q and q not in HARMLESS_BUILTINS and name not in ALLOWED:
            return True
    return False


def _listed(module: str, qualname: str) -> bool:
    """On the blocklist however it is spelled.

    Python's unpickler imports ``module`` then walks ``qualname`` with getattr, so
    ``torch:serialization.os.system`` is ``os.system`` reached through attributes. The
    name is dangerous when any dunder part appears, or when ANY window of the dotted name
    followed by the rest (where a module object may sit) names a dangerous module, global or prefix, in its
    Python 3 or Python 2 spelling.
    """
    mod_parts = module.split(".")
    q_parts = qualname.split(".")
    if any(p.startswith("__") and p.endswith("__") for p in q_parts):
        return True
    full = mod_parts + q_parts
    # every start: the unpickler imports ``module`` through sys.modules, where packages may
    # register aliases ("os.path", "six.moves"), so a module part can hide a module too.
    for i in range(len(full)):
        # past the module, a window must be followed by an attribute: "Mode.trace" (an enum
        # member named like a module) is a value, "Mode.trace.main" walks into a module.
        for j in range(i + 1, len(full) + 1 if i == 0 else len(full)):
            if _split_listed(".".join(full[i:j]), ".".join(full[j:])):
                return True
    return False


def classify(module: str, qualname: str) -> str:
    """``"allowed"``, ``"dangerous"`` or ``"unknown"`` for a global, by name only.

    Dangerous when any split or spelling of it is on the blocklist (see :func:`_listed`);
    otherwise allowed when on the allowlist (as written or as Python 3 spells it),
    dangerous for a builtin outside :data:`HARMLESS_BUILTINS`, unknown for the rest.
    """
    spellings = _spellings(module, qualname)
    if any(_listed(m, q) for m, q in spellings):
        return "dangerous"
    if any(f"{m}:{q}" in ALLOWED for m, q in spellings):
        return "allowed"
    m, q = spellings[-1]
    if m in _BUILTIN_MODULES and q not in HARMLESS_BUILTINS:
        return "dangerous"
    return "unknown"
