"""Writing a file's parts to disk, hashing them on the way.

The file is a sequence of parts (a header placeholder, then tensors),
cut into ``HASH_THREADS`` contiguous ranges written in parallel. A range's
thread copies its bytes into page-aligned bounce buffers (``CHUNK`` bytes) and
hashes each piece right after copying it, while it is still in that core's
cache (1.5x faster than hashing from memory, and hashing from another thread
loses that); a writer pool writes the full buffers at their offsets. A digest
is fed by the range where its part starts; the one part that runs on into the
next range finishes its digest from its source afterwards. Memory stays at a
few buffers per range whatever the size of the file: parts are read ``PIECE``
bytes at a time, so an accelerator's tensor is copied to the host piece by piece.

On Linux, files of at least ``DIRECT_MIN_BYTES`` are written with ``O_DIRECT``:
from the buffers straight to the disk, without copying them into the page cache
and writing that back before the ``fsync``, and without evicting the training
job's cached files (a load right after the save reads from disk). Smaller
files, and files where direct I/O is refused (tmpfs, other systems), go through
the page cache, with writeback started every ``SYNC_EVERY`` bytes.

The first bytes of the file (the header placeholder) are held back and written
last, by :meth:`Stream.finish`, with the final header in their place.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Digest", "Stream", "hash_parts", "open_stream", "pieces"]

DIRECT_MIN_BYTES = 64 << 20  # smaller files go through the page cache: warm for a load right after
BLOCK = 4096  # alignment of direct I/O offsets and lengths (a multiple of every common sector size)
CHUNK = 4 << 20  # bytes per buffer (direct I/O): hashed from the cache, written in one call
BUFFERED_CHUNK = 1 << 20  # through the page cache, where large writes gain nothing: less memory
DEPTH = 3  # buffers per range: one being filled, the others being written
INLINE_HASH = 1 << 20  # hash_parts: smaller parts are hashed by the calling thread
PIECE = 16 << 20  # most bytes of a part read at once: an accelerator's tensor is copied to the host piece by piece
HASH_THREADS = min(4, os.cpu_count() or 1)  # threads copying and hashing ranges (SHA-256 is the costliest step)
WRITE_THREADS = 2  # writes in flight: the disk stays busy while one writer waits for the GIL
MIN_RANGE = 16 << 20  # a range smaller than this is not worth a thread
RANGES_PER_THREAD = 4
SYNC_EVERY = 256 << 20  # page-cache writes: bytes between writebacks started in the background


class Digest(Protocol):
    """A ``hashlib`` object."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


class Stream:
    """A file written in parallel ranges through bounce buffers (see the module docstring).

    Args:
        fd: the empty file's descriptor, with ``O_DIRECT`` set or not. If a direct
            write is refused (``EINVAL``), the flag is cleared and that write and
            all later ones go through the page cache.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._direct = _is_direct(fd)
        self._writer = ThreadPoolExecutor(WRITE_THREADS, "safeckpt-write")
        self._held = _aligned(BLOCK)
        self._size = 0
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._unsynced = 0
        self._syncer: threading.Thread | None = None
        self._sizes: list[int] = []
        self._starts: list[int] = []
        self._read: Callable[[int, int, int], np.ndarray] = _nothing
        self._digests: list[str] = []
        self._new_digest: Callable[[], Digest] = hashlib.sha256

    def write(
        self, sizes: list[int], read: Callable[[int, int, int], np.ndarray], *, hold: int, new_digest: Callable[[], Digest]
    ) -> list[str]:
        """Write parts of ``sizes`` bytes from offset 0, keeping the first ``hold`` bytes for :meth:`finish`.

        ``read(index, begin, end)`` gives bytes ``[begin, end)`` of part ``index`` as a flat
        ``uint8`` array, when they are written, at most ``PIECE`` bytes at a time (nothing is
        allocated per part up front: with 20,000 parts, the garbage collector's passes over the
        caller's objects would cost more than the writing).

        Returns:
            the hex digest of each part, from ``new_digest`` objects that live only while
            their part is being hashed (20,000 at once would weigh 9 MiB).
        """
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        self._sizes, self._starts, self._read, self._new_digest = sizes, starts, read, new_digest
        empty = new_digest().hexdigest()
        self._digests = [empty] * len(sizes)  # zero-size parts keep it
        self._size = size = starts[-1]
        held = min(_round_up(max(hold, 1)), _round_up(size)) if size else 0
        self._held = _aligned(max(held, BLOCK))
        bounds = _ranges(starts, held, size)
        ranges: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        for lo, hi in zip(bounds, bounds[1:]):
            ranges.put((lo, hi))
        helpers = min(HASH_THREADS, len(bounds) - 1) - 1
        with ThreadPoolExecutor(max(helpers, 1), "safeckpt-hash") as pool:
            jobs = [pool.submit(self._write_ranges, ranges) for _ in range(helpers)]
            try:
                self._write_ranges(ranges)
            finally:
                errors = [job.exception() for job in jobs]
        for error in errors:
            if error is not None:
                raise error
        return self._digests

    def finish(self, head: bytes) -> None:
        """Put ``head`` over the first bytes, write them, cut the padding and fsync the file."""
        assert len(head) <= len(self._held), "the head to replace must lie in the bytes held back"
        if self._syncer is not None:
            self._syncer.join()
        self._held[: len(head)] = np.frombuffer(head, dtype=np.uint8)
        self._pwrite(self._held, _round_up(min(len(self._held), self._size)), 0)
        os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)

    def close(self) -> None:
        """Stop the writer threads once their queued writes are done."""
        self._failed.set()
        self._writer.shutdown(wait=True)
        if self._syncer is not None:
            self._syncer.join()

    # ------------------------------------------------------------------ one range

    def _write_ranges(self, ranges: queue.SimpleQueue[tuple[int, int]]) -> None:
        """Take ranges until none is left, with this thread's buffers."""
        spare = [_aligned(CHUNK if self._direct else BUFFERED_CHUNK) for _ in range(DEPTH)]
        try:
            while not self._failed.is_set():
                try:
                    lo, hi = ranges.get_nowait()
                except queue.Empty:
                    return
                self._write_range(lo, hi, _Buffers(self, lo, spare, self._held if lo == 0 else None))
        except BaseException:
            self._failed.set()  # the other threads stop at their next part
            raise

    def _write_range(self, lo: int, hi: int, buffers: _Buffers) -> None:
        """Copy bytes [lo, hi) into buffers and write them; hash the parts starting in the range."""
        sizes, starts, read, new_digest, failed = self._sizes, self._starts, self._read, self._new_digest, self._failed
        unfinished = []
        for index in range(bisect.bisect_right(starts, lo) - 1, len(sizes)):
            start, size = starts[index], sizes[index]
            if start >= hi:
                break
            if failed.is_set():
                return
            if not size:
                continue
            digest = new_digest() if start >= lo else None
            begin, end = max(lo, start) - start, min(hi, start + size) - start
            for piece_begin, piece_end in pieces(begin, end):
                buffers.copy(read(index, piece_begin, piece_end), start + piece_begin, digest)
            if digest is None:
                continue
            if end < size:
                unfinished.append((index, digest, end))
            else:
                self._digests[index] = digest.hexdigest()
        buffers.flush()
        for index, digest, end in unfinished:  # the part running on into the next range: the rest from its source
            for piece_begin, piece_end in pieces(end, sizes[index]):
                digest.update(read(index, piece_begin, piece_end))
            self._digests[index] = digest.hexdigest()

    # ------------------------------------------------------------------ the file

    def _submit(self, buffer: np.ndarray, length: int, offset: int) -> Future[None]:
        return self._writer.submit(self._pwrite, buffer, length, offset)

    def _pwrite(self, buffer: np.ndarray, length: int, offset: int) -> None:
        done = 0
        while done < length:
            try:
                done += _write_at(self._fd, buffer[done:length].data, offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                with self._lock:
                    _set_direct(self._fd, False)  # refused: through the page cache from now on
                    self._direct = _is_direct(self._fd)
                if self._direct:
                    raise
        if not self._direct:
            with self._lock:
                self._unsynced += length
                if self._unsynced >= SYNC_EVERY and not (self._syncer and self._syncer.is_alive()):
                    self._unsynced = 0
                    self._syncer = threading.Thread(target=_datasync, args=(self._fd,), daemon=True)
                    self._syncer.start()


class _Buffers:
    """The bounce buffers of one range: filled in order, written when full, reused once written."""

    def __init__(self, stream: Stream, lo: int, spare: list[np.ndarray], held: np.ndarray | None) -> None:
        self._stream = stream
        self._spare = spare  # the thread's, back in it after :meth:`flush`
        self._busy: collections.deque[tuple[np.ndarray, Future[None]]] = collections.deque()
        self._buffer = held if held is not None else self._take()
        self._offset = lo  # file offset of the buffer's first byte
        self._fill = 0
        self._held = held

    def copy(self, data: np.ndarray, offset: int, digest: Digest | None) -> None:
        assert offset == self._offset + self._fill, "parts must arrive in file order"
        pos = 0
        while pos < len(data):
            n = min(len(self._buffer) - self._fill, len(data) - pos)
            piece = self._buffer[self._fill : self._fill + n]
            np.copyto(piece, data[pos : pos + n])  # releases the GIL, unlike a slice assignment
            if digest is not None:
                digest.update(piece)
            self._fill += n
            pos += n
            if self._fill == len(self._buffer):
                self._next()

    def flush(self) -> None:
        """Write the last, partial buffer (padded to a block: the padding past the file's end is cut later) and wait."""
        if self._buffer is not self._held:
            if self._fill:
                self._busy.append((self._buffer, self._stream._submit(self._buffer, _round_up(self._fill), self._offset)))
            else:
                self._spare.append(self._buffer)
        while self._busy:
            buffer, job = self._busy.popleft()
            job.result()
            self._spare.append(buffer)

    def _next(self) -> None:
        if self._buffer is not self._held:
            self._busy.append((self._buffer, self._stream._submit(self._buffer, self._fill, self._offset)))
        self._offset += self._fill
        self._fill = 0
        self._buffer = self._take()

    def _take(self) -> np.ndarray:
        if not self._spare:
            buffer, job = self._busy.popleft()
            job.result()
            self._spare.append(buffer)
        return self._spare.pop()


def _ranges(starts: list[int], held: int, size: int) -> list[int]:
    """Range boundaries ``[0, b1, ..., size]``: about ``RANGES_PER_THREAD`` ranges per thread (so that
    a thread slowed down leaves more to the others), block-aligned, each at least ``MIN_RANGE``,
    cut just before a part's start (so that little of the part ending there is hashed from its source)."""
    bounds = [0]
    count = HASH_THREADS * RANGES_PER_THREAD
    for k in range(1, count):
        target = held + (size - held) * k // count
        nearest = starts[min(bisect.bisect_left(starts, target), len(starts) - 1)]
        cut = nearest - nearest % BLOCK
        if cut - max(bounds[-1], held) >= MIN_RANGE and size - cut >= MIN_RANGE:
            bounds.append(cut)
    bounds.append(size)
    return bounds


def _aligned(size: int) -> np.ndarray:
    """A page-aligned ``uint8`` buffer (anonymous memory, committed as it is touched)."""
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


def _write_at(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    with _SEEK_LOCK:  # pragma: no cover - Windows has no pwrite
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


_SEEK_LOCK = threading.Lock()


def _datasync(fd: int) -> None:
    try:
        getattr(os, "fdatasync", os.fsync)(fd)  # macOS and Windows have no fdatasync
    except OSError:  # the final fsync reports real failures
        pass


def hash_parts(sizes: list[int], read: Callable[[int, int, int], np.ndarray]) -> list[str]:
    """SHA-256 hex digests of parts of ``sizes`` bytes, read as in :meth:`Stream.write`; the
    large parts on ``HASH_THREADS`` threads.

    For writers that must know the digests before the data (a stream that cannot seek
    back): the bytes are hashed from memory, without the cache-hot copy, and read again
    to be written (an accelerator's tensor is copied to the host twice, a piece at a time).
    """

    def digest(index: int) -> str:
        h = hashlib.sha256()
        for begin, end in pieces(0, sizes[index]):
            h.update(read(index, begin, end).data)
        return h.hexdigest()

    with ThreadPoolExecutor(HASH_THREADS, "safeckpt-hash") as pool:
        large = {i: pool.submit(digest, i) for i, size in enumerate(sizes) if size >= INLINE_HASH}
        return [large[i].result() if i in large else digest(i) for i in range(len(sizes))]


def pieces(begin: int, end: int) -> Iterable[tuple[int, int]]:
    """``[begin, end)`` cut into ranges of at most ``PIECE`` bytes (none when it is empty)."""
    if end - begin <= PIECE:  # nearly always: a tuple, no generator per part
        return ((begin, end),) if end > begin else ()
    return [(b, min(end, b + PIECE)) for b in range(begin, end, PIECE)]


def _nothing(index: int, begin: int, end: int) -> np.ndarray:
    raise AssertionError("no parts to read before write()")


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _is_direct(fd: int) -> bool:
    return fcntl is not None and hasattr(os, "O_DIRECT") and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether the flag is now as asked (a file system may refuse it)."""
    if fcntl is None or not hasattr(os, "O_DIRECT"):
        return not on
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:  # EINVAL: no direct I/O on this file system (tmpfs...)
        return False
    return True


@contextlib.contextmanager
def open_stream(f: BinaryIO, size: int) -> Iterator[Stream]:
    """A :class:`Stream` over the empty file ``f``, which will receive ``size`` bytes.

    Direct I/O for at least ``DIRECT_MIN_BYTES`` where the file system takes it.
    On exit ``f`` is back in its own mode and positioned at the end of the file.
    """
    f.flush()
    fd = f.fileno()
    direct = size >= DIRECT_MIN_BYTES and _set_direct(fd, True)
    stream = Stream(fd)
    try:
        yield stream
    finally:
        stream.close()
        if direct:
            _set_direct(fd, False)
        f.seek(0, os.SEEK_END)
