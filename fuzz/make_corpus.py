"""Write the seed corpora of the fuzz harnesses: ``python fuzz/make_corpus.py OUTDIR``.

Creates ``OUTDIR/<harness>/`` for each harness of ``targets.TARGETS``:

- ``single_file``: safeckpt single files of every sample state (tensors of every
  dtype, views and tied tensors, nested containers, an OrderedDict with
  ``_metadata``, GlobalRef/OpaqueObject values, numpy), plain safetensors files,
  multi-file components, and a few torch.save files (the loader sniffs them all);
- ``skeleton``: raw msgpack skeletons (``encode_state(...).skeleton``), each
  component's key and value bins, the state attributes, standalone skeleton files;
- ``manifest``: mode byte + manifest JSON (valid and broken variants), mode byte +
  component files (see ``targets.manifest``);
- ``sharded``: mode byte + the shard file of a fixed sharded checkpoint (valid and with
  broken chunk placements), mode byte + its index (see ``targets.sharded``);
- ``views``: view specs (see ``targets_views``): valid views of every element size at
  aligned and shifted addresses, stride-0 bombs, huge empty shapes, a misaligned complex128;
- ``integrations``: mode byte + a model_signing signature of a fixed signed directory,
  a Hugging Face weight index or legacy weight file (see ``targets_integrations``);
- ``legacy`` and ``scan``: torch.save zip files, ``_use_new_zipfile_serialization=False``
  files, bare pickles of protocols 0-5, malicious pickles (os.system and friends via
  ``__reduce__``, built by pickling, never executed), plus for ``scan`` the safe formats.

Malicious builders from ``tests/malicious.py`` are added when that module imports.
Every seed is kept under 64 KiB so that fuzzing stays fast; bigger ones are skipped.
Nothing here ever unpickles anything.
"""

from __future__ import annotations

import argparse
import builtins
import datetime
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
import targets_hashflood
import targets_vm_budget
import targets_scan_archive
import targets_views
import targets_integrations

import safeckpt
from safeckpt.container import encode_state, parse_root, skeleton_file_bytes

MAX_SEED = 64 * 1024


class _Reduce:
    """Pickles as ``func(*args)``, the way an attacker's class does. Only ever pickled."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


SENTINEL = "/tmp/safeckpt-fuzz-pwned"


def _malicious_objects() -> dict[str, Any]:
    return {
        "os_system": _Reduce(os.system, (f"touch {SENTINEL}",)),
        "subprocess_popen": _Reduce(subprocess.Popen, (["touch", SENTINEL],)),
        "builtins_eval": _Reduce(builtins.eval, (f"open({SENTINEL!r}, 'w')",)),
        "builtins_exec": _Reduce(builtins.exec, ("import os",)),
    }


def _small_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model_state_dict": torch.nn.Linear(3, 2).state_dict(), "epoch": 3}


def _plain_pickle_value() -> Any:
    """Plain data whose pickle names only allowlisted or harmless globals."""
    return {
        "ints": [0, -1, 2**31, 2**70],
        "floats": (1.5, float("nan")),
        "str": "héllo",
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"ab"),
        "set": {1, 2},
        "frozenset": frozenset({3}),
        "complex": 1 + 2j,
        "ordered": OrderedDict(a=1, b=2),
        "nested": [[[{"k": (None, True)}]]],
        "slice": slice(1, 5, 2),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "np_array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_scalar": np.float64(2.5),
        "namespace": argparse.Namespace(lr=0.1),
        "timedelta": datetime.timedelta(days=1),
        "version": torch.__version__,
    }


def _torch_bytes(value: Any, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


# --------------------------------------------------------------------------- seeds per harness


def _safe_files(tmp: Path) -> Iterator[tuple[str, bytes]]:
    for name, state in targets.sample_states().items():
        path = safeckpt.save_single_file(None, state, tmp / f"{name}.safeckpt")
        yield f"safeckpt_{name}", path.read_bytes()
    torch.manual_seed(0)
    plain = {
        "fc.weight": torch.randn(3, 4),
        "fc.bias": torch.zeros(3),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "u8": torch.arange(5, dtype=torch.uint8),
        "empty": torch.empty(0),
    }
    yield "safetensors_plain", safetensors.torch.save(plain)
    yield "safetensors_metadata", safetensors.torch.save({"x": torch.ones(1)}, metadata={"format": "pt", "k": "v"})
    yield "safetensors_empty", safetensors.torch.save({})


def _component_files(tmp: Path) -> dict[str, Path]:
    return targets.write_fixed_set(tmp / "set")


def _legacy_files() -> Iterator[tuple[str, bytes]]:
    state = _small_state()
    plain = _plain_pickle_value()
    yield "torch_zip_state", _torch_bytes(state)
    yield "torch_zip_plain", _torch_bytes(plain)
    yield "torch_zip_views", _torch_bytes({"w": (w := torch.arange(12.0).view(3, 4)), "t": w.t(), "row": w[1]})
    yield "torch_zip_param", _torch_bytes({"p": torch.nn.Parameter(torch.ones(2)), "bf16": torch.ones(2, dtype=torch.bfloat16)})
    yield "torch_legacy_state", _torch_bytes(state, legacy=True)
    yield "torch_legacy_plain", _torch_bytes(plain, legacy=True)
    yield "torch_legacy_views", _torch_bytes({"w": w, "t": w.t(), "row": w[1]}, legacy=True)
    for protocol in range(6):
        yield f"pickle_p{protocol}", pickle.dumps(plain, protocol=protocol)
    yield "pickle_tensor_p2", pickle.dumps(torch.ones(2), protocol=2)  # names torch.storage._load_from_bytes
    for name, payload in _malicious_objects().items():
        for protocol in (0, 2, 4):
            yield f"malicious_{name}_p{protocol}", pickle.dumps({"epoch": 1, "hook": payload}, protocol=protocol)
    hook = _malicious_objects()["os_system"]
    yield "malicious_torch_zip_os_system", _torch_bytes({**state, "hook": hook})
    yield "malicious_torch_legacy_os_system", _torch_bytes({**state, "hook": hook}, legacy=True)
    yield from _test_suite_malicious()


def _test_suite_malicious() -> Iterator[tuple[str, bytes]]:
    """The malicious corpus of ``tests/malicious.py``, when it is importable (files under 64 KiB)."""
    tests_dir = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests_dir))
    built = []
    try:
        import malicious  # type: ignore[import-not-found]

        with tempfile.TemporaryDirectory() as tmp:
            for name, builder in malicious.CORPUS:
                directory = Path(tmp) / name
                directory.mkdir()
                try:
                    path = builder(directory, directory / "sentinel")
                except Exception as exc:
                    print(f"make_corpus: skipping tests/malicious.py {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                built.append((f"suite_{name}", Path(path).read_bytes()))
    except Exception as exc:  # optional: the harness corpus does not depend on it
        print(f"make_corpus: tests/malicious.py not used ({type(exc).__name__}: {exc})", file=sys.stderr)
    finally:
        sys.path.remove(str(tests_dir))
    yield from built


def _skeleton_seeds(tmp: Path) -> Iterator[tuple[str, bytes]]:
    for name, state in targets.sample_states().items():
        encoded = encode_state(state, targets.LIMITS)
        yield f"skeleton_{name}", encoded.skeleton
        yield f"skeleton_file_{name}", skeleton_file_bytes(encoded)
        root = parse_root(encoded.skeleton, targets.LIMITS, name)
        if root.attrs is not None:
            yield f"attrs_{name}", root.attrs
        for i, (key, _segment, value) in enumerate(root.components):
            yield f"key_{name}_{i}", key
            yield f"value_{name}_{i}", value
    # component values as a multi-file component sees them (unprefixed names, no dedupe)
    for key, value in targets.sample_states()["training"].items():
        encoded = encode_state({key: value}, targets.LIMITS, dedupe=False, prefixed=False)
        yield f"component_{key}", encoded.skeleton


def _manifest_seeds(tmp: Path) -> Iterator[tuple[str, bytes]]:
    files = _component_files(tmp)
    manifest_text = files.pop("__manifest__").read_bytes()
    yield "m0_manifest", b"\x00" + manifest_text
    document = json.loads(manifest_text)
    components = document["components"]

    def variant(name: str, **changes: Any) -> tuple[str, bytes]:
        return name, b"\x00" + json.dumps({**document, **changes}, indent=1).encode()

    yield variant("m0_one_component", components=components[:1])
    yield variant("m0_reversed", components=components[::-1])
    yield variant("m0_no_components", components=[])
    yield variant("m0_missing_file", components=[{**components[0], "file": "m_nothere.safetensors"}])
    yield variant("m0_escape", components=[{**components[0], "file": "../m_model_state_dict.safetensors"}])
    yield variant("m0_wrong_size", components=[{**components[0], "size": components[0]["size"] + 1}])
    yield variant("m0_wrong_digest", components=[{**components[0], "sha256": "0" * 64}])
    yield variant("m0_duplicate", components=[components[0], components[0]])
    yield variant("m0_future_version", format_version=99)
    yield variant("m0_msgpack_as_st", components=[{**components[0], "file": files["model_kwargs"].name}])
    for key, path in files.items():
        mode = b"\x01" if path.suffix == ".msgpack" else b"\x02"
        yield f"m{mode[0]}_{key}", mode + path.read_bytes()
        yield f"m3_{key}", b"\x03" + path.read_bytes()
    yield "m3_torch_zip", b"\x03" + _torch_bytes(_small_state()["model_state_dict"])
    yield "m3_pickle", b"\x03" + pickle.dumps({"a": 1}, protocol=2)


def _sharded_seeds(tmp: Path) -> Iterator[tuple[str, bytes]]:
    directory = tmp / "sharded"
    targets.write_fixed_sharded(directory)
    shard = (directory / "safeckpt-shards" / targets.SHARD).read_bytes()
    index = (directory / "safeckpt-sharded.msgpack").read_bytes()
    yield "s0_shard", b"\x00" + shard
    yield "s1_index", b"\x01" + index
    length = int.from_bytes(shard[:8], "little")
    header = json.loads(shard[8 : 8 + length])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])

    def variant(name: str, **changes: Any) -> tuple[str, bytes]:
        edited = {**header, "__metadata__": {**header["__metadata__"], **changes}}
        text = json.dumps(edited).encode()
        return name, b"\x00" + len(text).to_bytes(8, "little") + text + shard[8 + length :]

    yield variant("s0_offsets_outside", DCP_SHARDING_INFO=json.dumps({**info, "w": {"saved_offsets": [1, 0]}}))
    yield variant("s0_offsets_wrong_rank", DCP_SHARDING_INFO=json.dumps({**info, "w": {"saved_offsets": [0]}}))
    yield variant("s0_no_sharding_info", DCP_SHARDING_INFO="")
    yield variant("s0_sharding_info_list", DCP_SHARDING_INFO="[]")


def _tar_seeds() -> Iterator[tuple[str, bytes]]:
    """Legacy tar checkpoints (``torch.load`` unpickles their members): benign, and with a
    global named in ``storages`` after raw bytes, and ``pickle`` as a symlink."""
    import tarfile

    def tar(members: list[tuple[str, bytes | str]]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name, body in members:
                info = tarfile.TarInfo(name)
                if isinstance(body, str):
                    info.type, info.linkname = tarfile.SYMTYPE, body
                    t.addfile(info)
                else:
                    info.size = len(body)
                    t.addfile(info, io.BytesIO(body))
        return out.getvalue()

    plain = [("storages", pickle.dumps(0, protocol=2)), ("tensors", pickle.dumps(0, protocol=2)),
             ("pickle", pickle.dumps({"w": [1, 2]}, protocol=2))]
    yield "tar_plain", tar(plain)
    yield "tar_global_mid", tar([("storages", pickle.dumps(1, protocol=2) + bytes(24) + b"cposix\nsystem\n.")] + plain[1:])
    yield "tar_link", tar(plain[:2] + [("pickle", "/etc/hostname")])


def seeds(tmp: Path) -> dict[str, list[tuple[str, bytes]]]:
    """``{harness: [(name, bytes)]}``."""
    safe = list(_safe_files(tmp))
    legacy = list(_legacy_files())
    components = [(f"component_{key}", path.read_bytes()) for key, path in _component_files(tmp / "c").items()]
    torch_samples = [(n, d) for n, d in legacy if n in ("torch_zip_state", "torch_legacy_state", "pickle_p2")]
    return {
        "single_file": safe + components + torch_samples,
        "skeleton": list(_skeleton_seeds(tmp)),
        "manifest": list(_manifest_seeds(tmp)),
        "legacy": legacy,
        "scan": legacy + safe[:2] + components + list(_tar_seeds()),
        "sharded": list(_sharded_seeds(tmp)),
        "vm_budget": targets_vm_budget.SEEDS + [(n, d) for n, d in legacy if n.startswith("pickle")],
        "names": list(_names_seeds()),
        "scan_archive": targets_scan_archive.seeds(tmp),
        "views": list(targets_views.seeds()),
        "integrations": list(targets_integrations.seeds()),
        "values": _values_seeds(),
        "hashflood": targets_hashflood.seeds(),
    }


def _names_seeds() -> Iterator[tuple[str, bytes]]:
    """Mode byte + ``module\nqualname`` (see ``targets_names``)."""
    for i in range(8):
        yield f"n_structured_{i}", bytes([0 if i % 2 else 3, 7 * i, i, i + 1, 2])
    for name in ("torch:serialization.os.system", "posixpath:os.system", "__builtin__:eval", "commands:getoutput",
                 "collections:OrderedDict", "builtins:range", "torch.nn.modules.linear:Linear", "numpy:ndarray",
                 "_operator:attrgetter", "numpy._core.memmap:memmap", "torch:UntypedStorage.from_file",
                 "logging:FileHandler", "_frozen_importlib:_gcd_import", "torch.utils.model_zoo:load_url"):
        module, qualname = name.split(":")
        yield f"n_free_{module}_{qualname}", b"\x01" + f"{module}\n{qualname}".encode()
        yield f"n_stack_{module}_{qualname}", b"\x04" + f"{module}\n{qualname}".encode()
    yield "n_resolve_ordered", b"\x02\x00\nOrderedDict"
    yield "n_resolve_walk", b"\x02\x06\nserialization.os.system"


def _values_seeds() -> list[tuple[str, bytes]]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import targets_values

    return [(f"values_{i}", data) for i, data in enumerate(targets_values.seeds())]


def write_corpus(out: Path, harnesses: list[str] | None = None) -> dict[str, int]:
    """Write the seeds under ``out/<harness>/``; returns the number written per harness."""
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for harness, items in seeds(Path(tmp)).items():
            if harnesses and harness not in harnesses:
                continue
            directory = out / harness
            directory.mkdir(parents=True, exist_ok=True)
            written = 0
            for name, data in items:
                if len(data) >= MAX_SEED:
                    print(f"make_corpus: {harness}/{name} is {len(data)} bytes, over 64 KiB; skipped", file=sys.stderr)
                    continue
                (directory / f"{name}.bin").write_bytes(data)
                written += 1
            counts[harness] = written
    return counts


# Every harness: those of targets.TARGETS and those whose targets live in their own targets_<name>.py.
OWN_TARGET_HARNESSES = {*targets.TARGETS, "vm_budget", "names", "scan_archive", "views", "values", "integrations", "hashflood"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--harness", action="append", choices=sorted(OWN_TARGET_HARNESSES), help="only these (repeatable)")
    args = parser.parse_args(argv)
    for harness, count in write_corpus(args.outdir, args.harness).items():
        print(f"{harness}: {count} seeds in {args.outdir / harness}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
