"""Where the ``safeckpt`` command line writes, and the one place its text is made safe for a terminal.

Every line the CLI prints (stdout reports, stderr errors, progress bars,
argparse messages) goes through :func:`terminal_text`: file names, tensor
names, keys, metadata and error messages come from files an attacker may have
written, and ESC/OSC/BEL sequences, carriage returns, backspaces or Unicode
bidirectional controls in them could rewrite what the user sees ("safe: no
class references" over a verdict). ``--json`` output is left exact:
``json.dumps`` escapes every control and non-ASCII character itself.

This module does not import torch, so ``safeckpt --help``, ``--version`` and
``scan`` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import UnsafeCheckpointError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "JSON_SCHEMA_VERSION",
    "Out",
    "Progress",
    "collect_files",
    "error_fields",
    "human_bytes",
    "message",
    "plural",
    "print_error",
    "terminal_text",
]

EXIT_OK = 0
"""The command succeeded: the file is safe, digests match, the checkpoints are identical."""
EXIT_FAILED = 1
"""A finding: a dangerous file or refused conversion, a digest mismatch, differences between checkpoints."""
EXIT_USAGE = 2
"""An error: bad arguments, a file that is not a checkpoint, a missing file, anything else that went wrong."""
JSON_SCHEMA_VERSION = 1
"""``schema_version`` of every ``--json`` document; bumped when a field changes meaning or goes away."""


# --------------------------------------------------------------------------- escaping


def _escape_char(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal_text(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every non-printable character written as an escape (``\\x1b``, ``\\u202e``).

    Non-printable is what :meth:`str.isprintable` says: C0/C1 controls (ESC, BEL,
    CR, backspace, DEL), format characters (bidi overrides and isolates,
    zero-width characters), line and paragraph separators, and lone surrogates
    (undecodable bytes of a file name). The space is kept.

    Args:
        text: anything; non-str values are converted with ``str`` first.
        keep_newlines: keep ``\\n`` (for multi-line text the CLI itself wrote, such as ``--help``).
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(
        c if c.isprintable() or (keep_newlines and c == "\n") else _escape_char(c) for c in s
    )


# --------------------------------------------------------------------------- small formatting helpers


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact bytes under 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def plural(n: int, noun: str) -> str:
    """``(1, "key")`` -> ``"1 key"``, ``(3, "key")`` -> ``"3 keys"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def collect_files(paths: Sequence[str], recursive: bool, wanted: Callable[[Path], bool]) -> list[Path]:
    """Files named on the command line, with directories replaced by the files in them that ``wanted`` accepts."""
    found: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            inside = sorted(p.rglob("*") if recursive else p.iterdir())
            found.extend(f for f in inside if f.is_file() and not f.name.startswith(".") and wanted(f))
        else:
            found.append(p)
    return found


# --------------------------------------------------------------------------- errors


def message(exc: BaseException, path: object = None) -> str:
    """What went wrong, in one line, naming the file once (``path`` is added when the message lacks it)."""
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        text = f"{exc.filename}: no such file"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if path is not None and str(path) not in text:
        text = f"{path}: {text}"
    return text


def error_fields(exc: BaseException, path: object = None) -> dict[str, Any]:
    """The ``error`` object of a ``--json`` document."""
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": message(exc, path)}
    for attr in ("file", "tensor_name", "path_in_state", "limit"):
        if getattr(exc, attr, None) is not None:
            fields[attr] = getattr(exc, attr)
    if isinstance(exc, UnsafeCheckpointError):
        fields["globals"] = list(exc.globals)
    return fields


def print_error(command: str | None, text: str, stream: TextIO | None = None) -> None:
    """One escaped ``safeckpt COMMAND: error: ...`` line on stderr."""
    where = f"safeckpt {command}" if command else "safeckpt"
    print(terminal_text(f"{where}: {text}"), file=sys.stderr if stream is None else stream)


# --------------------------------------------------------------------------- output


class LocalOnly:
    """What :attr:`Out.remote` is before a command runs: no URL arguments, nothing to rename.

    :mod:`safeckpt.cli_remote` (which imports the storage layer) is loaded only when a
    command runs, so ``--help`` and ``--version`` stay fast.
    """

    options: dict[str, Any] = {}

    def shown(self, value: Any) -> Any:
        return value

    def local(self, arg: str, *, recursive: bool = True) -> str:
        return arg

    def close(self) -> None:
        pass


class Out:
    """Where a command writes: human lines or one JSON document on stdout, errors and progress on stderr."""

    def __init__(self, args: argparse.Namespace, remote: Any = None) -> None:
        self.args = args
        self.json: bool = args.json
        self.remote: Any = remote if remote is not None else LocalOnly()
        """The command's URL arguments (a :class:`safeckpt.cli_remote.Remote`, set by :func:`safeckpt.cli.main`
        when a command runs): what is printed names them, never their local copies."""

    def line(self, text: str = "") -> None:
        """One human line on stdout (nothing with ``--json``), escaped."""
        if not self.json:
            print(terminal_text(self.remote.shown(text)), file=sys.stdout)

    def error(self, text: str) -> None:
        """One error line on stderr (also with ``--json``, whose document carries the details)."""
        print_error(self.args.command, f"error: {self.remote.shown(text)}")

    def warning(self, text: str) -> None:
        """One warning line on stderr."""
        print_error(self.args.command, f"warning: {self.remote.shown(text)}")

    def table(self, rows: Sequence[Sequence[str]], indent: int = 2) -> None:
        """Rows of columns, every column but the last padded to its widest cell (at most 48)."""
        if not rows or self.json:
            return
        rows = [[terminal_text(cell) for cell in row] for row in rows]  # widths of what is shown
        widths = [min(48, max(len(r[i]) for r in rows if len(r) > i)) for i in range(max(map(len, rows)) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
            self.line((" " * indent + "  ".join(cells)).rstrip())

    def document(self, doc: dict[str, Any]) -> None:
        """The ``--json`` document (nothing without ``--json``); ``json.dumps`` escapes control characters."""
        if self.json:
            body = {"schema_version": JSON_SCHEMA_VERSION, "command": self.args.command, **self.remote.shown(doc)}
            print(json.dumps(body, indent=2, default=str, ensure_ascii=True), file=sys.stdout)

    def progress(self, label: str, total: int = 0, unit: str = "") -> Progress:
        return Progress(self.remote.shown(label), total, enabled=not self.args.quiet, unit=unit)


# --------------------------------------------------------------------------- progress bar


class Progress:
    """A one-line progress bar on a terminal, shown only for work that lasts over ``delay`` seconds.

    It writes ``\\r`` updates to ``stream`` (stderr by default) and only when that
    stream is a TTY and ``enabled`` is true; it erases itself when closed. The
    label is escaped (it may hold a file name).

    Args:
        label: what is being done.
        total: units of work (``0`` when unknown).
        enabled: false with ``--quiet``.
        unit: ``"bytes"`` to show sizes, anything else to show counts.
        stream: where to draw (default ``sys.stderr`` at construction time).
        delay: seconds before the bar first appears.
    """

    WIDTH = 24

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool = True,
        unit: str = "",
        stream: TextIO | None = None,
        delay: float = 1.0,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.label = terminal_text(label)
        self.total = total
        self.unit = unit
        self.done = 0
        self.delay = delay
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled and callable(isatty) and bool(isatty())
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units done and redraw (at most ten times a second)."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < self.delay or (self._drawn and now - self._last < 0.1 and self.done < self.total):
            return
        self._last = now
        self._draw()

    def _count(self, n: int) -> str:
        return human_bytes(n) if self.unit == "bytes" else str(n)

    def _draw(self) -> None:
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            text = f"{self.label} [{bar}] {frac * 100:3.0f}% {self._count(self.done)}/{self._count(self.total)}"
        else:
            text = f"{self.label} {self._count(self.done)}"
        self.stream.write("\r" + text[:120])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar, if it was drawn."""
        if self._drawn:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
            self._drawn = False
