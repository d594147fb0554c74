"""The file-system trust boundary: inside a set or a manager directory safeckpt never follows a
link, never opens anything but a regular file, and never deletes through a link.

Each attack plants a link or a FIFO where safeckpt expects its own file and checks
that a sentinel outside the set (another run, another set) is untouched.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt.manager import CheckpointManager

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or not hasattr(os, "mkfifo"), reason="needs POSIX links and FIFOs")


def _state(value: float) -> dict[str, Any]:
    return {"model_state_dict": {"w": torch.full((4,), value)}, "optimizer_state_dict": {"lr": value}, "model_kwargs": {"v": value}}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Another set, outside the attacked directory: its files are the link targets."""
    other = tmp_path / "other"
    safeckpt.save_multi_files(None, _state(666.0), other / "m.pth")
    return other


# --------------------------------------------------------------------------- links inside a set


def test_symlinked_component_is_refused_with_manifest_and_verify(tmp_path: Path, outside: Path) -> None:
    run = tmp_path / "run"
    safeckpt.save_multi_files(None, _state(1.0), run / "m.pth")
    target = outside / "m_model_state_dict.safetensors"
    component = run / "m_model_state_dict.safetensors"
    component.unlink()
    os.symlink(target, component)  # same size and digest as the outside file: only the link gives it away
    before = target.read_bytes()
    for verify in (False, True):
        with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link") as info:
            safeckpt.load_multi_files(run / "m.pth", verify=verify)
        assert info.value.file == str(component)
        with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
            safeckpt.load(run / "m.safeckpt.json", verify=verify)
    assert target.read_bytes() == before


def test_symlinked_component_is_not_discovered(tmp_path: Path, outside: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside / "m_model_state_dict.safetensors", run / "m_model_state_dict.safetensors")
    with pytest.raises(FileNotFoundError):
        safeckpt.load_multi_files(run / "m.pth")


def test_component_inside_a_symlinked_directory_is_refused(tmp_path: Path, outside: Path) -> None:
    from safeckpt.storage import LocalStorage

    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "sub")
    storage = LocalStorage(run)
    with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
        storage.open("sub/m_model_state_dict.safetensors")
    with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
        storage.remove("sub/m.safeckpt.json")
    with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
        storage.remove_tree("sub")
    with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
        storage.write_bytes("sub/planted", b"x")
    assert (outside / "m.safeckpt.json").is_file() and not (outside / "planted").exists()


def test_a_named_single_file_may_be_a_link(tmp_path: Path) -> None:
    """The caller chose the path (a hub cache snapshot links to its blobs): a link to a regular file loads."""
    real = tmp_path / "blob"
    safeckpt.save_single_file(None, {"w": torch.ones(2)}, real)
    os.symlink(real, tmp_path / "model.safeckpt")
    assert torch.equal(safeckpt.load(tmp_path / "model.safeckpt")["w"], torch.ones(2))


# --------------------------------------------------------------------------- links in a manager directory


def test_symlinked_step_directory_is_never_written_into_or_deleted_through(tmp_path: Path) -> None:
    other_run = tmp_path / "other_run"
    victim = CheckpointManager(other_run)
    victim.save(5, _state(5.0))
    marker = other_run / "step_000000000005" / "COMMITTED"
    sentinel = marker.read_bytes()
    run = tmp_path / "run"
    mgr = CheckpointManager(run, max_to_keep=1)
    mgr.save(1, _state(1.0))
    os.symlink(other_run / "step_000000000005", run / "step_000000000005")  # planted
    with pytest.raises(safeckpt.CheckpointFormatError, match="symbolic link"):
        mgr.save(5, _state(6.0))
    mgr.save(7, _state(7.0))  # retention and cleanup run: the link is not a step of this run
    assert mgr.all_steps() == [7]
    assert CheckpointManager(run).all_steps() == [7]
    assert marker.read_bytes() == sentinel
    assert sorted(p.name for p in (other_run / "step_000000000005").iterdir()) == ["COMMITTED", "checkpoint.safeckpt"]
    assert victim.all_steps() == [5]


def test_symlinked_marker_or_checkpoint_file_is_never_trusted(tmp_path: Path) -> None:
    other = CheckpointManager(tmp_path / "other")
    other.save(3, _state(3.0))
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    mgr.save(3, _state(1.0))
    step = run / "step_000000000003"
    (step / "checkpoint.safeckpt").unlink()
    os.symlink(tmp_path / "other" / "step_000000000003" / "checkpoint.safeckpt", step / "checkpoint.safeckpt")
    with pytest.raises(safeckpt.SafeCkptError):
        CheckpointManager(run).restore(3)
    (step / "COMMITTED").unlink()
    os.symlink(tmp_path / "other" / "step_000000000003" / "COMMITTED", step / "COMMITTED")
    assert CheckpointManager(run).all_steps() == []  # a linked marker is no marker
    assert (tmp_path / "other" / "step_000000000003" / "COMMITTED").is_file()


# --------------------------------------------------------------------------- FIFOs never block


_FIFO_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, safeckpt
    from safeckpt.manager import CheckpointManager
    root = sys.argv[1]
    mgr = CheckpointManager(os.path.join(root, "run"))
    mgr.save(1, {"w": torch.ones(2)})
    ckpt = os.path.join(root, "run", "step_000000000001", "checkpoint.safeckpt")
    os.unlink(ckpt)
    os.mkfifo(ckpt)
    single = os.path.join(root, "single.safeckpt")
    os.mkfifo(single)
    os.mkfifo(os.path.join(root, "m_model_state_dict.safetensors"))
    outcomes = []
    for call in (lambda: mgr.restore(1), lambda: safeckpt.load(single), lambda: safeckpt.open(single),
                 lambda: safeckpt.load_multi_files(os.path.join(root, "m.pth")), lambda: safeckpt.scan(single)):
        try:
            call()
            outcomes.append("loaded")
        except safeckpt.SafeCkptError as exc:
            outcomes.append(type(exc).__name__)
        except FileNotFoundError:
            outcomes.append("missing")
    print(outcomes)
    """
)


def test_a_fifo_in_place_of_a_checkpoint_file_never_blocks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(safeckpt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    outcomes = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert "loaded" not in outcomes, outcomes
    assert outcomes[:3] == ["IntegrityError", "CheckpointFormatError", "CheckpointFormatError"], outcomes
