"""Review, class 8: a bit flipped in every byte of a multi-file set, loaded with ``verify=True``.

Single-bit flips of every byte of a set's manifest (manifest, skeleton files, safetensors
component) must end in a ``SafeCkptError`` or load the same state. A flip in a
component's file name inside the manifest made ``load(verify=True)`` raise a bare
``FileNotFoundError`` (556 of the manifest's bit flips): the missing file is named by the
manifest's bytes, so it is a torn set. Rule: ``multifile.check_entry_in`` raises
``ComponentFileMissingError`` for a listed component that is missing: an ``IntegrityError``
and still the standard ``FileNotFoundError`` the contract promises for a missing file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt.errors import IntegrityError, SafeCkptError


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return type(a) is type(b) and a == b


def _set(tmp_path: Path) -> tuple[Path, dict]:
    state = {"model_state_dict": OrderedDict(w=torch.arange(6, dtype=torch.float32)),
             "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1}]}, "model_kwargs": {"n": 3}}
    safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    return tmp_path / "m.pth", safeckpt.load(tmp_path / "m.pth")


def test_every_manifest_bit_flip_is_a_safeckpt_error_or_the_same_state(tmp_path: Path) -> None:
    base, ref = _set(tmp_path)
    manifest = tmp_path / "m.safeckpt.json"
    original = manifest.read_bytes()
    for i in range(len(original)):
        for bit in (0, 5, 6):  # a letter's case, a digit or letter into another class
            data = bytearray(original)
            data[i] ^= 1 << bit
            manifest.write_bytes(bytes(data))
            try:
                value = safeckpt.load(base, verify=True)
            except SafeCkptError:
                continue
            assert _same(ref, value), f"byte {i} bit {bit} loaded another state"


@pytest.mark.parametrize("verify", [False, True])
def test_manifest_naming_a_missing_file_is_an_integrity_error(tmp_path: Path, verify: bool) -> None:
    base, _ = _set(tmp_path)
    manifest = tmp_path / "m.safeckpt.json"
    doc = json.loads(manifest.read_text())
    for c in doc["components"]:
        if c["key"] == "model_kwargs":
            c["file"] = "m_model_kwargs.msgpacK"
    manifest.write_text(json.dumps(doc))
    for call in (lambda: safeckpt.load(base, verify=verify), lambda: safeckpt.load_multi_files(manifest, verify=verify)):
        with pytest.raises(IntegrityError, match="missing") as info:
            call()
        assert info.value.tensor_name == "model_kwargs"
        assert isinstance(info.value, FileNotFoundError) and info.value.filename.endswith("m_model_kwargs.msgpacK")
    # the components that are there still load on their own
    assert safeckpt.load_multi_files(base, keys=["model_state_dict"], verify=verify)["model_state_dict"]["w"].numel() == 6
