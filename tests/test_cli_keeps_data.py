"""Issue 15 through the ``safeckpt`` console script: nothing lost or overwritten, every root converts,
only real checkpoints are taken for checkpoints, errors said once on stderr, ``--allow-global``
resolved from the working directory. API counterparts are checked beside each."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import safeckpt
from safeckpt import CheckpointManager, OpaqueObject

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("safeckpt")
    assert exe is not None, "the safeckpt console script is not installed: pip install -e ."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


def resemblyzer_like() -> dict[str, Any]:
    """A state with none of the seed's default keys (as Resemblyzer's checkpoint)."""
    return {"model_state": {"lstm.weight": torch.randn(4, 3), "proj.bias": torch.randn(2)}, "step": 7}


# --------------------------------------------------------------------------- nothing lost


def test_convert_multi_keeps_every_component(tmp_path: Path) -> None:
    src = tmp_path / "rz.pt"
    state = resemblyzer_like()
    torch.save(state, src)
    proc = cli(["convert", src, tmp_path / "rz", "--multi"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = safeckpt.load(tmp_path / "rz")
    assert set(loaded) == {"model_state", "step"}
    assert torch.equal(loaded["model_state"]["lstm.weight"], state["model_state"]["lstm.weight"])
    assert loaded["step"] == 7
    written = safeckpt.convert(src, tmp_path / "api" / "rz", multi=True)
    assert isinstance(written, dict) and {"model_state", "step"} <= set(written)


def test_convert_multi_refuses_keys_that_cannot_name_files(tmp_path: Path) -> None:
    src = tmp_path / "ints.pt"
    torch.save({0: torch.ones(1), "a": 1}, src)
    proc = cli(["convert", src, "--multi"], tmp_path)
    assert proc.returncode == 2 and "not str" in proc.stderr and proc.stdout == ""
    assert not list(tmp_path.glob("ints_*"))


def test_seed_api_logs_left_out_keys_and_refuses_to_keep_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="safeckpt"):
        safeckpt.save_multi_files(None, {"model_state_dict": {"w": torch.ones(1)}, "epoch": 3, "seed": 1}, tmp_path / "m.pth")
    assert any("not saved" in r.getMessage() and "'epoch'" in r.getMessage() for r in caplog.records)
    assert not any("'seed'" in r.getMessage() and "not saved" in r.getMessage() for r in caplog.records)  # folded
    single = tmp_path / "rz.safeckpt"
    safeckpt.save_single_file(None, resemblyzer_like(), single)
    with pytest.raises(ValueError, match="none of the components"):
        safeckpt.save_multi_from_single(single)
    with pytest.raises(ValueError, match="none of the components"):
        safeckpt.save_multi_files(None, resemblyzer_like(), tmp_path / "x.pth")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob("rz_*"))

    class Handler:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, msg: str) -> None:
            self.lines.append(msg)

    handler = Handler()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="safeckpt"):
        safeckpt.save_multi_files(handler, {"model_kwargs": {}, "extra": 1}, tmp_path / "h.pth")
    assert len(handler.lines) == 1, "the handler gets the seed's one success line"
    assert any("not saved" in r.getMessage() and "extra" in r.getMessage() for r in caplog.records)


def test_two_sources_never_overwrite_the_second(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.ones(2)}, a)
    torch.save({"w": torch.zeros(3)}, b)
    before = b.read_bytes()
    for extra in ([], ["--overwrite"]):
        proc = cli(["convert", a, b, *extra], tmp_path)
        assert b.read_bytes() == before, "the second checkpoint was overwritten"
        assert "second source" in proc.stderr
        assert proc.returncode in (0, 2)
    assert torch.equal(safeckpt.load(tmp_path / "b.safetensors")["w"], torch.zeros(3))
    out = tmp_path / "out"
    proc = cli(["convert", a, b, "--out-dir", out, "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert b.read_bytes() == before


def test_convert_in_place_needs_the_option(tmp_path: Path) -> None:
    p = tmp_path / "c.safetensors"
    safeckpt.save_single_file(None, {"w": torch.ones(2)}, p)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="in_place"):
        safeckpt.convert(p, p)
    proc = cli(["convert", p, p], tmp_path)
    assert proc.returncode == 2 and "--in-place" in proc.stderr and p.read_bytes() == before
    proc = cli(["convert", p], tmp_path)  # the default destination is the source itself
    assert proc.returncode == 2 and p.read_bytes() == before
    legacy = tmp_path / "l.pth"
    torch.save({"w": torch.arange(3.0)}, legacy)
    proc = cli(["convert", legacy, "--in-place"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(safeckpt.load(legacy)["w"], torch.arange(3.0))
    assert safeckpt.open(legacy).is_safeckpt
    assert safeckpt.convert(p, p, in_place=True) == p


# --------------------------------------------------------------------------- any root value


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(6.0).reshape(2, 3),
        [torch.ones(2), {"a": torch.zeros(1)}, 3, "text"],
        (torch.ones(1), 2),
        nn.Linear(2, 3),
        42,
    ],
    ids=["tensor", "list", "tuple", "module", "int"],
)
def test_any_root_converts_and_loads_back_as_the_same_kind(tmp_path: Path, value: Any) -> None:
    src = tmp_path / "root.bin"
    torch.save(value, src)
    proc = cli(["convert", src, tmp_path / "root.safetensors"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = safeckpt.load(tmp_path / "root.safetensors")
    if isinstance(value, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and torch.equal(loaded, value)
    elif isinstance(value, nn.Module):
        assert isinstance(loaded, OpaqueObject) and loaded.cls.qualname == "Linear"
        assert torch.equal(loaded.state["_parameters"]["weight"], value.weight.detach())
    elif isinstance(value, (list, tuple)):
        assert type(loaded) is type(value) and len(loaded) == len(value)
        assert torch.equal(loaded[0], value[0])
    else:
        assert loaded == value
    # a plain safetensors reader sees the tensors under names starting with "root"
    names = list(safetensors.torch.load_file(tmp_path / "root.safetensors"))
    assert all(n == "root" or n.startswith("root/") for n in names)
    inspected = cli(["inspect", "--json", tmp_path / "root.safetensors"], tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert cli(["verify", tmp_path / "root.safetensors"], tmp_path).returncode == 0


def test_value_root_rejects_malformed_skeleton(tmp_path: Path) -> None:
    from safeckpt.container import parse_root
    from safeckpt.errors import CheckpointFormatError
    from safeckpt.limits import DEFAULT_LIMITS
    import msgpack

    two = msgpack.packb({"root": "value", "attrs": None, "components": [[b"\xc0", "root", b"\xc0"]] * 2})
    with pytest.raises(CheckpointFormatError, match="exactly one component"):
        parse_root(two, DEFAULT_LIMITS, "f")
    attrs = msgpack.packb({"root": "value", "attrs": b"\x80", "components": [[b"\xc0", "root", b"\xc0"]]})
    with pytest.raises(CheckpointFormatError):
        parse_root(attrs, DEFAULT_LIMITS, "f")


# --------------------------------------------------------------------------- only real checkpoints


def test_foreign_json_is_not_a_checkpoint(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 4, "format": "pt"}))
    for command in ("inspect", "verify"):
        proc = cli([command, config], tmp_path)
        assert proc.returncode == 2, proc.stdout
        assert "not a checkpoint" in proc.stderr and str(config) in proc.stderr and proc.stdout == ""


def test_hf_index_is_recognised(tmp_path: Path) -> None:
    safetensors.torch.save_file({"a": torch.ones(1)}, tmp_path / "model-00001-of-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map}))
    proc = cli(["inspect", index], tmp_path)
    assert proc.returncode == 0 and "Hugging Face shard index" in proc.stdout and "MISSING" in proc.stdout
    doc = json.loads(cli(["inspect", "--json", index], tmp_path).stdout)
    assert doc["format"] == "hf-shard-index" and len(doc["shards"]) == 2
    proc = cli(["verify", index], tmp_path)
    assert proc.returncode == 1 and "missing" in proc.stdout
    safetensors.torch.save_file({"b": torch.ones(1)}, tmp_path / "model-00002-of-00002.safetensors")
    assert cli(["verify", index], tmp_path).returncode == 0
    safetensors.torch.save_file({"c": torch.ones(1)}, tmp_path / "model-00002-of-00002.safetensors")
    assert cli(["verify", index], tmp_path).returncode == 1  # the shard lacks the tensor mapped to it


def test_manager_directory_and_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    manager.save(1, {"model": {"w": torch.ones(4)}}, {"loss": 0.5})
    manager.save(2, {"model": {"w": torch.zeros(4)}}, {"loss": 0.4})
    step = run / "step_000000000002"
    proc = cli(["inspect", run], tmp_path)
    assert proc.returncode == 0 and "2 complete steps" in proc.stdout and "loss=0.4" in proc.stdout
    assert cli(["inspect", step], tmp_path).returncode == 0
    assert cli(["verify", run], tmp_path).returncode == 0
    proc = cli(["verify", step / "COMMITTED"], tmp_path)
    assert proc.returncode == 0 and "OK step 2" in proc.stdout
    # corrupt one tensor byte of the step's checkpoint: size unchanged, header unchanged
    ckpt = step / "checkpoint.safeckpt"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    for target in (step / "COMMITTED", step, run):
        proc = cli(["verify", target], tmp_path)
        assert proc.returncode == 1, (target, proc.stdout, proc.stderr)
        assert "FAILED" in proc.stdout
    # an incomplete step: a marker removed
    (run / "step_000000000001" / "COMMITTED").unlink()
    proc = cli(["verify", run / "step_000000000001"], tmp_path)
    assert proc.returncode == 1 and "INCOMPLETE" in proc.stdout


# --------------------------------------------------------------------------- errors, --allow-global


def test_convert_error_once_on_stderr_with_the_name(tmp_path: Path) -> None:
    proc = cli(["convert", tmp_path / "X.pth"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("no such file") == 1 and proc.stderr.count("X.pth") == 1, proc.stderr


def test_allow_global_resolves_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "mymodule.py").write_text(
        "class MyModel:\n    def __init__(self):\n        self.size = 3\n"
    )
    src = tmp_path / "obj.pt"
    # a pickle of mymodule.MyModel, written in a child process that has the module on its path
    subprocess.run(
        ["python", "-c", "import torch, mymodule; torch.save({'m': mymodule.MyModel()}, 'obj.pt')"],
        cwd=tmp_path,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    proc = cli(["convert", src, "--allow-global", "mymodule:MyModel", "mymodule:Nope", "nomod:X"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mymodule:MyModel" not in proc.stderr
    assert "mymodule:Nope" in proc.stderr and "nomod:X" in proc.stderr and "warning" in proc.stderr
    assert (tmp_path / "obj.safetensors").exists()
