"""Asynchronous saves: freeze the bytes of a state now, write them on a background thread.

:func:`freeze` runs on the caller's thread. The state is already encoded (its
skeleton packed, so later changes to plain values cannot leak in); freezing
copies each tensor entry's bytes to CPU memory once, exactly the bytes that
will be written (tied weights once), so the caller may change or free its
tensors as soon as it returns.

:class:`BackgroundWriter` runs one job at a time: submitting waits for the
previous job first, so at most one frozen state is held in memory. An exception
in the background is kept and raised by the next :meth:`~BackgroundWriter.join`,
never lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import torch

from .container import Encoded

__all__ = ["BackgroundWriter", "freeze"]


def _same(data: torch.Tensor) -> torch.Tensor:
    return data


def freeze(encoded: Encoded) -> int:
    """Copy the tensor bytes of ``encoded`` to CPU memory owned by it.

    Returns:
        The number of bytes copied.
    """
    copied = 0
    for entry in encoded.entries:
        data = entry.cpu_bytes().clone()  # the caller's tensors are not read again
        entry.source = partial(_same, data)
        copied += entry.nbytes
    return copied


class BackgroundWriter:
    """One background thread at a time; its failure is re-raised by :meth:`join`.

    Args:
        name: the thread name (shown in debuggers and tracebacks).
    """

    def __init__(self, name: str = "safeckpt-writer") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.pending: object = None  # what the running job is writing (the manager keeps its step here)

    @property
    def busy(self) -> bool:
        """True while a job is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], tag: object = None) -> None:
        """Run ``job`` in the background, after waiting for (and raising the failure of) the previous one."""
        self.join()
        self.pending = tag

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # kept for join(); a thread cannot raise to its caller
                self._error = exc

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the running job; raise the exception it failed with, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.pending = None
        error, self._error = self._error, None
        if error is not None:
            raise error
