"""Pickle-free collectives: telling every rank how an operation went on the others.

``torch.distributed.broadcast_object_list`` and ``all_gather_object`` pickle
their payload, which safeckpt never does. Here an outcome is a small JSON
document (``{"ok": true, "result": ...}`` or the failure's exception type,
message and structured attributes) sent as a ``uint8`` tensor after an
``int64`` tensor holding its length, so every rank always runs the same
collectives in the same order whatever happened locally: a failure can never
leave the other ranks waiting at a barrier.

A rank that receives a failure rebuilds an exception of the same class when the
class is on a fixed allowlist (safeckpt's errors and common builtins), else a
``RuntimeError``; nothing is imported by name.
"""

from __future__ import annotations

import builtins
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import errors
from ..handler import Reporter

__all__ = ["Outcome", "all_gather_outcomes", "broadcast_outcome", "describe", "dist_ready", "raise_own", "world"]

_MAX_MESSAGE = 8 * 1024  # characters of an error message that are sent
_MAX_PAYLOAD = 1 << 20  # bytes a rank accepts from another
_ATTRS = ("path_in_state", "value_type", "file", "offset", "limit", "maximum", "actual", "tensor_name", "expected", "name")

_SAFECKPT_ERRORS = {name: getattr(errors, name) for name in errors.__all__ if name != "FallbackWarning"}
_BUILTIN_ERRORS = {
    cls.__name__: cls
    for cls in (
        OSError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
        TimeoutError, ValueError, TypeError, KeyError, IndexError, RuntimeError, MemoryError, NotImplementedError,
    )
}


def dist_ready() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collective tensors must live for the default group's backend (NCCL needs CUDA)."""
    backend = str(torch.distributed.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Outcome:
    """How an operation went on one rank.

    Attributes:
        rank: the rank it happened on.
        ok: True on success.
        result: a JSON value the rank reported on success (e.g. the path it wrote).
        error: on failure: ``type`` (qualified name), ``message``, ``errno``, ``filename``, ``attrs``.
    """

    rank: int
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None

    def exception(self, receiver: int, action: str) -> BaseException:
        """The failure as an exception to raise on rank ``receiver``.

        The class is the original one when it is on the allowlist, else ``RuntimeError``.
        The message names the failing rank, what failed, and the receiving rank. The
        exception carries ``source_rank`` and ``remote_type`` attributes.
        """
        error = self.error or {}
        type_name = str(error.get("type", "RuntimeError"))
        short = type_name.rpartition(".")[2]
        if type_name.startswith("safeckpt."):
            cls: type[BaseException] = _SAFECKPT_ERRORS.get(short, RuntimeError)
        else:
            cls = _BUILTIN_ERRORS.get(type_name, RuntimeError)
        message = f"rank {self.rank} failed to {action}: {type_name}: {error.get('message', '')} (raised on rank {receiver})"
        exc: BaseException
        if issubclass(cls, OSError) and isinstance(error.get("errno"), int):
            exc = cls(error["errno"], message, *([error["filename"]] if isinstance(error.get("filename"), str) else []))
        else:
            exc = cls(message)
        for attr, value in (error.get("attrs") or {}).items():
            if attr in _ATTRS and hasattr(exc, attr):
                setattr(exc, attr, value)
        exc.source_rank = self.rank  # type: ignore[attr-defined]
        exc.remote_type = type_name  # type: ignore[attr-defined]
        return exc


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def describe(exc: BaseException) -> dict[str, Any]:
    """The JSON description of ``exc`` that :meth:`Outcome.exception` rebuilds."""
    cls = type(exc)
    if cls.__module__.startswith("safeckpt"):
        type_name = f"safeckpt.{cls.__qualname__}"
    elif cls.__module__ == "builtins" and getattr(builtins, cls.__qualname__, None) is cls:
        type_name = cls.__qualname__
    else:
        type_name = f"{cls.__module__}.{cls.__qualname__}"
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    attrs = {attr: _jsonable(getattr(exc, attr)) for attr in _ATTRS if hasattr(exc, attr)}
    out: dict[str, Any] = {"type": type_name, "message": str(message)[:_MAX_MESSAGE], "attrs": attrs}
    if isinstance(exc, OSError):
        out["errno"] = exc.errno if isinstance(exc.errno, int) else None
        out["filename"] = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
    return out


def _encode(error: BaseException | None, result: Any) -> bytes:
    doc = {"ok": True, "result": _jsonable(result)} if error is None else {"ok": False, "error": describe(error)}
    raw = json.dumps(doc).encode("utf-8")
    if len(raw) > _MAX_PAYLOAD:  # an enormous result or message: keep the verdict, drop the detail
        raw = json.dumps({"ok": error is None, "error": {"type": "RuntimeError", "message": "outcome too large to send"}}).encode()
    return raw


def _decode(rank: int, raw: bytes) -> Outcome:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        doc = f"unreadable outcome: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        message = doc if isinstance(doc, str) else "not an outcome document"
        return Outcome(rank, False, error={"type": "RuntimeError", "message": message})
    error = doc.get("error")
    return Outcome(rank, doc["ok"], doc.get("result"), error if isinstance(error, dict) else None)


def broadcast_outcome(error: BaseException | None = None, result: Any = None, *, src: int = 0) -> Outcome:
    """Send rank ``src``'s outcome to every rank; every rank of the default group must call it.

    Args:
        error: on rank ``src``, the exception its operation raised, or ``None``.
        result: on rank ``src``, a JSON-able value to hand to every rank on success.
        src: the sending rank.

    Returns:
        Rank ``src``'s :class:`Outcome`, on every rank.
    """
    dist = torch.distributed
    device = _device()
    if dist.get_rank() == src:
        raw = _encode(error, result)
        size = torch.tensor([len(raw)], dtype=torch.int64, device=device)
        dist.broadcast(size, src)
        dist.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device), src)
        return _decode(src, raw)
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    length = int(size.item())
    body = torch.empty(length, dtype=torch.uint8, device=device)
    dist.broadcast(body, src)
    if not 0 < length <= _MAX_PAYLOAD:
        return Outcome(src, False, error={"type": "RuntimeError", "message": f"outcome of {length} bytes refused"})
    return _decode(src, body.cpu().numpy().tobytes())


def all_gather_outcomes(error: BaseException | None = None, result: Any = None) -> list[Outcome]:
    """Every rank's outcome, on every rank; every rank of the default group must call it.

    Args:
        error: this rank's exception, or ``None`` on success.
        result: a JSON-able value this rank reports on success.

    Returns:
        One :class:`Outcome` per rank, in rank order.
    """
    dist = torch.distributed
    device = _device()
    raw = _encode(error, result)
    world_size = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(raw)], dtype=torch.int64, device=device))
    lengths = [int(s.item()) for s in sizes]
    width = max(lengths)
    mine = torch.zeros(width, dtype=torch.uint8, device=device)
    mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    bodies = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world_size)]
    dist.all_gather(bodies, mine)
    return [_decode(r, bodies[r][: lengths[r]].cpu().numpy().tobytes()) for r in range(world_size)]


def raise_own(error: BaseException | None, reporter: Reporter, action: str) -> None:
    """Raise this rank's own failure, if any, once the ranks have exchanged outcomes: a
    ``BaseException`` (``KeyboardInterrupt``...) as it is, an ``Exception`` through the reporter
    (``nn_handler.raise_error``) with the message "Rank R failed to ``action``: ...".
    """
    if error is None:
        return
    if not isinstance(error, Exception):
        raise error
    reporter.fail(error, f"Rank {reporter.rank} failed to {action}: {error}")
