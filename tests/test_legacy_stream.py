"""The legacy reader's reading rules: one pass over a pre-1.6 stream, storages bounded by the
file before they are allocated, and tensor views bounded by ``Limits.max_expansion`` times the
file's size (zip and pre-1.6 alike)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt.legacy import source as source_module
from safeckpt.legacy import vm as vm_module
from safeckpt.limits import Limits

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _long8(value: int) -> bytes:
    """LONG1 of 8 bytes: the same length whatever the value (file sizes stay fixed)."""
    return b"\x8a\x08" + value.to_bytes(8, "little", signed=True)


def _ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_long8(v) for v in values) + b"t"


def _tensor_pickle(numel: int, shape: tuple[int, ...], stride: tuple[int, ...], *, legacy: bool) -> bytes:
    """``_rebuild_tensor_v2`` of one ``ByteStorage`` (key ``"0"``) holding ``numel`` bytes."""
    pid = b"(" + _u("storage") + b"ctorch\nByteStorage\n" + _u("0") + _u("cpu") + _long8(numel)
    pid += (b"N" if legacy else b"") + b"tQ"
    args = b"(" + pid + _long8(0) + _ints(shape) + _ints(stride) + b"\x89" + b"ccollections\nOrderedDict\n)Rt"
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R."


def _write_stream(path: Path, main: bytes, declared: int, data: bytes) -> int:
    """A pre-1.6 stream with one storage ``"0"`` whose header declares ``declared`` elements;
    returns where its main pickle starts."""
    head = pickle.dumps(MAGIC, protocol=2) + pickle.dumps(1001, protocol=2) + pickle.dumps(SYS_INFO, protocol=2)
    keys = pickle.dumps(["0"], protocol=2)
    path.write_bytes(head + main + keys + struct.pack("<q", declared) + data)
    return len(head)


def _write_zip(path: Path, main: bytes, data: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", main)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", data)


# --------------------------------------------------------------------------- one pass over a pre-1.6 stream


def test_a_pre16_stream_is_read_in_one_pass_over_its_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = OrderedDict((f"layer{i}.weight", torch.randn(3, i + 1)) for i in range(6))
    state["tied"] = state["layer2.weight"]
    state["half"] = torch.arange(6, dtype=torch.float16)
    state["slice"] = state["half"][2:5]
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loads: list[int] = []
    real_load = vm_module.SymbolicUnpickler.load
    monkeypatch.setattr(vm_module.SymbolicUnpickler, "load", lambda self: loads.append(1) or real_load(self))
    monkeypatch.setattr(source_module.PickleSource, "skip", lambda self: pytest.fail("a pickle was skipped, then read"))
    value = safeckpt.load(path)
    assert len(loads) == 5  # magic number, protocol, sys info, main pickle, storage keys: each once
    expected = torch.load(path, weights_only=True)
    assert list(value) == list(expected)
    for key in expected:
        assert value[key].dtype == expected[key].dtype and torch.equal(value[key], expected[key])
        assert value[key].stride() == expected[key].stride()
    assert value["tied"].data_ptr() == value["layer2.weight"].data_ptr()
    assert value["slice"].untyped_storage().data_ptr() == value["half"].untyped_storage().data_ptr()


def test_pre16_storages_are_fresh_memory(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(64)}, path, _use_new_zipfile_serialization=False)
    before = path.read_bytes()
    value = safeckpt.load(path)
    value["w"].mul_(3)
    assert path.read_bytes() == before
    assert torch.equal(safeckpt.load(path)["w"], torch.ones(64))


def test_pre16_storages_are_bounded_by_the_file_before_they_are_allocated(tmp_path: Path) -> None:
    path = tmp_path / "claims.pt"
    data = b"\x07" * 16
    main_start = _write_stream(path, _tensor_pickle(16, (16,), (1,), legacy=True), 16, data)
    size = path.stat().st_size
    assert torch.equal(safeckpt.load(path), torch.full((16,), 7, dtype=torch.uint8))
    at_limit = size - main_start  # the declared storages fill every byte after the main pickle's start
    _write_stream(path, _tensor_pickle(at_limit, (16,), (1,), legacy=True), at_limit, data)
    with pytest.raises(safeckpt.LimitExceededError, match="storage '0' runs past the end") as info:
        safeckpt.load(path)  # allocated, then refused by the layout: its bytes are not there
    assert info.value.limit == "file_size"
    _write_stream(path, _tensor_pickle(at_limit + 1, (16,), (1,), legacy=True), at_limit + 1, data)
    with pytest.raises(safeckpt.LimitExceededError, match="storages named up to '0' runs past the end") as info:
        safeckpt.load(path)  # refused before anything is allocated
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("file_size", size, size + 1)


def test_a_storage_declaring_a_terabyte_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.pt"
    _write_stream(path, _tensor_pickle(1 << 40, (4,), (1,), legacy=True), 1 << 40, b"\0" * 4)
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path)
    assert info.value.limit == "file_size" and info.value.actual > 1 << 40


@pytest.mark.parametrize("declared", [15, 17])
def test_pre16_storage_sizes_that_disagree_with_the_data_are_refused(tmp_path: Path, declared: int) -> None:
    path = tmp_path / "disagree.pt"
    _write_stream(path, _tensor_pickle(16, (16,), (1,), legacy=True), declared, b"\0" * 32)
    with pytest.raises(safeckpt.CheckpointFormatError, match="size disagrees with its data"):
        safeckpt.load(path)


def test_a_pre16_storage_the_key_list_leaves_out_has_no_data(tmp_path: Path) -> None:
    path = tmp_path / "nodata.pt"
    head = pickle.dumps(MAGIC, protocol=2) + pickle.dumps(1001, protocol=2) + pickle.dumps(SYS_INFO, protocol=2)
    path.write_bytes(head + _tensor_pickle(4, (4,), (1,), legacy=True) + pickle.dumps([], protocol=2) + b"\0" * 64)
    with pytest.raises(safeckpt.CheckpointFormatError, match="storage '0' has no data"):
        safeckpt.load(path)


# --------------------------------------------------------------------------- expansion: bounded by the file's size


def _expanded(tmp_path: Path, fmt: str, elements: int) -> Path:
    """One byte of storage viewed as ``elements`` bytes (stride 0); the file's size does not depend on ``elements``."""
    path = tmp_path / f"expand_{fmt}.pt"
    if fmt == "zip":
        _write_zip(path, _tensor_pickle(1, (elements,), (0,), legacy=False), b"\x05")
    else:
        _write_stream(path, _tensor_pickle(1, (elements,), (0,), legacy=True), 1, b"\x05")
    return path


@pytest.mark.parametrize("fmt", ["zip", "stream"])
@pytest.mark.parametrize("ratio", [16, 3])
def test_views_may_hold_max_expansion_times_the_files_size(tmp_path: Path, fmt: str, ratio: int) -> None:
    size = _expanded(tmp_path, fmt, 1).stat().st_size
    limits = Limits(max_expansion=ratio)
    path = _expanded(tmp_path, fmt, ratio * size)
    assert path.stat().st_size == size
    value: Any = safeckpt.load(path, limits=limits)  # at the limit: a view, nothing materialised
    assert value.shape == (ratio * size,) and value.stride() == (0,) and int(value[-1]) == 5
    path = _expanded(tmp_path, fmt, ratio * size + 1)
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=limits)
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_expansion", ratio * size, ratio * size + 1)
    with pytest.raises(safeckpt.LimitExceededError):
        safeckpt.convert(path, tmp_path / "out.safetensors", limits=limits)
