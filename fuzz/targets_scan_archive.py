"""Fuzz target and seeds for the scanner's archive reading (``fuzz_scan_archive.py``).

The archive reader must raise only ``SafeCkptError``, never skip a member torch would
read (an unambiguous archive's every member is what an exact lookup of its name gives),
and an ambiguous archive is never scanned "safe" or "suspicious".
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

from targets import LIMITS, _expect, _write, workdir

from safeckpt.legacy.archive import open_archive
from safeckpt.legacy.scan import scan

__all__ = ["scan_archive", "seeds"]


def scan_archive(data: bytes) -> None:
    """Open ``data`` as torch's reader would, then scan it."""
    path = _write(workdir() / "archive.bin", data)
    archive = _expect(open_archive, path, LIMITS)
    if archive is not None:
        prefix = archive.prefix
        if not archive.ambiguous:
            for member in archive.members:
                if member.name.startswith(prefix):
                    found = archive.find(member.name[len(prefix):])
                    assert found is member, f"{member.name!r} is not what torch's lookup of its name gives"
        for member in archive.members[:8]:
            _expect(archive.read, member, LIMITS)
    report = _expect(scan, path, limits=LIMITS)
    if report is not None:
        assert report.verdict in ("safe", "suspicious", "dangerous")
        if archive is not None and archive.ambiguous and data.startswith(b"PK\x03\x04"):
            assert report.verdict == "dangerous", report


# --------------------------------------------------------------------------- seeds


def _raw_zip(entries: list[tuple[bytes, bytes]], deflate: bool = False) -> bytes:
    out, central = bytearray(), bytearray()
    for name, body in entries:
        data = body
        if deflate:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            data = c.compress(body) + c.flush()
        method = 8 if deflate else 0
        crc = zlib.crc32(body)
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), len(body), len(name), 0)
        out += name + data
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), len(body),
                               len(name), 0, 0, 0, 0, 0, offset) + name
    cd = len(out)
    out += central + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd, 0)
    return bytes(out)


def seeds(tmp: Path) -> list[tuple[str, bytes]]:
    """Real torch.save and TorchScript archives, zip64, NUL and duplicate names, broken directories."""
    import torch

    out: list[tuple[str, bytes]] = []
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "n": 1}, buf)
    real = buf.getvalue()
    out.append(("torch_save_zip", real))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    jit = tmp / "m.jit"
    script.save(str(jit))
    out.append(("torchscript", jit.read_bytes()))
    payload = pickle.dumps({"w": [1, 2]}, protocol=2)
    base = [(b"archive/data.pkl", payload), (b"archive/byteorder", b"little"), (b"archive/version", b"3\n")]
    out.append(("handmade", _raw_zip(base)))
    out.append(("deflated", _raw_zip(base, deflate=True)))
    out.append(("nul_twin", _raw_zip(base + [(b"archive/data.pkl\0", payload)])))
    out.append(("case_twin", _raw_zip(base + [(b"archive/DATA.PKL", payload)])))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        for name, body in base:
            with z.open(name.decode(), "w", force_zip64=True) as f:
                f.write(body)
    out.append(("zip64_entries", zipped.getvalue()))
    cut = bytearray(real)
    cd = cut.rfind(b"PK\x01\x02")
    cut[cd + 42 : cd + 46] = struct.pack("<I", 0xFFFFFFF0)  # last entry's local header far away
    out.append(("broken_offset", bytes(cut)))
    eocd = real.rfind(b"PK\x05\x06")
    out.append(("broken_count", real[: eocd + 10] + struct.pack("<H", 0xFFFF) + real[eocd + 12 :]))
    out.append(("truncated_directory", real[: real.find(b"PK\x01\x02") + 20]))
    return out
