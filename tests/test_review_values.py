"""Review, class 4: values a file declares that break the API instead of raising SafeCkptError.

``torch.Size`` accepts any Python int and only fails later: a skeleton SIZE (or a legacy
``torch.Size(...)`` call) holding ``2**100`` loaded, then ``convert`` died with
``OverflowError: Integer value out of range`` (msgpack) and printing it raised
``ValueError``. Rule: a ``torch.Size`` made from file values holds ints in torch's int64
range (``safeckpt.tensors.torch_size``, used by the skeleton decoder and the legacy reader).
"""

from __future__ import annotations

import base64
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

import safeckpt
from safeckpt.errors import CheckpointFormatError

LOW, HIGH = -(2**63), 2**63 - 1


def _bigint(value: int) -> msgpack.ExtType:
    return msgpack.ExtType(2, value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True))


def _skeleton_file(path: Path, value: object) -> Path:
    """A safeckpt file whose component ``x`` is ``value`` (a msgpack-ready skeleton value)."""
    safeckpt.save_single_file(None, {"x": 1}, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    skeleton = msgpack.unpackb(base64.b64decode(meta["safeckpt.skeleton"]), raw=False)
    skeleton["components"] = [[msgpack.packb("x"), "x", msgpack.packb(value)]]
    meta["safeckpt.skeleton"] = base64.b64encode(msgpack.packb(skeleton)).decode()
    del meta["safeckpt.digests"], meta["safeckpt.header_digest"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return path


def _size_skeleton(path: Path, dims: list[int]) -> Path:
    tag = msgpack.ExtType(1, bytes([6]))
    return _skeleton_file(path, [tag, *(d if -(2**63) <= d < 2**64 else _bigint(d) for d in dims)])


class _Size:
    def __init__(self, dims: tuple[int, ...]) -> None:
        self.dims = dims

    def __reduce__(self) -> tuple[object, ...]:
        return (torch.Size, (self.dims,))


def _size_pickle(path: Path, dims: list[int]) -> Path:
    path.write_bytes(pickle.dumps({"x": _Size(tuple(dims))}, protocol=2))
    return path


@pytest.mark.parametrize("make", [_size_skeleton, _size_pickle])
@pytest.mark.parametrize("dims", [[HIGH], [LOW], [HIGH, LOW, 0, -1]])
def test_size_at_int64_bounds_loads_and_converts(make, dims: list[int], tmp_path: Path) -> None:
    path = make(tmp_path / "in.bin", dims)
    value = safeckpt.load(path)["x"]
    assert type(value) is torch.Size and list(value) == dims
    out = safeckpt.convert(path, tmp_path / "out.safeckpt")
    assert safeckpt.load(out)["x"] == torch.Size(dims)


@pytest.mark.parametrize("make", [_size_skeleton, _size_pickle])
@pytest.mark.parametrize("dims", [[HIGH + 1], [LOW - 1], [1, 2**100], [-(10**30)]])
def test_size_past_int64_is_a_format_error(make, dims: list[int], tmp_path: Path) -> None:
    path = make(tmp_path / "in.bin", dims)
    with pytest.raises(CheckpointFormatError, match="torch.Size"):
        safeckpt.load(path)
    with pytest.raises(CheckpointFormatError, match="torch.Size"):
        safeckpt.convert(path, tmp_path / "out.safeckpt")
    assert not (tmp_path / "out.safeckpt").exists()


@pytest.mark.parametrize("make", [_size_skeleton, _size_pickle])
def test_cli_on_huge_size_exits_2_without_traceback(make, tmp_path: Path) -> None:
    path = make(tmp_path / "in.bin", [2**100])
    for args in (["inspect", str(path)], ["convert", str(path), "-o", str(tmp_path / "o.safeckpt")]):
        run = subprocess.run([sys.executable, "-m", "safeckpt", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and "torch.Size" in run.stderr
