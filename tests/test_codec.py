"""Example tests of the value codec: one behaviour each.

What the safe format holds (SPEC section 1, "Non-tensor values"), how class
references and plain-data objects come back, what it refuses and where, and
how the decoder treats hand-crafted hostile skeleton bytes.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import enum
import json
import logging
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest
import torch
from torch import nn
from torch.torch_version import TorchVersion

import safeckpt
from safeckpt import CheckpointFormatError, GlobalRef, LimitExceededError, OpaqueObject, UnsupportedValueError
from safeckpt.codec import Decoder, Encoder, Ext, Tag, pack
from safeckpt.container import META_SKELETON, META_VERSION
from safeckpt.limits import DEFAULT_LIMITS
from safeckpt.refs import AllowList
from safeckpt.tensors import NameAllocator, TensorPlan

MODULE = __name__  # how this file's classes are named in GlobalRefs


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass
class TrainConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    name: str = "vp"
    steps: int = 1000


class Point(NamedTuple):
    x: int
    y: float


# --------------------------------------------------------------------------- helpers


def save_load(tmp_path: Path, state: dict[Any, Any], **load_kwargs: Any) -> Any:
    path = tmp_path / "x.safeckpt"
    safeckpt.save_single_file(None, state, path)
    return safeckpt.load(path, **load_kwargs)


def roundtrip(tmp_path: Path, value: Any, **load_kwargs: Any) -> Any:
    return save_load(tmp_path, {"value": value}, **load_kwargs)["value"]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_identical(a: Any, b: Any, where: str = "value") -> None:
    """Same type at every level, same order, bit-identical floats, tensors and arrays."""
    assert type(a) is type(b), f"{where}: {type(a)!r} came back as {type(b)!r}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        da, db = a.detach().contiguous(), b.detach().contiguous()
        if da.numel():
            da = da.as_strided((da.numel(),), (1,)).view(torch.uint8)
            db = db.as_strided((db.numel(),), (1,)).view(torch.uint8)
        assert torch.equal(da.reshape(-1), db.reshape(-1)), f"{where}: tensor bytes differ"
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype.str, a.shape, a.tobytes()) == (b.dtype.str, b.shape, b.tobytes()), where
    elif type(a) is float:
        assert _bits(a) == _bits(b), f"{where}: {a!r} vs {b!r}"
    elif type(a) is complex:
        assert (_bits(a.real), _bits(a.imag)) == (_bits(b.real), _bits(b.imag)), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys or their order differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
        if isinstance(a, collections.OrderedDict):
            assert_identical(dict(vars(a)), dict(vars(b)), f"{where}.__dict__")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, (set, frozenset)):
        assert {(type(x), x) for x in a} == {(type(x), x) for x in b}, where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def temp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- supported kinds

SUPPORTED_VALUES = {
    "none": None,
    "bool": True,
    "int": -7,
    "int_u64_max": 2**64 - 1,
    "bigint": 2**200 + 1,
    "negative_bigint": -(2**100) - 3,
    "float": 0.1,
    "float_nan": math.nan,
    "float_inf": math.inf,
    "float_neg_inf": -math.inf,
    "float_neg_zero": -0.0,
    "complex": complex(1.5, -0.0),
    "complex_nan": complex(math.nan, math.inf),
    "str": "héllo ☃ \U0001f600",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab\x00"),
    "list": [1, "a", None],
    "tuple": (1, (2, 3), ()),
    "set": {1, "a", b"b", None},
    "frozenset": frozenset({1.5, (1, 2)}),
    "dict": {"a": 1, 2: "b", None: [], 1.5: {}, b"k": ()},
    "ordered_dict": collections.OrderedDict([("z", 1), ("a", 2)]),
    "dtype": torch.bfloat16,
    "device": torch.device("cuda", 1),
    "size": torch.Size([2, 0, 3]),
    "torch_version": torch.__version__,
    "numpy_float32": np.float32(1.25),
    "numpy_int8": np.int8(-3),
    "numpy_uint64": np.uint64(2**64 - 1),
    "numpy_bool": np.bool_(True),
    "numpy_complex128": np.complex128(1 - 2j),
    "numpy_str": np.str_("ab"),
    "numpy_empty_str": np.str_(""),
    "numpy_empty_bytes": np.bytes_(b""),
    "numpy_array": np.arange(6, dtype=np.float64).reshape(2, 3),
    "numpy_big_endian_array": np.arange(4, dtype=">i4"),
    "numpy_unicode_array": np.array(["a", "bcd"]),
    "numpy_0d_array": np.array(2.5),
    "numpy_empty_array": np.zeros((0, 2), dtype=np.int16),
    "tensor": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "tensor_0d": torch.tensor(3, dtype=torch.int64),
    "tensor_empty": torch.zeros(0, 4),
    "tensor_bool": torch.tensor([True, False]),
    "tensor_float8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    "tensor_complex128": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex128),
    "tensor_transposed": torch.arange(6.0).reshape(2, 3).t(),
    "tensor_single_element_slice": torch.arange(8.0)[::4][:1],
    "tensor_empty_slice": torch.arange(8.0)[::2][:0],
    "parameter": nn.Parameter(torch.ones(2, 2)),
    "parameter_frozen": nn.Parameter(torch.ones(3), requires_grad=False),
}


@pytest.mark.parametrize("kind", list(SUPPORTED_VALUES))
def test_supported_value_roundtrips_with_the_same_type(tmp_path: Path, kind: str) -> None:
    value = SUPPORTED_VALUES[kind]
    assert_identical(value, roundtrip(tmp_path, value))


def test_torch_version_comes_back_comparable(tmp_path: Path) -> None:
    loaded = roundtrip(tmp_path, TorchVersion("2.1.0"))
    assert type(loaded) is TorchVersion
    assert loaded >= (2, 0) and loaded < "2.2"


def test_state_dict_metadata_survives_inside_a_state(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    sd = model.state_dict()
    loaded = save_load(tmp_path, {"model_state_dict": sd})["model_state_dict"]
    assert type(loaded) is collections.OrderedDict
    assert loaded._metadata == sd._metadata
    assert_identical(sd, loaded)
    nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).load_state_dict(loaded, strict=True)


def test_state_dict_metadata_survives_when_the_state_is_the_state_dict(tmp_path: Path) -> None:
    sd = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).state_dict()
    loaded = save_load(tmp_path, sd)
    assert type(loaded) is collections.OrderedDict
    assert list(loaded) == list(sd)
    assert loaded._metadata == sd._metadata
    assert_identical(sd, loaded)


def test_optimizer_state_int_keys_survive(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    loaded = save_load(tmp_path, {"optimizer_state_dict": osd})["optimizer_state_dict"]
    assert list(loaded["state"]) == [0, 1] and all(type(k) is int for k in loaded["state"])
    assert_identical(osd, loaded)
    torch.optim.Adam(nn.Linear(3, 2).parameters()).load_state_dict(loaded)


def test_tuple_and_frozenset_dict_keys_survive(tmp_path: Path) -> None:
    value = {(1, "a"): 1, frozenset({2, 3}): 2, ((1, 2), None): 3, "plain": 4}
    assert_identical(value, roundtrip(tmp_path, value))


def test_distinct_nan_keys_are_not_merged(tmp_path: Path) -> None:
    value = {complex(math.nan, 0): "first", complex(math.nan, 0): "second", math.nan: "third", -math.nan: "fourth"}
    assert len(value) == 4  # nan != nan: four distinct keys
    loaded = roundtrip(tmp_path, value)
    assert list(loaded.values()) == ["first", "second", "third", "fourth"]


def test_class_and_its_placeholder_as_keys_save_only_what_loads(tmp_path: Path) -> None:
    # nn.Linear and its GlobalRef are distinct keys that the format writes identically.
    value = {nn.Linear: "class", GlobalRef("torch.nn.modules.linear", "Linear"): "placeholder"}
    path = tmp_path / "x.safeckpt"
    try:
        safeckpt.save_single_file(None, {"value": value}, path)
    except UnsupportedValueError as exc:  # refusing such a state up front is fine
        assert exc.path_in_state is not None and exc.path_in_state.startswith("state['value']")
        assert not path.exists()
        return
    loaded = safeckpt.load(path)["value"]
    assert sorted(loaded.values()) == ["class", "placeholder"]


# --------------------------------------------------------------------------- objects and references


def test_module_instance_loads_as_opaque_object(tmp_path: Path) -> None:
    loaded = roundtrip(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.1))
    assert type(loaded) is OpaqueObject
    assert loaded.cls == GlobalRef("torch.nn.modules.loss", "CrossEntropyLoss")
    assert loaded.state["label_smoothing"] == 0.1


@pytest.mark.parametrize(
    "allowed", [nn.CrossEntropyLoss, "torch.nn.modules.loss:CrossEntropyLoss"], ids=["object", "name"]
)
def test_allowed_module_class_rebuilds_the_instance(tmp_path: Path, allowed: Any) -> None:
    loaded = roundtrip(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.1), allowed_globals=[allowed])
    assert type(loaded) is nn.CrossEntropyLoss
    assert loaded.label_smoothing == 0.1
    logits, target = torch.tensor([[2.0, 0.5]]), torch.tensor([0])
    assert torch.equal(loaded(logits, target), nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target))


def test_opaque_object_rebuild_returns_the_real_instance(tmp_path: Path) -> None:
    opaque = roundtrip(tmp_path, nn.CrossEntropyLoss(ignore_index=3))
    rebuilt = opaque.rebuild()
    assert type(rebuilt) is nn.CrossEntropyLoss
    assert rebuilt.ignore_index == 3


@pytest.mark.parametrize(
    "instance",
    [TrainConfig(lr=0.5, tags=["a"]), FrozenConfig(name="ve", steps=7)],
    ids=["dataclass", "frozen_dataclass"],
)
def test_dataclass_instance_is_opaque_unless_allowed(tmp_path: Path, instance: Any) -> None:
    opaque = roundtrip(tmp_path, instance)
    assert type(opaque) is OpaqueObject
    assert opaque.cls == GlobalRef(MODULE, type(instance).__qualname__)
    rebuilt = roundtrip(tmp_path, instance, allowed_globals=[type(instance)])
    assert type(rebuilt) is type(instance)
    assert rebuilt == instance
    assert opaque.rebuild() == instance


def test_namedtuple_instance_is_opaque_unless_allowed(tmp_path: Path) -> None:
    opaque = roundtrip(tmp_path, Point(1, 2.5))
    assert type(opaque) is OpaqueObject
    assert opaque.cls == GlobalRef(MODULE, "Point")
    rebuilt = roundtrip(tmp_path, Point(1, 2.5), allowed_globals=[f"{MODULE}:Point"])
    assert type(rebuilt) is Point and rebuilt == Point(1, 2.5)


def test_class_and_function_references_are_global_refs(tmp_path: Path) -> None:
    loaded = roundtrip(tmp_path, [nn.Linear, math.sqrt, torch.optim.Adam])
    assert loaded == [
        GlobalRef("torch.nn.modules.linear", "Linear"),
        GlobalRef("math", "sqrt"),
        GlobalRef("torch.optim.adam", "Adam"),
    ]
    assert all(type(x) is GlobalRef for x in loaded)


def test_enum_member_is_global_ref_unless_its_enum_class_is_allowed(tmp_path: Path) -> None:
    assert roundtrip(tmp_path, Color.BLUE) == GlobalRef(MODULE, "Color.BLUE")
    assert roundtrip(tmp_path, Color.BLUE, allowed_globals=["math:sqrt"]) == GlobalRef(MODULE, "Color.BLUE")
    assert roundtrip(tmp_path, Color.BLUE, allowed_globals=[Color]) is Color.BLUE
    assert roundtrip(tmp_path, Color.BLUE, allowed_globals=[f"{MODULE}:Color"]) is Color.BLUE


def test_global_ref_resolve_imports_the_object() -> None:
    assert GlobalRef("torch.nn.modules.linear", "Linear").resolve() is nn.Linear
    assert GlobalRef(MODULE, "Color.RED").resolve() is Color.RED
    assert GlobalRef.parse("math:sqrt").resolve() is math.sqrt


def test_resaving_loaded_placeholders_roundtrips_equal_placeholders(tmp_path: Path) -> None:
    state = {
        "loss_fn": nn.CrossEntropyLoss(),
        "config": TrainConfig(tags=["x"]),
        "point": Point(1, 2.0),
        "model_class": nn.Linear,
        "mode": Color.RED,
    }
    first = save_load(tmp_path, state)
    (tmp_path / "again").mkdir()
    second = save_load(tmp_path / "again", first)
    assert second == first
    assert [type(v) for v in second.values()] == [OpaqueObject, OpaqueObject, OpaqueObject, GlobalRef, GlobalRef]
    rebuilt = save_load(tmp_path / "again", first, allowed_globals=[nn.CrossEntropyLoss])["loss_fn"]
    assert type(rebuilt) is nn.CrossEntropyLoss


# --------------------------------------------------------------------------- refusals


def _generator() -> Any:
    yield 1


def _unsupported_states() -> dict[str, tuple[Any, str]]:
    def local_function() -> None:
        pass

    class LocalClass:
        pass

    cycle: list[Any] = [1]
    cycle.append(cycle)
    return {
        "lambda": ({"loss_fn": lambda x: x}, "state['loss_fn']"),
        "local_function": ({"hooks": {"post": local_function}}, "state['hooks']['post']"),
        "local_class_instance": ({"obj": LocalClass()}, "state['obj']"),
        "lock": ({"lock": threading.Lock()}, "state['lock']"),
        "generator": ({"it": [0, _generator()]}, "state['it'][1]"),
        "reference_cycle": ({"a": cycle}, "state['a'][1]"),
    }


@pytest.mark.parametrize("case", list(_unsupported_states()))
def test_unsupported_value_error_names_its_exact_path(tmp_path: Path, case: str) -> None:
    state, path_in_state = _unsupported_states()[case]
    target = tmp_path / "x.safeckpt"
    with pytest.raises(UnsupportedValueError) as info:
        safeckpt.save_single_file(None, state, target)
    assert isinstance(info.value, TypeError)
    assert info.value.path_in_state == path_in_state
    assert path_in_state in str(info.value)
    assert temp_leftovers(tmp_path) == []


def test_open_file_is_refused_with_its_path(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.safeckpt"
    with open(tmp_path / "log.txt", "w") as handle:
        with pytest.raises(UnsupportedValueError) as info:
            safeckpt.save_single_file(None, {"logging": {"file": handle}}, target)
    assert info.value.path_in_state == "state['logging']['file']"
    assert not target.exists()
    assert not target.parent.exists() or temp_leftovers(target.parent) == []


def test_list_containing_itself_is_refused_at_the_inner_reference(tmp_path: Path) -> None:
    a: list[Any] = []
    a.append(a)
    with pytest.raises(UnsupportedValueError) as info:
        safeckpt.save_single_file(None, {"a": a}, tmp_path / "x.safeckpt")
    assert info.value.path_in_state == "state['a'][0]"
    assert temp_leftovers(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "x.safeckpt"
    safeckpt.save_single_file(None, {"step": 1}, target)
    before = target.read_bytes()
    with pytest.raises(UnsupportedValueError):
        safeckpt.save_single_file(None, {"step": 2, "fn": lambda: 0}, target)
    assert target.read_bytes() == before
    assert temp_leftovers(tmp_path) == ["x.safeckpt"]


# --------------------------------------------------------------------------- nothing is imported

PROBE_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.sentinel").write_text("imported")

class TheClass:
    def __init__(self):
        self.answer = 42

def the_function():
    return 1
"""

SAVE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import probe_mod_safeckpt, safeckpt
probe = probe_mod_safeckpt
state = {"cls": probe.TheClass, "obj": probe.TheClass(), "fn": probe.the_function}
safeckpt.save_single_file(None, state, sys.argv[2])
"""

LOAD_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import safeckpt
sentinel = os.path.join(sys.argv[1], "imported.sentinel")
report = {}
state = safeckpt.load(sys.argv[2])
report["inert"] = {
    "imported": "probe_mod_safeckpt" in sys.modules,
    "sentinel": os.path.exists(sentinel),
    "types": {k: type(v).__name__ for k, v in state.items()},
    "cls": str(state["cls"]),
}
state = safeckpt.load(sys.argv[2], allowed_globals=["probe_mod_safeckpt:TheClass"])
report["allowed"] = {
    "imported": "probe_mod_safeckpt" in sys.modules,
    "sentinel": os.path.exists(sentinel),
    "types": {k: type(v).__name__ for k, v in state.items()},
    "answer": getattr(state["obj"], "answer", None),
}
print(json.dumps(report))
"""


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(safeckpt.__file__).resolve().parent.parent))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_loading_imports_no_module_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "probe_mod_safeckpt.py").write_text(PROBE_MODULE)
    ckpt = tmp_path / "probe.safeckpt"
    saved = _python(SAVE_SCRIPT, str(tmp_path), str(ckpt))
    assert saved.returncode == 0, saved.stderr
    sentinel = tmp_path / "imported.sentinel"
    assert sentinel.exists()  # the probe works: importing it leaves the sentinel
    sentinel.unlink()

    loaded = _python(LOAD_SCRIPT, str(tmp_path), str(ckpt))
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["inert"] == {
        "imported": False,
        "sentinel": False,
        "types": {"cls": "GlobalRef", "obj": "OpaqueObject", "fn": "GlobalRef"},
        "cls": "probe_mod_safeckpt:TheClass",
    }
    assert report["allowed"] == {
        "imported": True,
        "sentinel": True,
        "types": {"cls": "type", "obj": "TheClass", "fn": "GlobalRef"},
        "answer": 42,
    }


# --------------------------------------------------------------------------- hostile skeletons


def _tag(tag: Tag) -> msgpack.ExtType:
    return msgpack.ExtType(Ext.TAG, bytes([tag]))


def _any_entry(name: str) -> torch.Tensor:
    """The tensor source of the hostile cases: every entry is the same 16 bytes."""
    return torch.arange(16, dtype=torch.uint8)


def _decode(data: bytes, allowed: Any = ()) -> Any:
    return Decoder(_any_entry, AllowList(allowed), DEFAULT_LIMITS).unpack(data)


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_decoder_reads_back_what_the_encoder_writes() -> None:
    """The baseline the hostile cases below deviate from."""
    encoder = Encoder(TensorPlan(NameAllocator()), DEFAULT_LIMITS)
    value = {"a": (1, 2), "b": {1, 2}, 3: [torch.float16, 2**70, 1j]}
    assert _decode(pack(encoder.encode(value, ("v",)))) == value


def test_unknown_extension_code_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError, match="extension"):
        _decode(_packb([1, msgpack.ExtType(42, b"\x00")]))


def test_tag_not_at_the_start_of_an_array_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([1, _tag(Tag.TUPLE), 2]))


def test_tag_inside_a_tagged_array_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.TUPLE), 1, _tag(Tag.SET)]))


def test_bare_tag_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(_tag(Tag.TUPLE)))


def test_tag_as_map_key_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb({_tag(Tag.TUPLE): 1}))


@pytest.mark.parametrize(
    "tag_bytes", [b"", b"\x00", b"\x63", b"\x01\x01"], ids=["empty", "zero", "unknown", "two_bytes"]
)
def test_unknown_tag_is_a_format_error(tag_bytes: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([msgpack.ExtType(Ext.TAG, tag_bytes), 1]))


@pytest.mark.parametrize(
    "body",
    [
        [_tag(Tag.TENSOR), "entry"],
        [_tag(Tag.TENSOR), "entry", 0, None, None],
        [_tag(Tag.NDARRAY), "entry", "<f4"],
        [_tag(Tag.NDARRAY_BYTES), "<f4", [1]],
        [_tag(Tag.OBJECT), msgpack.ExtType(Ext.GLOBAL, b"math:sqrt"), "new", [], {}],
        [_tag(Tag.ORDERED_DICT)],
        [_tag(Tag.DICT), "a", 1, "b"],
    ],
    ids=[
        "tensor_short",
        "tensor_long",
        "ndarray_short",
        "ndarray_bytes_short",
        "object_short",
        "ordered_dict_empty",
        "dict_odd",
    ],
)
def test_tagged_array_with_the_wrong_arity_is_a_format_error(body: list[Any]) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(body))


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(Ext.BIGINT, b""),
        msgpack.ExtType(Ext.COMPLEX, b"\x00" * 15),
        msgpack.ExtType(Ext.COMPLEX, b"\x00" * 17),
    ],
    ids=["bigint_empty", "complex_short", "complex_long"],
)
def test_number_extension_with_a_bad_length_is_a_format_error(ext: msgpack.ExtType) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(ext))


@pytest.mark.parametrize(
    "name", [b"float99", b"Tensor", b"\xff\xfe", b""], ids=["unknown", "not_a_dtype", "not_ascii", "empty"]
)
def test_unknown_dtype_name_is_a_format_error(name: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(msgpack.ExtType(Ext.DTYPE, name)))


def test_unknown_dtype_in_a_tensor_view_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.TENSOR), "entry", 0, ["float99", [2], [1], 0]]))


def test_tensor_view_past_the_end_of_its_entry_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.TENSOR), "entry", 0, ["float32", [5], [1], 0]]))  # 20 bytes of 16


@pytest.mark.parametrize("code", [b"|O8", b"|O", b"|V8", b"<f4[x]x"], ids=["object", "object_bare", "void", "junk"])
def test_numpy_scalar_of_an_object_or_unknown_dtype_is_a_format_error(code: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(msgpack.ExtType(Ext.NUMPY_SCALAR, code + b"\0" + b"\0" * 8)))


def test_inline_numpy_array_of_object_dtype_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.NDARRAY_BYTES), "|O8", [1], b"\0" * 8]))


@pytest.mark.parametrize(
    "name", [b"os:system;rm", b"os:system rm -rf", b"os", b":system", b"os:", b"os:__import__('x')", b"\xff:x"]
)
def test_global_with_an_invalid_name_is_a_format_error(name: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(msgpack.ExtType(Ext.GLOBAL, name)))
    with pytest.raises(CheckpointFormatError):
        _decode(_packb(msgpack.ExtType(Ext.GLOBAL, name)), allowed=["os:system"])


def test_allowed_global_that_does_not_exist_stays_inert_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The caller's name is wrong, not the file: it is reported (issue 15) and the reference stays inert."""
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        value = _decode(_packb(msgpack.ExtType(Ext.GLOBAL, b"math:no_such_function")), allowed=["math:no_such_function"])
    assert value == GlobalRef("math", "no_such_function")
    assert "math:no_such_function: math has no 'no_such_function'; ignored" in caplog.text


def test_duplicate_map_key_is_a_format_error() -> None:
    raw = b"\x82\xa1a\x01\xa1a\x02"  # fixmap of 2: "a": 1, "a": 2
    with pytest.raises(CheckpointFormatError, match="duplicate"):
        _decode(raw)


def test_duplicate_key_in_a_tagged_dict_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError, match="duplicate"):
        _decode(_packb([_tag(Tag.DICT), [_tag(Tag.TUPLE), 1, 2], 1, [_tag(Tag.TUPLE), 1, 2], 2]))
    with pytest.raises(CheckpointFormatError, match="duplicate"):
        _decode(_packb([_tag(Tag.ORDERED_DICT), None, "k", 1, "k", 2]))


def test_ordered_dict_attribute_with_a_dunder_name_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.ORDERED_DICT), {"__class__": 1}, "k", 1]))


def test_unhashable_set_member_is_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([_tag(Tag.SET), [1, 2]]))


def test_nesting_past_msgpacks_limit_is_a_limit_error() -> None:
    raw = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays around nil
    with pytest.raises(LimitExceededError) as info:
        _decode(raw)
    assert info.value.limit == "max_depth"


def test_truncated_skeleton_is_a_format_error_at_every_length() -> None:
    encoder = Encoder(TensorPlan(NameAllocator()), DEFAULT_LIMITS)
    value = {
        "ints": [1, -(2**70), 2**64 - 1],
        "misc": (1.5, 2j, "é", b"x", bytearray(b"y"), None, True),
        "torch": [torch.float16, torch.device("cpu"), torch.Size([2, 3]), torch.__version__],
        "numpy": [np.float32(1.5), np.array(["ab"])],
        "od": collections.OrderedDict([((1, 2), frozenset({3}))]),
        "ref": math.sqrt,
    }
    raw = pack(encoder.encode(value, ("v",)))
    assert type(_decode(raw)) is dict
    for end in range(len(raw)):
        with pytest.raises(CheckpointFormatError):
            _decode(raw[:end])


def test_trailing_bytes_after_the_skeleton_are_a_format_error() -> None:
    with pytest.raises(CheckpointFormatError):
        _decode(_packb([1, 2]) + b"\x01")


# --------------------------------------------------------------------------- hostile skeleton roots in a file


def _write_crafted_file(path: Path, components: list[Any], *, kind: str = "dict", attrs: bytes | None = None) -> Path:
    root = _packb({"root": kind, "attrs": attrs, "components": components})
    metadata = {"format": "pt", META_VERSION: "1", META_SKELETON: base64.b64encode(root).decode("ascii")}
    header = json.dumps({"__metadata__": metadata}).encode("ascii")
    header += b" " * (-(8 + len(header)) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_handwritten_file_with_plain_components_loads(tmp_path: Path) -> None:
    """The baseline the crafted-file cases below deviate from."""
    path = _write_crafted_file(tmp_path / "ok.safeckpt", [[_packb("epoch"), "epoch", _packb(3)]])
    assert safeckpt.load(path) == {"epoch": 3}


def test_component_key_that_is_a_list_is_a_format_error(tmp_path: Path) -> None:
    path = _write_crafted_file(tmp_path / "bad.safeckpt", [[_packb([1, 2]), "x", _packb(1)]])
    with pytest.raises(CheckpointFormatError):
        safeckpt.load(path)


def test_state_attributes_on_a_plain_dict_root_are_a_format_error(tmp_path: Path) -> None:
    path = _write_crafted_file(tmp_path / "bad.safeckpt", [[_packb("a"), "a", _packb(1)]], attrs=_packb({"extra": 1}))
    with pytest.raises(CheckpointFormatError):
        safeckpt.load(path)


def test_bound_method_is_refused_not_stored_as_a_getattr_call(tmp_path: Path) -> None:
    path = tmp_path / "m.safeckpt"
    with pytest.raises(UnsupportedValueError) as info:
        safeckpt.save_single_file(None, {"f": nn.ReLU().forward}, path)
    assert info.value.path_in_state == "state['f']"
    assert "builtins:getattr" in str(info.value)
    assert not path.exists()
