"""A realistic NNHandler training checkpoint through safeckpt, end to end.

The fixture (tests/fixtures.py) really trains a small model with a BatchNorm and
a tied weight, so the state holds what NNHandler writes: state dicts with
``_metadata``, Adam state with int keys and tensor steps, a scheduler, class and
function references, an ``nn.Module`` loss, a ``torch.Generator``, nan/inf
floats and a ``TorchVersion``.
"""

from __future__ import annotations

import copy
import datetime
import enum
import json
import logging
import math
import struct
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch.torch_version import TorchVersion

import safeckpt
import safeckpt.saving
from safeckpt.tensors import SAFETENSORS_DTYPES

import fixtures
from fixtures import STATE_GLOBALS, make_training_state, train_step

# --------------------------------------------------------------------------- helpers

_REFERENCE_TYPES = (type, types.FunctionType, types.BuiltinFunctionType)
_LEAF_TYPES = (type(None), bool, int, complex, str, bytes, TorchVersion, torch.dtype, torch.device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that nan payloads and -0.0 compare exactly."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_tensor_same(actual: Any, expected: torch.Tensor, where: str) -> None:
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad differs"
    assert torch.equal(_bits(actual), _bits(expected)), f"{where}: tensor bytes differ"
    if expected.dtype.is_floating_point and not torch.isnan(expected).any():
        assert torch.equal(actual, expected), f"{where}: tensor values differ"


def _reduced_state(obj: Any) -> Any:
    """What the pickle protocol says an instance's state is (its ``__dict__`` for most classes)."""
    return obj.__reduce_ex__(4)[2]


def assert_same(actual: Any, expected: Any, where: str = "state", *, allowed: bool) -> None:
    """Recursively compare types and values.

    With ``allowed=False`` class/function references must come back as inert
    ``GlobalRef`` and instances of other classes as ``OpaqueObject``; with
    ``allowed=True`` they must be the real objects.
    """
    if isinstance(expected, enum.Enum) or isinstance(expected, _REFERENCE_TYPES):
        if allowed:
            assert actual is expected, f"{where}: {actual!r} is not {expected!r}"
        else:
            ref = safeckpt.GlobalRef(expected.__module__, expected.__qualname__)
            assert type(actual) is safeckpt.GlobalRef and actual == ref, f"{where}: {actual!r} != {ref!r}"
        return
    if isinstance(expected, torch.Tensor):
        assert_tensor_same(actual, expected, where)
        return
    if type(expected) is float:
        assert type(actual) is float, f"{where}: {type(actual)} is not float"
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} is not nan"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), (
                f"{where}: {actual!r} != {expected!r}"
            )
        return
    if isinstance(expected, _LEAF_TYPES):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
        return
    if type(expected) in (dict, OrderedDict):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]", allowed=allowed)
        if type(expected) is OrderedDict:  # a state_dict's _metadata lives here
            assert_same(dict(vars(actual)), dict(vars(expected)), f"{where}.__dict__", allowed=allowed)
        return
    if type(expected) in (list, tuple):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]", allowed=allowed)
        return
    if type(expected) in (set, frozenset):
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"
        return
    # An instance of some other class: an OpaqueObject unless its class is allowed.
    if allowed:
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert_same(_reduced_state(actual), _reduced_state(expected), f"{where}<state>", allowed=True)
    else:
        cls = type(expected)
        assert type(actual) is safeckpt.OpaqueObject, f"{where}: {type(actual)} is not OpaqueObject"
        assert actual.cls == safeckpt.GlobalRef(cls.__module__, cls.__qualname__), f"{where}: {actual.cls!r}"
        assert_same(actual.state, _reduced_state(expected), f"{where}<state>", allowed=False)


def _walk_tensors(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    """(path, tensor) for every tensor reachable through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, dict):
        return [pt for k, v in value.items() for pt in _walk_tensors(v, (*path, k))]
    if isinstance(value, (list, tuple)):
        return [pt for i, v in enumerate(value) for pt in _walk_tensors(v, (*path, i))]
    return []


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), 8 + length


TIED = ("model_state_dict/emb.weight", "model_state_dict/out.weight")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    state, objects = make_training_state()
    path = safeckpt.save_single_file(None, state, tmp_path / "run" / "ckpt.pth")
    return state, objects, path


# --------------------------------------------------------------------------- the fixture itself


def test_fixture_holds_every_nnhandler_key_and_kind() -> None:
    state, objects = make_training_state()
    assert set(state) == {
        "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "grad_scaler_state_dict",
        "model_class", "model_kwargs", "model_type", "optimizer_class", "scheduler_class",
        "optimizer_kwargs", "scheduler_kwargs", "loss_fn", "loss_fn_kwargs", "pass_epoch_to_loss",
        "metrics", "seed", "complimentary_kwargs", "ddp_kwargs", "train_loader_kwargs",
        "val_loader_kwargs", "train_losses", "val_losses", "train_metrics_history",
        "val_metrics_history", "auto_saver_state", "ema_state_dict", "ema_decay", "sde_class",
        "sde_kwargs", "sampler_class", "sampler_kwargs", "sampler_state_dict", "callback_classes",
        "callback_states", "nn_handler_version", "pytorch_version",
    }  # fmt: skip
    msd = state["model_state_dict"]
    assert type(msd) is OrderedDict and hasattr(msd, "_metadata")
    assert msd["norm.num_batches_tracked"].dtype == torch.int64 and msd["norm.num_batches_tracked"].dim() == 0
    assert msd["emb.weight"].data_ptr() == msd["out.weight"].data_ptr()
    assert all(type(k) is int for k in state["optimizer_state_dict"]["state"])
    assert isinstance(state["optimizer_state_dict"]["state"][0]["step"], torch.Tensor)
    assert type(state["pytorch_version"]) is TorchVersion
    assert isinstance(state["train_loader_kwargs"]["generator"], torch.Generator)
    assert isinstance(state["loss_fn"], torch.nn.CrossEntropyLoss)
    assert math.isnan(state["val_losses"][0])
    assert objects["model"] is not None and objects["scheduler"].last_epoch == 3


# --------------------------------------------------------------------------- round trip


def test_realistic_state_round_trips_with_inert_references(saved: Any) -> None:
    state, _, path = saved
    loaded = safeckpt.load_single_file(path)
    assert list(loaded) == list(state)
    assert_same(loaded, state, allowed=False)
    assert loaded["model_class"] == safeckpt.GlobalRef("fixtures", "TinyModel")
    assert loaded["optimizer_class"] == safeckpt.GlobalRef("torch.optim.adam", "Adam")
    assert type(loaded["loss_fn"]) is safeckpt.OpaqueObject
    assert loaded["loss_fn"].cls == safeckpt.GlobalRef("torch.nn.modules.loss", "CrossEntropyLoss")
    assert type(loaded["pytorch_version"]) is TorchVersion
    assert loaded["pytorch_version"] == torch.__version__ and loaded["pytorch_version"] >= "2.0"
    assert math.isnan(loaded["val_losses"][0]) and math.isnan(loaded["val_losses"][2])
    assert loaded["callback_states"]["early_stopping"]["best"] == math.inf
    assert loaded["callback_states"]["checkpoint"]["best_score"] == -math.inf
    assert loaded["model_state_dict"]._metadata == state["model_state_dict"]._metadata
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_realistic_state_round_trips_with_allowed_globals(saved: Any) -> None:
    state, objects, path = saved
    loaded = safeckpt.load_single_file(path, allowed_globals=STATE_GLOBALS)
    assert_same(loaded, state, allowed=True)
    assert loaded["model_class"] is fixtures.TinyModel
    assert loaded["scheduler_kwargs"]["lr_lambda"] is fixtures.lr_lambda
    loss_fn = loaded["loss_fn"]
    assert type(loss_fn) is torch.nn.CrossEntropyLoss
    logits, targets = torch.randn(4, fixtures.VOCAB), torch.tensor([0, 3, 5, 1])
    assert torch.equal(loss_fn(logits, targets), objects["loss_fn"](logits, targets))
    gen = loaded["train_loader_kwargs"]["generator"]
    assert isinstance(gen, torch.Generator) and gen.initial_seed() == fixtures.SEED
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=state["train_loader_kwargs"]["generator"]))
    assert loaded["sampler_state_dict"] == state["sampler_state_dict"]


def test_allowed_globals_by_name_resolves_only_those(saved: Any) -> None:
    _, _, path = saved
    loaded = safeckpt.load_single_file(path, allowed_globals=["fixtures:TinyModel", "torch.optim.adam:Adam"])
    assert loaded["model_class"] is fixtures.TinyModel
    assert loaded["optimizer_class"] is torch.optim.Adam
    assert type(loaded["sde_class"]) is safeckpt.GlobalRef
    assert type(loaded["loss_fn"]) is safeckpt.OpaqueObject
    assert loaded["sde_class"].resolve() is fixtures.VPSDE


# --------------------------------------------------------------------------- resume


def test_resume_from_loaded_state_is_bit_identical(saved: Any) -> None:
    state, objects, path = saved
    loaded = safeckpt.load_single_file(path, allowed_globals=STATE_GLOBALS)

    torch.manual_seed(999)  # a different initialisation, overwritten by the load
    model = loaded["model_class"](**loaded["model_kwargs"])
    assert not torch.equal(model.proj.weight, objects["model"].proj.weight)
    optimizer = loaded["optimizer_class"](model.parameters(), **loaded["optimizer_kwargs"])
    kwargs = {k: v for k, v in loaded["scheduler_kwargs"].items() if k != "lr_lambda"}
    scheduler = loaded["scheduler_class"](optimizer, **kwargs)
    model.load_state_dict(loaded["model_state_dict"], strict=True)
    optimizer.load_state_dict(loaded["optimizer_state_dict"])
    scheduler.load_state_dict(loaded["scheduler_state_dict"])
    assert model.out.weight is model.emb.weight

    batch = objects["batch"]
    loss_orig = train_step(objects["model"], objects["optimizer"], objects["scheduler"], objects["loss_fn"], batch)
    loss_new = train_step(model, optimizer, scheduler, loaded["loss_fn"], batch)

    assert torch.equal(loss_orig, loss_new)
    orig_sd, new_sd = objects["model"].state_dict(), model.state_dict()
    assert list(orig_sd) == list(new_sd)
    for key in orig_sd:
        assert_tensor_same(new_sd[key], orig_sd[key], key)
    orig_opt, new_opt = objects["optimizer"].state_dict(), optimizer.state_dict()
    for idx in orig_opt["state"]:
        for key, value in orig_opt["state"][idx].items():
            assert_tensor_same(new_opt["state"][idx][key], value, f"optimizer state {idx} {key}")
    assert new_opt["param_groups"] == orig_opt["param_groups"]
    assert scheduler.get_last_lr() == objects["scheduler"].get_last_lr()
    assert scheduler.last_epoch == objects["scheduler"].last_epoch == 4


# --------------------------------------------------------------------------- tied weights


def test_tied_weight_is_stored_once_and_comes_back_shared(saved: Any) -> None:
    _, _, path = saved
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert len(keys & set(TIED)) == 1
    msd = safeckpt.load_single_file(path)["model_state_dict"]
    a, b = msd["emb.weight"], msd["out.weight"]
    assert a.data_ptr() == b.data_ptr()
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    with safeckpt.open(path) as ck:
        msd2 = ck.get("model_state_dict")
    assert msd2["emb.weight"].data_ptr() == msd2["out.weight"].data_ptr()


# --------------------------------------------------------------------------- no mutation


def test_save_does_not_mutate_the_state(tmp_path: Path) -> None:
    state, _ = make_training_state()
    snapshot = copy.deepcopy(state)
    top_ids = {k: id(v) for k, v in state.items()}
    model_kwargs = state["model_kwargs"]
    kwargs_before = dict(model_kwargs)
    tensor_ids = [(path, id(t), t.data_ptr()) for path, t in _walk_tensors(state)]
    msd_meta = state["model_state_dict"]._metadata

    safeckpt.save_single_file(None, state, tmp_path / "ckpt.safeckpt")

    assert list(state) == list(snapshot)
    assert {k: id(v) for k, v in state.items()} == top_ids
    assert state["model_kwargs"] is model_kwargs and model_kwargs == kwargs_before
    assert "seed" not in model_kwargs and "sde_class_name" not in model_kwargs
    assert [(path, id(t), t.data_ptr()) for path, t in _walk_tensors(state)] == tensor_ids
    assert state["model_state_dict"]._metadata is msd_meta
    assert_same(state, snapshot, allowed=True)


# --------------------------------------------------------------------------- interop


def test_safetensors_readers_see_every_tensor_under_its_state_path(saved: Any) -> None:
    state, _, path = saved
    walked = {_name(p): t for p, t in _walk_tensors(state)}
    assert {"model_state_dict/proj.weight", "optimizer_state_dict/state/0/exp_avg"} <= set(walked)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        read = {k: f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    missing = set(walked) - set(keys)
    assert len(missing) == 1 and missing <= set(TIED)
    extra = set(keys) - set(walked)  # tensors inside objects (the Generator's state)
    assert all(k.startswith("train_loader_kwargs/generator/") for k in extra), extra
    components = [f"{c}/" for c in state]
    assert all(any(k.startswith(c) for c in components) for k in keys)
    for name, tensor in walked.items():
        if name in read:
            assert torch.equal(read[name], tensor.detach()), name
            assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == set(keys)
    for name in keys:
        assert torch.equal(plain[name], read[name])

    header, _ = _read_header(path)
    assert header["__metadata__"] == metadata
    assert metadata["format"] == "pt"
    assert metadata["safeckpt.format_version"].isdigit()
    assert header["model_state_dict/norm.num_batches_tracked"]["dtype"] == "I64"
    assert header["model_state_dict/norm.num_batches_tracked"]["shape"] == []


def test_plain_safetensors_file_loads_as_dict_of_tensors(tmp_path: Path) -> None:
    tensors = {
        "encoder.weight": torch.randn(3, 4),
        "encoder.bias": torch.zeros(4, dtype=torch.float16),
        "position_ids": torch.arange(5),
    }
    path = tmp_path / "model.pth"  # the extension is not what tells the format
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})

    loaded = safeckpt.load(path)
    assert type(loaded) is dict and set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_tensor_same(loaded[name], t, name)

    with safeckpt.open(path) as ck:
        assert not ck.is_safeckpt
        assert sorted(ck.components()) == sorted(tensors)
        assert sorted(ck.tensor_names()) == sorted(tensors)
        assert torch.equal(ck.get_tensor("encoder.weight"), tensors["encoder.weight"])
        assert ck.metadata == {"format": "pt"}
        info = ck.info()
        assert set(info) == set(tensors)
        for name, t in tensors.items():
            assert info[name].tensors == 1
            assert info[name].bytes == t.numel() * t.element_size()
            assert info[name].dtypes == (str(t.dtype).removeprefix("torch."),)
        with pytest.raises(safeckpt.ComponentNotFoundError):
            ck.get_tensor("nope")


# --------------------------------------------------------------------------- lazy reader


def _expected_info(value: Any) -> tuple[int, int, tuple[str, ...]]:
    tensors = [t for _, t in _walk_tensors(value)]
    if isinstance(value, dict):  # the Generator inside train_loader_kwargs keeps its state as a tensor
        tensors += [v.get_state() for v in value.values() if isinstance(v, torch.Generator)]
    unique = {(t.untyped_storage().data_ptr(), t.dtype, t.shape, t.stride(), t.storage_offset()): t for t in tensors}
    return (
        len(unique),
        sum(t.numel() * t.element_size() for t in unique.values()),
        tuple(sorted({str(t.dtype).removeprefix("torch.") for t in unique.values()})),
    )


def test_lazy_reader_lists_and_reads_components(saved: Any) -> None:
    state, _, path = saved
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    header, _ = _read_header(path)
    file_order = sorted(keys, key=lambda k: header[k]["data_offsets"][0])
    with safeckpt.open(path) as ck:
        assert ck.is_safeckpt
        assert ck.components() == list(state)
        assert ck.tensor_names() == file_order
        msd = ck.get("model_state_dict")
        assert_same(msd, state["model_state_dict"], "model_state_dict", allowed=False)
        assert_same(ck.get("callback_states"), state["callback_states"], "callback_states", allowed=False)
        assert ck.get("model_class") == safeckpt.GlobalRef("fixtures", "TinyModel")
        assert torch.equal(ck.get_tensor("model_state_dict/proj.weight"), state["model_state_dict"]["proj.weight"])

        meta = ck.metadata
        assert meta["library_version"] == safeckpt.__version__
        assert meta["torch_version"] == str(torch.__version__)
        assert isinstance(meta["format_version"], int) and meta["format_version"] >= 1
        created = datetime.datetime.fromisoformat(meta["created"])
        assert created.tzinfo is not None

        info = ck.info()
        assert list(info) == list(state)
        for component, value in state.items():
            got = info[component]
            assert (got.tensors, got.bytes, got.dtypes) == _expected_info(value), component
        assert info["model_state_dict"].dtypes == ("float32", "int64")
        assert info["seed"].tensors == 0 and info["seed"].bytes == 0

        with pytest.raises(safeckpt.ComponentNotFoundError) as excinfo:
            ck.get("nope")
        assert isinstance(excinfo.value, KeyError)
        with pytest.raises(KeyError):
            ck.get("nope")
        with pytest.raises(safeckpt.ComponentNotFoundError):
            ck.get_tensor("model_state_dict/nope")


def test_info_counts_each_tensor_in_its_own_component_only(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(2)}, "model/ema": {"w": torch.ones(3)}}
    path = safeckpt.save_single_file(None, state, tmp_path / "ck")
    with safeckpt.open(path) as ck:
        info = ck.info()
        assert (info["model"].tensors, info["model"].bytes) == (1, 8)
        assert (info["model/ema"].tensors, info["model/ema"].bytes) == (1, 12)
        assert torch.equal(ck.get("model/ema")["w"], torch.ones(3))


def test_reading_one_tensor_does_not_touch_the_others(tmp_path: Path) -> None:
    small = torch.arange(16, dtype=torch.float32)
    big = torch.randn(256, 1024)  # 1 MiB
    state = {"a": {"small": small}, "b": {"big": big}, "step": 7}
    path = safeckpt.save_single_file(None, state, tmp_path / "two.safeckpt")

    header, data_start = _read_header(path)
    begin, end = header["b/big"]["data_offsets"]
    with open(path, "r+b") as f:  # corrupt b/big in place, after it was saved
        f.seek(data_start + begin)
        f.write(b"\xa5" * (end - begin))

    with safeckpt.open(path, verify=True) as ck:
        assert torch.equal(ck.get_tensor("a/small"), small)
        assert torch.equal(ck.get("a")["small"], small)
        assert ck.get("step") == 7
        with pytest.raises(safeckpt.IntegrityError) as excinfo:
            ck.get("b")
        assert excinfo.value.tensor_name == "b/big"
        with pytest.raises(safeckpt.IntegrityError) as excinfo:
            ck.get_tensor("b/big")
        assert excinfo.value.tensor_name == "b/big"
    with pytest.raises(safeckpt.IntegrityError) as excinfo:
        safeckpt.load_single_file(path, verify=True)
    assert excinfo.value.tensor_name == "b/big"
    with safeckpt.open(path) as ck:  # without verify the corrupt bytes are returned as they are
        assert not torch.equal(ck.get("b")["big"], big)


def test_lazy_reader_hands_out_tensors_independent_of_the_file(tmp_path: Path) -> None:
    weight = torch.arange(10, dtype=torch.float32)
    path = safeckpt.save_single_file(None, {"m": {"w": weight}}, tmp_path / "ck")
    with safeckpt.open(path, verify=True) as ck:
        first = ck.get("m")["w"]
        first.add_(1.0)  # the caller owns what it was given, e.g. a state dict it trains on
        assert torch.equal(ck.get_tensor("m/w"), weight)  # a read gives the file's bytes, not the caller's edit
        assert torch.equal(ck.get("m")["w"], weight)
    assert torch.equal(first, weight + 1.0)


# --------------------------------------------------------------------------- tensors


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = math.prod(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    dtypes = [*SAFETENSORS_DTYPES, torch.complex128]
    tensors = {str(dt).removeprefix("torch."): _random_tensor(dt, (2, 3), gen) for dt in dtypes}
    path = safeckpt.save_single_file(None, {"t": tensors}, tmp_path / "dtypes")
    loaded = safeckpt.load_single_file(path)["t"]
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert_tensor_same(loaded[name], t, name)
    with safe_open(str(path), "pt") as f:
        for dt, code in SAFETENSORS_DTYPES.items():
            assert f.get_tensor(f"t/{str(dt).removeprefix('torch.')}").dtype == dt, code


def test_tensor_shapes_layouts_and_flags_round_trip(tmp_path: Path) -> None:
    m = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    param = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    state = {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7),
        "empty": torch.empty(0, 3),
        "transposed": m.t(),
        "strided": m[::2, 1::2],
        "negative_zero_nan": torch.tensor([-0.0, math.nan, math.inf, -math.inf]),
        "param": param,
        "frozen": frozen,
        "leaf_requires_grad": torch.ones(2, requires_grad=True),
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    path = safeckpt.save_single_file(None, state, tmp_path / "layouts")
    loaded = safeckpt.load_single_file(path)
    assert_same(loaded, state, allowed=False)
    assert loaded["param"].requires_grad and not loaded["frozen"].requires_grad


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_views_of_one_storage_come_back_sharing_it(tmp_path: Path) -> None:
    x = torch.arange(10, dtype=torch.float32)
    base = torch.arange(12, dtype=torch.float64)
    y = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    z = torch.arange(8, dtype=torch.float32)
    state = {
        "x": x,
        "x_view": x[1:3],
        "left": base[0:6],  # overlapping views, neither covers the other
        "right": base[3:9],
        "y": y,
        "y_t": y.t(),
        "z_view_first": z[2:5],  # the view comes before its base
        "z": z,
    }
    path = safeckpt.save_single_file(None, state, tmp_path / "views")
    loaded = safeckpt.load_single_file(path)
    assert_same(loaded, state, allowed=False)
    for a, b in [("x", "x_view"), ("left", "right"), ("y", "y_t"), ("z", "z_view_first")]:
        assert _shares(loaded[a], loaded[b]), (a, b)
    assert not _shares(loaded["x"], loaded["y"]) and not _shares(loaded["x"], loaded["left"])
    loaded["x"][1] = 100.0
    assert loaded["x_view"][0].item() == 100.0
    loaded["left"][4] = -1.0
    assert loaded["right"][1].item() == -1.0
    loaded["y"][0, 2] = 42
    assert loaded["y_t"][2, 0].item() == 42
    loaded["z"][3] = 9.5
    assert loaded["z_view_first"][1].item() == 9.5


def test_slice_of_a_big_tensor_stores_only_the_slice(tmp_path: Path) -> None:
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    for name, view in [("slice", big[1000:1010]), ("strided", big[::65536])]:
        state = {"model": {name: view}}
        path = safeckpt.save_single_file(None, state, tmp_path / name)
        assert path.stat().st_size < 64 * 1024, name
        loaded = safeckpt.load_single_file(path)
        assert_same(loaded, state, allowed=False)


# --------------------------------------------------------------------------- nn_handler protocol


class RecordingHandler:
    def __init__(self, rank: int = 3) -> None:
        self._rank = rank
        self.messages: list[str] = []
        self.errors: list[tuple[type[BaseException], str, BaseException]] = []

    def log(self, message: str) -> None:
        self.messages.append(message)

    def raise_error(self, exc_type: type[BaseException], message: str, cause: BaseException) -> None:
        self.errors.append((exc_type, message, cause))
        raise exc_type(message) from cause


class RankOnly:
    rank = 2


def test_success_is_logged_through_the_handler_with_its_rank(tmp_path: Path) -> None:
    handler = RecordingHandler()
    target = tmp_path / "deep" / "er" / "ckpt.safeckpt"
    written = safeckpt.save_single_file(handler, {"seed": 1}, str(target))
    assert isinstance(written, Path) and written == target
    assert target.is_file()
    assert len(handler.messages) == 1 and "Rank 3" in handler.messages[0]
    assert str(target) in handler.messages[0]
    assert handler.errors == []


def test_failing_save_goes_through_raise_error(tmp_path: Path) -> None:
    handler = RecordingHandler()
    target = tmp_path / "ckpt.safeckpt"
    with pytest.raises(safeckpt.UnsupportedValueError) as excinfo:
        safeckpt.save_single_file(handler, {"seed": 1, "bad": lambda x: x}, target)
    assert len(handler.errors) == 1
    exc_type, message, cause = handler.errors[0]
    assert exc_type is safeckpt.UnsupportedValueError
    assert "Rank 3" in message and str(target) in message and "state['bad']" in message
    assert isinstance(cause, safeckpt.UnsupportedValueError) and cause.path_in_state == "state['bad']"
    assert excinfo.value.__cause__ is cause
    assert handler.messages == []
    assert list(tmp_path.iterdir()) == []


def test_failing_save_without_handler_raises_directly(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError) as excinfo:
        safeckpt.save_single_file(None, {"x": {"bad": lambda: 0}}, tmp_path / "ckpt")
    assert excinfo.value.path_in_state == "state['x']['bad']"
    assert list(tmp_path.iterdir()) == []


def test_without_handler_the_safeckpt_logger_gets_the_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="safeckpt")
    target = tmp_path / "ckpt"
    safeckpt.save_single_file(None, {"seed": 1}, target)
    records = [r for r in caplog.records if r.name == "safeckpt"]
    assert len(records) == 1
    assert "Rank 0" in records[0].getMessage() and str(target) in records[0].getMessage()


def test_rank_attribute_is_used_when_there_is_no_private_rank(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="safeckpt")
    safeckpt.save_single_file(RankOnly(), {"seed": 1}, tmp_path / "ckpt")
    messages = [r.getMessage() for r in caplog.records if r.name == "safeckpt"]
    assert len(messages) == 1 and "Rank 2" in messages[0]


def test_private_rank_wins_over_rank(tmp_path: Path) -> None:
    handler = RecordingHandler(rank=3)
    handler.rank = 5  # type: ignore[attr-defined]
    safeckpt.save_single_file(handler, {"seed": 1}, tmp_path / "ckpt")
    assert "Rank 3" in handler.messages[0] and "Rank 5" not in handler.messages[0]


# --------------------------------------------------------------------------- public names

# The public names of SPEC sections 1, 4 and 6.
SPEC_NAMES = {
    "save_single_file", "save_multi_files", "save_multi_from_single",
    "load_single_file", "load_multi_files", "load", "open", "convert", "scan",
    "Checkpoint", "CheckpointManager", "GlobalRef", "OpaqueObject", "Limits", "ScanReport",
    "SafeCkptError", "CheckpointFormatError", "UnsafeCheckpointError", "UnsupportedValueError",
    "IntegrityError", "LimitExceededError", "ComponentNotFoundError", "FallbackWarning",
}  # fmt: skip


def test_all_is_sorted_unique_and_importable() -> None:
    names = safeckpt.__all__
    assert len(names) == len(set(names))
    assert names == sorted(names)
    for name in names:
        assert hasattr(safeckpt, name), name
    exec(f"from safeckpt import {', '.join(names)}", {})


def test_all_lists_exactly_the_public_names() -> None:
    public = {  # dir(): the names are imported lazily, on first use
        name
        for name in dir(safeckpt)
        if not name.startswith("_") and not isinstance(getattr(safeckpt, name), types.ModuleType)
    }
    assert public | {"__version__"} == set(safeckpt.__all__)
    assert SPEC_NAMES | {"__version__"} == set(safeckpt.__all__)
    assert safeckpt.saving.save_single_file is safeckpt.save_single_file
