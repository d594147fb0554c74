"""Zip archives read exactly as torch reads them (one reader for loading and scanning).

``torch.load`` opens any file starting with ``PK\\x03\\x04`` with its own zip reader
(caffe2's ``PyTorchStreamReader`` over miniz), not Python's ``zipfile``: it finds
the end-of-central-directory record by searching backwards from the end, takes
member offsets as absolute file offsets, uses the central directory for sizes and
compression, looks names up by their exact bytes (compared case-insensitively, so
``DATA.PKL`` answers for ``data.pkl``), and takes the folder of the *first* central
directory entry as the prefix of every record it reads (``<prefix>/data.pkl``,
``<prefix>/data/<key>``, ``<prefix>/byteorder``, ``<prefix>/constants.pkl``).
Python's ``zipfile`` differs (names cut at NUL, the last duplicate wins, offsets
shifted for prepended data), so a reader built on it can be shown a benign member
while torch runs another.

Rule: this module walks the central directory itself, like torch, and records every
way two readers could see different things as a *problem* that makes the archive
ambiguous: duplicate names (case-insensitively), names holding NUL, members that
overlap each other or the central directory, a local header that disagrees with
its central entry (name, compression, sizes), zip64 fields that disagree with the
32-bit ones. Loaders refuse an ambiguous archive; ``scan`` calls it dangerous.
Deflated members are inflated within ``Limits.max_inflated_bytes``, checked on the
declared size and again while inflating.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import CheckpointFormatError, LimitExceededError
from ..limits import Limits

__all__ = ["Archive", "Member", "open_archive"]

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_MAX_COMMENT = 0xFFFF
_STORED, _DEFLATED = 0, 8
_CHUNK = 1 << 20
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class Member:
    """One central directory entry.

    Attributes:
        name: the exact name, decoded as UTF-8 with undecodable bytes kept as surrogates.
        method: 0 (stored) or 8 (deflated); anything else cannot be read.
        compressed_size: bytes stored in the file.
        size: bytes once inflated.
        header_offset: where its local header starts.
        data_offset: where its stored bytes start.
    """

    name: str
    method: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int


@dataclass
class Archive:
    """The members of a zip archive as torch sees them.

    Attributes:
        path: the file.
        size: its size in bytes.
        members: central directory entries, in directory order.
        prefix: the record prefix torch uses (the first entry's folder, with its slash).
        problems: every way another zip reader could read something else (empty when unambiguous).
    """

    path: str
    size: int
    members: tuple[Member, ...]
    prefix: str
    problems: list[str] = field(default_factory=list)
    _index: dict[str, Member] = field(default_factory=dict, repr=False)

    @property
    def ambiguous(self) -> bool:
        return bool(self.problems)

    def find(self, record: str) -> Member | None:
        """The member torch reads for ``record`` (a name under the prefix, e.g. ``"data.pkl"``)."""
        return self._index.get(_fold(self.prefix + record))

    def records(self) -> list[str]:
        """Names under the prefix, prefix removed (what torch's ``get_all_records`` lists)."""
        n = len(self.prefix)
        return [m.name[n:] for m in self.members if m.name.startswith(self.prefix)]

    def read(self, member: Member, limits: Limits) -> bytes:
        """The member's bytes, inflated if deflated, within ``Limits.max_inflated_bytes``.

        Raises:
            LimitExceededError: if it declares or inflates to more than the limit.
            CheckpointFormatError: if it is compressed another way or its data is corrupt.
        """
        with open(self.path, "rb") as f:
            f.seek(member.data_offset)
            if member.method == _STORED:
                if member.size != member.compressed_size:
                    raise self._bad(f"stored member {member.name!r:.200} declares two sizes")
                limits.check("max_inflated_bytes", member.size, what=f"member {member.name!r:.200}", file=self.path)
                data = f.read(member.size)
                if len(data) != member.size:
                    raise self._bad(f"member {member.name!r:.200} is truncated")
                return data
            if member.method != _DEFLATED:
                raise self._bad(f"member {member.name!r:.200} uses compression method {member.method}, which torch cannot read")
            return _inflate(f, member, limits, self.path)

    def _bad(self, message: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path}: {message}", file=self.path)


def _fold(name: str) -> str:
    """miniz compares names ASCII-case-insensitively (``str.lower`` is that on an ASCII name)."""
    return name.lower() if name.isascii() else name.translate(_LOWER)


_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _inflate(f: object, member: Member, limits: Limits, path: str) -> bytes:
    limit = limits.max_inflated_bytes
    limits.check("max_inflated_bytes", member.size, what=f"the inflated size of {member.name!r:.200}", file=path)
    inflater = zlib.decompressobj(-15)
    out: list[bytes] = []
    produced = 0
    left = member.compressed_size
    read = getattr(f, "read")
    try:
        while True:
            if inflater.unconsumed_tail:
                chunk = inflater.unconsumed_tail
            elif left > 0:
                chunk = read(min(left, _CHUNK))
                if not chunk:
                    raise CheckpointFormatError(f"{path}: member {member.name!r:.200} is truncated", file=path)
                left -= len(chunk)
            else:
                break
            # never produce more than one byte past what was declared: that byte proves a lie
            piece = inflater.decompress(chunk, member.size - produced + 1)
            produced += len(piece)
            if produced > member.size:
                if produced > limit:
                    raise LimitExceededError(
                        f"{path}: member {member.name!r:.200} inflates past Limits.max_inflated_bytes={limit}",
                        limit="max_inflated_bytes", maximum=limit, actual=produced, file=path,
                    )
                raise CheckpointFormatError(
                    f"{path}: member {member.name!r:.200} inflates to more than its declared {member.size} bytes", file=path
                )
            out.append(piece)
            if inflater.eof:
                break
    except zlib.error as exc:
        raise CheckpointFormatError(f"{path}: member {member.name!r:.200} is corrupt: {exc}", file=path) from exc
    if produced != member.size:
        raise CheckpointFormatError(
            f"{path}: member {member.name!r:.200} inflates to {produced} bytes, it declares {member.size}", file=path
        )
    return b"".join(out)


def _end_record(f: object, size: int, path: str) -> tuple[int, int, int, list[str]]:
    """(entry count, central directory offset, its size, problems), as miniz finds them."""
    problems: list[str] = []
    tail_len = min(size, _MAX_COMMENT + 22)
    getattr(f, "seek")(size - tail_len)
    tail: bytes = getattr(f, "read")(tail_len)
    pos = tail.rfind(_EOCD, 0, max(0, len(tail) - 18))  # a whole 22-byte record must fit
    if pos < 0:
        raise CheckpointFormatError(f"{path}: not a zip archive (no end of central directory record)", file=path)
    (_, disk, cd_disk, n_here, n_total, cd_size, cd_offset, _) = struct.unpack("<4sHHHHIIH", tail[pos : pos + 22])
    eocd = size - tail_len + pos
    if disk != 0 or cd_disk != 0 or n_here != n_total:
        raise CheckpointFormatError(f"{path}: multi-disk zip archives are not supported", file=path)
    if eocd >= 20:
        getattr(f, "seek")(eocd - 20)
        locator: bytes = getattr(f, "read")(20)
        if locator[:4] == _LOCATOR:
            (_, _, offset64, _) = struct.unpack("<4sIQI", locator)
            if offset64 + 56 > eocd - 20:
                raise CheckpointFormatError(f"{path}: zip64 end record outside the file", file=path)
            getattr(f, "seek")(offset64)
            record: bytes = getattr(f, "read")(56)
            if len(record) != 56 or record[:4] != _EOCD64:
                raise CheckpointFormatError(f"{path}: bad zip64 end of central directory record", file=path)
            (_, _, _, _, disk64, cd_disk64, n_here64, n_total64, cd_size64, cd_offset64) = struct.unpack(
                "<4sQHHIIQQQQ", record
            )
            if disk64 != 0 or cd_disk64 != 0 or n_here64 != n_total64:
                raise CheckpointFormatError(f"{path}: multi-disk zip archives are not supported", file=path)
            for small, big, what in ((n_total, n_total64, "entry count"), (cd_size, cd_size64, "directory size"),
                                     (cd_offset, cd_offset64, "directory offset")):
                if small not in (0xFFFF, 0xFFFFFFFF) and small != big:
                    problems.append(f"the zip64 {what} ({big}) disagrees with the 32-bit one ({small})")
            n_total, cd_size, cd_offset = n_total64, cd_size64, cd_offset64
    if cd_offset + cd_size > eocd:
        raise CheckpointFormatError(f"{path}: the central directory runs past its end record", file=path)
    return n_total, cd_offset, cd_size, problems


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + length]
        if tag == 1:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            break
        i += 4 + length
    return usize, csize, offset


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def open_archive(path: str | os.PathLike[str], limits: Limits) -> Archive:
    """Walk the central directory of the zip archive at ``path`` as torch does.

    Ambiguities are collected in :attr:`Archive.problems`, not raised: the caller
    decides (loaders refuse, ``scan`` reports "dangerous").

    Raises:
        CheckpointFormatError: if torch could not read it as an archive either.
        LimitExceededError: past ``Limits.max_tensors`` entries.
    """
    name = os.fspath(path)
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        count, cd_offset, cd_size, problems = _end_record(f, size, name)
        limits.check("max_tensors", count, what="the number of archive members", file=name)
        if count == 0:
            raise CheckpointFormatError(f"{name}: the archive is empty", file=name)
        f.seek(cd_offset)
        directory = f.read(cd_size)
        if len(directory) != cd_size:
            raise CheckpointFormatError(f"{name}: truncated central directory", file=name)
        members: list[Member] = []
        i = 0
        local = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # local headers as slices, not a seek + 2 reads each
        for _ in range(count):
            if i + 46 > cd_size or directory[i : i + 4] != _CENTRAL:
                raise CheckpointFormatError(f"{name}: malformed central directory entry at byte {cd_offset + i}", file=name)
            (flags, method, _, _, _, csize, usize, nlen, elen, clen, _, _, _, offset) = struct.unpack_from(
                "<HHHHIIIHHHHHII", directory, i + 8
            )
            end = i + 46 + nlen + elen + clen
            if end > cd_size:
                raise CheckpointFormatError(f"{name}: central directory entry runs past the directory", file=name)
            raw = directory[i + 46 : i + 46 + nlen]
            usize, csize, offset = _zip64_extra(directory[i + 46 + nlen : i + 46 + nlen + elen], usize, csize, offset)
            if flags & 1:
                raise CheckpointFormatError(f"{name}: member {_name(raw)!r:.200} is encrypted", file=name)
            members.append(_member(local, name, size, raw, flags, method, csize, usize, offset, problems))
            i = end
        local.close()
    return _finish(name, size, members, cd_offset, cd_size, problems)


def _member(
    local: mmap.mmap, path: str, size: int, raw: bytes, flags: int, method: int, csize: int, usize: int, offset: int,
    problems: list[str],
) -> Member:
    text = _name(raw)
    if offset + 30 > size:
        raise CheckpointFormatError(f"{path}: member {text!r:.200} starts past the end of the file", file=path)
    header = local[offset : offset + 30]
    if header[:4] != _LOCAL:
        raise CheckpointFormatError(f"{path}: bad local header for {text!r:.200}", file=path)
    (_, _, lflags, lmethod, _, _, _, lcsize, lusize, nlen, elen) = _LOCAL_HEADER.unpack(header)
    local_name = local[offset + 30 : offset + 30 + nlen]
    if local_name != raw:
        problems.append(f"member {text!r:.200} has another name in its local header ({_name(local_name)!r:.200})")
    if lmethod != method:
        problems.append(f"member {text!r:.200}: local header and central directory disagree on compression")
    if not (lflags & 8) and 0xFFFFFFFF not in (lcsize, lusize) and (lcsize, lusize) != (csize, usize):
        problems.append(f"member {text!r:.200}: local header and central directory disagree on its size")
    data = offset + 30 + nlen + elen
    if data + csize > size:
        raise CheckpointFormatError(f"{path}: member {text!r:.200} runs past the end of the file", file=path)
    return Member(text, method, csize, usize, offset, data)


def _finish(path: str, size: int, members: list[Member], cd_offset: int, cd_size: int, problems: list[str]) -> Archive:
    first = members[0].name
    if "/" not in first:
        raise CheckpointFormatError(f"{path}: the archive's first member {first!r:.200} is not in a folder", file=path)
    index: dict[str, Member] = {}
    for m in members:
        if "\0" in m.name:
            problems.append(f"member name {m.name!r:.200} holds a NUL byte (other zip readers cut it there)")
        key = _fold(m.name)
        if key in index:
            problems.append(f"member name {m.name!r:.200} appears twice (readers differ on which one they take)")
        else:
            index[key] = m
    spans = sorted((m.header_offset, m.data_offset + m.compressed_size, m.name) for m in members)
    spans.append((cd_offset, cd_offset + cd_size, "the central directory"))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            problems.append(f"{a!r:.200} overlaps {b!r:.200}")
    return Archive(path, size, tuple(members), first[: first.index("/") + 1], problems, index)
