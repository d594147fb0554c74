"""The bytes of one pickle, read ahead in chunks and never past what a limit allows.

:class:`PickleSource` is the byte-level half of the legacy VM (its base class):
it holds a window of the input (the whole input when it is ``bytes``), hands out
opcode arguments, and at the end puts a file back right after the pickle's STOP.
Arguments are decoded as Python's own ``pickle`` decodes them. A string, bytes
value or big integer is checked against ``Limits.max_str_len`` on its declared
length, before anything is read for it; a protocol 0 text argument is searched
for its newline only as far as ``max_str_len``.
"""

from __future__ import annotations

import pickletools
import struct
from typing import Any

from ..errors import CheckpointFormatError
from ..limits import Limits

__all__ = ["PickleSource"]

CHUNK = 1 << 16  # read ahead from a file this much at a time (the file is put back at STOP)
MAX_DECIMAL_DIGITS = 4300  # protocol 0 integers: Python's own int-from-text limit (quadratic past it)

_U2 = struct.Struct("<H")
_I4 = struct.Struct("<i")
_U4 = struct.Struct("<I")
_U8 = struct.Struct("<Q")
_F8 = struct.Struct(">d")


class PickleSource:
    """Input of one pickle: ``bytes`` or a file-like object with ``read``, ``tell`` and ``seek``.

    Attributes:
        read_ahead: bytes read from a file at a time, at least (then doubling with what is
            held); a caller starting many short reads in one large buffer sets it small.
    """

    read_ahead = CHUNK

    def __init__(self, source: Any, limits: Limits) -> None:
        self._limits = limits
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._file = None
            self._buf = bytes(source)
            self._start = 0
        else:
            self._file = source
            self._buf = b""
            self._start = source.tell()
        self._i = 0  # next byte, in _buf
        self._n = len(self._buf)
        self._origin = self._start  # offset of _buf[0] in the input
        self._pos = self._start  # offset of the opcode being run (error messages, findings)

    @property
    def bytes_read(self) -> int:
        """Bytes of the pickle consumed so far."""
        return self._origin + self._i - self._start

    def _error(self, message: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"malformed pickle at byte {self._pos}: {message}", offset=self._pos)

    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available from ``_i``; False at the end of the input."""
        if self._file is None:
            return False
        rest = self._buf[self._i :]
        self._origin += self._i
        chunks = [rest]
        have = len(rest)
        target = max(need, have + max(self.read_ahead, have))  # doubling: a long text line is read in O(its length)
        while have < target:
            data = self._file.read(target - have)
            if not data:
                break
            chunks.append(data)
            have += len(data)
        self._buf = b"".join(chunks)
        self._i = 0
        self._n = have
        return have >= need

    def _need(self, n: int) -> int:
        """Fill for an ``n``-byte field; returns the new ``_i``."""
        if not self._fill(n):
            raise self._error(f"expected {n} bytes but only {self._n - self._i} remain")
        return self._i

    def _take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes (a declared length: checked against ``max_str_len`` first)."""
        if n > 8:
            self._limits.check("max_str_len", n, what=f"the declared length of a pickled {what}")
        i = self._i
        j = i + n
        if j > self._n:
            if not self._fill(n):
                raise self._error(f"expected {n} bytes in a {what}, but only {self._n - self._i} remain")
            i = self._i
            j = i + n
        self._i = j
        return self._buf[i:j]

    def _end(self) -> None:
        """Put a file right after the STOP just read; drop the window."""
        if self._file is not None:
            self._file.seek(self._origin + self._i)
        self._buf = b""
        self._n = self._i = 0

    # fixed-size fields ------------------------------------------------------------------

    def _u1(self) -> int:
        i = self._i
        if i >= self._n:
            i = self._need(1)
        self._i = i + 1
        return self._buf[i]

    def _u2(self) -> int:
        i = self._i
        if i + 2 > self._n:
            i = self._need(2)
        self._i = i + 2
        return _U2.unpack_from(self._buf, i)[0]  # type: ignore[no-any-return]

    def _i4(self) -> int:
        i = self._i
        if i + 4 > self._n:
            i = self._need(4)
        self._i = i + 4
        return _I4.unpack_from(self._buf, i)[0]  # type: ignore[no-any-return]

    def _u4(self) -> int:
        i = self._i
        if i + 4 > self._n:
            i = self._need(4)
        self._i = i + 4
        return _U4.unpack_from(self._buf, i)[0]  # type: ignore[no-any-return]

    def _u8(self) -> int:
        i = self._i
        if i + 8 > self._n:
            i = self._need(8)
        self._i = i + 8
        return _U8.unpack_from(self._buf, i)[0]  # type: ignore[no-any-return]

    def _f8(self) -> float:
        i = self._i
        if i + 8 > self._n:
            i = self._need(8)
        self._i = i + 8
        return _F8.unpack_from(self._buf, i)[0]  # type: ignore[no-any-return]

    # protocol 0 text ----------------------------------------------------------------------

    def _line(self) -> bytes:
        """A newline-terminated argument, without its newline (at most ``max_str_len`` bytes)."""
        cap = self._limits.max_str_len + 1
        searched = 0
        while True:
            i = self._i
            k = self._buf.find(b"\n", i + searched, min(self._n, i + cap))
            if k >= 0:
                self._i = k + 1
                return self._buf[i:k]
            searched = self._n - i
            if searched >= cap:
                self._limits.check("max_str_len", cap, what="a protocol 0 text argument")
            if not self._fill(searched + 1):
                raise self._error("no newline found when trying to read a protocol 0 text argument")

    def _decimal(self, text: bytes, base: int = 10) -> int:
        if len(text) > MAX_DECIMAL_DIGITS:
            raise self._error(f"a protocol 0 integer of {len(text)} characters (more than {MAX_DECIMAL_DIGITS})")
        return int(text, base)

    # skipping -------------------------------------------------------------------------------

    def skip(self) -> int:
        """Read past the pickle without interpreting it (the file is left right after its STOP).

        Returns:
            the number of opcodes skipped.
        """
        fixed, counted = _FIXED, _COUNTED
        count = 0
        while True:
            i = self._i
            if i >= self._n:
                if not self._fill(1):
                    raise self._error("pickle ended without STOP")
                i = self._i
            self._pos = self._origin + i
            self._i = i + 1
            code = self._buf[i]
            count += 1
            n = fixed.get(code)
            if n is not None:
                if n:
                    i = self._i
                    if i + n > self._n:
                        i = self._need(n)
                    self._i = i + n
                elif code == 0x2E:  # STOP
                    self._end()
                    return count
            elif code in counted:
                size = counted[code](self)
                if size < 0:
                    raise self._error("a negative length")
                self._take(size, "value")
            elif code in _LINES:
                for _ in range(_LINES[code]):
                    self._line()
            else:
                raise self._error(f"opcode 0x{code:02x} is not a pickle opcode")


def _opcode_shapes() -> tuple[dict[int, int], dict[int, Any], dict[int, int]]:
    fixed: dict[int, int] = {}
    counted: dict[int, Any] = {}
    lines: dict[int, int] = {}
    readers = {-2: PickleSource._u1, -3: PickleSource._i4, -4: PickleSource._u4, -5: PickleSource._u8}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        n = op.arg.n if op.arg is not None else 0
        if n >= 0:
            fixed[code] = n
        elif n == pickletools.UP_TO_NEWLINE:
            lines[code] = 2 if op.name in ("GLOBAL", "INST") else 1
        else:
            counted[code] = readers[n]
    return fixed, counted, lines


_FIXED, _COUNTED, _LINES = _opcode_shapes()
