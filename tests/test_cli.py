"""The ``safeckpt`` command line (SPEC section 5).

Every command runs at least once in a real subprocess (``python -m safeckpt`` and
the ``safeckpt`` console script) on real files: a safeckpt single file, a
multi-file set, a plain safetensors file, legacy ``torch.save`` files of both
formats, a malicious pickle (whose payload must never run), corrupt files, and a
file with one flipped tensor byte. The many smaller cases call ``main()`` in
process, which is the same code without the cost of importing torch again.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import safeckpt
from safeckpt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from safeckpt.cli_diff import diff_states
from safeckpt.cli_report import Progress

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as ``os.system("touch SENTINEL")``: a real remote-code-execution payload."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


def make_state() -> dict[str, Any]:
    """A small training state: model and Adam state after one step, a class, an nn.Module, a numpy array."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "model_class": nn.Sequential,
        "model_kwargs": {"hidden": 4, "betas": (0.9, 0.999)},
        "loss_fn": nn.MSELoss(),
        "epoch": 3,
        "history": np.arange(4, dtype=np.float32),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of file the command line reads, written once for the module (tests copy before writing)."""
    d = tmp_path_factory.mktemp("corpus")
    state = make_state()
    files = {
        "safe": d / "ckpt.safeckpt",
        "multi": d / "multi" / "m.pth",
        "manifest": d / "multi" / "m.safeckpt.json",
        "plain": d / "plain.safetensors",
        "legacy": d / "legacy.pth",
        "old": d / "old.pth",
        "evil": d / "evil.pth",
        "junk": d / "junk.pth",
        "truncated_header": d / "truncated_header.safeckpt",
        "truncated_data": d / "truncated_data.safeckpt",
        "flipped": d / "flipped.safeckpt",
        "sentinel": d / "SENTINEL",
    }
    safeckpt.save_single_file(None, state, files["safe"])
    safeckpt.save_multi_files(None, state, files["multi"])
    safetensors.torch.save_file(dict(state["model_state_dict"]), files["plain"])
    torch.save(state, files["legacy"])
    torch.save(state, files["old"], _use_new_zipfile_serialization=False)
    torch.save({"model_state_dict": state["model_state_dict"], "hook": Payload(files["sentinel"])}, files["evil"])
    files["junk"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    raw = files["safe"].read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    files["truncated_header"].write_bytes(raw[: header_len // 2])
    files["truncated_data"].write_bytes(raw[:-40])
    flipped = bytearray(raw)
    flipped[8 + header_len + 3] ^= 0xFF  # a byte of the first tensor in the data section
    files["flipped"].write_bytes(bytes(flipped))
    return files


def run_main(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``main([...])`` in process: ``(exit code, stdout, stderr)``."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, dict[str, Any]]:
    """``main([..., "--json"])``: the exit code and the parsed document."""
    code, out, _ = run_main(capsys, *argv, "--json")
    return code, json.loads(out)


def run_cli(args: list[Any], cwd: Path, *, script: bool = False) -> subprocess.CompletedProcess[str]:
    """The command line in a real subprocess (``python -m safeckpt`` or the console script)."""
    if script:
        exe = shutil.which("safeckpt")
        assert exe is not None, "the safeckpt console script is not installed: pip install -e ."
        command = [exe]
    else:
        command = [sys.executable, "-m", "safeckpt"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        command + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def copy_in(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    target = tmp_path / (name or src.name)
    shutil.copy(src, target)
    return target


# --------------------------------------------------------------------------- every command in a subprocess


def test_subprocess_inspect_json_on_a_safeckpt_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(["inspect", "--json", "--tensors", corpus["safe"]], tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["schema_version"], doc["command"], doc["ok"], doc["format"]) == (1, "inspect", True, "safeckpt")
    assert doc["metadata"]["format_version"] == 1 and doc["metadata"]["library_version"] == safeckpt.__version__
    by_key = {c["key"]: c for c in doc["components"]}
    assert list(by_key) == list(make_state())
    msd = by_key["model_state_dict"]
    assert (msd["tensors"], msd["dtypes"], msd["summary"]) == (4, ["float32"], "OrderedDict, 4 keys")
    assert {t["name"]: t["shape"] for t in msd["tensor_list"]} == {
        "0.weight": [4, 3],
        "0.bias": [4],
        "2.weight": [2, 4],
        "2.bias": [2],
    }
    assert by_key["epoch"]["summary"] == "int 3" and by_key["epoch"]["tensors"] == 0
    refs = {r["name"]: r["paths"] for r in doc["class_references"]}
    assert refs["torch.nn.modules.container:Sequential"] == ["model_class"]
    assert refs["torch.nn.modules.loss:MSELoss"] == ["loss_fn"]
    assert doc["tensor_count"] == sum(c["tensors"] for c in doc["components"]) > 4
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal


def test_subprocess_scan_reports_the_malicious_file_and_never_runs_it(corpus: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(["scan", "--json", corpus["evil"], corpus["legacy"], corpus["safe"]], tmp_path)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    files = {Path(f["path"]).name: f for f in json.loads(proc.stdout)["files"]}
    evil = files["evil.pth"]
    assert evil["verdict"] == "dangerous" and evil["format"] == "torch-zip"
    dangerous = [g for g in evil["globals"] if g["status"] == "dangerous"]
    assert [g["name"] for g in dangerous] == [f"{os.name}:system"] and "called" in dangerous[0]["uses"]
    assert files["legacy.pth"]["verdict"] == "suspicious"  # names classes it does not rebuild (kept inert)
    assert files["ckpt.safeckpt"]["verdict"] == "safe" and files["ckpt.safeckpt"]["globals"] == []
    assert not corpus["sentinel"].exists()


def test_console_script_converts_a_directory_and_refuses_the_malicious_file(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    for key in ("legacy", "old", "evil", "junk"):
        copy_in(corpus[key], tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    proc = run_cli(["convert", tmp_path, "--json"], tmp_path, script=True)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    doc = json.loads(proc.stdout)
    status = {Path(r["source"]).name: r["status"] for r in doc["results"]}
    assert status == {"evil.pth": "refused", "legacy.pth": "converted", "old.pth": "converted"}  # junk is no torch file
    refused = next(r for r in doc["results"] if r["status"] == "refused")
    assert refused["globals"] == [f"{os.name}:system"] and refused["outputs"] == []
    assert doc["summary"] == {"converted": 2, "refused": 1, "error": 0}
    assert not (tmp_path / "evil.safetensors").exists() and not corpus["sentinel"].exists()
    assert safeckpt.load(tmp_path / "old.safetensors")["epoch"] == 3


def test_subprocess_verify_names_the_flipped_tensor(corpus: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(["verify", "--json", corpus["flipped"]], tmp_path)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["digests"] is True
    assert doc["error"]["type"] == "IntegrityError"
    assert doc["error"]["tensor_name"] == safeckpt.open(corpus["safe"]).tensor_names()[0]
    human = run_cli(["verify", corpus["flipped"]], tmp_path)
    assert human.returncode == EXIT_FAILED and doc["error"]["tensor_name"] in human.stdout


def test_subprocess_split_then_merge(corpus: dict[str, Path], tmp_path: Path) -> None:
    single = copy_in(corpus["safe"], tmp_path)
    proc = run_cli(["split", single, "--keys", "model_state_dict", "epoch", "--json"], tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["files"]) == {"model_state_dict", "epoch"} and Path(doc["manifest"]).is_file()
    merged = tmp_path / "merged.safeckpt"
    proc = run_cli(["merge", doc["manifest"], merged, "--verify", "--json"], tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["components"] == ["model_state_dict", "epoch"]
    back = safeckpt.load(merged)
    assert back["epoch"] == 3 and torch.equal(
        back["model_state_dict"]["0.weight"], make_state()["model_state_dict"]["0.weight"]
    )


def test_subprocess_diff_confirms_a_conversion(corpus: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "new.safetensors"
    assert main(["convert", str(corpus["legacy"]), str(converted), "-q"]) == EXIT_OK
    proc = run_cli(["diff", corpus["legacy"], converted, "--json"], tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["identical"] is True and doc["differences"] == []
    assert doc["a"]["format"] == "torch-zip" and doc["b"]["format"] == "safeckpt"
    assert {c["key"]: c["status"] for c in doc["components"]} == {k: "same" for k in make_state()}
    assert doc["compared"]["tensors"] == 4 + 4 * 3  # the state dict, and Adam's step, exp_avg, exp_avg_sq per parameter


def test_subprocess_errors_are_one_line_without_traceback(corpus: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(["inspect", corpus["junk"]], tmp_path)
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not a checkpoint" in proc.stderr
    debug = run_cli(["inspect", corpus["junk"], "--debug"], tmp_path)
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr
    assert run_cli(["inspect"], tmp_path).returncode == EXIT_USAGE  # argparse: a missing argument


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize(
    ("key", "fmt"),
    [
        ("safe", "safeckpt"),
        ("multi", "safeckpt-multi"),
        ("manifest", "safeckpt-multi"),
        ("plain", "safetensors"),
        ("legacy", "torch-zip"),
        ("old", "torch-legacy"),
    ],
)
def test_inspect_every_format(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str], key: str, fmt: str) -> None:
    code, doc = run_json(capsys, "inspect", corpus[key])
    assert code == EXIT_OK and doc["format"] == fmt
    state = make_state()
    keys = [c["key"] for c in doc["components"]]
    if fmt == "safetensors":
        assert sorted(keys) == sorted(state["model_state_dict"]) and doc["tensor_count"] == 4
    elif fmt == "safeckpt-multi":
        assert keys == ["model_state_dict", "optimizer_state_dict", "model_kwargs"]
        assert all(Path(c["file"]).is_file() for c in doc["components"])
        kwargs = next(c for c in doc["components"] if c["key"] == "model_kwargs")
        assert kwargs["summary"] == "dict, 4 keys"  # the seed's folding adds nn_handler_version, pytorch_version
    else:
        assert keys == list(state)
        assert {r["name"] for r in doc["class_references"]} >= {"torch.nn.modules.container:Sequential"}
    msd = next(c for c in doc["components"] if c["key"] in ("model_state_dict", "0.weight"))
    assert msd["dtypes"] == ["float32"]
    code, out, err = run_main(capsys, "inspect", corpus[key], "--tensors")
    assert code == EXIT_OK and err == ""
    assert out.startswith(f"{corpus[key]}: {fmt}, ") and "0.weight" in out and "[4, 3]" in out


def test_inspect_does_not_run_the_malicious_file(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "inspect", corpus["evil"])
    assert code == EXIT_FAILED and out == ""
    assert f"dangerous globals: {os.name}:system" in err
    code, doc = run_json(capsys, "inspect", corpus["evil"])
    assert code == EXIT_FAILED and doc["ok"] is False
    assert doc["error"]["type"] == "UnsafeCheckpointError" and doc["error"]["globals"] == [f"{os.name}:system"]
    assert not corpus["sentinel"].exists()


@pytest.mark.parametrize("key", ["junk", "truncated_header", "truncated_data"])
def test_inspect_corrupt_files_exit_2(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str], key: str) -> None:
    code, doc = run_json(capsys, "inspect", corpus[key])
    assert code == EXIT_USAGE and doc["ok"] is False
    assert doc["error"]["type"] in ("CheckpointFormatError", "LimitExceededError")


def test_inspect_missing_path_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "inspect", tmp_path / "nope.pth")
    assert code == EXIT_USAGE and out == "" and "no such file" in err and err.count("\n") == 1
    code, out, err = run_main(capsys, "inspect", tmp_path)
    assert code == EXIT_USAGE and "is a directory" in err


# --------------------------------------------------------------------------- scan


def test_scan_exit_codes(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(capsys, "scan", corpus["safe"], corpus["plain"], corpus["manifest"])
    assert code == EXIT_OK and [f["verdict"] for f in doc["files"]] == ["safe"] * 3
    code, doc = run_json(capsys, "scan", corpus["junk"], corpus["legacy"])
    assert code == EXIT_USAGE and doc["summary"] == {"safe": 0, "suspicious": 1, "dangerous": 0, "error": 1}
    assert doc["files"][0]["error"]["type"] == "CheckpointFormatError"
    code, doc = run_json(capsys, "scan", corpus["junk"], corpus["evil"])
    assert code == EXIT_FAILED  # dangerous wins over an unreadable file
    code, out, _ = run_main(capsys, "scan", corpus["evil"])
    assert code == EXIT_FAILED and "DANGEROUS" in out and f"{os.name}:system" in out
    assert not corpus["sentinel"].exists()


def test_scan_a_directory(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy_in(corpus["old"], tmp_path)
    copy_in(corpus["safe"], tmp_path)
    (tmp_path / "README").write_text("not a checkpoint")
    code, doc = run_json(capsys, "scan", tmp_path)
    assert code == EXIT_OK and sorted(Path(f["path"]).name for f in doc["files"]) == ["ckpt.safeckpt", "old.pth"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(capsys, "scan", empty)[0] == EXIT_USAGE


# --------------------------------------------------------------------------- convert


def test_convert_src_and_dst(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_in(corpus["old"], tmp_path)
    code, out, _ = run_main(capsys, "convert", src)
    assert code == EXIT_OK and f"converted {src} -> {tmp_path / 'old.safetensors'}" in out
    before = (tmp_path / "old.safetensors").read_bytes()
    code, doc = run_json(capsys, "convert", src)  # the output exists: refused without --overwrite
    assert code == EXIT_USAGE and doc["results"][0]["status"] == "error" and "--overwrite" in doc["results"][0]["error"]
    assert (tmp_path / "old.safetensors").read_bytes() == before
    assert run_main(capsys, "convert", src, "--overwrite")[0] == EXIT_OK
    code, doc = run_json(capsys, "convert", src, tmp_path / "sub" / "named.ckpt")
    assert code == EXIT_OK and doc["results"][0]["outputs"] == [str(tmp_path / "sub" / "named.ckpt")]
    assert run_main(capsys, "diff", src, tmp_path / "sub" / "named.ckpt")[0] == EXIT_OK


def test_convert_multi_with_keys(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_in(corpus["legacy"], tmp_path)
    code, doc = run_json(
        capsys, "convert", src, tmp_path / "set" / "run.pth", "--multi", "--keys", "model_state_dict", "epoch"
    )
    assert code == EXIT_OK
    outputs = [Path(p).name for p in doc["results"][0]["outputs"]]
    assert outputs == ["run_model_state_dict.safetensors", "run_epoch.msgpack", "run.safeckpt.json"]
    assert safeckpt.load(tmp_path / "set" / "run.pth")["epoch"] == 3
    assert run_main(capsys, "convert", src, "--keys", "epoch")[0] == EXIT_USAGE  # --keys needs --multi


def test_convert_files_into_a_directory(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, evil = (copy_in(corpus[k], tmp_path) for k in ("legacy", "old", "evil"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, doc = run_json(capsys, "convert", a, b, evil, out_dir)
    assert code == EXIT_FAILED and doc["summary"] == {"converted": 2, "refused": 1, "error": 0}
    assert sorted(p.name for p in out_dir.iterdir()) == ["legacy.safetensors", "old.safetensors"]
    code, doc = run_json(capsys, "convert", a, f"{tmp_path / 'new'}/")  # a trailing / names a directory to create
    assert code == EXIT_OK and doc["results"][0]["outputs"] == [str(tmp_path / "new" / "legacy.safetensors")]
    code, out, _ = run_main(capsys, "convert", evil)
    assert code == EXIT_FAILED and f"REFUSED {evil}: dangerous globals {os.name}:system" in out
    assert not corpus["sentinel"].exists()


def test_convert_malformed_and_missing_files(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = copy_in(corpus["junk"], tmp_path)
    code, doc = run_json(capsys, "convert", junk)
    assert (
        code == EXIT_USAGE and doc["results"][0]["status"] == "error" and not junk.with_suffix(".safetensors").exists()
    )
    assert run_main(capsys, "convert", tmp_path / "missing.pth")[0] == EXIT_USAGE
    assert run_main(capsys, "convert", tmp_path)[0] == EXIT_USAGE  # no torch.save file in it


# --------------------------------------------------------------------------- verify


def test_verify_every_format(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(capsys, "verify", corpus["safe"])
    assert (code, doc["ok"], doc["digests"], doc["format"]) == (EXIT_OK, True, True, "safeckpt")
    assert doc["components"] == len(make_state()) and doc["tensors"] > 4
    code, doc = run_json(capsys, "verify", corpus["multi"])
    assert (code, doc["digests"], doc["components"]) == (EXIT_OK, True, 3)
    for key, fmt in (("plain", "safetensors"), ("legacy", "torch-zip"), ("old", "torch-legacy")):
        code, doc = run_json(capsys, "verify", corpus[key])
        assert (code, doc["ok"], doc["digests"], doc["format"]) == (EXIT_OK, True, False, fmt)
        code, out, _ = run_main(capsys, "verify", corpus[key])
        assert "structure checked only" in out
    assert run_main(capsys, "verify", corpus["plain"], "--require-digests")[0] == EXIT_FAILED
    assert run_main(capsys, "verify", corpus["evil"])[0] == EXIT_FAILED
    for key in ("junk", "truncated_header", "truncated_data"):
        assert run_main(capsys, "verify", corpus[key])[0] == EXIT_USAGE


def test_verify_a_tampered_multi_file_set(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(corpus["multi"].parent, tmp_path / "set")
    component = tmp_path / "set" / "m_optimizer_state_dict.safetensors"
    raw = bytearray(component.read_bytes())
    raw[-1] ^= 0x01  # a tensor byte: the file keeps its size and header, so only its own digests notice
    component.write_bytes(bytes(raw))
    code, doc = run_json(capsys, "verify", tmp_path / "set" / "m.pth")
    assert code == EXIT_FAILED and doc["error"]["type"] == "IntegrityError"
    assert doc["error"]["tensor_name"].startswith("state/")
    shutil.copy(corpus["multi"].parent / component.name, component)
    assert run_main(capsys, "verify", tmp_path / "set" / "m.pth")[0] == EXIT_OK
    (tmp_path / "set" / "m_model_kwargs.msgpack").unlink()
    code, out, _ = run_main(capsys, "verify", tmp_path / "set" / "m.safeckpt.json")
    assert code == EXIT_FAILED and "'model_kwargs'" in out and "incomplete" in out


# --------------------------------------------------------------------------- split and merge


def test_split_and_merge_round_trip(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = copy_in(corpus["legacy"], tmp_path)
    code, doc = run_json(capsys, "split", legacy, "--all")
    assert code == EXIT_OK and list(doc["files"]) == list(make_state())
    assert run_main(capsys, "split", legacy, "--all")[0] == EXIT_USAGE  # the set exists
    assert run_main(capsys, "split", legacy, "--all", "--overwrite")[0] == EXIT_OK
    merged = tmp_path / "merged.safeckpt"
    assert run_main(capsys, "merge", doc["manifest"], merged)[0] == EXIT_OK
    assert run_main(capsys, "merge", doc["manifest"], merged)[0] == EXIT_USAGE  # the output exists
    code, doc = run_json(capsys, "diff", corpus["legacy"], merged)
    assert code == EXIT_FAILED  # a set's model_kwargs get the seed's folding, and nothing else changes
    assert {(d["kind"], d["path"]) for d in doc["differences"]} == {
        ("extra", "model_kwargs/nn_handler_version"),
        ("extra", "model_kwargs/pytorch_version"),
    }


def test_split_and_merge_usage_errors(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    single = copy_in(corpus["safe"], tmp_path)
    code, _, err = run_main(capsys, "split", single, "--keys", "model_state_dict", "nope")
    assert code == EXIT_USAGE and "no component 'nope'" in err
    plain = copy_in(corpus["plain"], tmp_path)
    assert run_main(capsys, "split", plain)[0] == EXIT_USAGE  # none of the default keys
    assert run_main(capsys, "split", corpus["manifest"])[0] == EXIT_USAGE  # already a set
    assert run_main(capsys, "merge", single, tmp_path / "x.safeckpt")[0] == EXIT_USAGE  # not a set
    assert not list(tmp_path.glob("ckpt_*")) and not (tmp_path / "x.safeckpt").exists()


# --------------------------------------------------------------------------- diff


def test_diff_reports_every_kind_of_difference(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = safeckpt.load(corpus["safe"])
    msd = state["model_state_dict"]
    msd["0.weight"] = msd["0.weight"] + 0.25
    msd["0.bias"] = msd["0.bias"].double()
    msd["2.bias"] = torch.zeros(3)
    del msd["2.weight"]
    state["epoch"] = 4
    state["extra"] = [1, 2]
    del state["history"]
    changed = tmp_path / "changed.safeckpt"
    safeckpt.save_single_file(None, state, changed)
    code, doc = run_json(capsys, "diff", corpus["legacy"], changed)
    assert code == EXIT_FAILED and doc["identical"] is False
    kinds = {d["path"]: (d["kind"], d["max_abs_diff"]) for d in doc["differences"]}
    assert kinds == {
        "model_state_dict/0.weight": ("value", pytest.approx(0.25)),
        "model_state_dict/0.bias": ("dtype", 0.0),
        "model_state_dict/2.bias": ("shape", None),
        "model_state_dict/2.weight": ("missing", None),
        "epoch": ("value", 1.0),
        "history": ("missing", None),
        "extra": ("extra", None),
    }
    status = {c["key"]: c["status"] for c in doc["components"]}
    assert status["model_state_dict"] == "different" and status["history"] == "missing" and status["extra"] == "extra"
    assert status["optimizer_state_dict"] == status["model_class"] == status["loss_fn"] == "same"
    code, out, _ = run_main(capsys, "diff", corpus["legacy"], changed)
    assert code == EXIT_FAILED and "DIFFERENT: 7 differences in 4 of 8 components" in out


def test_diff_tolerances(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = safeckpt.load(corpus["safe"])
    state["model_state_dict"]["0.weight"] = state["model_state_dict"]["0.weight"] + 1e-4
    near = tmp_path / "near.safeckpt"
    safeckpt.save_single_file(None, state, near)
    assert run_main(capsys, "diff", corpus["safe"], near)[0] == EXIT_FAILED
    assert run_main(capsys, "diff", corpus["safe"], near, "--atol", "1e-3")[0] == EXIT_OK
    assert run_main(capsys, "diff", corpus["safe"], near, "--rtol", "not-a-number")[0] == EXIT_USAGE


def test_diff_legacy_formats_against_each_other_and_plain_safetensors(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(capsys, "diff", corpus["old"], corpus["legacy"])[0] == EXIT_OK
    assert run_main(capsys, "diff", corpus["old"], corpus["safe"])[0] == EXIT_OK
    sd_only = tmp_path / "sd.pth"
    torch.save(make_state()["model_state_dict"], sd_only)  # an OrderedDict; plain safetensors gives a dict
    code, doc = run_json(capsys, "diff", sd_only, corpus["plain"])
    assert code == EXIT_OK and doc["compared"]["tensors"] == 4
    assert run_main(capsys, "diff", corpus["evil"], corpus["safe"])[0] == EXIT_FAILED  # refused, never run
    assert run_main(capsys, "diff", corpus["junk"], corpus["safe"])[0] == EXIT_USAGE
    assert not corpus["sentinel"].exists()


def test_diff_states_edge_cases() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert diff_states({"t": nan}, {"t": nan.clone()}).identical  # NaNs in the same places are equal
    big = torch.tensor([2**62 + 1])
    assert not diff_states({"t": big}, {"t": torch.tensor([2**62])}).identical  # int64 compared exactly
    assert diff_states({"x": [1, 2]}, {"x": (1, 2)}).differences[0].kind == "type"
    assert diff_states(OrderedDict(a=1.5), {"a": 1.5}).identical  # any mapping kind
    assert diff_states({"f": float("nan")}, {"f": float("nan")}).identical
    assert diff_states({"a": np.array([1, 2])}, {"a": np.array([1, 3])}).differences[0].max_abs_diff == 1.0
    assert diff_states({"a": np.array([2**62 + 1])}, {"a": np.array([2**62])}).differences[0].max_abs_diff == 1.0
    assert diff_states({"a": np.array([1.0], ">f4")}, {"a": np.array([1.0], ">f4")}).identical  # big-endian
    assert (
        diff_states({"a": torch.tensor([5], dtype=torch.int32)}, {"a": torch.tensor([6])}, atol=1).differences[0].kind
        == "dtype"
    )
    assert diff_states(torch.ones(2), torch.ones(2)).identical  # a state that is not a dict


# --------------------------------------------------------------------------- usage, progress


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run_main(
            capsys,
        )[0]
        == EXIT_USAGE
    )
    assert run_main(capsys, "frobnicate")[0] == EXIT_USAGE
    assert run_main(capsys, "scan")[0] == EXIT_USAGE
    assert run_main(capsys, "diff", "--atol")[0] == EXIT_USAGE
    code, out, _ = run_main(capsys, "--help")
    assert code == EXIT_OK and all(c in out for c in ("inspect", "convert", "scan", "verify", "split", "merge", "diff"))
    code, out, _ = run_main(capsys, "--version")
    assert code == EXIT_OK and safeckpt.__version__ in out


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    tty = FakeTTY()
    with Progress("work", 4, stream=tty, delay=0) as bar:
        for _ in range(4):
            bar.advance()
    text = tty.getvalue()
    assert text.startswith("\rwork [") and "100% 4/4" in text and text.endswith("\r")
    for stream, enabled in ((io.StringIO(), True), (FakeTTY(), False)):  # a pipe, or --quiet
        with Progress("work", 4, stream=stream, delay=0, enabled=enabled) as bar:
            bar.advance(4)
        assert stream.getvalue() == ""
    slow = FakeTTY()
    with Progress("work", 4, stream=slow, delay=60) as bar:  # work under a second shows nothing
        bar.advance(4)
    assert slow.getvalue() == ""
