"""What each fuzz harness feeds its input to, without atheris.

The atheris harnesses (``fuzz/fuzz_*.py``) are thin wrappers around the
functions in :data:`TARGETS`; ``tests/test_fuzz_regressions.py`` replays saved
crash inputs through the very same functions, so a regression test runs in a
plain ``pytest`` without atheris installed.

The contract fuzzed is SPEC section 3: untrusted bytes of any kind raise
:class:`safeckpt.SafeCkptError` subclasses only. Each target therefore catches
``SafeCkptError`` and nothing else (unlike safetensors' own harness, which
catches every ``Exception``): any other exception escapes and is a crash. The
one exception is documented in :func:`manifest`: a manifest naming a sibling
file that does not exist raises ``FileNotFoundError``, which SPEC section 4
makes the documented error for a missing file.

The sample states below are shared with ``make_corpus.py``: the skeleton
harness serves the tensors of exactly these states, so the skeleton seeds
decode fully, views and tied tensors included.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import atexit
import base64
import datetime
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from torch import nn

import safeckpt
from safeckpt import Limits, SafeCkptError
from safeckpt.codec import Decoder
from safeckpt.container import encode_state, parse_root
from safeckpt.legacy import read_torch_file, scan
from safeckpt.legacy.rebuild import Rebuilder
from safeckpt.legacy.vm import Report, SymbolicUnpickler
from safeckpt.multifile import file_digest, manifest_bytes
from safeckpt.storage import FileRecord
from safeckpt.refs import AllowList, GlobalRef, OpaqueObject
from safeckpt.tensors import DTYPES_FROM_SAFETENSORS

try:  # the policy module moved from safeckpt.legacy to safeckpt
    from safeckpt.policy import classify as _classify
except ImportError:  # pragma: no cover
    from safeckpt.legacy.policy import classify as _classify

__all__ = ["ALLOWED", "LIMITS", "TARGETS", "sample_states", "write_fixed_set"]

KiB = 1 << 10

#: Tight bounds so that no single input can take long or allocate much. Seeds are
#: under 64 KiB and ``run.py`` passes ``-max_len=65536``; every seed loads under these.
LIMITS = Limits(
    max_header_bytes=256 * KiB,
    max_skeleton_bytes=256 * KiB,
    max_depth=64,
    max_tensors=256,
    max_components=128,
    max_dims=8,
    max_container_len=1 << 14,
    max_str_len=256 * KiB,
)

#: A second pass of the loaders runs with these allowed, so that resolving and
#: rebuilding allowed globals from hostile arguments is fuzzed too. All are
#: stdlib classes whose constructors only build data.
ALLOWED = (
    "argparse:Namespace",
    "datetime:timedelta",
    "types:SimpleNamespace",
    "collections:OrderedDict",
    "re:RegexFlag",
)


def _expect(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``SafeCkptError`` is an expected refusal (returns ``None``), anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except SafeCkptError:
        return None


# --------------------------------------------------------------------------- sample states


def sample_states() -> dict[str, dict[Any, Any]]:
    """Small deterministic states covering every kind the safe format holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    training = {
        "model_state_dict": model.state_dict(),  # an OrderedDict with _metadata
        "optimizer_state_dict": optimizer.state_dict(),  # int keys, param_groups
        "model_kwargs": {"width": 3, "act": "relu", "dims": (4, 3, 2)},
        "epoch": 3,
        "seed": 1234,
        "sde_class": argparse.Namespace,  # a class: GlobalRef
        "optimizer_class": torch.optim.Adam,
        "pytorch_version": torch.__version__,  # TorchVersion
        "loss_history": [0.5, 0.25, float("nan"), float("inf")],
    }

    ordered_meta: OrderedDict[str, Any] = OrderedDict(a=1, b=[1, 2])
    ordered_meta._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    values = {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 2**100, -(2**70)],
        "floats": [0.0, -0.0, 1.5, float("-inf")],
        "complex": complex(1.5, -2.0),
        "str": "héllo \u2603",
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"abc"),
        "tuple": (1, "a", (2, 3)),
        "set": {1, 2, 3},
        "frozenset": frozenset({"x"}),
        "int_keys": {0: "a", 1: "b", -5: "c"},
        "tuple_keys": {(1, 2): "t", ("a",): 3},
        "ordered": ordered_meta,
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "size": torch.Size([2, 3]),
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("s"), np.bytes_(b"b")],
        "np_arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(["ab", "c"]), np.zeros(0, dtype=">i4")],
        "global_fn": math.sqrt,
        "enum": re.RegexFlag.IGNORECASE,
        "dangerous_name": GlobalRef("os", "system"),  # an inert reference only
        "namespace": argparse.Namespace(lr=0.1, steps=[1, 2]),
        "timedelta": datetime.timedelta(days=1, seconds=5),
        "simple": types.SimpleNamespace(x=1),
        "opaque": OpaqueObject(GlobalRef("some.module", "Thing"), "call", (1, 2), {"k": "v"}, {"s": 1}, [1], [("a", 1)]),
    }

    torch.manual_seed(1)
    w = torch.randn(4, 4)
    big = torch.arange(24, dtype=torch.float32)
    tensors = {
        "dtypes": {str(dt): torch.ones(3, dtype=dt) for dt in DTYPES_FROM_SAFETENSORS.values()},
        "complex128": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex128),  # U8 entry + view
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7.0),
        "tied": [w, w],  # stored once
        "views": {"row": w[1], "col": w[:, 1], "t": w.t(), "flat": w.view(16)},
        "non_contiguous": big.view(4, 6)[:, ::2],
        "overlap": [big[2:10], big[5:20]],  # no member covers the others: U8 storage span
        "param": nn.Parameter(torch.ones(2)),
        "requires_grad": torch.zeros(2, requires_grad=True),
        "np_tensor": np.arange(4, dtype=np.float64),
    }

    top: OrderedDict[str, Any] = OrderedDict(weight=torch.ones(2, 2), bias=torch.zeros(2))
    top._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]

    nested: Any = {"leaf": torch.ones(1)}
    for i in range(30):
        nested = [nested] if i % 2 else {"n": nested}
    return {
        "training": training,
        "values": values,
        "tensors": tensors,
        "ordered_top": top,  # type: ignore[dict-item]
        "nested": {"deep": nested},
        "empty": {},
    }


# --------------------------------------------------------------------------- work directory


_WORK: Path | None = None


def workdir() -> Path:
    """One temp directory per process, removed at exit."""
    global _WORK
    if _WORK is None:
        _WORK = Path(tempfile.mkdtemp(prefix="safeckpt-fuzz-"))
        atexit.register(shutil.rmtree, _WORK, True)
    return _WORK


def _write(path: Path, data: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------- single file


def _lazy(path: Path) -> None:
    ckpt = _expect(safeckpt.open, path, limits=LIMITS)
    if ckpt is None:
        return
    with ckpt:
        repr(ckpt)
        _ = ckpt.is_safeckpt
        _expect(lambda: ckpt.metadata)
        names = ckpt.tensor_names()
        _expect(ckpt.info)
        components = _expect(ckpt.components) or []
        for component in components[:8]:
            _expect(ckpt.get, component)
        for name in names[:8]:
            _expect(ckpt.get_tensor, name)


def single_file(data: bytes) -> None:
    """``load_single_file`` (plain, verified with globals allowed), the lazy ``open`` API, and ``load``."""
    path = _write(workdir() / "input.bin", data)
    _expect(safeckpt.load_single_file, path, limits=LIMITS)
    _expect(safeckpt.load_single_file, path, limits=LIMITS, verify=True, allowed_globals=ALLOWED)
    _lazy(path)
    _expect(safeckpt.load, path, limits=LIMITS)


# --------------------------------------------------------------------------- skeleton


_SKELETON_TENSORS: dict[str, torch.Tensor] | None = None


def skeleton_tensors() -> dict[str, torch.Tensor]:
    """Entry name -> entry tensor (as a safetensors reader returns it) for the sample states."""
    global _SKELETON_TENSORS
    if _SKELETON_TENSORS is None:
        table: dict[str, torch.Tensor] = {}
        for state in sample_states().values():
            for entry in encode_state(state, LIMITS).entries:
                dtype = DTYPES_FROM_SAFETENSORS[entry.code]
                table.setdefault(entry.name, entry.cpu_bytes().clone().view(dtype).reshape(entry.shape))
        _SKELETON_TENSORS = table
    return _SKELETON_TENSORS


def _tensor_source(name: str) -> torch.Tensor:
    table = skeleton_tensors()
    if name not in table:
        raise safeckpt.ComponentNotFoundError(f"no tensor {name!r:.100}", name=name)
    return table[name]


def skeleton(data: bytes) -> None:
    """``Decoder.unpack`` (nothing allowed, then ``ALLOWED``) and ``parse_root`` (embedded and standalone)."""
    _expect(Decoder(_tensor_source, AllowList(()), LIMITS, file="<fuzz>").unpack, data)
    _expect(Decoder(_tensor_source, AllowList(ALLOWED), LIMITS, file="<fuzz>").unpack, data)
    _expect(parse_root, data, LIMITS, "<fuzz>")
    _expect(parse_root, data, LIMITS, "<fuzz>", standalone=True)


# --------------------------------------------------------------------------- manifest / multi-file

BASE = "m"
MANIFEST = f"{BASE}.safeckpt.json"
_CREATED = re.compile(rb'"safeckpt\.created":"[^"]*"')
_FIXED_CREATED = b'"safeckpt.created":"2000-01-01T00:00:00+00:00"'


def _pin_created(path: Path) -> None:
    """Replace the creation time in a safetensors header by a fixed one of the same length,
    so that a set written twice is byte-identical (and its manifest digests are stable)."""
    raw = path.read_bytes()
    pinned = _CREATED.sub(lambda m: _FIXED_CREATED if len(m.group(0)) == len(_FIXED_CREATED) else m.group(0), raw, 1)
    path.write_bytes(pinned)


def write_fixed_set(directory: Path) -> dict[str, Path]:
    """The fixed, valid multi-file set whose manifest the manifest harness fuzzes.

    Byte-identical on every call (same torch and safeckpt), so manifests generated
    by ``make_corpus.py`` carry digests that match the files the harness writes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = sample_states()["training"]
    written = safeckpt.save_multi_files(None, state, directory / f"{BASE}.pth")
    entries = []
    for key, path in written.items():
        if path.suffix == ".safetensors":
            _pin_created(path)
        entries.append(FileRecord(path.name, path.stat().st_size, file_digest(path, LIMITS), key))
    manifest = directory / MANIFEST
    manifest.write_bytes(manifest_bytes(entries))
    return {**written, "__manifest__": manifest}


_SET_DIR: Path | None = None


def _fixed_set_dir() -> Path:
    global _SET_DIR
    if _SET_DIR is None:
        _SET_DIR = workdir() / "set"
        write_fixed_set(_SET_DIR)
        (_SET_DIR / f"{BASE}_dir").mkdir()  # a sibling directory a manifest may name
    return _SET_DIR


def _load_set(directory: Path, manifest: Path | None) -> None:
    base = directory / f"{BASE}.pth"
    _expect(safeckpt.load_multi_files, base, limits=LIMITS)
    _expect(safeckpt.load_multi_files, base, limits=LIMITS, verify=True, allowed_globals=ALLOWED)
    _expect(safeckpt.load_multi_files, base, ["model_kwargs"], limits=LIMITS)
    _expect(safeckpt.load, manifest or base, limits=LIMITS)


def _missing_sibling(exc: FileNotFoundError, directory: Path) -> bool:
    """True when ``exc`` is about a file in ``directory`` that does not exist."""
    name = exc.filename
    if not isinstance(name, str):
        return False
    path = Path(name)
    return path.parent == directory and not path.exists()


MODES = ("manifest", "skeleton_component", "safetensors_component", "discovered_component")


def manifest(data: bytes) -> None:
    """The multi-file loader. The first byte picks a mode (``data[0] % 4``), the rest is fuzzed:

    0. the manifest JSON, next to the component files of :func:`write_fixed_set`;
    1. the ``model_kwargs`` component as a skeleton file (``m_model_kwargs.msgpack``),
    2. the ``model_state_dict`` component as a safetensors file (``m_model_state_dict.safetensors``),
       each with a manifest recording its real size and digest (so the size check passes);
    3. a component file with no manifest (``m_blob.bin``), found by discovery.

    FileNotFoundError: in mode 0 a manifest may name a plain file name that is not
    there. SPEC section 4 says a missing file is the standard ``FileNotFoundError``,
    and ``load_multi_files`` documents it, so that is expected there, but only when
    it names a file inside the manifest's directory that really is missing; any
    other FileNotFoundError (and any in modes 1-3, where every file exists) is a crash.
    """
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    if mode == 0:
        directory = _fixed_set_dir()
        path = _write(directory / MANIFEST, body)
        try:
            _load_set(directory, path)
        except FileNotFoundError as exc:
            if not _missing_sibling(exc, directory):
                raise
        return
    directory = workdir() / MODES[mode]
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    if mode == 3:
        _write(directory / f"{BASE}_blob.bin", body)
        _load_set(directory, None)
        return
    key, suffix = ("model_kwargs", ".msgpack") if mode == 1 else ("model_state_dict", ".safetensors")
    component = _write(directory / f"{BASE}_{key}{suffix}", body)
    digest = _expect(file_digest, component, LIMITS) or "0" * 64
    manifest_file = _write(
        directory / MANIFEST, manifest_bytes([FileRecord(component.name, len(body), digest, key)])
    )
    _load_set(directory, manifest_file)


# --------------------------------------------------------------------------- legacy reader and scanner


def legacy(data: bytes) -> None:
    """``read_torch_file`` (CPU and meta), ``load_single_file`` with globals allowed, and the bare VM."""
    path = _write(workdir() / "legacy.bin", data)
    read = _expect(read_torch_file, path, device=torch.device("cpu"), limits=LIMITS)
    if read is not None:  # accepted: it must not name anything Python 3 would resolve to a dangerous global
        _check_python3_names(read.report.uses)
    _expect(read_torch_file, path, device=torch.device("meta"), limits=LIMITS)
    _expect(safeckpt.load_single_file, path, limits=LIMITS, allowed_globals=ALLOWED)
    rebuild = Rebuilder(LIMITS)
    unpickler = SymbolicUnpickler(
        io.BytesIO(data), Report(), LIMITS, rebuild.calls, values=rebuild.values, build=rebuild.build
    )
    _expect(unpickler.load)


def _python3_name(name: str) -> tuple[str, str]:
    """What ``pickle`` in Python 3 really imports for ``"module:qualname"`` (``fix_imports``,
    which ``torch.load`` and ``pickle.load`` use for protocols 0-2): ``commands:Popen`` is
    ``subprocess:Popen``, ``__builtin__:eval`` is ``builtins:eval``."""
    module, _, qualname = name.partition(":")
    if (module, qualname) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, qualname)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), qualname


def scan_target(data: bytes) -> None:
    """``scan`` of any bytes. The report must be well formed, and a global that Python 3's
    pickle would resolve to a dangerous one (through its Python 2 name mapping) must be
    reported as dangerous: an AssertionError here is a crash like any other."""
    path = _write(workdir() / "scan.bin", data)
    report = _expect(scan, path, limits=LIMITS)
    if report is None:
        return
    repr(report)
    assert report.verdict in ("safe", "suspicious", "dangerous"), report.verdict
    assert report.verdict != "safe" or not report.dangerous_globals, report
    _check_python3_names(u.name for u in report.globals if u.status != "dangerous")


def _check_python3_names(names: Any) -> None:
    for name in names:
        real = _python3_name(name)
        if real != tuple(name.split(":", 1)) and _classify(*real) == "dangerous":
            raise AssertionError(
                f"{name} was not refused, but Python 3 unpickles it as {':'.join(real)}, "
                "which safeckpt classifies as dangerous (a Python 2 alias bypasses the blocklist)"
            )


# --------------------------------------------------------------------------- sharded checkpoints

SHARD = "shard-00001-model-00001-of-00001.safetensors"
SHARDED_MODES = ("shard", "index")


def sharded_state() -> dict[str, Any]:
    """The state of the fixed sharded checkpoint: several ranks and dtypes, an empty tensor, a scalar."""
    return {
        "w": torch.arange(12.0).reshape(3, 4),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "e": torch.zeros(0, 2),
        "s": torch.tensor(7),
        "meta": {"epoch": 3, "cls": argparse.Namespace},
    }


def write_fixed_sharded(directory: Path) -> dict[str, Any]:
    """The fixed, valid sharded checkpoint (DCP in this process) whose files the sharded harness fuzzes.

    Returns its index document, as :func:`sharded` rewrites it around a fuzzed shard.
    """
    from safeckpt.distributed import save_sharded
    from safeckpt.distributed.sharded import META_NAME

    save_sharded(None, sharded_state(), directory)
    with safeckpt.Checkpoint(directory / META_NAME) as ckpt:
        return ckpt.load()  # type: ignore[no-any-return]


_SHARDED: tuple[Path, dict[str, Any], bytes] | None = None


def _fixed_sharded() -> tuple[Path, dict[str, Any], bytes]:
    """The fixed checkpoint's directory, index document and shard bytes (made once per process)."""
    global _SHARDED
    if _SHARDED is None:
        directory = workdir() / "sharded"
        document = write_fixed_sharded(directory)
        _SHARDED = directory, document, (directory / "safeckpt-shards" / SHARD).read_bytes()
    return _SHARDED


def sharded(data: bytes) -> None:
    """``load_sharded`` (in this process) and ``consolidate``. The first byte picks a mode
    (``data[0] % 2``), the rest is fuzzed:

    0. the shard file, with an index recording its real size (so the size check passes);
    1. the index file, next to the fixed valid shard.
    """
    from safeckpt.distributed import consolidate, load_sharded
    from safeckpt.distributed.sharded_index import META_NAME, index_writer

    if not data:
        return
    directory, document, shard = _fixed_sharded()
    mode, body = data[0] % 2, data[1:]
    _write(directory / "safeckpt-shards" / SHARD, body if mode == 0 else shard)
    if mode == 0:
        with open(directory / META_NAME, "wb") as f:
            index_writer({**document, "shards": [[SHARD, len(body)]]})(f)
    else:
        _write(directory / META_NAME, body)
    _expect(load_sharded, directory, limits=LIMITS, no_dist=True)
    _expect(load_sharded, directory, limits=LIMITS, no_dist=True, allowed_globals=ALLOWED)
    _expect(consolidate, directory, workdir() / "consolidated.safeckpt", limits=LIMITS)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "single_file": single_file,
    "skeleton": skeleton,
    "manifest": manifest,
    "legacy": legacy,
    "scan": scan_target,
    "sharded": sharded,
}


# --------------------------------------------------------------------------- triage


def crash_signature(exc: BaseException) -> str:
    """Exception type plus the innermost frame inside safeckpt (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f"{os.sep}safeckpt{os.sep}" in f.filename] or frames
    where = f"{Path(inside[-1].filename).name}:{inside[-1].lineno}" if inside else "?"
    return f"{type(exc).__name__}@{where}"


def record_crash(directory: str, harness: str, data: bytes, exc: BaseException) -> bool:
    """Keep-going mode of the harnesses: save the first input of each distinct crash signature
    as ``<directory>/<signature>.bin`` with its traceback beside it. Returns True when new."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.@-]", "_", crash_signature(exc))
    path = out / f"{stem}.bin"
    if path.exists():
        if len(data) < path.stat().st_size:  # keep the smallest input seen
            path.write_bytes(data)
        return False
    path.write_bytes(data)
    text = "".join(traceback.format_exception(exc))
    (out / f"{stem}.txt").write_text(f"harness: {harness}\n{text}")
    print(f"\n=== new crash {stem} (saved to {path})\n{text}", file=sys.stderr, flush=True)
    return True


# --------------------------------------------------------------------------- structure-aware mutation (single_file)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header dict, data section) of a well-formed safetensors file, else None. For mutators only."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8 or length > LIMITS.max_header_bytes:
        return None
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        return None
    return (header, data[8 + length :]) if type(header) is dict else None


def join_safetensors(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return len(raw).to_bytes(8, "little") + raw + body


_META_VALUES = ("1", "0", "2", "\u00b2", "\u0661", "01", " 1", "", "sha256:", "pt", "99999999999999999999")


def mutate_single_file(data: bytes, max_size: int, seed: int, mutate: Callable[[bytes, int], bytes]) -> bytes:
    """Mutate a safeckpt file where it matters: one component key or value of the skeleton,
    the skeleton as a whole, the component list, or a metadata value; the file around them
    is rebuilt well formed. ``mutate`` is libFuzzer's byte mutator (``atheris.Mutate``)."""
    rng = random.Random(seed)
    parts = split_safetensors(data)
    meta = parts[0].get("__metadata__") if parts else None
    if parts is None or type(meta) is not dict or rng.random() < 0.2:
        return mutate(data, max_size)
    header, body = parts
    choice = rng.random()
    if choice < 0.15:
        key = rng.choice(sorted(meta)) if meta else "safeckpt.format_version"
        if rng.random() < 0.5:
            meta[key] = rng.choice(_META_VALUES)
        else:
            meta[key] = mutate(str(meta.get(key, "")).encode(), 256).decode("utf-8", "replace")
        return join_safetensors(header, body)[:max_size]
    skeleton, root = b"", None
    try:
        skeleton = base64.b64decode(str(meta.get("safeckpt.skeleton", "")), validate=True)
        root = msgpack.unpackb(skeleton, raw=False)
    except Exception:  # the seed's own skeleton is already broken: mutate its bytes
        pass
    if type(root) is not dict or type(root.get("components")) is not list or choice < 0.3:
        skeleton = mutate(skeleton, max(64, 2 * len(skeleton)))
    else:
        components = root["components"]
        if components and choice < 0.85:
            item = rng.choice(components)
            if type(item) is list and len(item) == 3:
                slot = rng.choice((0, 2, 2))
                if type(item[slot]) is bytes:
                    item[slot] = mutate(item[slot], max(64, 2 * len(item[slot])))
        elif choice < 0.9 and components:
            components.append(rng.choice(components))  # a duplicate component
        elif choice < 0.95:
            attrs = root.get("attrs")  # whatever an earlier mutation left there: bytes or not
            root["attrs"] = mutate(attrs if type(attrs) is bytes and attrs else b"\x80", 256) if rng.random() < 0.8 else None
        else:
            rng.shuffle(components)
        skeleton = msgpack.packb(root, use_bin_type=True)
    meta["safeckpt.skeleton"] = base64.b64encode(skeleton).decode("ascii")
    out = join_safetensors(header, body)
    return out if len(out) <= max_size else mutate(data, max_size)
