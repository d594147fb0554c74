"""Ranking a manager's complete steps by a recorded metric (the order ``best()`` and retention use).

:func:`rank_steps` takes each step's parsed marker (see :mod:`safeckpt.steps`) and
orders the steps whose metric is a finite real number, best first; a step whose
marker records the metric as anything else is logged once and left unranked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from .steps import as_float
from .text import show

__all__ = ["rank_steps"]

logger = logging.getLogger("safeckpt")


def rank_steps(
    markers: Iterable[tuple[int, dict[str, Any] | None]], metric: str | None, mode: str, unranked: set[int], directory: Any
) -> list[int]:
    """Complete steps that have a valid ``metric`` (a finite real number within float range), best
    first (ties: the newer first). A step whose marker holds anything else is not ranked, once logged
    (``unranked`` remembers the steps already logged)."""
    scored = []
    for step, marker in markers:
        if marker is None:
            continue
        value = as_float(marker["metrics"].get(metric))
        if value is None or not math.isfinite(value):
            if metric in marker["metrics"] and step not in unranked:
                unranked.add(step)
                logger.warning(
                    "step %d in %s records metric %s as %s, not a finite number: it is not ranked",
                    step, directory, show(metric), show(marker["metrics"][metric], 60),
                )
            continue
        scored.append((value if mode == "min" else -value, -step))
    return [-neg for _, neg in sorted(scored)]
