"""The on-disk layout of FORMAT.md, pinned byte for byte, and the header parser's refusals."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path

import msgpack
import pytest
import torch

import safeckpt
from safeckpt.container import read_header
from safeckpt.limits import Limits


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def _write_raw(path: Path, header: dict, data: bytes = b"", pad: int = 0) -> Path:
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_golden_skeleton_bytes(tmp_path: Path) -> None:
    state = {"w": torch.tensor([1.0, 2.0]), "step": 3, "betas": (0.9, 0.999), "name": "x"}
    path = safeckpt.save_single_file(None, state, tmp_path / "g.safeckpt")
    length, header = _header(path)
    meta = header.pop("__metadata__")
    assert header == {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert (8 + length) % 64 == 0
    assert path.read_bytes()[8 + length :] == struct.pack("<2f", 1.0, 2.0)
    assert meta["format"] == "pt" and meta["safeckpt.format_version"] == "1"
    skeleton = base64.b64decode(meta["safeckpt.skeleton"])
    tag = lambda t: msgpack.ExtType(1, bytes([t]))  # noqa: E731
    expected = msgpack.packb(
        {
            "root": "dict",
            "attrs": None,
            "components": [
                [msgpack.packb("w"), "w", msgpack.packb([tag(7), "w", 0, None])],
                [msgpack.packb("step"), "step", msgpack.packb(3)],
                [msgpack.packb("betas"), "betas", msgpack.packb([tag(1), 0.9, 0.999])],
                [msgpack.packb("name"), "name", msgpack.packb("x")],
            ],
        },
        use_bin_type=True,
    )
    assert skeleton == expected
    digests = meta["safeckpt.digests"]
    assert digests == "sha256:" + hashlib.sha256(skeleton).hexdigest() + hashlib.sha256(struct.pack("<2f", 1.0, 2.0)).hexdigest()


def test_entries_are_ordered_widest_first_and_aligned(tmp_path: Path) -> None:
    state = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3, dtype=torch.float64), "c": torch.ones(3, dtype=torch.int16)}
    path = safeckpt.save_single_file(None, state, tmp_path / "o.safeckpt")
    header = read_header(path, Limits())
    assert list(header.entries) == ["b", "c", "a"]
    for info in header.entries.values():
        assert (header.data_start + info.begin) % info.dtype.itemsize == 0


def test_top_level_state_dict_keeps_its_type_and_metadata(tmp_path: Path) -> None:
    sd = torch.nn.Linear(2, 2).state_dict()
    path = safeckpt.save_single_file(None, sd, tmp_path / "sd.safeckpt")
    loaded = safeckpt.load(path)
    assert type(loaded) is OrderedDict and loaded._metadata == sd._metadata
    assert list(loaded) == list(sd)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"t": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "expected 0"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "data section holds 8"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
        ({"t": [1, 2]}, b"", "malformed header entry"),
    ],
)
def test_malformed_headers_raise_format_errors(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(safeckpt.CheckpointFormatError, match=message):
        safeckpt.load(path)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(safeckpt.CheckpointFormatError, match="too short|past the end|not a checkpoint"):
        safeckpt.load(path)


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "nojson.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    with pytest.raises(safeckpt.CheckpointFormatError, match="not valid JSON"):
        safeckpt.load(path)


@pytest.mark.parametrize("limit", ["max_header_bytes", "max_tensors", "max_dims"])
def test_header_limits_at_and_past_the_boundary(tmp_path: Path, limit: str) -> None:
    state = {"a": torch.zeros(1, 2, 3), "b": torch.zeros(2)}
    path = safeckpt.save_single_file(None, state, tmp_path / "l.safeckpt")
    length, _ = _header(path)
    actual = {"max_header_bytes": length, "max_tensors": 2, "max_dims": 3}[limit]
    read_header(path, Limits(**{limit: actual}))
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(**{limit: actual - 1}))
    assert info.value.limit == limit and info.value.maximum == actual - 1


@pytest.mark.parametrize("extra", [0, 1, 2])  # every length modulo 3: base64 padding of 0, 2 and 1 "="
def test_skeleton_size_limit_at_and_past_the_boundary(tmp_path: Path, extra: int) -> None:
    text = "x" * (10_000 + extra)
    path = safeckpt.save_single_file(None, {"text": text}, tmp_path / "s.safeckpt")
    size = len(base64.b64decode(_header(path)[1]["__metadata__"]["safeckpt.skeleton"]))
    assert safeckpt.load(path, limits=Limits(max_skeleton_bytes=size))["text"] == text
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_skeleton_bytes=size - 1))
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_skeleton_bytes", size - 1, size)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"a": 1}, tmp_path / "v.safeckpt")
    raw = path.read_bytes().replace(b'"safeckpt.format_version":"1"', b'"safeckpt.format_version":"9"')
    path.write_bytes(raw)
    with pytest.raises(safeckpt.CheckpointFormatError, match="version 9"):
        safeckpt.load(path)


def test_flipped_tensor_bit_is_named_by_verify(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(100, dtype=torch.float32), "v": torch.ones(10)}}
    path = safeckpt.save_single_file(None, state, tmp_path / "f.safeckpt")
    length, header = _header(path)
    begin = header["model/w"]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    raw[8 + length + begin + 17] ^= 0x01
    path.write_bytes(bytes(raw))
    assert not torch.equal(safeckpt.load(path)["model"]["w"], state["model"]["w"])  # unverified: silently wrong
    with pytest.raises(safeckpt.IntegrityError) as info:
        safeckpt.load(path, verify=True)
    assert info.value.tensor_name == "model/w"


def test_flipped_skeleton_bit_is_detected(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"lr": 0.5, "name": "abcdefgh"}, tmp_path / "k.safeckpt")
    raw = path.read_bytes()
    length, header = _header(path)
    skeleton = base64.b64decode(header["__metadata__"]["safeckpt.skeleton"])
    tampered = skeleton.replace(b"abcdefgh", b"abcdefgX")
    new_text = base64.b64encode(tampered)
    raw = raw.replace(base64.b64encode(skeleton), new_text)
    path.write_bytes(raw)
    assert safeckpt.load(path)["name"] == "abcdefgX"
    with pytest.raises(safeckpt.IntegrityError) as info:
        safeckpt.load(path, verify=True)
    assert info.value.tensor_name == "<skeleton>"


def test_format_is_detected_from_bytes_not_extension(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"a": torch.ones(2)}, tmp_path / "model.pth")
    assert torch.equal(safeckpt.load(path)["a"], torch.ones(2))
    legacy = tmp_path / "weights.safetensors"
    torch.save({"a": torch.arange(3)}, legacy)
    assert torch.equal(safeckpt.load(legacy)["a"], torch.arange(3))  # read as a torch file, not as safetensors
    assert safeckpt.scan(legacy).format == "torch-zip"


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path)
    with pytest.raises(FileNotFoundError):
        safeckpt.load(tmp_path / "missing.safeckpt")
