"""Text from files never reaches the terminal raw; the CLI starts without torch (issue 14 section 7, issue 15).

Every command runs through the ``safeckpt`` console script in a subprocess on
files whose keys, tensor names, metadata, class-reference names and error
texts hold ESC/OSC/BEL/CR/backspace/DEL and Unicode bidi controls: no such
character may appear in stdout or stderr, and ``--json`` must round-trip the
exact strings.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import GlobalRef
from safeckpt.cli_output import terminal_text

REPO = Path(__file__).resolve().parents[1]
HOSTILE = "\x1b[2K\x1b]0;pwned\x07\rsafe: no class references\x08\x7f\u202e\u2066x\u2069\u200f\x9b"
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def run_script(args: list[Any], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """The ``safeckpt`` console script in a subprocess, this tree first on PYTHONPATH; raw bytes back."""
    exe = shutil.which("safeckpt")
    assert exe is not None, "the safeckpt console script is not installed: pip install -e ."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, timeout=180, check=False)


def assert_clean(data: bytes, where: str) -> None:
    """No control byte but newline, no DEL, no C1 control, no bidi control."""
    bad = [b for b in data if (b < 0x20 and b != 0x0A) or b == 0x7F]
    assert not bad, f"{where}: raw control bytes {sorted(set(bad))} in {data[:400]!r}"
    text = data.decode("utf-8")
    assert not [c for c in text if c in BIDI or 0x80 <= ord(c) <= 0x9F], f"{where}: bidi or C1 controls in {text[:400]!r}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    state = {
        "model_state_dict": {f"w{HOSTILE}": torch.ones(2), "b": torch.zeros(1)},
        f"key{HOSTILE}": {"cls": GlobalRef("mod", "Cls"), "text": HOSTILE},
        "model_kwargs": {"note": HOSTILE},
    }
    files = {
        "safe": d / "a.safeckpt",
        "safe2": d / "b.safeckpt",
        "plain": d / "plain.safetensors",
        "legacy": d / "l.pth",
        "globals": d / "g.pkl",
    }
    safeckpt.save_single_file(None, state, files["safe"])
    safeckpt.save_single_file(None, {**state, "model_kwargs": {"note": HOSTILE + "2"}}, files["safe2"])
    safetensors.torch.save_file({f"t{HOSTILE}": torch.ones(3)}, files["plain"], metadata={f"m{HOSTILE}": HOSTILE})
    torch.save({f"k{HOSTILE}": torch.ones(2), "x": HOSTILE}, files["legacy"])
    # a bare pickle naming a global (STACK_GLOBAL) whose module and name hold the hostile text
    mod, cls = f"mod{HOSTILE}".encode(), f"Cls{HOSTILE}".encode()
    files["globals"].write_bytes(
        b"\x80\x04\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(cls)]) + cls + b"\x93)\x81."
    )
    return files


def test_terminal_text_escapes_every_nonprintable() -> None:
    assert terminal_text("plain text, ünïcode ok") == "plain text, ünïcode ok"
    escaped = terminal_text(HOSTILE)
    assert escaped.isprintable() and "\\x1b" in escaped and "\\u202e" in escaped and "\\x9b" in escaped
    assert terminal_text("a\nb") == "a\\x0ab" and terminal_text("a\nb", keep_newlines=True) == "a\nb"
    assert terminal_text("\udcff") == "\\udcff"  # an undecodable file-name byte
    assert terminal_text("\U000e0001") == "\\U000e0001"


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{safe}", "--tensors"],
        ["inspect", "{plain}", "--tensors"],
        ["inspect", "{legacy}", "--tensors"],
        ["diff", "{safe}", "{safe2}"],
        ["verify", "{safe}"],
        ["scan", "{legacy}", "{safe}", "{globals}"],
        ["inspect", "{globals}"],
        ["convert", "{legacy}", "{out}/conv.safetensors"],
    ],
    ids=["inspect-safe", "inspect-plain", "inspect-legacy", "diff", "verify", "scan", "inspect-globals", "convert"],
)
def test_hostile_text_is_escaped_and_json_exact(
    hostile: dict[str, Path], tmp_path: Path, command: list[str]
) -> None:
    names = {k: str(v) for k, v in hostile.items()} | {"out": str(tmp_path)}
    argv = [part.format(**names) for part in command]
    human = run_script(argv, tmp_path)
    names_global = "{globals}" in command  # the reader refuses that name: its error text is what is shown
    assert human.returncode in ((0, 1, 2) if names_global else (0, 1)), human.stderr
    assert_clean(human.stdout, f"{argv} stdout")
    assert_clean(human.stderr, f"{argv} stderr")
    if command[0] in ("inspect", "diff"):
        assert b"\\x1b" in (human.stderr if names_global else human.stdout), "the hostile text is shown, escaped"
    if command[0] == "convert":
        (tmp_path / "conv.safetensors").unlink()
    machine = run_script([*argv, "--json"], tmp_path)
    assert_clean(machine.stdout, f"{argv} --json stdout")
    assert_clean(machine.stderr, f"{argv} --json stderr")
    document = json.loads(machine.stdout)
    if command[0] in ("inspect", "diff", "scan") and not names_global:  # the raw strings, exact, inside the JSON document
        strings = _strings(document)
        assert any("\x1b]0;pwned\x07" in s and "\u202e\u2066x\u2069\u200f\x9b" in s for s in strings), strings[:40]


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)] if isinstance(s, str)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_inspect_json_round_trips_keys_names_metadata_and_refs(hostile: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(run_script(["inspect", "--json", "--tensors", hostile["safe"]], tmp_path).stdout)
    keys = [c["key"] for c in doc["components"]]
    assert f"key{HOSTILE}" in keys
    tensors = [t["name"] for c in doc["components"] for t in c.get("tensor_list", [])]
    assert f"w{HOSTILE}" in tensors
    assert "mod:Cls" in [r["name"] for r in doc["class_references"]]
    plain = json.loads(run_script(["inspect", "--json", hostile["plain"]], tmp_path).stdout)
    assert plain["metadata"][f"m{HOSTILE}"] == HOSTILE


def test_error_text_and_file_names_are_escaped_on_stderr(tmp_path: Path) -> None:
    missing = tmp_path / f"gone{HOSTILE}.pth"
    for argv in (["inspect", missing], ["verify", missing], ["convert", missing], ["diff", missing, missing], ["scan", missing]):
        proc = run_script(argv, tmp_path)
        assert proc.returncode == 2
        assert_clean(proc.stdout, f"{argv} stdout")
        assert_clean(proc.stderr, f"{argv} stderr")
        err = proc.stderr.decode()
        assert "no such file" in err and "gone\\x1b" in err, err
        assert err.count("no such file") == 1, f"the error is said once: {err!r}"
    junk = tmp_path / f"junk{HOSTILE}.pth"
    junk.write_bytes(b"\x80\x02" + HOSTILE.encode() * 3)
    proc = run_script(["inspect", junk, "--debug"], tmp_path)  # the traceback too
    assert proc.returncode == 2
    assert_clean(proc.stderr, "--debug traceback")


def test_argparse_messages_are_escaped(tmp_path: Path) -> None:
    proc = run_script(["inspect", "--nope" + HOSTILE], tmp_path)
    assert proc.returncode == 2
    assert_clean(proc.stderr, "argparse error")


# --------------------------------------------------------------------------- start-up without torch


def _modules_after(argv: list[str], cwd: Path) -> set[str]:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['safeckpt', *{argv!r}]\n"
        "from safeckpt.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stdout.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return set(proc.stdout.rsplit("MODULES ", 1)[1].split())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["inspect", "--help"], []])
def test_help_and_version_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    assert "torch" not in _modules_after(argv, tmp_path)


def test_scan_of_local_files_loads_neither_torch_numpy_nor_fsspec(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")
    safeckpt.save_single_file(None, {"w": torch.ones(2)}, tmp_path / "b.safeckpt")
    loaded = _modules_after(["scan", "-q", str(tmp_path)], tmp_path)
    assert "safeckpt.legacy.scan" in loaded  # it did scan
    assert not {"torch", "numpy", "fsspec"} & loaded
    assert "safeckpt.cli_remote" not in _modules_after(["--help"], tmp_path)


def _console_script_without_torch(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The console script and an environment in which ``import torch`` fails."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch was imported')\n")
    exe = shutil.which("safeckpt")
    assert exe is not None
    return exe, dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))


def test_console_script_help_and_version_do_not_import_torch(tmp_path: Path) -> None:
    """The console script itself, with torch made unimportable: --help and --version still work."""
    exe, env = _console_script_without_torch(tmp_path)
    for argv in (["--help"], ["--version"]):
        proc = subprocess.run([exe, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "safeckpt" in proc.stdout


def test_console_script_scan_runs_without_torch(tmp_path: Path) -> None:
    """``safeckpt scan`` with torch made unimportable: a bare pickle, a torch.save zip, a safeckpt
    file, a multi-file set's manifest and a plain safetensors file are all scanned."""
    import pickle

    import torch
    from safetensors.torch import save_file

    pickle_file = tmp_path / "p.pkl"
    pickle_file.write_bytes(pickle.dumps({"lr": 0.1, "steps": [1, 2]}, protocol=2))
    zip_file = tmp_path / "z.pth"
    torch.save({"w": torch.ones(3)}, zip_file)
    single = safeckpt.save_single_file(None, {"model_state_dict": {"w": torch.ones(2)}}, tmp_path / "s.safeckpt")
    safeckpt.save_multi_files(None, {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"a": 1}}, tmp_path / "m.pth")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    files = [pickle_file, zip_file, single, tmp_path / "m.safeckpt.json", plain]
    exe, env = _console_script_without_torch(tmp_path)
    proc = subprocess.run(
        [exe, "scan", "--json", *map(str, files)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch was imported" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["files"]) == len(files)
    assert {r["verdict"] for r in doc["files"]} == {"safe"}


def test_import_safeckpt_is_lazy(tmp_path: Path) -> None:
    assert "torch" not in _modules_after(["--version"], tmp_path)
    code = "import sys, safeckpt; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False"


def test_all_lists_exactly_the_public_names_and_each_resolves() -> None:
    assert safeckpt.__all__ == sorted(safeckpt.__all__)
    expected = {
        "Checkpoint", "CheckpointFormatError", "CheckpointManager", "ComponentNotFoundError", "FallbackWarning",
        "GlobalRef", "IntegrityError", "LimitExceededError", "Limits", "OpaqueObject", "SafeCkptError", "ScanReport",
        "UnsafeCheckpointError", "UnsupportedValueError", "__version__", "convert", "load",
        "load_multi_files", "load_single_file", "open", "save_multi_files", "save_multi_from_single",
        "save_single_file", "scan",
    }  # fmt: skip
    assert set(safeckpt.__all__) == expected
    for name in safeckpt.__all__:
        assert getattr(safeckpt, name) is not None, name
    assert callable(safeckpt.convert) and safeckpt.convert.__module__ == "safeckpt.conversion"
    importlib.import_module("safeckpt.conversion")
    assert callable(safeckpt.convert), "importing the implementation module does not shadow the function"
    assert safeckpt.distributed.__name__ == "safeckpt.distributed"
    assert safeckpt.saving.save_single_file is safeckpt.save_single_file  # submodules resolve as attributes
    with pytest.raises(AttributeError):
        safeckpt.no_such_name  # noqa: B018
    from safeckpt import Limits, load  # noqa: F401  # from-imports go through __getattr__ too


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_terminal_text_output_is_always_printable(text: str) -> None:
    shown = terminal_text(text)
    assert shown.isprintable() and not BIDI & set(shown)
    shown.encode("utf-8")  # raises if a lone surrogate survived
    if text.isprintable():
        assert shown == text  # printable text is shown as it is
