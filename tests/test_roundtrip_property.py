"""Property tests: any state built from the supported value kinds round-trips.

"Round-trips" means: identical types all the way down (``type(a) is type(b)``),
the same dict key order, bit-identical floats (nan payloads, -0.0), tensors with
the same dtype, shape, ``requires_grad`` and raw bytes, numpy arrays and scalars
with the same dtype string, shape and bytes, and classes, functions and enum
members back as inert ``GlobalRef`` objects unless they are allowed.
"""

from __future__ import annotations

import atexit
import collections
import copy
import enum
import math
import operator
import os
import shutil
import struct
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp
from torch.torch_version import TorchVersion

import safeckpt
from safeckpt.tensors import DTYPES_BY_NAME, SAFETENSORS_DTYPES

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches under ./.hypothesis by default; tests write nothing to the working directory.
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="safeckpt-hypothesis-")
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Color(enum.Enum):
    """A module-level enum: its members are stored as ``GlobalRef("<this module>", "Color.RED")``."""

    RED = 1
    GREEN = "green"


class Level(enum.IntEnum):
    """An int-valued enum: its members must not be mistaken for plain ints."""

    LOW = 1
    HIGH = 2


#: Module-level classes, functions and enum members that are stored by name.
GLOBAL_OBJECTS: list[Any] = [
    torch.nn.Linear,
    torch.optim.Adam,
    math.sqrt,
    operator.add,
    collections.OrderedDict,
    Color,
    Color.RED,
    Color.GREEN,
    Level.HIGH,
]
#: What the loader is allowed to import in the allowed-globals property (enum classes allow their members).
ALLOWED = [torch.nn.Linear, "torch.optim.adam:Adam", math.sqrt, "_operator:add", collections.OrderedDict, Color, Level]

#: Tensor dtypes safetensors cannot name, stored as bytes plus a reinterpreting view.
EXTRA_TENSOR_DTYPES = [
    torch.complex128,
    torch.complex32,
    torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2,
    torch.bits8,
    torch.bits16,
]
TENSOR_DTYPES = [*SAFETENSORS_DTYPES, *EXTRA_TENSOR_DTYPES]
GRAD_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}

NUMPY_ARRAY_DTYPES = [
    "|b1",
    "|i1",
    "|u1",
    "<i2",
    "<u2",
    "<i4",
    "<u4",
    "<i8",
    "<u8",
    "<f2",
    "<f4",
    "<f8",
    "<c8",
    "<c16",
    ">i2",
    ">u4",
    ">i8",
    ">f2",
    ">f4",
    ">f8",
    ">c8",
    ">c16",
    "<U1",
    "<U5",
    "|S3",
    "<M8[D]",
    "<m8[s]",
]
NUMPY_SCALAR_TYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


# --------------------------------------------------------------------------- comparison


def _is_global(value: Any) -> bool:
    return isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, enum.Enum))


def _expected_ref(value: Any) -> safeckpt.GlobalRef:
    if isinstance(value, enum.Enum):
        owner = type(value)
        return safeckpt.GlobalRef(owner.__module__, f"{owner.__qualname__}.{value.name}")
    return safeckpt.GlobalRef(value.__module__, value.__qualname__)


def _float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def _canon(value: Any) -> str:
    """A string that is equal for two hashable scalars exactly when they have the same type and bits."""
    kind = type(value).__qualname__
    if type(value) is float:
        return f"float:{_float_bits(value).hex()}"
    if type(value) is complex:
        return f"complex:{_float_bits(value.real).hex()}:{_float_bits(value.imag).hex()}"
    if type(value) is tuple:
        return "tuple(" + ",".join(_canon(v) for v in value) + ")"
    if type(value) is frozenset:
        return "frozenset{" + ",".join(sorted(_canon(v) for v in value)) + "}"
    return f"{kind}:{value!r}"


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` in row-major order, as raw bytes (so nan payloads compare exactly)."""
    dense = t.detach().resolve_conj().resolve_neg().contiguous()
    if dense.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    # A contiguous tensor may still report odd strides on size-1 dims: flatten by hand.
    return dense.as_strided((dense.numel(),), (1,)).view(torch.uint8)


def assert_same(a: Any, b: Any, *, allowed: bool = False, path: str = "state") -> None:
    """Assert that ``b`` (loaded) is ``a`` (saved) with identical types, order and bits.

    Args:
        allowed: classes/functions/enum members were in ``allowed_globals`` (or ``b``
            was never saved), so the real objects must be there; otherwise ``GlobalRef``
            placeholders with the right module and qualname.
    """
    if _is_global(a):
        if allowed:
            assert b is a, f"{path}: expected the real {a!r}, got {b!r}"
        else:
            assert type(b) is safeckpt.GlobalRef, f"{path}: expected a GlobalRef for {a!r}, got {b!r}"
            assert b == _expected_ref(a), f"{path}: {b!r} != {_expected_ref(a)!r}"
        return
    assert type(a) is type(b), f"{path}: type {type(a)!r} came back as {type(b)!r}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad {a.requires_grad} vs {b.requires_grad}"
        assert torch.equal(_tensor_bytes(a), _tensor_bytes(b)), f"{path}: tensor bytes differ"
        return
    if isinstance(a, np.ndarray):
        assert a.dtype.str == b.dtype.str, f"{path}: dtype {a.dtype.str} vs {b.dtype.str}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array bytes differ"
        return
    if isinstance(a, np.generic):
        assert a.dtype.str == b.dtype.str, f"{path}: dtype {a.dtype.str} vs {b.dtype.str}"
        assert a.tobytes() == b.tobytes(), f"{path}: scalar bytes differ"
        return
    if type(a) is float:
        assert _float_bits(a) == _float_bits(b), f"{path}: float {a!r} vs {b!r}"
        return
    if type(a) is complex:
        assert _canon(a) == _canon(b), f"{path}: complex {a!r} vs {b!r}"
        return
    if isinstance(a, dict):
        assert len(a) == len(b), f"{path}: {len(a)} keys vs {len(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert _canon(ka) == _canon(kb), f"{path}: key {ka!r} vs {kb!r} (order or type differs)"
            assert_same(va, vb, allowed=allowed, path=f"{path}[{ka!r}]")
        if type(a) is collections.OrderedDict:
            assert_same(dict(vars(a)), dict(vars(b)), allowed=allowed, path=f"{path}.__dict__")
        return
    if isinstance(a, (list, tuple)):  # also torch.Size
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, allowed=allowed, path=f"{path}[{i}]")
        return
    if isinstance(a, (set, frozenset)):
        assert sorted(map(_canon, a)) == sorted(map(_canon, b)), f"{path}: {a!r} vs {b!r}"
        return
    if isinstance(a, safeckpt.OpaqueObject):
        assert a.cls == b.cls and a.constructor == b.constructor, f"{path}: {a.cls} vs {b.cls}"
        for name in ("args", "kwargs", "state", "list_items", "dict_items"):
            assert_same(getattr(a, name), getattr(b, name), allowed=allowed, path=f"{path}.{name}")
        return
    if isinstance(a, (type(None), bool, int, str, bytes, bytearray, torch.dtype, torch.device, safeckpt.GlobalRef)):
        assert a == b, f"{path}: {a!r} vs {b!r}"  # TorchVersion is a str subclass: compared as text
        return
    raise AssertionError(f"{path}: assert_same does not know {type(a)!r}")


_OTHER_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0.0, -0.0),
        (math.nan, _OTHER_NAN),
        (1, True),
        ((1,), [1]),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (torch.tensor([0.0]), torch.tensor([-0.0])),
        (torch.zeros(2), torch.nn.Parameter(torch.zeros(2))),
        (np.zeros(2, dtype="<f4"), np.zeros(2, dtype=">f4")),
        (math.sqrt, math.sqrt),  # not saved with allowed=False: a GlobalRef is expected
    ],
    ids=[
        "signed_zero",
        "nan_payload",
        "bool_for_int",
        "list_for_tuple",
        "key_order",
        "tensor_zero",
        "parameter",
        "byte_order",
        "real_global",
    ],
)
def test_assert_same_is_strict(a: Any, b: Any) -> None:
    """The comparison itself must tell these apart, or the properties below prove nothing."""
    with pytest.raises(AssertionError):
        assert_same(a, b)


# --------------------------------------------------------------------------- strategies

big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -(2**64), 2**1000, -(2**1000)]),
)
any_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324]),
    st.integers(min_value=0, max_value=2**64 - 1).map(lambda bits: struct.unpack("<d", struct.pack("<Q", bits))[0]),
)
any_complex = st.builds(complex, any_floats, any_floats)

hashable_scalars = st.one_of(st.none(), st.booleans(), big_ints, any_floats, any_complex, st.text(), st.binary())
keys = st.one_of(
    hashable_scalars,
    st.tuples(hashable_scalars, hashable_scalars),
    st.lists(hashable_scalars, max_size=3).map(tuple),
    st.frozensets(hashable_scalars, max_size=3),
)

torch_versions = st.sampled_from(["2.13.0+cpu", "1.6.0", "2.1.0a0+git1234abc", "0.4.1", "2.5.0.dev20240801"]).map(
    TorchVersion
)
devices = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:3", "meta", "mps", "xpu:1"]).map(torch.device)
dtypes = st.sampled_from(sorted(DTYPES_BY_NAME.values(), key=str))
sizes = st.lists(st.integers(min_value=0, max_value=2**40), max_size=5).map(torch.Size)

numpy_scalars = st.one_of(
    st.sampled_from(NUMPY_SCALAR_TYPES).flatmap(lambda kind: hnp.from_dtype(np.dtype(kind)).map(kind)),
    # numpy drops trailing NULs of str_/bytes_ scalars itself (keeping the longer dtype): avoid that quirk
    st.text(max_size=4).map(lambda text: np.str_(text.rstrip("\x00"))),
    st.binary(max_size=4).map(lambda raw: np.bytes_(raw.rstrip(b"\x00"))),
    st.sampled_from(["M8[ms]", "m8[s]", "M8[D]"]).flatmap(lambda code: hnp.from_dtype(np.dtype(code))),
)


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_ARRAY_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    array = draw(hnp.arrays(dtype, shape))
    variant = draw(st.sampled_from(["plain", "transpose", "step", "fortran"]))
    if variant == "transpose" and array.ndim >= 2:
        array = array.T
    elif variant == "step" and array.ndim >= 1:
        array = array[::2]
    elif variant == "fortran":
        array = np.asfortranarray(array)
    return array


#: Tensors whose only element, or no element, sits behind a stride other than 1.
STRIDED_EDGE_CASES = {
    "one_of_a_step": torch.arange(8.0)[::8],
    "empty_step": torch.arange(8.0)[:0:2],
    "stride_0": torch.ones(1).expand(3),
}


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    flat = torch.tensor(list(raw), dtype=torch.uint8)
    if dtype is torch.bool:
        flat = flat & 1  # only 0 and 1 are valid bool bytes
    return flat.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, dtype_choices: list[torch.dtype] = TENSOR_DTYPES) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtype_choices))
    shape = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3))
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    t = _tensor_from_bytes(raw, dtype, shape)
    variant = draw(st.sampled_from(["plain", "plain", "transpose", "step", "narrow", "expand", "conj"]))
    if variant == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif variant == "step" and t.dim() >= 1:
        t = t[::2]
    elif variant == "narrow" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    elif variant == "expand":
        t = t.unsqueeze(0).expand(2, *t.shape)
    elif variant == "conj" and dtype in (torch.complex64, torch.complex128):
        t = t.conj()  # a lazily conjugated view: the conjugated values must be saved
    if dtype in GRAD_DTYPES and draw(st.booleans()):
        t = t.clone().requires_grad_(True)  # a leaf of its own (expand views cannot require grad in place)
    return t


@st.composite
def parameters(draw: st.DrawFn) -> torch.nn.Parameter:
    t = draw(tensors())
    requires_grad = t.dtype in GRAD_DTYPES and draw(st.booleans())
    return torch.nn.Parameter(t.detach(), requires_grad=requires_grad)


@st.composite
def views_of_one_storage(draw: st.DrawFn) -> list[torch.Tensor]:
    """Tied weights and overlapping views: several tensors of one storage, as a list."""
    dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.complex128, torch.bfloat16]))
    n = draw(st.integers(min_value=1, max_value=12))
    base = _tensor_from_bytes(draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize)), dtype, [n])
    views = [base]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        start = draw(st.integers(min_value=0, max_value=n - 1))
        stop = draw(st.integers(min_value=start, max_value=n))
        step = draw(st.integers(min_value=1, max_value=3))
        views.append(base[start:stop:step])
    if draw(st.booleans()):
        views.append(base)  # the very same object twice
    return draw(st.permutations(views))


leaves = st.one_of(
    hashable_scalars,
    st.binary().map(bytearray),
    dtypes,
    devices,
    sizes,
    torch_versions,
    numpy_scalars,
    numpy_arrays(),
    numpy_arrays(),
    tensors(),
    tensors(),
    tensors(),
    parameters(),
    st.sampled_from(GLOBAL_OBJECTS),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.sets(hashable_scalars, max_size=4),
        st.frozensets(hashable_scalars, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(lambda d: collections.OrderedDict(reversed(d.items()))),
    )


values = st.recursive(leaves, _containers, max_leaves=16)
states = st.one_of(
    st.dictionaries(keys, values, max_size=5),
    st.dictionaries(keys, values, max_size=5).map(collections.OrderedDict),
)


def _layouts(value: Any, out: list[Any] | None = None) -> list[Any]:
    """Shape, strides, offset, storage address and flags of every tensor and array, in walk order."""
    out = [] if out is None else out
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage().data_ptr()
        flags = (value.requires_grad, value.is_conj(), value.is_neg())
        out.append((type(value), value.dtype, tuple(value.shape), value.stride(), value.storage_offset(), storage))
        out.append(flags)
    elif isinstance(value, np.ndarray):
        data = value.__array_interface__["data"]
        out.append((value.dtype.str, value.shape, value.strides, data, value.flags.writeable))
    elif isinstance(value, dict):
        for key, item in value.items():
            _layouts(key, out)
            _layouts(item, out)
        if type(value) is collections.OrderedDict:
            _layouts(dict(vars(value)), out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _layouts(item, out)
    return out


def _roundtrip(state: Any, **load_kwargs: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safeckpt"
        written = safeckpt.save_single_file(None, state, path)
        assert written == path
        return safeckpt.load(path, **load_kwargs)


# --------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(states)
def test_any_supported_state_roundtrips_with_identical_types_and_bits(state: Any) -> None:
    assert_same(state, _roundtrip(state))


@PROPERTY_SETTINGS
@given(states)
def test_allowed_globals_come_back_as_the_real_objects(state: Any) -> None:
    assert_same(state, _roundtrip(state, allowed_globals=ALLOWED), allowed=True)


@PROPERTY_SETTINGS
@given(st.dictionaries(st.text(max_size=8), tensors(), max_size=6))
@example(STRIDED_EDGE_CASES)
def test_tensors_of_every_dtype_roundtrip_bit_identically(state: dict[str, torch.Tensor]) -> None:
    assert_same(state, _roundtrip(state))


@PROPERTY_SETTINGS
@given(st.dictionaries(st.text(max_size=8), st.one_of(numpy_arrays(), numpy_scalars), max_size=6))
@example({"0d": np.array(2.5), "0d_big_endian": np.array(7, dtype=">i4"), "empty": np.zeros(0, dtype=np.int16)})
def test_numpy_arrays_and_scalars_roundtrip_with_dtype_shape_and_bytes(state: dict[str, Any]) -> None:
    assert_same(state, _roundtrip(state))


@PROPERTY_SETTINGS
@given(st.dictionaries(keys, hashable_scalars, max_size=8))
@example({complex(math.nan, 0.0): "two nan keys", complex(math.nan, 0.0): "are two keys"})
def test_dict_keys_of_every_scalar_type_keep_type_and_order(mapping: dict[Any, Any]) -> None:
    nested = {"d": mapping, "od": collections.OrderedDict(reversed(mapping.items()))}
    assert_same(nested, _roundtrip(nested))
    assert_same(mapping, _roundtrip(mapping))  # the keys as top-level components


@PROPERTY_SETTINGS
@given(views_of_one_storage())
def test_views_of_one_storage_roundtrip_and_share_storage(views: list[torch.Tensor]) -> None:
    loaded = _roundtrip({"views": views})["views"]
    assert_same(views, loaded)
    storages = {t.untyped_storage().data_ptr() for t in loaded if t.numel()}
    assert len(storages) <= 1, "views of one storage came back in separate storages"
    for i, t in enumerate(views):
        for j in range(i):
            if views[j] is t:
                assert loaded[j] is loaded[i], "the same tensor object saved twice came back as two objects"


@PROPERTY_SETTINGS
@given(states)
def test_save_never_mutates_the_state(state: Any) -> None:
    before = copy.deepcopy(state)
    layouts = _layouts(state)
    _roundtrip(state)
    assert_same(before, state, allowed=True)
    assert _layouts(state) == layouts, "save changed the layout or storage of a tensor or array in the state"


def test_blocklisted_names_stay_inert_even_when_allowed() -> None:
    state = {"f": len, "g": os.system}
    loaded = _roundtrip(state, allowed_globals=["builtins:len", os.system])
    assert loaded["f"] == safeckpt.GlobalRef("builtins", "len") and type(loaded["f"]) is safeckpt.GlobalRef
    assert type(loaded["g"]) is safeckpt.GlobalRef and loaded["g"].qualname == "system"
