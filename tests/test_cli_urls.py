"""Every path argument of the command line may be a URL (issue 15), through the ``safeckpt`` console script
against a real S3 API (moto's server on loopback, via s3fs), and ``memory://`` in-process; the public
functions that take a path take a URL too. Errors and reports name the URL, never a temporary copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fixtures import s3_server

import safeckpt
from safeckpt import CheckpointManager
from safeckpt.cli import main
from safeckpt.cli_remote import parse_storage_options

REPO = Path(__file__).resolve().parents[1]
TEMP_MARK = "safeckpt-cli-"  # the CLI's local copies live under a directory named so


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """moto's S3 server on loopback; yields the storage options."""
    with s3_server("cli") as options:
        yield options


@pytest.fixture
def bucket(s3: dict[str, Any]) -> str:
    """A fresh prefix in the bucket for one test."""
    return f"s3://cli/{uuid.uuid4().hex[:12]}"


def fs(s3: dict[str, Any]) -> Any:
    return fsspec.filesystem("s3", **s3)


def cli(args: list[Any], s3: dict[str, Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script with the endpoint given as ``--storage-option`` (a dotted key)."""
    exe = shutil.which("safeckpt")
    assert exe is not None, "the safeckpt console script is not installed: pip install -e ."
    endpoint = s3["client_kwargs"]["endpoint_url"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [exe, *map(str, args), "--storage-option", f"client_kwargs.endpoint_url={endpoint}"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


def state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model_state_dict": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3.0)},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "model_kwargs": {"width": 3},
        "epoch": seed,
    }


def put(s3: dict[str, Any], local: Path, url: str) -> None:
    fs(s3).put_file(str(local), url)


def no_temp(proc: subprocess.CompletedProcess[str]) -> None:
    assert TEMP_MARK not in proc.stdout + proc.stderr and "/remote-" not in proc.stdout + proc.stderr


class Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


# --------------------------------------------------------------------------- reading commands


def test_inspect_verify_scan_diff_take_an_s3_file(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    url = f"{bucket}/ckpt.safeckpt"
    safeckpt.save_single_file(None, state(1), url, storage_options=s3)
    proc = cli(["inspect", url, "--tensors"], s3, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{url}: safeckpt, 4 components") and "model_state_dict/w" not in proc.stderr
    no_temp(proc)
    proc = cli(["verify", url, "--json"], s3, tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["path"] == url and doc["digests"] is True
    proc = cli(["scan", url], s3, tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{url}: safe"), proc.stderr
    local = tmp_path / "same.safeckpt"
    safeckpt.save_single_file(None, state(1), local)
    proc = cli(["diff", url, local], s3, tmp_path)
    assert proc.returncode == 0 and f"A: {url}" in proc.stdout and "identical" in proc.stdout, proc.stderr
    no_temp(proc)


def test_scan_of_an_s3_prefix_names_each_url_and_finds_the_dangerous_one(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    torch.save(state(2), tmp_path / "good.pth")
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    put(s3, tmp_path / "good.pth", f"{bucket}/dir/good.pth")
    put(s3, tmp_path / "evil.pth", f"{bucket}/dir/evil.pth")
    put(s3, tmp_path / "good.pth", f"{bucket}/dir/sub/deep.pth")
    proc = cli(["scan", f"{bucket}/dir"], s3, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"{bucket}/dir/evil.pth: DANGEROUS" in proc.stdout and f"{bucket}/dir/good.pth: safe" in proc.stdout
    assert "deep.pth" not in proc.stdout  # not recursive without -r
    no_temp(proc)
    proc = cli(["scan", f"{bucket}/dir/", "-r", "--json"], s3, tmp_path)
    paths = sorted(f["path"] for f in json.loads(proc.stdout)["files"])
    assert paths == [f"{bucket}/dir/evil.pth", f"{bucket}/dir/good.pth", f"{bucket}/dir/sub/deep.pth"]


def test_verify_a_tampered_s3_file_fails_naming_the_url(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    url = f"{bucket}/t.safeckpt"
    safeckpt.save_single_file(None, state(3), url, storage_options=s3)
    raw = bytearray(fs(s3).cat_file(url))
    raw[-1] ^= 0xFF
    fs(s3).pipe_file(url, bytes(raw))
    proc = cli(["verify", url], s3, tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED") and url in proc.stdout, proc.stdout + proc.stderr
    no_temp(proc)


def test_multi_file_set_and_manager_directory_on_s3(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    base = f"{bucket}/m.pth"
    safeckpt.save_multi_files(None, state(4), base, storage_options=s3)
    for arg in (base, f"{bucket}/m.safeckpt.json"):
        proc = cli(["verify", arg], s3, tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith(f"OK {arg} (safeckpt-multi)"), proc.stdout + proc.stderr
        no_temp(proc)
    proc = cli(["inspect", base, "--json"], s3, tmp_path)
    doc = json.loads(proc.stdout)
    assert doc["format"] == "safeckpt-multi" and doc["metadata"]["manifest"] == f"{bucket}/m.safeckpt.json"
    run = f"{bucket}/run"
    mgr = CheckpointManager(run, storage_options=s3)
    mgr.save(1, state(1), {"loss": 1.0})
    mgr.save(2, state(2), {"loss": 0.5})
    proc = cli(["verify", run], s3, tmp_path)
    assert proc.returncode == 0 and proc.stdout.count("OK step") == 2, proc.stdout + proc.stderr
    proc = cli(["inspect", f"{run}/step_000000000002/COMMITTED"], s3, tmp_path)
    assert proc.returncode == 0 and "step 2: committed" in proc.stdout and run in proc.stdout, proc.stderr
    no_temp(proc)


# --------------------------------------------------------------------------- writing commands


def test_convert_an_s3_file_next_to_itself_and_into_an_s3_out_dir(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    torch.save(state(5), tmp_path / "old.pth")
    src = f"{bucket}/old.pth"
    put(s3, tmp_path / "old.pth", src)
    proc = cli(["convert", src], s3, tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"converted {src} -> {bucket}/old.safetensors"), proc.stderr
    loaded = safeckpt.load(f"{bucket}/old.safetensors", storage_options=s3)
    assert torch.equal(loaded["model_state_dict"]["w"], state(5)["model_state_dict"]["w"])
    proc = cli(["convert", src], s3, tmp_path)  # the output exists now
    assert proc.returncode == 2 and f"{bucket}/old.safetensors exists" in proc.stderr and proc.stdout == ""
    proc = cli(["convert", src, "--out-dir", f"{bucket}/out", "--multi"], s3, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(safeckpt.load(f"{bucket}/out/old", storage_options=s3)) == set(state(5))
    proc = cli(["convert", src, "--out-dir", str(tmp_path / "here")], s3, tmp_path)  # remote source, local output
    assert proc.returncode == 0, proc.stderr
    assert safeckpt.load(tmp_path / "here" / "old.safetensors")["epoch"] == 5


def test_convert_refuses_a_dangerous_s3_file_and_writes_nothing(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    src = f"{bucket}/evil.pth"
    put(s3, tmp_path / "evil.pth", src)
    proc = cli(["convert", src], s3, tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith(f"REFUSED {src}: dangerous globals"), proc.stdout + proc.stderr
    assert "posix:system" in proc.stdout or "os:system" in proc.stdout
    assert not fs(s3).exists(f"{bucket}/evil.safetensors")
    no_temp(proc)


def test_split_and_merge_on_s3(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    url = f"{bucket}/whole.safeckpt"
    safeckpt.save_single_file(None, state(6), url, storage_options=s3)
    proc = cli(["split", url, "--all"], s3, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert fs(s3).exists(f"{bucket}/whole.safeckpt.json") and fs(s3).exists(f"{bucket}/whole_model_state_dict.safetensors")
    proc = cli(["split", url, "--all"], s3, tmp_path)
    assert proc.returncode == 2 and f"{bucket}/whole.safeckpt.json exists" in proc.stderr
    proc = cli(["merge", f"{bucket}/whole.safeckpt.json", f"{bucket}/merged.safeckpt", "--verify"], s3, tmp_path)
    assert proc.returncode == 0 and f"into {bucket}/merged.safeckpt" in proc.stdout, proc.stderr
    merged = safeckpt.load(f"{bucket}/merged.safeckpt", storage_options=s3, verify=True)
    assert set(merged) == set(state(6)) and torch.equal(merged["model_state_dict"]["b"], torch.arange(3.0))
    proc = cli(["merge", f"{bucket}/whole.safeckpt.json", f"{bucket}/merged.safeckpt"], s3, tmp_path)
    assert proc.returncode == 2 and f"{bucket}/merged.safeckpt exists" in proc.stderr


# --------------------------------------------------------------------------- errors name the URL, once, on stderr


@pytest.mark.parametrize("command", ["inspect", "verify", "scan", "convert", "split"])
def test_a_missing_s3_file_is_one_error_naming_the_url(s3: dict[str, Any], bucket: str, tmp_path: Path, command: str) -> None:
    url = f"{bucket}/missing.pth"
    proc = cli([command, url], s3, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "no such file" in lines[0].lower(), proc.stderr
    no_temp(proc)


def test_diff_of_a_missing_s3_file_names_the_url(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    safeckpt.save_single_file(None, state(0), tmp_path / "a.safeckpt")
    proc = cli(["diff", tmp_path / "a.safeckpt", f"{bucket}/nope.safeckpt"], s3, tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert f"{bucket}/nope.safeckpt" in proc.stderr
    no_temp(proc)


def test_a_text_file_on_s3_is_not_a_checkpoint_named_by_its_url(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    url = f"{bucket}/notes.pth"
    fs(s3).pipe_file(url, b"hello, this is text\n" * 10)
    for command in ("inspect", "verify", "convert"):
        proc = cli([command, url], s3, tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.count("\n") == 1 and url in proc.stderr, proc.stderr
        no_temp(proc)
    proc = cli(["scan", url], s3, tmp_path)
    assert proc.returncode == 2 and url in proc.stderr
    no_temp(proc)


def test_without_the_endpoint_option_the_error_names_the_url(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    """A bad option is a one-line usage error; ``--storage-option`` must be KEY=VALUE."""
    proc = cli(["inspect", f"{bucket}/x.safeckpt", "--storage-option", "novalue"], s3, tmp_path)
    assert proc.returncode == 2 and "--storage-option 'novalue': expected KEY=VALUE" in proc.stderr


# --------------------------------------------------------------------------- memory:// in-process, options, the API


def test_memory_urls_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = f"memory://cli-{uuid.uuid4().hex[:8]}"
    safeckpt.save_single_file(None, state(7), f"{root}/a.safeckpt")
    torch.save(state(7), tmp_path / "a.pth")
    fsspec.filesystem("memory").put_file(str(tmp_path / "a.pth"), f"{root}/a.pth")
    assert main(["inspect", f"{root}/a.safeckpt"]) == 0
    assert capsys.readouterr().out.startswith(f"{root}/a.safeckpt: safeckpt")
    assert main(["convert", f"{root}/a.pth", f"{root}/b.safeckpt"]) == 0
    assert main(["diff", f"{root}/a.pth", f"{root}/b.safeckpt"]) == 0
    out = capsys.readouterr().out
    assert f"A: {root}/a.pth" in out and "identical" in out
    assert main(["inspect", f"{root}/nothing.pth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root}/nothing.pth" in err and TEMP_MARK not in err


def test_an_unknown_protocol_is_one_error_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "scan", "convert", "verify"):
        assert main([command, "nosuchproto://b/x.pth"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nosuchproto://b/x.pth: cannot open this URL" in err and "internal" not in err


def test_parse_storage_options() -> None:
    assert parse_storage_options(["anon=true", "client_kwargs.endpoint_url=http://h:1", "client_kwargs.region_name=eu",
                                  'config_kwargs={"retries": {"max_attempts": 2}}', "key=abc"]) == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://h:1", "region_name": "eu"},
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "key": "abc",
    }
    for bad in ("noequals", "=v", "a..b=1"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_storage_options([bad])
    with pytest.raises(ValueError, match="already set"):
        parse_storage_options(["a=1", "a.b=2"])


def test_public_path_functions_take_s3_urls(s3: dict[str, Any], bucket: str, tmp_path: Path) -> None:
    """save_multi_from_single, scan, convert and open on S3 (the others: tests/test_remote.py)."""
    url = f"{bucket}/api/single.safeckpt"
    safeckpt.save_single_file(None, state(8), url, storage_options=s3)
    written = safeckpt.save_multi_from_single(url, storage_options=s3)
    assert set(written) == {"model_state_dict", "optimizer_state_dict", "model_kwargs"}
    assert all(isinstance(p, str) and p.startswith(bucket) for p in written.values())
    parts = safeckpt.load_multi_files(url, storage_options=s3, verify=True)
    assert parts["model_kwargs"]["width"] == 3
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    put(s3, tmp_path / "evil.pth", f"{bucket}/api/evil.pth")
    report = safeckpt.scan(f"{bucket}/api/evil.pth", storage_options=s3)
    assert report.verdict == "dangerous" and report.path == f"{bucket}/api/evil.pth"
    with pytest.raises(safeckpt.UnsafeCheckpointError) as info:
        safeckpt.convert(f"{bucket}/api/evil.pth", storage_options=s3)
    assert f"{bucket}/api/evil.pth" in str(info.value) and TEMP_MARK not in str(info.value)
    torch.save(state(8), tmp_path / "old.pth")
    put(s3, tmp_path / "old.pth", f"{bucket}/api/old.pth")
    assert safeckpt.convert(f"{bucket}/api/old.pth", storage_options=s3) == f"{bucket}/api/old.safetensors"
    with safeckpt.open(f"{bucket}/api/old.safetensors", storage_options=s3) as ckpt:
        assert torch.equal(ckpt.get_tensor("model_state_dict/b"), torch.arange(3.0))


def test_save_multi_from_single_takes_a_memory_url() -> None:
    url = f"memory://msfs-{uuid.uuid4().hex[:8]}/ckpt.safeckpt"
    safeckpt.save_single_file(None, state(9), url)
    written = safeckpt.save_multi_from_single(url, ["model_state_dict"])
    assert list(written) == ["model_state_dict"]
    assert safeckpt.load_multi_files(url, verify=True)["model_state_dict"]["b"].tolist() == [0.0, 1.0, 2.0]


# --------------------------------------------------------------------------- local errors: once, on stderr, naming the file


@pytest.mark.parametrize("command", ["inspect", "verify", "scan", "convert", "split", "diff"])
def test_a_text_file_is_one_error_naming_it(tmp_path: Path, s3: dict[str, Any], command: str) -> None:
    """A text file whose first byte is a pickle opcode ('h': BINGET) is "not a checkpoint", named, once."""
    notes = tmp_path / "notes.pth"
    notes.write_text("hello, this is text\n" * 10)
    args = [command, notes, notes] if command == "diff" else [command, notes]
    proc = cli(args, s3, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"safeckpt {command}: error: {notes}") and "not a checkpoint" in lines[0]
    with pytest.raises(safeckpt.CheckpointFormatError, match="not a checkpoint") as info:
        safeckpt.load(notes)
    assert str(info.value).startswith(str(notes)) and info.value.file == str(notes)
    with pytest.raises(FileNotFoundError, match="no such file") as missing:
        safeckpt.load(tmp_path / "nonexistent.pth")
    assert missing.value.filename == str(tmp_path / "nonexistent.pth") and "manifest" not in str(missing.value)


# --------------------------------------------------------------------------- the integrations' commands


def _memory_put(local: Path, url: str) -> None:
    fsspec.filesystem("memory").put_file(str(local), url)


def test_convert_hf_from_and_to_memory_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = f"memory://hf-{uuid.uuid4().hex[:8]}"
    weights = {"emb.weight": torch.randn(4, 3), "head.bias": torch.zeros(4)}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "toy"}')
    _memory_put(tmp_path / "pytorch_model.bin", f"{root}/src/pytorch_model.bin")
    _memory_put(tmp_path / "config.json", f"{root}/src/config.json")
    assert main(["convert", "--hf", f"{root}/src", f"{root}/dst"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"converted {root}/src -> {root}/dst: model.safetensors") and TEMP_MARK not in out
    mem = fsspec.filesystem("memory")
    assert mem.exists(f"{root}/dst/config.json")
    with safeckpt.open(f"{root}/dst/model.safetensors") as ckpt:
        assert torch.equal(ckpt.get_tensor("emb.weight"), weights["emb.weight"])
    assert main(["convert", "--hf", f"{root}/src", f"{root}/dst"]) == 2  # the output exists
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and TEMP_MARK not in err
    assert main(["convert", "--hf", f"{root}/src"]) == 0  # in place: written back beside the .bin
    assert mem.exists(f"{root}/src/model.safetensors") and mem.exists(f"{root}/src/pytorch_model.bin")
    assert main(["convert", "--hf", f"{root}/src", "--remove-legacy", "--overwrite"]) == 2
    assert "local folder only" in capsys.readouterr().err


def test_sign_and_verify_signature_of_a_memory_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    url = f"memory://sig-{uuid.uuid4().hex[:8]}/ckpt.safeckpt"
    safeckpt.save_single_file(None, state(1), url)
    assert main(["sign", url, "--key", str(private)]) == 0
    assert capsys.readouterr().out.strip() == f"signed {url} -> {url}.sig"
    assert fsspec.filesystem("memory").exists(f"{url}.sig")
    assert main(["verify", url, "--signature", f"{url}.sig", "--public-key", str(public)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {url}: the signature verifies") and TEMP_MARK not in out
    fsspec.filesystem("memory").pipe_file(url, b"tampered" + fsspec.filesystem("memory").cat_file(url)[8:])
    assert main(["verify", url, "--signature", f"{url}.sig", "--public-key", str(public)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and TEMP_MARK not in out and "/remote-" not in out
