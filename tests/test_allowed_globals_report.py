"""``allowed_globals`` strings that name nothing importable are reported, not silently ignored (issue 15):
the API logs a warning naming each one and why, the command line prints the same reason, both through
one resolution (:func:`safeckpt.refs.import_allowed`); what the file names stays an inert reference."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt import GlobalRef, OpaqueObject
from safeckpt.cli_convert import resolve_globals
from safeckpt.refs import AllowList, import_allowed

REPO = Path(__file__).resolve().parents[1]
MODULE = "gone_mod_safeckpt_report"
SOURCE = """
class Thing:
    def __init__(self):
        self.answer = 42
"""


def _env(extra: str | None = None) -> dict[str, str]:
    paths = [str(REPO), *([extra] if extra else []), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def test_import_allowed_reports_each_name_it_cannot_import() -> None:
    found, problems = import_allowed(
        ["collections:OrderedDict", "nomod_safeckpt_xyz:X", "collections:NoSuchThing", "noform", "os:system"]
    )
    assert list(found) == ["collections:OrderedDict"]
    assert "module 'nomod_safeckpt_xyz' not found" in problems["nomod_safeckpt_xyz:X"]
    assert problems["collections:NoSuchThing"] == "collections has no 'NoSuchThing'"
    assert problems["noform"] == "not of the form module:qualname"
    assert "never imports" in problems["os:system"]
    assert "os" not in found


def test_the_api_warns_naming_unresolved_allowed_globals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.safeckpt"
    safeckpt.save_single_file(None, {"kind": GlobalRef("collections", "OrderedDict"), "n": 1}, path)
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        loaded = safeckpt.load(path, allowed_globals=["collections:OrderedDict", "nomod_safeckpt_xyz:X", "collections:Nope"])
    assert loaded["kind"] is __import__("collections").OrderedDict
    text = caplog.text
    assert "nomod_safeckpt_xyz:X" in text and "collections:Nope" in text and "ignored" in text
    assert "collections:OrderedDict" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        safeckpt.load(path, allowed_globals=["collections:OrderedDict"])
    assert caplog.text == ""  # every name resolves: nothing to say


def test_every_reader_reports_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """load_single_file, load_multi_files, open and convert build the same allow list."""
    single = tmp_path / "s.safeckpt"
    safeckpt.save_single_file(None, {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {}}, single)
    legacy = tmp_path / "l.pth"
    torch.save({"w": torch.ones(2)}, legacy)
    calls: list[Any] = [
        lambda a: safeckpt.load_single_file(single, allowed_globals=a),
        lambda a: safeckpt.load_multi_files(tmp_path / "m.pth", allowed_globals=a),
        lambda a: safeckpt.open(single, allowed_globals=a).close(),
        lambda a: safeckpt.load(legacy, allowed_globals=a),
        lambda a: safeckpt.convert(legacy, tmp_path / "out.safeckpt", allowed_globals=a),
    ]
    safeckpt.save_multi_files(None, {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {}}, tmp_path / "m.pth")
    for call in calls:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="safeckpt"):
            call(["nomod_safeckpt_xyz:Gone"])
        assert "nomod_safeckpt_xyz:Gone" in caplog.text and "not found" in caplog.text


def test_a_set_warns_once_per_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = {"model_state_dict": {"w": torch.ones(2)}, "optimizer_state_dict": {"s": 1}, "model_kwargs": {}}
    safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        safeckpt.load(tmp_path / "m.pth", allowed_globals=["nomod_safeckpt_xyz:X"])
    assert caplog.text.count("nomod_safeckpt_xyz:X") == 1


def test_a_file_naming_an_allowed_but_missing_class_loads_it_inert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The class existed where the file was written, not here: the load succeeds, the object stays inert, and the
    warning says the name was not found (it used to be ignored silently, or fail the whole load)."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    script = f"import torch, {MODULE}; torch.save({{'obj': {MODULE}.Thing(), 'w': torch.ones(2)}}, 'thing.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(str(tmp_path)), check=True, timeout=120)
    (tmp_path / f"{MODULE}.py").unlink()
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        loaded = safeckpt.load(tmp_path / "thing.pt", allowed_globals=[f"{MODULE}:Thing"])
    assert isinstance(loaded["obj"], OpaqueObject) and loaded["obj"].cls == GlobalRef(MODULE, "Thing")
    assert f"{MODULE}:Thing" in caplog.text and "not found" in caplog.text
    assert MODULE not in sys.modules


def test_cli_and_api_give_the_same_reason() -> None:
    names = ["nomod_safeckpt_xyz:X", "collections:NoSuchThing"]
    _, lines = resolve_globals(names)
    unresolved = AllowList(names).unresolved
    assert lines == [f"--allow-global {name}: {unresolved[name]}; ignored" for name in names]


@pytest.mark.parametrize("how", ["console", "module"])
def test_console_script_and_python_m_resolve_the_same(tmp_path: Path, how: str) -> None:
    """The working directory's modules resolve from both; the missing names are said on stderr by both."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    script = f"import torch, {MODULE}; torch.save({{'obj': {MODULE}.Thing()}}, 'thing.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(str(tmp_path)), check=True, timeout=120)
    exe = shutil.which("safeckpt")
    assert exe is not None
    command = [exe] if how == "console" else [sys.executable, "-m", "safeckpt"]
    args = ["convert", "thing.pt", "--allow-global", f"{MODULE}:Thing", f"{MODULE}:Nope", "nomod_safeckpt_xyz:X"]
    proc = subprocess.run([*command, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, proc.stderr
    assert f"--allow-global {MODULE}:Nope: {MODULE} has no 'Nope'; ignored" in warnings[0]
    assert "--allow-global nomod_safeckpt_xyz:X: module 'nomod_safeckpt_xyz' not found" in warnings[1]
    assert f"{MODULE}:Thing" not in proc.stderr
