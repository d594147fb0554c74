"""Limits at their boundaries, and bombs that must fail fast in little memory."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

import safeckpt
from safeckpt import Limits
from safeckpt.container import read_header


def _rewrite_skeleton(path: Path, skeleton: bytes) -> None:
    """Replace a saved file's skeleton (and drop its digests) keeping the rest valid."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"]["safeckpt.skeleton"] = base64.b64encode(skeleton).decode()
    del header["__metadata__"]["safeckpt.digests"]
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def test_components_limit(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {f"k{i}": i for i in range(10)}, tmp_path / "c.safeckpt")
    assert len(safeckpt.load(path, limits=Limits(max_components=10))) == 10
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_components=9))
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_components", 9, 10)


def test_string_length_limit(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"s": "x" * 1000, "b": b"y" * 1000}, tmp_path / "s.safeckpt")
    assert safeckpt.load(path, limits=Limits(max_str_len=1000))["s"] == "x" * 1000
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path, limits=Limits(max_str_len=999))


def test_container_length_limit_in_the_skeleton(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"l": list(range(500)), "d": {i: i for i in range(500)}}, tmp_path / "l.safeckpt")
    assert safeckpt.load(path, limits=Limits(max_container_len=500))["l"] == list(range(500))
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path, limits=Limits(max_container_len=499))


def test_depth_limit_when_saving(tmp_path: Path) -> None:
    nested: list = []
    for _ in range(30):
        nested = [nested]
    state = {"n": nested}
    safeckpt.save_single_file(None, state, tmp_path / "ok.safeckpt")
    with pytest.raises(safeckpt.UnsupportedValueError, match="max_depth"):
        from safeckpt.container import encode_state

        encode_state(state, Limits(max_depth=30))
    assert encode_state(state, Limits(max_depth=32)).entries == []


def test_declared_array_of_four_billion_items_fails_fast(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"a": 1}, tmp_path / "arr.safeckpt")
    value = b"\xdd\xff\xff\xff\xff"  # array32 claiming 2**32 - 1 items, and nothing after
    root = {"root": "dict", "attrs": None, "components": [[msgpack.packb("a"), "a", value]]}
    _rewrite_skeleton(path, msgpack.packb(root, use_bin_type=True))
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path)


def test_depth_limit_when_reading_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * 50 + b"a" * 49 + b".")  # a list nested 50 deep
    assert safeckpt.load(path, limits=Limits(max_depth=50)) is not None
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_depth=49))
    assert info.value.limit == "max_depth"


def test_a_ten_byte_file_claiming_a_terabyte(tmp_path: Path) -> None:
    header = json.dumps({"t": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}).encode()
    path = tmp_path / "tb.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    for load in (lambda: read_header(path, Limits()), lambda: safeckpt.load(path)):
        with pytest.raises(safeckpt.LimitExceededError, match="outside") as info:
            load()
        assert (info.value.limit, info.value.maximum, info.value.actual) == ("file_size", 10, 1 << 40)


def test_declared_extents_at_and_one_past_the_end_of_the_file(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"t": torch.arange(4, dtype=torch.int32)}, tmp_path / "f.safeckpt")
    raw = path.read_bytes()
    assert torch.equal(safeckpt.load(path)["t"], torch.arange(4, dtype=torch.int32))
    path.write_bytes(raw[:-1])  # the last tensor byte gone: its entry now ends one past the data section
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path)
    assert info.value.limit == "file_size" and info.value.actual == info.value.maximum + 1
    (length,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[: 8 + length - 1])  # the header itself one byte short
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path)
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("file_size", 8 + length - 1, 8 + length)


BOMBS = r'''
import base64, json, resource, struct, sys, msgpack, safeckpt
from pathlib import Path
d = Path(sys.argv[1])
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def bomb(name, data):
    p = d / name
    p.write_bytes(data)
    try:
        safeckpt.load(p)
    except safeckpt.SafeCkptError:
        return
    raise SystemExit(f"{name} loaded")
bomb("huge_header_len", struct.pack("<Q", (1 << 63) - 1) + b"{}")
bomb("header_just_under_limit_claimed", struct.pack("<Q", 100 * (1 << 20)) + b"{" + b" " * 100)
t = json.dumps({"t": {"dtype": "F64", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 8]}}).encode()
bomb("terabyte_tensor", struct.pack("<Q", len(t)) + t + b"\0" * 8)
sk = base64.b64encode(b"\xdd\xff\xff\xff\xff").decode()
t = json.dumps({"__metadata__": {"safeckpt.format_version": "1", "safeckpt.skeleton": sk}}).encode()
bomb("skeleton_array_bomb", struct.pack("<Q", len(t)) + t)
bomb("pickle_binbytes8_bomb", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"x.")
bomb("pickle_long4_bomb", b"\x80\x02\x8b" + struct.pack("<i", (1 << 31) - 1) + b"\x01.")
bomb("pickle_deep_list", b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".")
m = {"format": "safeckpt-multi", "format_version": 1, "components": [{"key": "k", "file": "x.msgpack", "size": 1 << 60, "sha256": "0" * 64}]}
(d / "x.msgpack").write_bytes(b"\x80")
bomb("manifest.safeckpt.json", json.dumps(m).encode())
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
print(f"{grown:.1f}")
'''


def test_bombs_fail_fast_in_little_memory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BOMBS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    grown_mib = float(done.stdout.strip().splitlines()[-1])
    assert grown_mib < 100, f"peak RSS grew by {grown_mib:.1f} MiB"
