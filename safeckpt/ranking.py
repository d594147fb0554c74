"""Ranking a manager's complete steps by a recorded metric, and choosing the steps retention keeps.

:func:`rank_steps` takes each step's parsed marker (see :mod:`safeckpt.steps`) and
orders the steps whose metric is a finite real number, best first; a step whose
marker records the metric as anything else is logged once and left unranked.
:func:`steps_to_keep` applies ``max_to_keep`` and ``keep_best`` to that order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .steps import as_float
from .text import show

__all__ = ["rank_steps", "steps_to_keep"]

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


def steps_to_keep(steps: Sequence[int], max_to_keep: int | None, keep_best: int | None, ranked: Sequence[int]) -> set[int]:
    """The complete ``steps`` (oldest first) that retention keeps: the ``max_to_keep`` newest, the
    ``keep_best`` first of ``ranked`` (best first), and always the newest; all of them when neither is set."""
    if not steps or (max_to_keep is None and keep_best is None):
        return set(steps)
    keep = {steps[-1]}
    if max_to_keep is not None:
        keep.update(steps[-max_to_keep:])
    if keep_best is not None:
        keep.update(ranked[:keep_best])
    return keep
