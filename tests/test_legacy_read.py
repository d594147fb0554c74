"""Real legacy torch.save files read by safeckpt without executing anything.

Every file is also loaded by ``torch.load(weights_only=False)`` in ONE separate,
trusted child process (the ``trusted`` fixture); the child writes a description of
what it got (types, keys, class names, tensor metadata and storage sharing) as
JSON and the tensors themselves as a safetensors file, and each test compares
safeckpt's no-execution read with that, tensors bit for bit.

The realistic NNHandler state is built from a copy of ``tests/fixtures.py`` saved as
a temporary module, which is deleted from disk and from ``sys.modules`` before
anything is read: its classes must come back as inert ``GlobalRef``s.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn
from torch.torch_version import TorchVersion

import safeckpt
from safeckpt import GlobalRef, OpaqueObject

TESTS_DIR = Path(__file__).resolve().parent
TMP_MODULE = "safeckpt_legacy_tmp_nnhandler"

# --------------------------------------------------------------------------- describing a loaded state


def describe(obj: Any, tensors: dict[str, torch.Tensor], path: str = "state", groups: dict[int, int] | None = None,
             deep: bool = False) -> Any:
    """A JSON-able description of a loaded state, the same for torch.load's objects and safeckpt's placeholders.

    Tensors are recorded in ``tensors`` under their path in the state; their
    description holds dtype, shape, stride, storage offset and size, and the index
    of their storage in order of first appearance (so sharing is compared).
    Classes and functions become ``ref`` (``GlobalRef`` on safeckpt's side),
    other instances ``obj`` with their class name (``OpaqueObject`` on safeckpt's
    side; with ``deep`` its parts are described too).
    """
    groups = {} if groups is None else groups

    def rec(value: Any, where: str) -> Any:
        return describe(value, tensors, where, groups, deep)

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        storage = obj.untyped_storage()
        group = groups.setdefault(storage.data_ptr(), len(groups)) if storage.nbytes() else None
        return {
            "t": type(obj).__name__, "dtype": str(obj.dtype), "device": str(obj.device), "shape": list(obj.shape),
            "stride": list(obj.stride()), "offset": obj.storage_offset(), "storage": group,
            "storage_nbytes": storage.nbytes(), "requires_grad": obj.requires_grad, "key": path,
        }
    if isinstance(obj, np.ndarray):
        return {"t": "ndarray", "dtype": str(obj.dtype), "shape": list(obj.shape), "v": repr(obj.tolist())}
    if isinstance(obj, np.generic):
        return {"t": f"numpy.{type(obj).__name__}", "v": repr(obj.item())}
    if isinstance(obj, GlobalRef):
        return {"t": "ref", "v": obj.name}
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return {"t": "ref", "v": f"{obj.__module__}:{obj.__qualname__}"}
    if isinstance(obj, OpaqueObject):
        out: dict[str, Any] = {"t": "obj", "v": obj.cls.name}
        if deep:
            out.update(constructor=obj.constructor, args=rec(obj.args, f"{path}.args"),
                       kwargs=rec(obj.kwargs, f"{path}.kwargs"), state=rec(obj.state, f"{path}.state"),
                       list_items=rec(obj.list_items, f"{path}.list_items"),
                       dict_items=rec(obj.dict_items, f"{path}.dict_items"))
        return out
    if isinstance(obj, dict):
        out = {"t": type(obj).__name__,
               "items": [[rec(k, f"{path}.key"), rec(v, f"{path}[{k!r}]")] for k, v in obj.items()]}
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out["_metadata"] = rec(metadata, f"{path}._metadata")
        return out
    if isinstance(obj, torch.Size):
        return {"t": "Size", "v": list(obj)}
    if isinstance(obj, (list, tuple)):
        return {"t": type(obj).__name__, "items": [rec(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        return {"t": type(obj).__name__, "items": sorted(json.dumps(rec(v, f"{path}{{}}")) for v in obj)}
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return {"t": f"{type(obj).__module__}.{type(obj).__qualname__}", "v": repr(obj)}
    if isinstance(obj, (torch.dtype, torch.device)):
        return {"t": type(obj).__name__, "v": str(obj)}
    return {"t": "obj", "v": f"{type(obj).__module__}:{type(obj).__qualname__}"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(actual: Any, expected_desc: Any, expected_tensors: dict[str, torch.Tensor], deep: bool = False) -> None:
    """``actual`` (a safeckpt read) has the description and the tensor bits recorded for the expected state."""
    tensors: dict[str, torch.Tensor] = {}
    desc = json.loads(json.dumps(describe(actual, tensors, deep=deep)))
    assert desc == expected_desc
    assert sorted(tensors) == sorted(expected_tensors)
    for key, tensor in tensors.items():
        assert torch.equal(_bits(tensor), _bits(expected_tensors[key])), key


def assert_same_read(actual: Any, expected: Any) -> None:
    """Two safeckpt reads hold the same state (placeholders compared in depth)."""
    tensors: dict[str, torch.Tensor] = {}
    desc = json.loads(json.dumps(describe(expected, tensors, deep=True)))
    assert_same_state(actual, desc, tensors, deep=True)


# --------------------------------------------------------------------------- the legacy files


def _model_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model(torch.randn(5, 4))  # moves the BatchNorm running statistics
    return model.state_dict()


def _dtypes(zip_format: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 3, generator=g) * 4
    out = {
        "bfloat16": values.to(torch.bfloat16),
        "float16": values.to(torch.float16),
        "float64": values.to(torch.float64),
        "int8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "int16": torch.tensor([-32768, 7, 32767], dtype=torch.int16),
        "int32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "int64": torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "complex64": torch.complex(values, -values),
        "complex128": torch.complex(values, values).to(torch.complex128),
        "nan_inf": torch.tensor([math.nan, math.inf, -math.inf, -0.0]),
    }
    if zip_format:  # the pre-1.6 format cannot hold these
        out["float8_e4m3fn"] = values.to(torch.float8_e4m3fn)
        out["float8_e5m2"] = values.to(torch.float8_e5m2)
        out["uint16"] = torch.tensor([0, 65535], dtype=torch.uint16)
    return out


def _views() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32)
    return {
        "base": base,
        "window": base[2:14].view(3, 4),
        "strided": base[::3],
        "transposed": base.view(4, 6).t(),
        "other": torch.ones(3),
    }


def _edges() -> dict[str, torch.Tensor]:
    return {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(2**40),
        "empty": torch.empty(0),
        "empty_2d": torch.zeros(0, 3),
        "empty_int": torch.zeros(4, 0, dtype=torch.int64),
    }


def _parameters() -> dict[str, Any]:
    torch.manual_seed(2)
    return {
        "weight": nn.Parameter(torch.randn(3, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "buffer": torch.zeros(2),
    }


def _numpy() -> dict[str, Any]:
    return {
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "int_array": np.array([[1, -2], [3, 4]], dtype=np.int64),
        "bool_array": np.array([True, False]),
        "scalar": np.float64(1.5),
        "int_scalar": np.int64(-7),
        "tensor": torch.ones(2),
    }


BARE = {"epochs": 3, "name": "run-1", "losses": [3, 2, 1], "nested": {"a": [1, "b", [2]]}, "neg": -5, "big": 2**70}


def _import_tmp_module(mod_dir: Path) -> types.ModuleType:
    mod_dir.mkdir()
    source = mod_dir / f"{TMP_MODULE}.py"
    shutil.copyfile(TESTS_DIR / "fixtures.py", source)
    spec = importlib.util.spec_from_file_location(TMP_MODULE, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[TMP_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _cuda_location(data: bytes) -> bytes:
    """Rewrite the storage location string ``'cpu'`` to ``'cuda:0'`` (as on a GPU machine)."""
    old, new = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    assert old in data
    return data.replace(old, new)


def _save_cuda_variants(directory: Path) -> dict[str, Path]:
    from malicious import _legacy_pickles

    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float64)}
    buf = io.BytesIO()
    torch.save(state, buf)
    zip_path = directory / "cuda_zip.pt"
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(zip_path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, _cuda_location(data) if info.filename.endswith("/data.pkl") else data)
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    parts = _legacy_pickles(buf.getvalue())
    parts[3] = _cuda_location(parts[3])
    legacy_path = directory / "cuda_legacy.pt"
    legacy_path.write_bytes(b"".join(parts))
    return {"cuda_zip": zip_path, "cuda_legacy": legacy_path}


_TRUSTED = textwrap.dedent(
    """
    import importlib.util, json, pickle, sys
    tests_dir, mod_dir, cases_file, out_json, out_tensors = sys.argv[1:6]
    sys.path[:0] = [tests_dir, mod_dir]
    import torch, safetensors.torch
    spec = importlib.util.spec_from_file_location("legacy_read_helpers", tests_dir + "/test_legacy_read.py")
    helpers = sys.modules["legacy_read_helpers"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    descriptions, flat = {}, {}
    for case, (path, loader) in json.loads(open(cases_file).read()).items():
        if loader == "pickle":
            with open(path, "rb") as f:
                obj = pickle.load(f)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        tensors = {}
        descriptions[case] = helpers.describe(obj, tensors)
        for key, tensor in tensors.items():
            flat[case + "::" + key] = helpers._bits(tensor).clone()  # raw bytes: any dtype, compared bit for bit
    safetensors.torch.save_file(flat, out_tensors)
    with open(out_json, "w") as f:
        json.dump(descriptions, f)
    """
)


@dataclass
class Legacy:
    paths: dict[str, Path]
    expected: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Legacy:
    """Write every legacy file, describe each through torch.load in one trusted child, then delete the temp module."""
    root = tmp_path_factory.mktemp("legacy")
    mod_dir = root / "tmpmod"
    module: types.ModuleType | None = _import_tmp_module(mod_dir)
    paths: dict[str, Path] = {}
    loaders: dict[str, str] = {}
    try:
        assert module is not None
        realistic, _ = module.make_training_state()
        assert realistic["model_class"].__module__ == TMP_MODULE
        states = {
            "state_dict": _model_state_dict(),
            "realistic": realistic,
            "numpy": _numpy(),
            "parameters": _parameters(),
            "views": _views(),
            "edges": _edges(),
            "version": {"pytorch_version": torch.__version__, "name": "x"},
            "loss": {"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"), "loss_fn_kwargs": {}},
        }
        for name, state in states.items():
            paths[f"{name}_zip"] = root / f"{name}_zip.pth"
            torch.save(state, paths[f"{name}_zip"])
            if name == "realistic":  # torch.load cannot restore a torch.Generator from the pre-1.6 format
                loader_kwargs = {k: v for k, v in state["train_loader_kwargs"].items() if k != "generator"}
                state = dict(state, train_loader_kwargs=loader_kwargs)
            paths[f"{name}_legacy"] = root / f"{name}_legacy.pth"
            torch.save(state, paths[f"{name}_legacy"], _use_new_zipfile_serialization=False)
        for protocol in (2, 4):
            paths[f"state_dict_zip_p{protocol}"] = root / f"state_dict_zip_p{protocol}.pth"
            torch.save(states["state_dict"], paths[f"state_dict_zip_p{protocol}"], pickle_protocol=protocol)
        paths["state_dict_legacy_p4"] = root / "state_dict_legacy_p4.pth"
        torch.save(states["state_dict"], paths["state_dict_legacy_p4"], pickle_protocol=4, _use_new_zipfile_serialization=False)
        paths["dtypes_zip"] = root / "dtypes_zip.pth"
        torch.save(_dtypes(zip_format=True), paths["dtypes_zip"])
        paths["dtypes_legacy"] = root / "dtypes_legacy.pth"
        torch.save(_dtypes(zip_format=False), paths["dtypes_legacy"], _use_new_zipfile_serialization=False)
        paths.update(_save_cuda_variants(root))
        for protocol in (2, 4, 5):
            name = f"bare_pickle_p{protocol}"
            paths[name] = root / f"{name}.pkl"
            paths[name].write_bytes(pickle.dumps(BARE, protocol=protocol))
            loaders[name] = "pickle"

        cases = root / "cases.json"
        cases.write_text(json.dumps({case: (str(p), loaders.get(case, "torch")) for case, p in paths.items()}))
        out_json, out_tensors = root / "expected.json", root / "expected.safetensors"
        work = root / "cwd"
        work.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", _TRUSTED, str(TESTS_DIR), str(mod_dir), str(cases), str(out_json), str(out_tensors)],
            cwd=work, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        del states, realistic
    finally:
        module = None
        sys.modules.pop(TMP_MODULE, None)
        shutil.rmtree(mod_dir)
        importlib.invalidate_caches()
    flat = safetensors.torch.load_file(out_tensors)
    tensors: dict[str, dict[str, torch.Tensor]] = {case: {} for case in paths}
    for key, tensor in flat.items():
        case, _, path = key.partition("::")
        tensors[case][path] = tensor
    return Legacy(paths, json.loads(out_json.read_text()), tensors)


CASES = [
    "state_dict_zip", "state_dict_legacy", "state_dict_zip_p2", "state_dict_zip_p4", "state_dict_legacy_p4",
    "realistic_zip", "realistic_legacy", "numpy_zip", "numpy_legacy", "parameters_zip", "parameters_legacy",
    "views_zip", "views_legacy", "edges_zip", "edges_legacy", "version_zip", "version_legacy", "loss_zip",
    "loss_legacy", "dtypes_zip", "dtypes_legacy", "cuda_zip", "cuda_legacy",
    "bare_pickle_p2", "bare_pickle_p4", "bare_pickle_p5",
]


def test_cases_cover_every_file(legacy: Legacy) -> None:
    assert sorted(CASES) == sorted(legacy.paths)


# --------------------------------------------------------------------------- reading = torch.load, without execution


@pytest.mark.parametrize("case", CASES)
def test_read_matches_trusted_torch_load(legacy: Legacy, case: str) -> None:
    path = legacy.paths[case]
    state = safeckpt.load(path)
    assert_same_state(state, legacy.expected[case], legacy.tensors[case])
    assert_same_state(safeckpt.load_single_file(path), legacy.expected[case], legacy.tensors[case])
    assert TMP_MODULE not in sys.modules


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_realistic_state_reads_after_its_module_is_gone(legacy: Legacy, fmt: str) -> None:
    assert TMP_MODULE not in sys.modules and importlib.util.find_spec(TMP_MODULE) is None
    state = safeckpt.load(legacy.paths[f"realistic_{fmt}"])
    assert TMP_MODULE not in sys.modules  # named, never imported
    assert state["model_class"] == GlobalRef(TMP_MODULE, "TinyModel")
    assert state["sde_class"] == GlobalRef(TMP_MODULE, "VPSDE") and state["sde_class"].short_name == "VPSDE"
    assert state["metrics"] == {"accuracy": GlobalRef(TMP_MODULE, "accuracy"),
                                "top3_accuracy": GlobalRef(TMP_MODULE, "top3_accuracy")}
    assert state["scheduler_kwargs"]["lr_lambda"] == GlobalRef(TMP_MODULE, "lr_lambda")
    assert state["optimizer_class"] == GlobalRef("torch.optim.adam", "Adam")
    sampler = state["sampler_state_dict"]
    assert isinstance(sampler, OpaqueObject) and sampler.cls == GlobalRef(TMP_MODULE, "SamplerState")
    assert sampler.state == {"step": 3, "last_sigma": 0.25, "history": [1.0, 0.5, 0.25]}
    assert isinstance(state["loss_fn"], OpaqueObject)
    assert state["loss_fn"].cls == GlobalRef("torch.nn.modules.loss", "CrossEntropyLoss")
    sd = state["model_state_dict"]
    assert type(sd) is OrderedDict and sd._metadata[""]["version"] == 1
    assert sd["emb.weight"].untyped_storage().data_ptr() == sd["out.weight"].untyped_storage().data_ptr()  # tied
    assert sd["norm.num_batches_tracked"].dtype == torch.int64 and sd["norm.num_batches_tracked"].dim() == 0
    optimizer = state["optimizer_state_dict"]
    assert sorted(optimizer["state"]) == optimizer["param_groups"][0]["params"] == [0, 1, 2, 3, 4, 5]  # int keys
    assert type(state["pytorch_version"]) is TorchVersion and state["pytorch_version"] == torch.__version__
    assert state["optimizer_kwargs"]["betas"] == (0.9, 0.999)
    assert math.isnan(state["val_losses"][0]) and state["callback_states"]["early_stopping"]["best"] == math.inf


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_numpy_values_come_back_as_numpy(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"numpy_{fmt}"])
    expected = _numpy()
    for key in ("array", "int_array", "bool_array"):
        assert type(state[key]) is np.ndarray and state[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(state[key], expected[key])
    assert type(state["scalar"]) is np.float64 and state["scalar"] == 1.5
    assert type(state["int_scalar"]) is np.int64 and state["int_scalar"] == -7


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_parameters_keep_type_and_requires_grad(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"parameters_{fmt}"])
    expected = _parameters()
    assert type(state["weight"]) is nn.Parameter and state["weight"].requires_grad
    assert type(state["frozen"]) is nn.Parameter and not state["frozen"].requires_grad
    assert type(state["buffer"]) is torch.Tensor
    for key in expected:
        assert torch.equal(state[key].detach(), expected[key].detach())


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_share_one_storage(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"views_{fmt}"])
    expected = _views()
    ptr = state["base"].untyped_storage().data_ptr()
    for key in ("window", "strided", "transposed"):
        assert state[key].untyped_storage().data_ptr() == ptr, key
        assert state[key].stride() == expected[key].stride() and state[key].storage_offset() == expected[key].storage_offset()
        assert torch.equal(state[key], expected[key]), key
    assert state["other"].untyped_storage().data_ptr() != ptr
    state["base"][2] = -1.0  # the views see writes through the shared storage
    assert state["window"][0, 0] == -1.0 and state["transposed"][2, 0] == -1.0


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_dtypes_and_edge_tensors(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"dtypes_{fmt}"])
    expected = _dtypes(zip_format=fmt == "zip")
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and state[key].shape == tensor.shape, key
        assert torch.equal(_bits(state[key]), _bits(tensor)), key
    edges = safeckpt.load(legacy.paths[f"edges_{fmt}"])
    assert edges["scalar"].dim() == 0 and edges["scalar"].item() == 3.5
    assert edges["int_scalar"].dim() == 0 and edges["int_scalar"].item() == 2**40
    assert edges["empty"].shape == (0,) and edges["empty_2d"].shape == (0, 3)
    assert edges["empty_int"].shape == (4, 0) and edges["empty_int"].dtype == torch.int64


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_version_is_a_torch_version(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"version_{fmt}"])
    assert type(state["pytorch_version"]) is TorchVersion
    assert state["pytorch_version"] == torch.__version__ and state["pytorch_version"] >= "2.0"


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_cuda_storages_load_on_cpu(legacy: Legacy, fmt: str) -> None:
    state = safeckpt.load(legacy.paths[f"cuda_{fmt}"])
    assert state["w"].device == torch.device("cpu") and torch.equal(state["w"], torch.arange(6.0).view(2, 3))
    assert state["b"].dtype == torch.float64 and torch.equal(state["b"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bare_pickle_loads(legacy: Legacy, protocol: int) -> None:
    state = safeckpt.load(legacy.paths[f"bare_pickle_p{protocol}"])
    assert state == BARE
    assert type(state["losses"]) is list and type(state["nested"]["a"][2]) is list


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_convert_realistic_to_single_file(legacy: Legacy, tmp_path: Path, fmt: str) -> None:
    src = legacy.paths[f"realistic_{fmt}"]
    dst = tmp_path / "converted.safetensors"
    result = safeckpt.convert(src, dst)
    assert Path(result) == dst and dst.is_file()
    with safe_open(str(dst), framework="pt") as f:  # a valid safetensors file
        assert len(list(f.keys())) > 0
    converted = safeckpt.load(dst)
    assert_same_read(converted, safeckpt.load(src))
    sd = converted["model_state_dict"]
    assert sd["emb.weight"].untyped_storage().data_ptr() == sd["out.weight"].untyped_storage().data_ptr()
    assert TMP_MODULE not in sys.modules


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_convert_realistic_to_multi_files(legacy: Legacy, tmp_path: Path, fmt: str) -> None:
    src = legacy.paths[f"realistic_{fmt}"]
    base = tmp_path / "set" / "m.pth"
    everything = safeckpt.convert(src, tmp_path / "all" / "m.pth", multi=True)  # the default keeps every component
    assert isinstance(everything, dict) and set(everything) == set(safeckpt.load(src))
    keys = ["model_state_dict", "optimizer_state_dict", "model_kwargs"]
    written = safeckpt.convert(src, base, multi=True, keys_to_save=keys)
    assert isinstance(written, dict)
    assert sorted(written) == ["model_kwargs", "model_state_dict", "optimizer_state_dict"]
    assert all(Path(p).is_file() and Path(p).parent == base.parent for p in written.values())
    loaded = safeckpt.load(base)
    read = safeckpt.load(src)
    assert sorted(loaded) == sorted(written)
    assert_same_read(loaded["model_state_dict"], read["model_state_dict"])
    assert_same_read(loaded["optimizer_state_dict"], read["optimizer_state_dict"])
    folded = dict(read["model_kwargs"], seed=read["seed"], sde_class_name="VPSDE", sde_kwargs=read["sde_kwargs"],
                  nn_handler_version=read["nn_handler_version"], pytorch_version=read["pytorch_version"])
    assert_same_read(loaded["model_kwargs"], folded)
    assert src.is_file() and TMP_MODULE not in sys.modules


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_save_multi_from_single_on_a_legacy_file(legacy: Legacy, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "ckpt.pth"
    shutil.copyfile(legacy.paths[f"realistic_{fmt}"], path)
    written = safeckpt.save_multi_from_single(path)
    assert sorted(written) == ["model_kwargs", "model_state_dict", "optimizer_state_dict"]
    loaded = safeckpt.load_multi_files(path)
    read = safeckpt.load(path)
    kwargs = loaded["model_kwargs"]
    assert kwargs["sde_class_name"] == "VPSDE"  # GlobalRef(TMP_MODULE, "VPSDE").short_name
    assert kwargs["seed"] == read["seed"] and kwargs["sde_kwargs"] == read["sde_kwargs"]
    assert type(kwargs["pytorch_version"]) is TorchVersion
    assert_same_read(loaded["model_state_dict"], read["model_state_dict"])


# --------------------------------------------------------------------------- allowed globals, trust_pickle, scan


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("allowed", [nn.CrossEntropyLoss, "torch.nn.modules.loss:CrossEntropyLoss"])
def test_allowed_globals_rebuild_a_loss_module(legacy: Legacy, fmt: str, allowed: Any) -> None:
    path = legacy.paths[f"loss_{fmt}"]
    inert = safeckpt.load(path)["loss_fn"]
    assert isinstance(inert, OpaqueObject) and inert.cls == GlobalRef("torch.nn.modules.loss", "CrossEntropyLoss")
    loss = safeckpt.load(path, allowed_globals=[allowed])["loss_fn"]
    assert type(loss) is nn.CrossEntropyLoss
    assert loss.label_smoothing == 0.1 and loss.reduction == "sum" and loss.ignore_index == -100
    logits, targets = torch.randn(4, 5, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 4, 2, 1])
    reference = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    assert torch.equal(loss(logits, targets), reference(logits, targets))


def test_trust_pickle_is_real_torch_load(legacy: Legacy) -> None:
    state = safeckpt.load(legacy.paths["loss_zip"], trust_pickle=True)
    assert type(state["loss_fn"]) is nn.CrossEntropyLoss and state["loss_fn"].label_smoothing == 0.1


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_scan_realistic_is_not_dangerous(legacy: Legacy, fmt: str) -> None:
    report = safeckpt.scan(legacy.paths[f"realistic_{fmt}"])
    assert report.verdict in ("safe", "suspicious")
    by_name = {g.name: g for g in report.globals}
    assert by_name[f"{TMP_MODULE}:TinyModel"].status == "unknown"
    assert by_name[f"{TMP_MODULE}:VPSDE"].status == "unknown"
    assert by_name["collections:OrderedDict"].status == "allowed"
    assert by_name["torch._utils:_rebuild_tensor_v2"].status == "allowed"
    assert not [g for g in report.globals if g.status == "dangerous"]
    assert not [f for f in report.findings if f.severity == "dangerous"]
    assert TMP_MODULE not in sys.modules


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_scan_plain_state_dict_is_safe(legacy: Legacy, fmt: str) -> None:
    report = safeckpt.scan(legacy.paths[f"state_dict_{fmt}"])
    assert report.verdict == "safe"
    assert report.globals and all(g.status == "allowed" for g in report.globals)
    assert not report.findings or all(f.severity == "suspicious" for f in report.findings)


# --------------------------------------------------------------------------- damaged files

_SPAWN_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen",
                 "ctypes.dlopen", "socket.__new__", "webbrowser.open", "shutil.rmtree")
_spawned: list[str] = []
sys.addaudithook(lambda event, args: _spawned.append(event) if event.startswith(_SPAWN_EVENTS) else None)

DAMAGED = ["state_dict_zip", "state_dict_legacy", "realistic_zip", "realistic_legacy", "numpy_legacy"]


@pytest.mark.parametrize("case", DAMAGED)
def test_truncated_files_raise_format_errors(legacy: Legacy, tmp_path: Path, case: str) -> None:
    data = legacy.paths[case].read_bytes()
    n = len(data)
    cuts = sorted({c for c in (0, 1, 2, 8, 30, 64, 200, n // 4, n // 2, 3 * n // 4, n - 64, n - 22, n - 8, n - 1)
                   if 0 <= c < n})
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.pth"
        path.write_bytes(data[:cut])
        for reader in (safeckpt.load, safeckpt.scan):
            with pytest.raises((safeckpt.CheckpointFormatError, safeckpt.UnsafeCheckpointError)):
                reader(path)


@pytest.mark.parametrize("case", DAMAGED)
def test_bit_flips_raise_only_safeckpt_errors(legacy: Legacy, tmp_path: Path, case: str) -> None:
    data = legacy.paths[case].read_bytes()
    rng = random.Random(f"bit-flips:{case}")
    positions = sorted(rng.sample(range(len(data)), 50))
    bad = []
    spawned_before = len(_spawned)
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip_{pos}.pth"
        path.write_bytes(bytes(flipped))
        for reader in (safeckpt.load, safeckpt.scan):
            try:
                reader(path)
            except safeckpt.SafeCkptError:
                pass
            except Exception as exc:  # noqa: BLE001  (anything else is a reader bug)
                bad.append((pos, reader.__name__, type(exc).__name__, str(exc)[:120]))
        path.unlink()
    assert bad == []
    assert _spawned[spawned_before:] == []  # nothing ran
    assert TMP_MODULE not in sys.modules
