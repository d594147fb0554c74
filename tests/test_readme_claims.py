"""What the README says about loading, verifying old files, tied weights and split/merge folding is true
(issue 15): each claim is checked against behaviour, and the README is checked to still say it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import safeckpt
from safeckpt import IntegrityError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def cli(args: list[Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("safeckpt")
    assert exe is not None, "the safeckpt console script is not installed: pip install -e ."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


def without_header_digest(src: Path, dst: Path) -> None:
    """``src`` as an earlier safeckpt wrote it: the same file without ``safeckpt.header_digest``."""
    raw = src.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    del header["__metadata__"]["safeckpt.header_digest"]
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length :])


def test_an_old_file_without_the_header_digest_fails_verify_and_convert_fixes_it(tmp_path: Path) -> None:
    assert "fail `verify=True`" in README and "safeckpt convert old.safeckpt new.safeckpt" in README
    state = {"model_state_dict": {"w": torch.randn(3, 2)}, "epoch": 4}
    new = tmp_path / "new.safeckpt"
    safeckpt.save_single_file(None, state, new)
    old = tmp_path / "old.safeckpt"
    without_header_digest(new, old)
    assert torch.equal(safeckpt.load(old)["model_state_dict"]["w"], state["model_state_dict"]["w"])  # loads unverified
    with pytest.raises(IntegrityError, match="safeckpt convert OLD NEW") as info:
        safeckpt.load(old, verify=True)
    assert info.value.tensor_name == "<header>"
    proc = cli(["verify", old], tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED") and str(old) in proc.stdout
    resaved = tmp_path / "resaved.safeckpt"
    proc = cli(["convert", old, resaved], tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli(["verify", resaved], tmp_path)
    assert proc.returncode == 0 and "every SHA-256 digest matches" in proc.stdout, proc.stdout
    loaded = safeckpt.load(resaved, verify=True)
    assert torch.equal(loaded["model_state_dict"]["w"], state["model_state_dict"]["w"]) and loaded["epoch"] == 4


def test_a_torch_save_file_loads_without_trust_pickle_and_only_a_dangerous_one_is_refused(tmp_path: Path) -> None:
    assert "is refused unless you pass" not in README  # the claim the issue found false is gone
    assert "only a file\n  that names dangerous code is refused" in README
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.arange(3.0), "opt": {"lr": 0.1}}, path)
    assert torch.equal(safeckpt.load(path)["w"], torch.arange(3.0))

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError):
        safeckpt.load(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_tied_weights_are_seen_once_by_a_plain_safetensors_reader(tmp_path: Path) -> None:
    assert "sees a tied weight once, under its first name" in README
    emb = torch.randn(5, 3)
    state = {"model_state_dict": {"emb.weight": emb, "head.weight": emb}, "model_kwargs": {}}
    path = tmp_path / "tied.safeckpt"
    safeckpt.save_single_file(None, state, path)
    plain = safetensors.torch.load_file(path)
    assert list(plain) == ["model_state_dict/emb.weight"]
    loaded = safeckpt.load(path)["model_state_dict"]
    assert loaded["emb.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    component = safetensors.torch.load_file(tmp_path / "m_model_state_dict.safetensors")
    assert sorted(component) == ["emb.weight", "head.weight"]  # every name, for load_state_dict(strict=True)


def test_split_and_merge_fold_metadata_into_model_kwargs(tmp_path: Path) -> None:
    assert "`split` and `merge` therefore give back a set whose\n`model_kwargs` holds those folded values" in README
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"width": 2}, "seed": 11,
             "pytorch_version": "2.13.0"}
    single = tmp_path / "c.safeckpt"
    safeckpt.save_single_file(None, state, single)
    proc = cli(["split", single], tmp_path)
    assert proc.returncode == 0, proc.stderr
    parts = safeckpt.load_multi_files(single)
    assert set(parts) == {"model_state_dict", "model_kwargs"}  # no seed component unless named
    assert parts["model_kwargs"]["seed"] == 11 and parts["model_kwargs"]["width"] == 2
    assert parts["model_kwargs"]["pytorch_version"] == "2.13.0"
    proc = cli(["merge", tmp_path / "c.safeckpt.json", tmp_path / "merged.safeckpt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    merged = safeckpt.load(tmp_path / "merged.safeckpt", verify=True)
    assert set(merged) == {"model_state_dict", "model_kwargs"} and merged["model_kwargs"]["seed"] == 11
    assert state["model_kwargs"] == {"width": 2}  # the caller's state was never touched
