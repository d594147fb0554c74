"""A skeleton file (a multi-file set's ``.msgpack`` component) under ``verify=True``.

It records no digest of its own: its set's manifest holds the SHA-256 of the
whole file. So through the set, ``verify=True`` checks that digest on the same
open file it then decodes; read alone, ``verify=True`` raises ``IntegrityError``
(no digest to check), as for any safeckpt file whose digests are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safeckpt

STATE = {"model_state_dict": {"w": torch.arange(6.0)}, "model_kwargs": {"lr": 0.5, "name": "abcdefgh", "n": 7}}


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, Path]:
    files = safeckpt.save_multi_files(None, STATE, tmp_path / "m.pth")
    skeleton = files["model_kwargs"]
    assert skeleton.suffix == ".msgpack"
    return tmp_path / "m.safeckpt.json", skeleton


def _kwargs(value: dict) -> dict:
    """The saved kwargs (saving folds version metadata into ``model_kwargs`` too)."""
    return {k: value[k] for k in STATE["model_kwargs"]}


def _flip(path: Path, byte: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_set_with_an_intact_skeleton_verifies(saved: tuple[Path, Path]) -> None:
    manifest, _ = saved
    loaded = safeckpt.load_multi_files(manifest, verify=True)
    assert loaded["model_kwargs"]["name"] == "abcdefgh" and torch.equal(loaded["model_state_dict"]["w"], torch.arange(6.0))


def test_tampered_value_bits_in_the_skeleton_raise_integrity_error(saved: tuple[Path, Path]) -> None:
    manifest, skeleton = saved
    at = skeleton.read_bytes().index(b"abcdefgh")
    _flip(skeleton, at, 0)  # "abcdefgh" -> "`bcdefgh": still a well-formed file, another value
    assert safeckpt.load_multi_files(manifest)["model_kwargs"]["name"] == "`bcdefgh"  # unverified: it loads
    with pytest.raises(safeckpt.IntegrityError) as info:
        safeckpt.load_multi_files(manifest, verify=True)
    assert info.value.tensor_name == "model_kwargs"


def test_every_bit_flipped_in_the_skeleton_is_caught_with_verify(saved: tuple[Path, Path]) -> None:
    manifest, skeleton = saved
    original = skeleton.read_bytes()
    for byte in range(len(original)):
        for bit in range(8):
            raw = bytearray(original)
            raw[byte] ^= 1 << bit
            skeleton.write_bytes(bytes(raw))
            with pytest.raises((safeckpt.IntegrityError, safeckpt.CheckpointFormatError)):
                safeckpt.load_multi_files(manifest, keys=["model_kwargs"], verify=True)
    skeleton.write_bytes(original)
    assert _kwargs(safeckpt.load_multi_files(manifest, keys=["model_kwargs"], verify=True)["model_kwargs"]) == STATE["model_kwargs"]


def test_wrong_or_unreadable_manifest_digest_raises(saved: tuple[Path, Path]) -> None:
    manifest, _ = saved
    document = json.loads(manifest.read_text())
    entry = next(e for e in document["components"] if e["key"] == "model_kwargs")
    entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(document))
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load_multi_files(manifest, verify=True)
    entry["sha256"] = "not hex"
    manifest.write_text(json.dumps(document))
    with pytest.raises((safeckpt.IntegrityError, safeckpt.CheckpointFormatError)):
        safeckpt.load_multi_files(manifest, verify=True)


def test_skeleton_read_alone_with_verify_has_no_digest(saved: tuple[Path, Path]) -> None:
    _, skeleton = saved
    assert _kwargs(safeckpt.load(skeleton)["model_kwargs"]) == STATE["model_kwargs"]
    for read in (safeckpt.load, safeckpt.load_single_file, safeckpt.open):
        with pytest.raises(safeckpt.IntegrityError, match="records no digest of its own"):
            read(skeleton, verify=True)


def test_discovered_set_without_manifest_cannot_verify(saved: tuple[Path, Path]) -> None:
    manifest, _ = saved
    manifest.unlink()
    assert _kwargs(safeckpt.load_multi_files(manifest.parent / "m.pth")["model_kwargs"]) == STATE["model_kwargs"]
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load_multi_files(manifest.parent / "m.pth", verify=True)
