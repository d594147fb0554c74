"""What every atheris harness shares: instrumenting safeckpt only, the crash policy, set-up.

A harness file names its target in ``targets.py`` and calls :func:`fuzz`. Only
``SafeCkptError`` is an expected outcome of a target; anything else escapes and is a
crash (with ``SAFECKPT_FUZZ_KEEP_GOING`` set by ``run.py --keep-going``, each distinct
crash is recorded and fuzzing goes on).
"""

import os
import sys
from collections.abc import Callable

import atheris

# Heavy dependencies first, so that only safeckpt is instrumented.
import msgpack  # noqa: F401
import numpy  # noqa: F401
import safetensors  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["safeckpt"]):
    import safeckpt  # noqa: F401
    import targets

KEEP_GOING = os.environ.get("SAFECKPT_FUZZ_KEEP_GOING")


def fuzz(harness: str, target: Callable[[bytes], None], setup: Callable[[], object] = targets.workdir, mutator=None) -> None:
    """Run ``target`` under libFuzzer with the command-line flags in ``sys.argv``."""

    def test_one_input(data: bytes) -> None:
        if not KEEP_GOING:
            target(data)  # anything but SafeCkptError escapes: a crash
            return
        try:
            target(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # triage mode only: record each distinct crash once, go on
            # (BaseException: torch.distributed.checkpoint's CheckpointException is not an Exception)
            targets.record_crash(KEEP_GOING, harness, data, exc)

    setup()  # per-process set-up before the first input
    if mutator is None:
        atheris.Setup(sys.argv, test_one_input)
    else:
        atheris.Setup(sys.argv, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()
