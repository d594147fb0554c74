"""Tensors that claim more than the file holds (issue 14, section 3).

Every tensor made over file bytes goes through ``safeckpt.tensors``: dims in ``[0, 2**63)``
whose non-zero product stays below ``2**63``, a byte extent inside its entry, an absolute
address aligned for its dtype (else a copy), and views that hold at most
``Limits.max_expansion`` times the bytes they come from. Crashes and memory are measured
in child processes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt import CheckpointFormatError, LimitExceededError, Limits
from safeckpt.distributed import load_sharded, save_sharded
from safeckpt.distributed.sharded_index import META_NAME, SHARD_DIR, index_writer
from safeckpt.storage import atomic_write
from safeckpt.legacy.rebuild import Rebuilder, StorageRef
from safeckpt.tensors import INDEX_BOUND, ViewScope, check_dims, view_tensor

MiB = 1 << 20
TIMEOUT = 300  # a hang guard: the children finish in seconds


def _child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (PYTHONPATH is inherited); a crash shows as a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def _expanded_legacy(path: Path, n: int, *, zip_format: bool = False) -> Path:
    """A legacy torch.save file holding one float32 zero expanded (stride 0) to ``n`` elements."""
    torch.save({"a": torch.zeros(1).expand(n)}, path, _use_new_zipfile_serialization=zip_format)
    return path


def _raw_file(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _repad(path: Path, shift: int) -> Path:
    """Rewrite a safetensors file's header padding so that its data section starts ``shift`` bytes
    past a multiple of 64 (the header keeps its meaning; digests stay valid)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].rstrip(b" ")
    pad = (shift - 8 - len(text)) % 64
    path.write_bytes(struct.pack("<Q", len(text) + pad) + text + b" " * pad + raw[8 + length :])
    return path


# --------------------------------------------------------------------------- shapes torch cannot make


@pytest.mark.parametrize(
    "dims, ok",
    [
        ([0, INDEX_BOUND - 1], True),
        ([0, INDEX_BOUND], False),
        ([0, 1 << 70], False),
        ([1 << 40, 1 << 40, 0], False),
        ([0, 1 << 40, 1 << 40], False),  # order does not matter
        ([1 << 31, 1 << 31, 0], True),
        ([1 << 31, 1 << 32, 0], False),  # product exactly 2**63
        ([-1], False),
        ([True], False),
    ],
)
def test_dims_are_checked_before_torch_sees_them(dims: list[int], ok: bool) -> None:
    if ok:
        assert check_dims(dims, what="t", limits=Limits()) == 0
        assert torch.empty(dims).shape == tuple(dims)  # what the check lets through, torch can make
    else:
        with pytest.raises(CheckpointFormatError, match="malformed shape"):
            check_dims(dims, what="t", limits=Limits())


def test_rank_limit_at_and_past() -> None:
    assert check_dims([1] * 4, what="t", limits=Limits(max_dims=4)) == 1
    with pytest.raises(LimitExceededError) as info:
        check_dims([1] * 5, what="t", limits=Limits(max_dims=4))
    assert info.value.limit == "max_dims"


@pytest.mark.parametrize("shape", [[0, 1 << 70], [1 << 40, 1 << 40, 0], [0, INDEX_BOUND]])
def test_zero_element_tensors_with_huge_dims_in_a_header_are_refused(tmp_path: Path, shape: list[int]) -> None:
    path = _raw_file(tmp_path / "z.safetensors", {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    for read in (lambda: safeckpt.load(path), lambda: safeckpt.open(path).get_tensor("t"),
                 lambda: safeckpt.remote.open(path.as_uri()).get_tensor("t")):
        with pytest.raises(CheckpointFormatError, match="malformed shape"):
            read()


def test_the_largest_zero_element_shape_loads(tmp_path: Path) -> None:
    shape = [0, INDEX_BOUND - 1]
    path = _raw_file(tmp_path / "z.safetensors", {"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}})
    assert safeckpt.load(path)["t"].shape == tuple(shape)
    assert safeckpt.remote.open(path.as_uri()).get_tensor("t").shape == tuple(shape)


@pytest.mark.parametrize("shape", [[0, 1 << 70], [1 << 40, 1 << 40, 0]])
def test_zero_element_tensors_with_huge_dims_in_a_sharded_table_are_refused(tmp_path: Path, shape: list[int]) -> None:
    save_sharded(None, {"e": torch.zeros(0, 2)}, tmp_path / "c")
    with safeckpt.Checkpoint(tmp_path / "c" / META_NAME) as ckpt:
        doc = ckpt.load()
    doc["tensors"] = [[*item[:3], shape] for item in doc["tensors"]]
    doc["shards"] = [[p.name, p.stat().st_size] for p in sorted((tmp_path / "c" / SHARD_DIR).iterdir())]
    atomic_write(tmp_path / "c" / META_NAME, index_writer(doc))
    with pytest.raises(CheckpointFormatError, match="malformed shape"):
        load_sharded(tmp_path / "c")


def _storage(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> StorageRef:
    flat = data.reshape(-1).view(torch.uint8)
    return StorageRef("0", dtype, flat.numel(), lambda: flat)


@pytest.mark.parametrize(
    "size, stride",
    [([0, 1 << 70], [1, 1]), ([1 << 40, 1 << 40, 0], [1, 1, 1]), ([2], [INDEX_BOUND]), ([2], [-1]), ([1], [1, 1])],
)
def test_legacy_rebuild_refuses_shapes_and_strides_torch_cannot_make(size: list[int], stride: list[int]) -> None:
    rebuild = Rebuilder(Limits())
    with pytest.raises(CheckpointFormatError):
        rebuild.rebuild_tensor_v2(_storage(torch.arange(4.0)), 0, tuple(size), tuple(stride), False, OrderedDict())


def test_legacy_rebuild_of_an_empty_tensor_with_huge_strides() -> None:
    out = Rebuilder(Limits()).rebuild_tensor_v2(_storage(torch.arange(4.0)), 0, (0, 3), (INDEX_BOUND - 1, 1), False, None)
    assert out.shape == (0, 3) and out.numel() == 0


def test_a_view_past_its_storage_is_refused() -> None:
    rebuild = Rebuilder(Limits())
    assert torch.equal(rebuild.rebuild_tensor(_storage(torch.arange(4.0)), 3, (1,), (1,)), torch.tensor([3.0]))
    with pytest.raises(CheckpointFormatError, match="reaches byte 20"):
        rebuild.rebuild_tensor(_storage(torch.arange(4.0)), 4, (1,), (1,))


# --------------------------------------------------------------------------- expansion


def test_expansion_allowance_at_and_one_past_the_limit() -> None:
    scope = ViewScope(Limits(max_expansion=2), source_bytes=100)
    base = torch.zeros(1, dtype=torch.uint8)
    scope.charge(base, 150, "a")
    scope.charge(base, 50, "b")  # 200 = 2 x 100: at the limit
    with pytest.raises(LimitExceededError) as info:
        scope.charge(base, 1, "c")
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_expansion", 200, 201)


@pytest.mark.parametrize("zip_format", [False, True])
def test_legacy_stride0_views_at_and_past_the_expansion_limit(tmp_path: Path, zip_format: bool) -> None:
    # the storage holds 4 bytes: views may hold 16 x 4 = 64 bytes, 16 float32 elements
    at = safeckpt.load(_expanded_legacy(tmp_path / "at.pt", 16, zip_format=zip_format))["a"]
    assert at.shape == (16,) and at.stride() == (0,) and not at.any()
    with pytest.raises(LimitExceededError) as info:
        safeckpt.load(_expanded_legacy(tmp_path / "past.pt", 17, zip_format=zip_format))
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_expansion", 64, 68)
    trusted = safeckpt.load(tmp_path / "past.pt", limits=Limits(max_expansion=17))["a"]
    assert trusted.shape == (17,) and trusted.stride() == (0,)


def test_a_16_tib_view_is_refused_not_a_runtime_error(tmp_path: Path) -> None:
    path = _expanded_legacy(tmp_path / "huge.pt", 1 << 42)
    assert safeckpt.scan(path).verdict == "safe"  # scanning reads no data (meta tensors): nothing to bound
    with pytest.raises(LimitExceededError):
        safeckpt.load(path)
    with pytest.raises(LimitExceededError):
        safeckpt.convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _single_view_file(path: Path, n: int) -> int:
    safeckpt.save_single_file(None, {"v": torch.zeros(1, dtype=torch.uint8).expand(n)}, path)
    return path.stat().st_size


def test_safe_format_views_at_and_past_the_expansion_limit(tmp_path: Path) -> None:
    # the header is padded to 64 bytes, so the file size does not move with the view's length
    size = _single_view_file(tmp_path / "v.safetensors", 1_000_000)
    assert _single_view_file(tmp_path / "v.safetensors", 16 * size) == size
    loaded = safeckpt.load(tmp_path / "v.safetensors")["v"]
    assert loaded.shape == (16 * size,) and loaded.stride() == (0,)
    with safeckpt.open(tmp_path / "v.safetensors") as ckpt:
        assert ckpt.get("v").shape == (16 * size,)
    assert _single_view_file(tmp_path / "v.safetensors", 16 * size + 1) == size
    with pytest.raises(LimitExceededError) as info:
        safeckpt.load(tmp_path / "v.safetensors")
    assert (info.value.maximum, info.value.actual) == (16 * size, 16 * size + 1)
    with pytest.raises(LimitExceededError):
        safeckpt.remote.load(tmp_path.joinpath("v.safetensors").as_uri())


def test_save_keeps_overlapping_tensors_as_views(tmp_path: Path) -> None:
    state = {
        "row": torch.arange(3.0).expand(1000, 3),
        "col": torch.ones(2, 1).expand(2, 50),
        "c128": torch.tensor([1 + 2j], dtype=torch.complex128).expand(10),
        "plain": torch.arange(6.0).reshape(2, 3).t(),
    }
    path = safeckpt.save_single_file(None, state, tmp_path / "v.safetensors")
    assert path.stat().st_size < 2048  # 12 kB of "row" elements are 12 bytes in the file
    out = safeckpt.load(path)
    for key, value in state.items():
        assert torch.equal(out[key], value), key
    assert out["row"].stride() == (0, 1) and out["col"].stride() == (1, 0) and out["c128"].stride() == (0,)


_RSS_CHILD = """
    import resource, sys
    import safeckpt
    from safeckpt import Limits, LimitExceededError
    src, dst, ratio = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        safeckpt.convert(src, dst, limits=Limits(max_expansion=ratio))
        outcome = "converted"
    except LimitExceededError as exc:
        outcome = "refused:" + exc.limit
    print(outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("ratio, outcome", [(16, "refused:max_expansion"), (1 << 30, "converted")])
def test_converting_a_stride0_bomb_is_bounded(tmp_path: Path, ratio: int, outcome: str) -> None:
    src = _expanded_legacy(tmp_path / "bomb.pt", 1 << 26)  # 256 MiB of float32 zeros from one storage of 4 bytes
    assert src.stat().st_size < 1024
    done = _child(_RSS_CHILD, str(src), str(tmp_path / "out.safetensors"), str(ratio))
    assert done.returncode == 0, done.stderr
    result, grown = done.stdout.split()
    assert result == outcome
    assert int(grown) < 32  # MiB: the view is never materialised
    if outcome == "converted":  # the view survives as a view of 4 bytes
        assert (tmp_path / "out.safetensors").stat().st_size < 2048
        out = safeckpt.load(tmp_path / "out.safetensors", limits=Limits(max_expansion=1 << 30))["a"]
        assert out.shape == (1 << 26,) and out.stride() == (0,)


_DIFF_CHILD = """
    import resource, subprocess, sys
    done = subprocess.run([sys.executable, "-m", "safeckpt", "diff", sys.argv[1], sys.argv[2]],
                          capture_output=True, text=True, timeout=int(sys.argv[3]))
    print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
    sys.stderr.write(done.stdout + done.stderr)
"""


def test_diff_of_a_stride0_bomb_finishes_with_bounded_memory(tmp_path: Path) -> None:
    small_a = _expanded_legacy(tmp_path / "a.pt", 4)
    small_b = _expanded_legacy(tmp_path / "b.pt", 4)
    bomb = _expanded_legacy(tmp_path / "bomb.pt", 1 << 42)  # 16 TiB
    baseline = _child(_DIFF_CHILD, str(small_a), str(small_b), str(TIMEOUT))
    attacked = _child(_DIFF_CHILD, str(bomb), str(small_b), str(TIMEOUT))
    code_small, rss_small = map(int, baseline.stdout.split())
    code_bomb, rss_bomb = map(int, attacked.stdout.split())
    assert code_small == 0, baseline.stderr
    assert code_bomb not in (0, 1) and "max_expansion" in attacked.stderr  # an error, named, not a difference
    assert rss_bomb < rss_small + 32  # MiB


# --------------------------------------------------------------------------- alignment in memory

_DTYPES = [torch.uint8, torch.int16, torch.float32, torch.float64, torch.complex128]


def _values(dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(12, dtype=torch.float64) * 1.5 + 1).to(dtype) if dtype != torch.uint8 else torch.arange(12, dtype=dtype)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("shift", [1, 63])
def test_entries_and_views_one_byte_off_are_aligned_copies(tmp_path: Path, dtype: torch.dtype, shift: int) -> None:
    state = {"whole": _values(dtype), "view": _values(dtype)[2:].reshape(2, 5)[:, ::2], "base": _values(dtype)}
    state["view"] = state["base"][2:].reshape(2, 5)[:, ::2]  # a strided view of another saved tensor
    path = _repad(safeckpt.save_single_file(None, state, tmp_path / "a.safetensors"), shift)
    for copy in (False, True):
        out = safeckpt.load(path, copy=copy)
        for key, value in state.items():
            assert torch.equal(out[key], value), key
            assert out[key].data_ptr() % dtype.itemsize == 0, key
        assert out["view"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()  # still shared


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_legacy_storages_one_byte_off_are_aligned_copies_shared_by_their_views(dtype: torch.dtype) -> None:
    raw = torch.empty(12 * dtype.itemsize + 1, dtype=torch.uint8)[1:]  # an odd address
    raw.copy_(_values(dtype).view(torch.uint8))
    storage = StorageRef("0", dtype, raw.numel(), lambda: raw)
    rebuild = Rebuilder(Limits())
    first = rebuild.rebuild_tensor(storage, 0, (12,), (1,))
    second = rebuild.rebuild_tensor(storage, 2, (2, 3), (3, 1))
    assert torch.equal(first, _values(dtype)) and torch.equal(second, _values(dtype)[2:8].reshape(2, 3))
    assert first.data_ptr() % dtype.itemsize == 0 and second.data_ptr() % dtype.itemsize == 0
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


def test_views_of_aligned_bases_stay_zero_copy() -> None:
    base = torch.arange(8.0)
    scope = ViewScope(Limits(), source_bytes=1024)
    out = view_tensor(base, ["float32", [2, 2], [1, 2], 3], limits=Limits(), scope=scope, where="t")
    assert out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() and out.storage_offset() == 3


_CRASH_CHILD = """
    import sys, warnings, torch, safeckpt
    warnings.simplefilter("ignore")  # complex -> float drops the imaginary part, on purpose
    state = safeckpt.load(sys.argv[1])
    t = state["c"]
    expected = (torch.arange(64, dtype=torch.float64) * (1 + 1j)).to(torch.complex128)
    assert t.data_ptr() % 16 == 0, t.data_ptr()
    assert torch.equal(t.float(), expected.float())  # SIGSEGV on a misaligned complex128 view
    assert torch.equal((t * 2).sum(), (expected * 2).sum())
    print("ok")
"""


def test_complex128_view_at_an_odd_address_does_not_crash(tmp_path: Path) -> None:
    state = {"c": (torch.arange(64, dtype=torch.float64) * (1 + 1j)).to(torch.complex128)}
    path = _repad(safeckpt.save_single_file(None, state, tmp_path / "c.safetensors"), 1)
    done = _child(_CRASH_CHILD, str(path))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _shift_zip_storages(src: Path, dst: Path, modulo: int) -> int:
    """Rewrite a torch zip archive, growing the storage members' local extra field until the
    first one's data starts ``modulo`` bytes past a multiple of 16. Returns that offset."""
    with zipfile.ZipFile(src) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    for pad in range(4, 64):
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
            for info, data in members:
                new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                if "/data/" in info.filename:
                    new.extra = struct.pack("<HH", 0x5A5A, pad - 4) + b"\0" * (pad - 4)
                out.writestr(new, data)
        with zipfile.ZipFile(dst) as archive:
            info = next(i for i in archive.infolist() if "/data/" in i.filename)
        with open(dst, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_len + extra_len
        if offset % 16 == modulo:
            return offset
    raise AssertionError("no padding gave the offset asked for")


def test_legacy_zip_member_shifted_by_its_extra_field_does_not_crash(tmp_path: Path) -> None:
    state = {"c": (torch.arange(64, dtype=torch.float64) * (1 + 1j)).to(torch.complex128)}
    torch.save(state, tmp_path / "c.pt")
    assert _shift_zip_storages(tmp_path / "c.pt", tmp_path / "shifted.pt", 1) % 2 == 1
    done = _child(_CRASH_CHILD, str(tmp_path / "shifted.pt"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --------------------------------------------------------------------------- the views fuzz target


def _views_target() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
    try:
        import targets_views
    finally:
        sys.path.pop(0)
    return targets_views


def test_every_views_fuzz_seed_passes_its_oracle() -> None:
    target = _views_target()
    seeds = list(target.seeds())
    assert len(seeds) > 50
    for name, data in seeds:
        target.views(data)  # a SafeCkptError is caught inside; anything else (oracle included) fails


@pytest.mark.parametrize("mode", [0, 1])
def test_views_fuzz_oracle_catches_a_view_read_from_elsewhere(mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _views_target()
    spec = target.encode_spec(mode, "float32", [4], [1], 0, 0, bytes(range(32)))
    target.views(spec)
    shifted = target.encode_spec(mode, "float32", [4], [1], 1, 0, bytes(range(32)))
    monkeypatch.setattr(target, "_expected", lambda base, name, shape, stride, offset: torch.zeros(4))
    with pytest.raises(AssertionError, match="other bytes"):
        target.views(shifted)


# --------------------------------------------------------------------------- numpy arrays (inline and legacy)


@pytest.mark.parametrize(
    "shape, code, ok",
    [
        ([0, INDEX_BOUND - 1], "|u1", True),
        ([0, INDEX_BOUND], "|u1", False),
        ([0, (1 << 61) - 1], "<f4", True),
        ([0, 1 << 61], "<f4", False),  # 2**61 elements of 4 bytes: numpy cannot size it
        ([1 << 40, 1 << 40, 0], "<f4", False),
        ([0, 1 << 70], "<f8", False),
        ([0, (1 << 61) - 1], "<U0", True),  # numpy sizes an empty U0 as 4 bytes
        ([0, 1 << 61], "<U0", False),
    ],
)
def test_zero_element_numpy_arrays_with_huge_dims(shape: list[int], code: str, ok: bool) -> None:
    import numpy as np

    from safeckpt.codec.types import array_from_bytes

    rebuild = Rebuilder(Limits())
    for make in (
        lambda: array_from_bytes(b"", np.dtype(code), shape, max_dims=8),
        lambda: rebuild._array_from_state((1, tuple(shape), np.dtype(code), False, b"")),
    ):
        if ok:
            assert make().shape == tuple(shape)
        else:
            with pytest.raises(CheckpointFormatError, match="malformed numpy shape"):
                make()


@pytest.mark.parametrize("dtype", [torch.float4_e2m1fn_x2, torch.float8_e4m3fn, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("shape", [(4,), (0,), (2, 0)])
def test_loads_with_deterministic_algorithms_on(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Deterministic mode fills every typed torch.empty, which torch cannot do for float4: tensors are made as bytes."""
    numel = 1
    for dim in shape:
        numel *= dim
    t = torch.arange(numel * dtype.itemsize, dtype=torch.uint8).view(dtype).reshape(shape)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        path = safeckpt.save_single_file(None, {"t": t, "u": t[1:]}, tmp_path / "x.safeckpt")
        loaded = safeckpt.load(path)
        with safeckpt.open(path) as ckpt:
            lazily = [ckpt.get_tensor(name) for name in ckpt.tensor_names()]
    finally:
        torch.use_deterministic_algorithms(before)
    assert loaded["t"].dtype == dtype and loaded["t"].view(torch.uint8).equal(t.view(torch.uint8))
    assert loaded["u"].shape == t[1:].shape
    assert lazily and all(x.numel() * x.element_size() <= t.numel() * t.element_size() for x in lazily)
