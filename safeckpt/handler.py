"""The ``nn_handler`` protocol of the seed API: logging, error routing and the rank.

``nn_handler`` may be any object or ``None``. If it has ``log(msg)`` that is used
for success messages, if it has ``raise_error(exc_type, message, cause)`` failures
go through it (it raises), and the rank comes from ``_rank``, else ``rank``, else
``torch.distributed`` when initialised, else 0. With ``None`` the ``logging``
logger ``"safeckpt"`` is used. Every line names the rank.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import torch

__all__ = ["Reporter", "logger"]

logger = logging.getLogger("safeckpt")


def rank_of(nn_handler: Any) -> int:
    """The process rank as the seed API reads it."""
    for attr in ("_rank", "rank"):
        value = getattr(nn_handler, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class Reporter:
    """Speaks for one save or load on behalf of ``nn_handler``."""

    def __init__(self, nn_handler: Any) -> None:
        self.handler = nn_handler
        self.rank = rank_of(nn_handler)

    def log(self, message: str) -> None:
        log = getattr(self.handler, "log", None)
        if callable(log):
            log(message)
        else:
            logger.info(message)

    def fail(self, exc: BaseException, message: str) -> NoReturn:
        """Raise ``exc`` with ``message`` (which names the rank), through ``raise_error`` when present."""
        raise_error = getattr(self.handler, "raise_error", None)
        if callable(raise_error):
            raise_error(type(exc), message, exc)
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(message)
        raise exc
