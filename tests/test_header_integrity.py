"""What ``verify=True`` covers (issue 14, section 8).

A file safeckpt wrote records a digest of its skeleton, of each entry's bytes, and of what
its header declares (metadata keys and values, each entry's name, dtype, shape and offsets).
With ``verify=True`` a missing or unreadable digest is an ``IntegrityError``, and no single
flipped bit anywhere in the header or the data loads silently.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt import CheckpointFormatError, IntegrityError
from safeckpt.container import META_DIGESTS, META_HEADER_DIGEST, META_VERSION


def _state() -> dict[str, Any]:
    return {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([7, 8, 9], dtype=torch.int32), "step": 3}


def _saved(tmp_path: Path) -> Path:
    return safeckpt.save_single_file(None, _state(), tmp_path / "c.safetensors")


def _rewrite_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _outcome(path: Path) -> str:
    """How ``load(verify=True)`` ends: ``"integrity"``, ``"format"`` or ``"loaded"``."""
    try:
        safeckpt.load(path, verify=True)
    except IntegrityError:
        return "integrity"
    except CheckpointFormatError:
        return "format"
    return "loaded"


def test_flipped_digest_key_name_and_data_bit_are_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.index(META_DIGESTS.encode())
    raw[at + len("safeckpt.d")] ^= 0x01  # "safeckpt.digests" -> "safeckpt.eigests"
    raw[-1] ^= 0x01  # and one data bit
    path.write_bytes(bytes(raw))
    assert safeckpt.load(path)["step"] == 3  # readable without verify
    with pytest.raises(IntegrityError) as info:
        safeckpt.load(path, verify=True)
    assert info.value.tensor_name == "<header>" and info.value.file == str(path)
    with pytest.raises(IntegrityError):
        safeckpt.remote.open(path.as_uri(), verify=True)


def test_every_bit_of_the_header_is_covered(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    original = path.read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    end = 8 + len(original[8 : 8 + length].rstrip(b" ")) + 1  # the JSON and one padding byte
    outcomes: dict[str, int] = {}
    silent = []
    for position in range(end):
        for bit in range(8):
            raw = bytearray(original)
            raw[position] ^= 1 << bit
            path.write_bytes(bytes(raw))
            outcome = _outcome(path)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "loaded":
                silent.append((position, bit))
    assert not silent, f"bit flips that loaded with verify=True: {silent[:20]}"
    assert outcomes["integrity"] > 1000  # most flips keep the file parseable: the digests catch them


def test_every_bit_of_the_data_is_covered(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    original = path.read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    for position in range(8 + length, len(original)):
        for bit in range(8):
            raw = bytearray(original)
            raw[position] ^= 1 << bit
            path.write_bytes(bytes(raw))
            assert _outcome(path) == "integrity", (position, bit)


def _swap_names(header: dict[str, Any]) -> None:
    header["w"], header["b"] = header["b"], header["w"]


def _retype(header: dict[str, Any]) -> None:
    header["b"]["dtype"] = "F32"  # same size, other values


@pytest.mark.parametrize(
    "change",
    [
        _swap_names,
        _retype,
        lambda h: h["w"].__setitem__("shape", [3, 1]),
        lambda h: h["__metadata__"].__setitem__(META_VERSION, "0"),
        lambda h: h["__metadata__"].__setitem__("safeckpt.created", "2000-01-01T00:00:00+00:00"),
        lambda h: h["__metadata__"].__setitem__("extra", "x"),
        lambda h: h["__metadata__"].pop("format"),
    ],
    ids=["swapped-names", "retyped", "reshaped", "version", "created", "added-key", "removed-key"],
)
def test_header_changes_that_keep_every_byte_digest_are_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = _saved(tmp_path)
    _rewrite_header(path, change)
    safeckpt.load(path)  # still a valid file: without verify it loads
    with pytest.raises(IntegrityError) as info:
        safeckpt.load(path, verify=True)
    assert info.value.tensor_name == "<header>" and info.value.expected and info.value.actual
    with pytest.raises(IntegrityError):
        safeckpt.remote.open(path.as_uri(), verify=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["__metadata__"].pop(META_HEADER_DIGEST),
        lambda h: h["__metadata__"].pop(META_DIGESTS),
        lambda h: h["__metadata__"].__setitem__(META_DIGESTS, h["__metadata__"][META_DIGESTS][:-64]),
        lambda h: h["__metadata__"].__setitem__(META_HEADER_DIGEST, "sha256:" + "G" * 64),
        lambda h: h["__metadata__"].__setitem__(META_DIGESTS, "md5:" + h["__metadata__"][META_DIGESTS][7:]),
    ],
    ids=["no-header-digest", "no-digests", "short-digests", "not-hex", "other-prefix"],
)
def test_missing_or_unreadable_digests_are_integrity_errors(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = _saved(tmp_path)
    _rewrite_header(path, change)
    with pytest.raises(IntegrityError) as info:
        safeckpt.load(path, verify=True)
    assert info.value.tensor_name == "<header>"


def test_padding_is_layout_not_meaning(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite_header(path, lambda h: None)  # the same header, laid out again
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].rstrip(b" ") + b" " * 100
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    out = safeckpt.load(path, verify=True)
    assert torch.equal(out["w"], _state()["w"]) and out["step"] == 3
