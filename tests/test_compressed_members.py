"""Deflated storage members of a torch zip: torch.load reads them, so safeckpt does too.

torch.save never compresses a storage, but any zip tool can rewrite the archive
with deflate and ``torch.load`` still reads it. safeckpt inflates such a member
within ``Limits.max_inflated_bytes`` (its declared size checked before, the bytes
counted while inflating) and gives the same tensors as ``torch.load``, bit for bit.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt.limits import Limits


def _rewrite(src: Path, dst: Path, *, method: int = zipfile.ZIP_DEFLATED, only_storages: bool = True) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            storage = "/data/" in info.filename
            zout.writestr(info.filename, zin.read(info), compress_type=method if storage or not only_storages else zipfile.ZIP_STORED)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": base,
        "view": base[2:, 1:4],  # shares the storage, with an offset
        "i64": torch.arange(-7, 13, dtype=torch.int64),
        "c64": torch.randn(5, dtype=torch.complex64, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "u8": torch.arange(200, dtype=torch.uint8),
    }


@pytest.fixture()
def deflated(tmp_path: Path) -> Path:
    plain, out = tmp_path / "plain.pt", tmp_path / "deflated.pt"
    torch.save(_state(), plain)
    _rewrite(plain, out)
    with zipfile.ZipFile(out) as z:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED and "/data/" in i.filename for i in z.infolist())
    return out


def test_torch_load_reads_deflated_storages(deflated: Path) -> None:
    """The premise: torch's reader inflates them."""
    state = _state()
    loaded = torch.load(deflated, weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("only_storages", [True, False])
def test_deflated_storages_load_bit_identical_to_torch(tmp_path: Path, only_storages: bool) -> None:
    plain, path = tmp_path / "plain.pt", tmp_path / "d.pt"
    torch.save(_state(), plain)
    _rewrite(plain, path, only_storages=only_storages)
    ours, theirs = safeckpt.load(path), torch.load(path, weights_only=True)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
        assert a.contiguous().view(torch.uint8).flatten().tolist() == b.contiguous().view(torch.uint8).flatten().tolist()
    assert ours["view"].untyped_storage().data_ptr() == ours["f32"].untyped_storage().data_ptr()
    ours["f32"][0, 0] = 123.0  # writable, like torch.load's
    assert ours["view"][0, 0].item() == ours["f32"][2, 1].item()


def test_inflated_size_at_the_limit_loads_and_one_byte_less_is_refused(tmp_path: Path) -> None:
    plain, path = tmp_path / "plain.pt", tmp_path / "d.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, plain)
    _rewrite(plain, path)
    assert torch.equal(safeckpt.load(path, limits=Limits(max_inflated_bytes=4000))["w"], torch.arange(1000.0))
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_inflated_bytes=3999))
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_inflated_bytes", 3999, 4000)


def _patch_sizes(path: Path, member_suffix: str, *, size: int | None = None, method: int | None = None) -> None:
    """Rewrite a member's declared uncompressed size or method in its local and central headers."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    name = info.filename.encode()
    local = info.header_offset
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(name)] != name:
        central = raw.index(b"PK\x01\x02", central + 4)
    if size is not None:
        struct.pack_into("<I", raw, local + 22, size)
        struct.pack_into("<I", raw, central + 24, size)
    if method is not None:
        struct.pack_into("<H", raw, local + 8, method)
        struct.pack_into("<H", raw, central + 10, method)
    path.write_bytes(bytes(raw))


def test_member_that_inflates_past_its_declared_size_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """A 16-byte storage whose deflated bytes expand to 256 MiB: refused after 17 bytes, RSS flat."""
    plain, path = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4)}, plain)
    bomb = bytes(256 << 20)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = bomb if info.filename.endswith("/data/0") else zin.read(info)
            method = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=method)
    _patch_sizes(path, "/data/0", size=16)
    assert path.stat().st_size < 1 << 20
    child = r"""
import json, resource, sys
import safeckpt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    safeckpt.load(sys.argv[1]); outcome = "loaded"
except safeckpt.SafeCkptError as e:
    outcome = type(e).__name__ + ": " + str(e)
print(json.dumps({"outcome": outcome, "rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""
    result = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("CheckpointFormatError") and "more than its declared 16 bytes" in report["outcome"]
    assert report["rss_mib"] < 64


def test_unknown_compression_method_is_a_clear_error(deflated: Path) -> None:
    _patch_sizes(deflated, "/data/0", method=12)  # bzip2: neither torch's reader nor safeckpt inflates it
    with pytest.raises(safeckpt.CheckpointFormatError, match="compression method 12"):
        safeckpt.load(deflated)


def test_corrupt_deflate_stream_is_a_format_error(tmp_path: Path) -> None:
    plain, path = tmp_path / "plain.pt", tmp_path / "d.pt"
    torch.save({"w": torch.arange(64.0)}, plain)
    _rewrite(plain, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start : start + 4] = b"\xff\xff\xff\xff"  # an invalid block type
    path.write_bytes(bytes(raw))
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path)


def test_scan_and_convert_read_deflated_archives(deflated: Path, tmp_path: Path) -> None:
    assert safeckpt.scan(deflated).verdict == "safe"
    out = tmp_path / "converted.safeckpt"
    safeckpt.convert(deflated, out)
    state = _state()
    converted = safeckpt.load(out)
    assert all(torch.equal(converted[k], state[k]) for k in state)

