"""``scan`` answers what ``torch.load(weights_only=False)`` or ``pickle.load`` would do.

Each bypass of the old scanner is a named malicious input: the verdict is
``dangerous``, safeckpt's loader refuses it, nothing ran, and (where the payload is
a harmless sentinel writer) real ``torch.load`` in a child process shows that torch
does open the member the scanner flagged.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt.detect import Kind, kinds_bytes
from safeckpt.legacy.archive import open_archive
from safeckpt.legacy.nested import Budget, search_nested
from safeckpt.legacy.vm import Report

# --------------------------------------------------------------------------- building blocks


class _Touch:
    """Pickles to ``open(path, "w")``: creates the sentinel file, nothing else."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def touch_pickle(sentinel: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"weights": [1, 2], "x": _Touch(sentinel)}, protocol=protocol)


BENIGN = pickle.dumps({"weights": [1, 2]}, protocol=2)


def make_zip(entries: list[tuple[bytes, bytes]], *, deflate: frozenset[bytes] = frozenset(), lead: bytes = b"",
             local_names: dict[bytes, bytes] | None = None) -> bytes:
    """A zip archive written byte by byte (Python's zipfile cannot write NUL or duplicate names).

    Offsets are absolute (``lead`` bytes come first), as torch's reader expects."""
    out = bytearray(lead)
    central = bytearray()
    for name, data in entries:
        method = 8 if name in deflate else 0
        body = zlib.compressobj(6, zlib.DEFLATED, -15).compress(data) if method else data
        if method:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = c.compress(data) + c.flush()
        crc = zlib.crc32(data)
        local = (local_names or {}).get(name, name)
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), len(data), len(local), 0)
        out += local + body
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(body), len(data),
                               len(name), 0, 0, 0, 0, 0, offset)
        central += name
    cd_offset = len(out)
    out += central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)


def torch_entries(data_pkl: bytes, prefix: bytes = b"archive/") -> list[tuple[bytes, bytes]]:
    return [(prefix + b"data.pkl", data_pkl), (prefix + b"byteorder", b"little"), (prefix + b"version", b"3\n")]


def torch_load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def assert_dangerous_and_refused(path: Path, sentinel: Path) -> None:
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous", report
    with pytest.raises(safeckpt.UnsafeCheckpointError):
        safeckpt.load(path)
    assert not sentinel.exists()


# --------------------------------------------------------------------------- zip archives as torch reads them


def test_nul_name_twin_scans_the_member_torch_reads(tmp_path: Path) -> None:
    """``archive/data.pkl`` (payload) then ``archive/data.pkl\\0`` (benign): zipfile keeps the last
    (cut at NUL), torch reads the exact name."""
    sentinel = tmp_path / "ran"
    path = tmp_path / "nul_twin.pt"
    entries = torch_entries(touch_pickle(sentinel)) + [(b"archive/data.pkl\0", BENIGN)]
    path.write_bytes(make_zip(entries))
    assert_dangerous_and_refused(path, sentinel)
    report = safeckpt.scan(path)
    assert any(f.kind == "ambiguous-archive" for f in report.findings)
    assert "io:open" in report.dangerous_globals  # builtins.open is io.open
    torch_load_in_child(path)
    assert sentinel.exists(), "torch.load did not run the member the scanner flagged"


def test_duplicate_name_differing_in_case_is_ambiguous(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    path = tmp_path / "case_twin.pt"
    path.write_bytes(make_zip(torch_entries(BENIGN) + [(b"archive/DATA.PKL", touch_pickle(sentinel))]))
    archive = open_archive(path, safeckpt.Limits())
    assert archive.ambiguous and "twice" in archive.problems[0]
    assert_dangerous_and_refused(path, sentinel)


def test_local_header_name_disagreeing_with_central_directory_is_ambiguous(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    path = tmp_path / "local_name.pt"
    path.write_bytes(make_zip(torch_entries(BENIGN), local_names={b"archive/data.pkl": b"archive/data.pkX"}))
    assert_dangerous_and_refused(path, sentinel)


def test_overlapping_members_are_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "overlap.pt"
    data = bytearray(make_zip(torch_entries(BENIGN)))
    # point the byteorder entry's central record at data.pkl's local header
    cd = data.rfind(b"PK\x01\x02archive/byteorder"[:4], 0, data.find(b"PK\x05\x06"))
    first_cd = data.find(b"PK\x01\x02")
    second_cd = data.find(b"PK\x01\x02", first_cd + 4)
    assert cd > 0
    struct.pack_into("<I", data, second_cd + 42, 0)
    path.write_bytes(bytes(data))
    archive = open_archive(path, safeckpt.Limits())
    assert archive.ambiguous
    assert safeckpt.scan(path).verdict == "dangerous"


def test_deflated_data_pkl_is_read_and_scanned(tmp_path: Path) -> None:
    """torch reads deflated members: a compressed payload is scanned, not skipped."""
    sentinel = tmp_path / "ran"
    path = tmp_path / "deflated.pt"
    path.write_bytes(make_zip(torch_entries(touch_pickle(sentinel)), deflate=frozenset({b"archive/data.pkl"})))
    assert_dangerous_and_refused(path, sentinel)
    torch_load_in_child(path)
    assert sentinel.exists()


def test_prefix_is_the_first_entrys_folder(tmp_path: Path) -> None:
    """A second folder's data.pkl is not what torch reads; the first entry's folder is."""
    sentinel = tmp_path / "ran"
    path = tmp_path / "prefix.pt"
    entries = torch_entries(touch_pickle(sentinel), b"first/") + torch_entries(BENIGN, b"second/")
    path.write_bytes(make_zip(entries))
    assert open_archive(path, safeckpt.Limits()).prefix == "first/"
    assert_dangerous_and_refused(path, sentinel)


@pytest.mark.parametrize("extra", [0, 1])
def test_inflated_size_limit_boundary(tmp_path: Path, extra: int) -> None:
    payload = pickle.dumps({"x": b"a" * 5000}, protocol=2)
    path = tmp_path / "big.pt"
    path.write_bytes(make_zip(torch_entries(payload), deflate=frozenset({b"archive/data.pkl"})))
    limits = safeckpt.Limits(max_inflated_bytes=len(payload) - extra)
    if extra:
        with pytest.raises(safeckpt.LimitExceededError) as info:
            safeckpt.scan(path, limits=limits)
        assert info.value.limit == "max_inflated_bytes"
    else:
        assert safeckpt.scan(path, limits=limits).verdict == "safe"


def test_member_inflating_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    payload = pickle.dumps({"x": b"a" * 5000}, protocol=2)
    data = bytearray(make_zip(torch_entries(payload), deflate=frozenset({b"archive/data.pkl"})))
    cd = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 100)  # central: declared inflated size
    struct.pack_into("<I", data, 22, 100)  # local header agrees
    path = tmp_path / "liar.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CheckpointFormatError, match="more than its declared"):
        safeckpt.scan(path)
    with pytest.raises(safeckpt.CheckpointFormatError):
        safeckpt.load(path)


def test_real_torch_save_zip_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "real.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 3}
    torch.save(state, path)
    archive = open_archive(path, safeckpt.Limits())
    assert not archive.ambiguous
    assert set(archive.records()) >= {"data.pkl", "byteorder", "data/0"}
    assert safeckpt.scan(path).verdict == "safe"
    loaded = safeckpt.load(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 3


# --------------------------------------------------------------------------- polyglots


def test_safetensors_header_that_starts_a_zip_is_scanned_as_both(tmp_path: Path) -> None:
    """The length prefix ``PK\\x03\\x04\\0\\0\\0\\0`` is a 64 MiB header: the file is a valid
    safetensors file, and torch.load opens it as a zip whose members sit after the header."""
    sentinel = tmp_path / "ran"
    length = struct.unpack("<Q", b"PK\x03\x04\0\0\0\0")[0]
    zip_part_offset = 8 + length
    zipped = make_zip(torch_entries(touch_pickle(sentinel)), lead=b"\0" * zip_part_offset)[zip_part_offset:]
    header = json.dumps({"blob": {"dtype": "U8", "shape": [len(zipped)], "data_offsets": [0, len(zipped)]}}).encode()
    header += b" " * (length - len(header))
    path = tmp_path / "polyglot.safetensors"
    path.write_bytes(b"PK\x03\x04\0\0\0\0" + header + zipped)
    assert kinds_bytes(path.read_bytes()[:16])[:2] == (Kind.SAFETENSORS, Kind.TORCH_ZIP)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # a real safetensors file
        assert list(f.keys()) == ["blob"]
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous"
    assert "safetensors" in report.format and "torch-zip" in report.format
    assert any(f.kind == "polyglot" for f in report.findings)
    reader = torch._C.PyTorchFileReader(str(path))  # torch's own reader opens the payload member
    assert bytes(reader.get_record("data.pkl")) == touch_pickle(sentinel)
    assert not sentinel.exists()


# --------------------------------------------------------------------------- nested pickles


def _holder(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "holder.pkl"
    path.write_bytes(pickle.dumps({"blob": blob}, protocol=4))
    return path


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("where", ["alone", "trailing_byte", "at_offset_7"])
def test_nested_pickle_in_bytes_any_protocol_any_offset(tmp_path: Path, protocol: int, where: str) -> None:
    sentinel = tmp_path / "ran"
    inner = touch_pickle(sentinel, protocol)
    blob = {"alone": inner, "trailing_byte": inner + b"x", "at_offset_7": b"header:" + inner + b"tail"}[where]
    path = _holder(tmp_path, blob)
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous", (protocol, where, report.findings)
    assert any(f.kind == "nested-pickle" and f.severity == "dangerous" for f in report.findings)
    if where != "at_offset_7":
        pickle.loads(blob)  # what a later pickle.loads of the value does
        assert sentinel.exists()


def test_nested_search_depth_bound(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    blob = touch_pickle(sentinel, 0)
    for _ in range(2):  # three levels deep: found
        blob = pickle.dumps({"b": blob + b"!"}, protocol=0)
    assert safeckpt.scan(_holder(tmp_path, blob)).verdict == "dangerous"


def test_nested_search_budget_ends_in_suspicious_not_safe() -> None:
    inner = touch_pickle(Path("/nonexistent/never"), 0)
    value = {"blob": b"\x80\x02" * 50 + inner}
    full = Report()
    search_nested(value, full, safeckpt.Limits(), Budget(len(inner) * 2))
    assert full.dangerous
    starved = Report()
    search_nested(value, starved, safeckpt.Limits(), Budget(0, slack=20))
    assert not starved.dangerous
    assert any(f.kind == "nested-search-incomplete" and f.severity == "suspicious" for f in starved.findings)


def test_benign_bytes_stay_safe(tmp_path: Path) -> None:
    """Text that happens to parse as a protocol 0 GLOBAL mid-value ("cat\\nfoo\\n" names at:foo)
    is reported only if what it names is dangerous: mid-value candidates are for payloads."""
    blob = bytes(range(256)) * 64 + b"cat\nfoo\n" + os.urandom(4096)
    assert safeckpt.scan(_holder(tmp_path, blob)).verdict == "safe"


# --------------------------------------------------------------------------- manifests


def test_manifest_components_are_scanned(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"a": 1}}
    files = safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    assert safeckpt.scan(tmp_path / "m.safeckpt.json").verdict == "safe"
    files["model_kwargs"].write_bytes(touch_pickle(sentinel))
    report = safeckpt.scan(tmp_path / "m.safeckpt.json")
    assert report.format == "safeckpt-multi"
    assert report.verdict == "dangerous"
    assert any(files["model_kwargs"].name in f.message for f in report.findings)
    assert not sentinel.exists()


def test_manifest_symlink_component_is_reported_not_followed(tmp_path: Path) -> None:
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"a": 1}}
    files = safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(files["model_kwargs"].read_bytes())
    files["model_kwargs"].unlink()
    files["model_kwargs"].symlink_to(outside)
    report = safeckpt.scan(tmp_path / "m.safeckpt.json")
    assert report.verdict == "suspicious"
    assert any("not a regular file" in f.message for f in report.findings)


def test_json_that_is_not_a_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8, "components": []}))
    report = safeckpt.scan(path)
    assert report.format == "not-a-checkpoint"
    assert report.verdict == "safe" and not report.globals


# --------------------------------------------------------------------------- no torch


def test_scan_never_imports_torch(tmp_path: Path) -> None:
    """The scanner modules are torch-free: a child process imports them without running the
    package's ``__init__`` (which other modules may make eager) and scans four formats."""
    sentinel = tmp_path / "ran"
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    (tmp_path / "b.pkl").write_bytes(touch_pickle(sentinel))
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"a": 1}}
    safeckpt.save_single_file(None, state, tmp_path / "c.safeckpt")
    safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    package = Path(safeckpt.__file__).parent
    code = textwrap.dedent(f"""
        import sys, types
        pkg = types.ModuleType("safeckpt"); pkg.__path__ = [{str(package)!r}]
        sys.modules["safeckpt"] = pkg
        from safeckpt.legacy import scan
        verdicts = [scan(p).verdict for p in
                    ({str(tmp_path / 'a.pt')!r}, {str(tmp_path / 'b.pkl')!r}, {str(tmp_path / 'c.safeckpt')!r},
                     {str(tmp_path / 'm.safeckpt.json')!r})]
        print(verdicts, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['safe',", "'dangerous',", "'safe',", "'safe']", "False"]
    assert not sentinel.exists()


def test_zip64_entries_read_like_plain_ones(tmp_path: Path) -> None:
    """Sizes and offsets in zip64 extra fields are honoured (torch writes them for large members)."""
    import zipfile

    path = tmp_path / "zip64.pt"
    with zipfile.ZipFile(path, "w") as z:
        for name, body in torch_entries(BENIGN):
            with z.open(name.decode(), "w", force_zip64=True) as f:
                f.write(body)
    archive = open_archive(path, safeckpt.Limits())
    assert not archive.ambiguous
    member = archive.find("data.pkl")
    assert member is not None and archive.read(member, safeckpt.Limits()) == BENIGN
    assert safeckpt.scan(path).verdict == "safe"
