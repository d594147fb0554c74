"""Review, class 6: legacy tar checkpoints, which ``torch.load`` unpickles before anything else.

``torch.load(weights_only=False)`` opens any file Python's ``tarfile`` accepts as the
oldest ``torch.save`` format and runs ``pickle.load`` on its ``storages``, ``tensors``
and ``pickle`` members (extracting them first: a link is followed). ``scan`` called
such a file "not a checkpoint" (``CheckpointFormatError``) while ``torch.load`` ran the
payload. Rule: ``safeckpt.legacy.tarscan.scan_tar``; a tar archive is scanned, every
regular member searched for pickles at every offset, a link member is dangerous.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import safeckpt
from safeckpt.errors import CheckpointFormatError

SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _system(command: str) -> bytes:
    """A protocol 0 pickle calling ``posix.system(command)`` (built by hand, never run here)."""
    return b"cposix\nsystem\n(V" + command.encode() + b"\ntR."


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
                t.addfile(info)
            else:
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))
    return path


def _members(storages: bytes, tensors: bytes, pickled: bytes) -> list[tuple[str, bytes | str]]:
    return [("sys_info", pickle.dumps(SYS_INFO, protocol=2)), ("storages", storages), ("tensors", tensors),
            ("pickle", pickled)]


ZERO = pickle.dumps(0, protocol=2)
BENIGN = pickle.dumps({"w": [1, 2]}, protocol=2)


def _cases(sentinel: Path) -> dict[str, list[tuple[str, bytes | str]]]:
    cmd = f"touch {sentinel}"
    return {
        "storages_first_pickle": _members(_system(cmd), ZERO, BENIGN),
        # one storage: its descriptor pickle, 8 raw bytes of count, then the next pickle torch reads
        "storages_after_raw_bytes": _members(pickle.dumps(1, protocol=2) + pickle.dumps(("k", "cpu", 0), protocol=2)
                                             + bytes(8) + _system(cmd), ZERO, BENIGN),
        "tensors_member": _members(ZERO, _system(cmd), BENIGN),
        "pickle_member": _members(ZERO, ZERO, _system(cmd)),
        "pickle_protocol_2": _members(ZERO, ZERO, b"\x80\x02" + _system(cmd)),
        "last_duplicate_wins": _members(ZERO, ZERO, BENIGN) + [("pickle", _system(cmd))],
    }


@pytest.mark.parametrize("case", sorted(_cases(Path("x"))))
def test_tar_payload_is_dangerous(case: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    path = _tar(tmp_path / "legacy.tar.pt", _cases(sentinel)[case])
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous"
    assert "torch-tar" in report.format
    assert any(use.name == "posix:system" for use in report.globals)
    with pytest.raises(CheckpointFormatError):
        safeckpt.load(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("member", ["storages", "tensors", "pickle"])
def test_tar_link_member_is_dangerous(member: str, tmp_path: Path) -> None:
    members = [(name, "/etc/hostname" if name == member else body) for name, body in _members(ZERO, ZERO, BENIGN)]
    report = safeckpt.scan(_tar(tmp_path / "link.tar", members))
    assert report.verdict == "dangerous"
    assert any(f.kind == "tar-link" for f in report.findings)


def test_benign_tar_is_suspicious_not_dangerous(tmp_path: Path) -> None:
    report = safeckpt.scan(_tar(tmp_path / "plain.tar", _members(ZERO, ZERO, BENIGN)))
    assert report.verdict == "suspicious" and report.format == "torch-tar"
    # a link outside the three names torch reads is not followed by torch
    report = safeckpt.scan(_tar(tmp_path / "other.tar", _members(ZERO, ZERO, BENIGN) + [("notes", "/etc/hostname")]))
    assert report.verdict == "suspicious"


def test_cli_scan_of_tar_payload_exits_1(tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    path = _tar(tmp_path / "legacy.tar.pt", _cases(sentinel)["storages_first_pickle"])
    run = subprocess.run([sys.executable, "-m", "safeckpt", "scan", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "dangerous" in run.stdout and "posix:system" in run.stdout
    assert not sentinel.exists()


def test_torch_load_runs_the_tar_payload_the_scanner_reports(tmp_path: Path) -> None:
    """The premise, in a child process: torch.load(weights_only=False) does run it."""
    sentinel = tmp_path / "PWNED"
    path = _tar(tmp_path / "legacy.tar.pt", _cases(sentinel)["storages_first_pickle"])
    code = "import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=300, check=False)
    assert sentinel.exists()
