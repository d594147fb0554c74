"""Values from a file that used to break the API instead of raising SafeCkptError.

Attributes that shadow methods, integer keys too long for ``str``, self-containing
lists, shared containers that multiply, and big-endian complex tensors.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt import CheckpointFormatError, SafeCkptError, UnsupportedValueError
from safeckpt.cli_diff import diff_states
from safeckpt.cli_report import Cycle, view_file, walk
from safeckpt.text import int_fits_text, segment, show

HANG_GUARD = 120


def _od_build(names: list[str]) -> bytes:
    """Protocol 2: OrderedDict() BUILD {name: 1, ...} inside {"model": ...}."""
    items = b"".join(b"X" + len(n).to_bytes(4, "little") + n.encode() + b"K\x01" for n in names)
    return b"\x80\x02}X\x05\x00\x00\x00modelccollections\nOrderedDict\n)R}(" + items + b"ubs."


SELF_LIST = b"\x80\x02]q\x00h\x00a."  # a list that contains itself


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safeckpt", *args], capture_output=True, text=True, timeout=HANG_GUARD, env=os.environ.copy()
    )


@pytest.mark.parametrize("name", ["keys", "items", "get", "values", "__class__"])
def test_build_attr_shadowing_a_method_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "od.pkl"
    path.write_bytes(_od_build([name]))
    for call in (safeckpt.load, lambda p: safeckpt.convert(p, tmp_path / "out.safetensors")):
        with pytest.raises(CheckpointFormatError):
            call(path)
    # scan answers what pickle.load would do: set a data attribute, nothing dangerous (and no TypeError)
    assert safeckpt.scan(path).verdict != "dangerous"
    assert not (tmp_path / "out.safetensors").exists()


def test_build_metadata_attr_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "od.pkl"
    path.write_bytes(_od_build(["_metadata"]))
    assert safeckpt.load(path)["model"]._metadata == 1


def test_skeleton_attr_shadowing_a_method_is_refused(tmp_path: Path) -> None:
    od: OrderedDict[str, int] = OrderedDict(a=1)
    od.keys = 5  # type: ignore[method-assign]
    with pytest.raises(UnsupportedValueError, match="shadow"):
        safeckpt.save_single_file(None, {"m": od}, tmp_path / "x.safeckpt")
    good: OrderedDict[str, int] = OrderedDict(a=1)
    good._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    loaded = safeckpt.load(safeckpt.save_single_file(None, {"m": good}, tmp_path / "z.safeckpt"))
    assert loaded["m"]._metadata == {"": {"version": 1}}


def test_skeleton_attr_written_by_hand_is_refused(tmp_path: Path) -> None:
    from safeckpt.codec.decode import Decoder
    from safeckpt.codec.types import TAGS, Tag, pack
    from safeckpt.limits import DEFAULT_LIMITS
    from safeckpt.refs import AllowList

    data = pack([TAGS[Tag.ORDERED_DICT], {"get": 1}, "a", 1])
    with pytest.raises(CheckpointFormatError, match="shadow"):
        Decoder(lambda n: torch.zeros(1), AllowList(()), DEFAULT_LIMITS).unpack(data)


def test_int_text_boundary() -> None:
    at_limit, over = 10**4299, 10**4300  # 4,300 digits, 4,301 digits
    assert len(str(at_limit)) == 4300 and int_fits_text(at_limit) and not int_fits_text(over)
    assert show(at_limit, 50).startswith("1000") and len(show(at_limit, 50)) == 50
    assert show(over) == "<int of about 4301 digits>" and segment(-over).startswith("<-int")


def test_huge_int_component_key_everywhere(tmp_path: Path) -> None:
    key = 10**4999
    path = safeckpt.save_single_file(None, {key: torch.ones(2), "n": {key: torch.zeros(1)}}, tmp_path / "k.safeckpt")
    loaded = safeckpt.load(path)
    assert key in loaded and torch.equal(loaded["n"][key], torch.zeros(1))
    with pytest.raises(safeckpt.ComponentNotFoundError, match="int of about"):
        safeckpt.open(path).get("absent")
    for args in (("inspect", str(path)), ("inspect", "--json", str(path)), ("verify", str(path)), ("diff", str(path), str(path))):
        done = _cli(*args)
        assert done.returncode == 0, done.stderr
        assert "Exceeds the limit" not in done.stdout + done.stderr and len(done.stdout) < 10_000


def test_self_list_api_and_cli(tmp_path: Path) -> None:
    path = tmp_path / "self.pkl"
    path.write_bytes(SELF_LIST)
    value = safeckpt.load(path)
    assert value[0] is value
    nodes = list(walk(value))
    assert nodes[1] == ((0,), Cycle("list", ()))
    assert diff_states(value, safeckpt.load(path)).identical
    with pytest.raises(UnsupportedValueError, match="contains itself"):
        safeckpt.save_single_file(None, {"x": value}, tmp_path / "out.safeckpt")
    for args, code in ((("inspect", str(path)), 0), (("verify", str(path)), 0), (("diff", str(path), str(path)), 0)):
        done = _cli(*args)
        assert done.returncode == code, done.stderr
        assert len(done.stdout) < 5_000


def test_shared_container_blowup_is_bounded(tmp_path: Path) -> None:
    x: list[object] = [1]
    for _ in range(100):
        x = [x, x]
    with pytest.raises(safeckpt.LimitExceededError):
        list(walk(x))
    with pytest.raises(UnsupportedValueError, match="max_shared_values"):
        safeckpt.save_single_file(None, {"x": x}, tmp_path / "bomb.safeckpt")
    import pickle

    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"x": x}, protocol=2))
    assert path.stat().st_size < 2000
    done = _cli("inspect", str(path))
    assert done.returncode == 2 and "max_shared_values" in done.stderr or "repeated" in done.stderr


def test_shared_but_acyclic_is_walked_at_each_place() -> None:
    a = [torch.zeros(1)]
    paths = [p for p, n in walk({"a": a, "b": a}) if isinstance(n, torch.Tensor)]
    assert paths == [("a", 0), ("b", 0)]


def test_cycle_through_inert_object_with_an_unrelated_allowed_global(tmp_path: Path) -> None:
    import pickle
    import types

    module = types.ModuleType("values_fuzz_mod")

    class Node:
        pass

    Node.__module__, Node.__qualname__ = "values_fuzz_mod", "Node"
    module.Node = Node  # type: ignore[attr-defined]
    sys.modules["values_fuzz_mod"] = module
    try:
        node = Node()
        node.me = node  # type: ignore[attr-defined]
        data = pickle.dumps({"n": node, "c": __import__("collections").Counter}, protocol=2)
    finally:
        del sys.modules["values_fuzz_mod"]
    path = tmp_path / "cyc.pkl"
    path.write_bytes(data)
    value = safeckpt.load(path, allowed_globals=["collections:Counter"])
    assert value["n"].state["me"] is value["n"]


def test_diff_of_ints_beyond_float_range() -> None:
    assert not diff_states({"a": 10**400}, {"a": 10**400 + 1}).identical
    assert diff_states({"a": 10**400}, {"a": 10**400 + 1}, rtol=1e-3).identical


# --------------------------------------------------------------------------- big-endian archives

DTYPES = [
    torch.complex64, torch.complex128, torch.complex32, torch.bfloat16, torch.float16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.bool, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]


def _big_endian_copy(src: Path, dst: Path) -> None:
    """Rewrite a torch.save zip as a big-endian machine would have written it (torch.load's swap rule)."""
    from safeckpt.legacy.rebuild import swap_size
    import pickletools

    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        units: dict[str, int] = {}
        pending = None
        for op, arg, _ in pickletools.genops(zin.read(pkl)):
            if op.name == "GLOBAL" and arg.endswith("Storage"):
                pending = arg
            elif op.name in ("BINUNICODE", "SHORT_BINUNICODE") and pending is not None and arg.isdigit():
                module, name = pending.split(" ")
                dtype = None if name == "UntypedStorage" else getattr(torch, name).dtype
                units[arg] = swap_size(dtype)
                pending = None
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for n in names:
                data = zin.read(n)
                if n.endswith("/byteorder"):
                    data = b"big"
                elif "/data/" in n and n.rsplit("/", 1)[1] in units:
                    unit = units[n.rsplit("/", 1)[1]]
                    if unit > 1:
                        data = b"".join(data[i : i + unit][::-1] for i in range(0, len(data), unit))
                zout.writestr(n, data)


def test_big_endian_archive_matches_torch_load(tmp_path: Path) -> None:
    state = {}
    for dtype in DTYPES:
        base = torch.tensor([1 + 2j, 3 - 4j, -5.5 + 0.25j]) if dtype.is_complex else torch.tensor([1.0, 2.0, 3.0, 100.0])
        state[str(dtype)] = base.to(dtype)
    src, dst = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(state, src)
    _big_endian_copy(src, dst)
    expected = torch.load(dst, weights_only=True)
    got = safeckpt.load(dst)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name
    for name in ("torch.complex64", "torch.complex128"):
        assert torch.equal(got[name], state[name])  # real and imaginary parts in place


def test_fuzz_values_targets_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
    try:
        import targets_values
    finally:
        sys.path.pop(0)
    for seed in targets_values.seeds():
        try:
            targets_values.run(seed)
        except SafeCkptError:
            pass
