"""The streaming writer under saves (``safeckpt/stream.py``): bytes, digests, direct I/O and failures.

The module's sizes are shrunk here (4 KiB blocks, 16 and 12 KiB buffers, 32 KiB ranges)
so that small files cross every boundary: held header, buffers, ranges, threads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import stream
from safeckpt.stream import BLOCK, open_stream

HAS_DIRECT = hasattr(os, "O_DIRECT")


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "CHUNK", 4 * BLOCK)
    monkeypatch.setattr(stream, "BUFFERED_CHUNK", 3 * BLOCK)
    monkeypatch.setattr(stream, "MIN_RANGE", 8 * BLOCK)
    monkeypatch.setattr(stream, "DIRECT_MIN_BYTES", 1)


class Parts:
    """Parts of random bytes, read as the stream asks; ``fail_at`` makes one part's read raise."""

    def __init__(self, sizes: list[int], seed: int = 0, fail_at: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.blobs = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
        self.sizes = sizes
        self.fail_at = fail_at

    def read(self, index: int, begin: int, end: int) -> np.ndarray:
        if index == self.fail_at:
            raise RuntimeError("tensor changed size")
        return np.frombuffer(self.blobs[index], dtype=np.uint8)[begin:end]


def _write(path: Path, parts: Parts, head: bytes) -> list[str]:
    with open(path, "xb") as f:
        with open_stream(f, sum(parts.sizes)) as s:
            digests = s.write(parts.sizes, parts.read, hold=len(head), new_digest=hashlib.sha256)
            s.finish(head)
        assert f.tell() == os.fstat(f.fileno()).st_size  # the caller's file is left at the end
    return digests


def _check(path: Path, digests: list[str], parts: Parts, head: bytes) -> None:
    expected = b"".join(parts.blobs)
    assert path.read_bytes() == head + expected[len(head) :]
    assert digests == [hashlib.sha256(b).hexdigest() for b in parts.blobs]


sizes_strategy = st.lists(
    st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([BLOCK - 1, BLOCK, BLOCK + 1, 16 * BLOCK, 16 * BLOCK + 7]),
              st.integers(0, 40 * BLOCK)),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_strategy, head_size=st.integers(1, 6 * BLOCK), threads=st.sampled_from([1, 2, 3]))
def test_file_and_digests_are_exact_for_any_layout(tmp_path_factory: Any, sizes: list[int], head_size: int,
                                                    threads: int) -> None:
    directory = tmp_path_factory.mktemp("s")
    original = stream.HASH_THREADS
    stream.HASH_THREADS = threads
    try:
        parts = Parts([head_size, *sizes])
        head = bytes(range(256)) * (head_size // 256) + bytes(head_size % 256)
        digests = _write(directory / "f", parts, head)
        _check(directory / "f", digests, parts, head)
    finally:
        stream.HASH_THREADS = original


def test_ranges_are_block_aligned_and_cut_before_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = [0]
    for size in [3000, 70_000, 5, 200_000, 90_000, 1, 400_000, 64_000]:
        starts.append(starts[-1] + size)
    held = stream._round_up(3000)
    bounds = stream._ranges(starts, held, starts[-1])
    assert bounds[0] == 0 and bounds[-1] == starts[-1]
    assert len(bounds) > 3
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        assert lo % BLOCK == 0 and lo >= held
        assert hi - lo >= stream.MIN_RANGE
        assert any(lo <= start < lo + BLOCK for start in starts)  # just before a part's start


def test_a_part_spanning_several_ranges_is_hashed_whole(tmp_path: Path) -> None:
    parts = Parts([100, 200 * BLOCK + 3, 10])
    head = b"H" * 100
    digests = _write(tmp_path / "f", parts, head)
    _check(tmp_path / "f", digests, parts, head)


def test_head_longer_than_a_buffer(tmp_path: Path) -> None:
    parts = Parts([9 * BLOCK + 5, 30 * BLOCK])
    head = b"x" * (9 * BLOCK + 5)
    digests = _write(tmp_path / "f", parts, head)
    _check(tmp_path / "f", digests, parts, head)


@pytest.mark.skipif(not HAS_DIRECT, reason="O_DIRECT is Linux-only")
def test_large_files_bypass_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        if not stream._set_direct(f.fileno(), True):
            pytest.skip("this file system refuses O_DIRECT")
    flags: list[bool] = []
    real = stream.Stream._pwrite

    def spy(self: stream.Stream, buffer: np.ndarray, length: int, offset: int) -> None:
        flags.append(bool(fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_DIRECT))
        real(self, buffer, length, offset)

    monkeypatch.setattr(stream.Stream, "_pwrite", spy)
    parts = Parts([300, 50 * BLOCK + 1])
    with open(tmp_path / "f", "xb") as f:
        with open_stream(f, sum(parts.sizes)) as s:
            digests = s.write(parts.sizes, parts.read, hold=300, new_digest=hashlib.sha256)
            s.finish(b"h" * 300)
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT  # the caller's file is back to normal
    assert flags and all(flags)
    _check(tmp_path / "f", digests, parts, b"h" * 300)


def test_small_files_go_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "DIRECT_MIN_BYTES", 1 << 30)
    calls: list[bool] = []
    monkeypatch.setattr(stream, "_set_direct", lambda fd, on: calls.append(on) or True)
    parts = Parts([64, 20 * BLOCK])
    digests = _write(tmp_path / "f", parts, b"h" * 64)
    _check(tmp_path / "f", digests, parts, b"h" * 64)
    assert calls == []


@pytest.mark.skipif(not HAS_DIRECT, reason="O_DIRECT is Linux-only")
def test_refused_direct_writes_fall_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes the O_DIRECT flag but refuses the writes (EINVAL): the save still completes."""
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(stream, "_set_direct", _fake_set_direct)
    monkeypatch.setattr(os, "pwrite", pwrite)
    parts = Parts([100, 40 * BLOCK + 9, 3])
    digests = _write(tmp_path / "f", parts, b"h" * 100)
    _check(tmp_path / "f", digests, parts, b"h" * 100)
    assert refused  # direct was tried, then given up


def _fake_set_direct(fd: int, on: bool) -> bool:
    """Sets the flag even where the file system would refuse it (tmpfs), to reach the EINVAL path."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        pytest.skip("this file system refuses the O_DIRECT flag itself")
    return True


def test_a_failing_write_is_raised_and_stops_the_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    count = {"n": 0}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        count["n"] += 1
        if count["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    parts = Parts([100, 60 * BLOCK])
    with pytest.raises(OSError) as info:
        _write(tmp_path / "f", parts, b"h" * 100)
    assert info.value.errno == errno.ENOSPC
    assert not [t for t in threading.enumerate() if t.name.startswith("safeckpt-")]


def test_a_failing_read_is_raised(tmp_path: Path) -> None:
    parts = Parts([100, 40 * BLOCK, 5 * BLOCK, 10], fail_at=2)
    with pytest.raises(RuntimeError, match="changed size"):
        _write(tmp_path / "f", parts, b"h" * 100)


@pytest.mark.parametrize("direct_min", [1, 1 << 40])
def test_saves_through_both_paths_round_trip_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        direct_min: int) -> None:
    monkeypatch.setattr(stream, "DIRECT_MIN_BYTES", direct_min)
    torch.manual_seed(0)
    state = {
        "model": {f"w{i}": torch.randn(1000 + 37 * i) for i in range(40)},
        "big": torch.randn(300_000),
        "ints": torch.arange(12345, dtype=torch.int64),
        "half": torch.randn(777).half(),
        "epoch": 3,
    }
    path = tmp_path / "c.safeckpt"
    safeckpt.save_single_file(None, state, path)
    loaded = safeckpt.load(path, verify=True)
    for key in ("big", "ints", "half"):
        assert torch.equal(loaded[key], state[key]) and loaded[key].dtype == state[key].dtype
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["epoch"] == 3


def test_a_tensor_resized_during_the_save_is_refused(tmp_path: Path) -> None:
    from safeckpt import container
    from safeckpt.limits import DEFAULT_LIMITS

    encoded = container.encode_state({"w": torch.randn(50_000)}, DEFAULT_LIMITS)
    encoded.entries[0].source = lambda: torch.zeros(10)  # what a resize between encoding and writing looks like
    with open(tmp_path / "f", "xb") as f, pytest.raises(RuntimeError, match="tensor w changed size"):
        container.write_single(f, encoded)


def test_entry_bytes_are_read_in_slices(tmp_path: Path) -> None:
    from safeckpt import container
    from safeckpt.limits import DEFAULT_LIMITS

    weight = torch.randn(1000).t()
    (entry,) = container.encode_state({"w": weight}, DEFAULT_LIMITS).entries
    whole = weight.numpy().view(np.uint8).ravel()
    assert np.array_equal(entry.cpu_bytes().numpy(), whole)
    assert np.array_equal(entry.cpu_bytes(5, 17).numpy(), whole[5:17])
    assert np.array_equal(entry.cpu_bytes(3990).numpy(), whole[3990:])


class Recording(Parts):
    """:class:`Parts` that remember the longest read."""

    longest = 0

    def read(self, index: int, begin: int, end: int) -> np.ndarray:
        self.longest = max(self.longest, end - begin)
        return super().read(index, begin, end)


def test_hash_parts_match_hashlib_reading_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "PIECE", 3 * BLOCK + 5)
    inline = stream.INLINE_HASH
    parts = Recording([0, 7, inline - 1, inline, 3 * inline + 11, 3 * BLOCK + 5, 3 * BLOCK + 6])
    assert stream.hash_parts(parts.sizes, parts.read) == [hashlib.sha256(b).hexdigest() for b in parts.blobs]
    assert parts.longest == 3 * BLOCK + 5


def test_stream_reads_at_most_a_piece_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "PIECE", 2 * BLOCK + 3)  # smaller than a buffer and than a range
    monkeypatch.setattr(stream, "HASH_THREADS", 2)
    parts = Recording([100, 40 * BLOCK + 9, 3, 25 * BLOCK])  # the large parts span buffers and ranges
    head = b"h" * 100
    digests = _write(tmp_path / "p.bin", parts, head)
    _check(tmp_path / "p.bin", digests, parts, head)
    assert parts.longest == 2 * BLOCK + 3


def test_remote_stream_reads_tensors_a_piece_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from safeckpt import container, remote
    from safeckpt.limits import DEFAULT_LIMITS

    monkeypatch.setattr(stream, "PIECE", 1000)
    state = {"big": torch.arange(3000, dtype=torch.float32), "small": torch.ones(3), "empty": torch.ones(0)}
    encoded = container.encode_state(state, DEFAULT_LIMITS)
    longest = 0
    read = safeckpt.tensors.Entry.cpu_array

    def recording(entry: Any, begin: int = 0, end: int | None = None) -> np.ndarray:
        nonlocal longest
        array = read(entry, begin, end)
        longest = max(longest, array.size)
        return array

    monkeypatch.setattr(safeckpt.tensors.Entry, "cpu_array", recording)
    out = io.BytesIO()
    size, _ = remote.stream_single(out, encoded)
    assert longest == 1000 and size == len(out.getvalue())
    path = tmp_path / "streamed.safeckpt"
    path.write_bytes(out.getvalue())
    loaded = safeckpt.load(path, verify=True)
    assert sorted(loaded) == sorted(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
