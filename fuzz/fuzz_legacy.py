#!/usr/bin/env python3
"""atheris harness for the legacy (torch.save / pickle) reader.

read_torch_file (cpu and meta), load_single_file with globals allowed, and the bare
SymbolicUnpickler, on any bytes: no pickle is ever executed.
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_legacy.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_legacy.py crash-<sha1>                              # replay one input
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Heavy dependencies first, so that only safeckpt is instrumented.
import msgpack  # noqa: F401
import numpy  # noqa: F401
import safetensors  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["safeckpt"]):
    import safeckpt  # noqa: F401
    import targets

HARNESS = "legacy"
TARGET = targets.legacy


KEEP_GOING = os.environ.get("SAFECKPT_FUZZ_KEEP_GOING")  # set by run.py --keep-going


def TestOneInput(data: bytes) -> None:
    if not KEEP_GOING:
        TARGET(data)  # anything but SafeCkptError escapes: a crash
        return
    try:
        TARGET(data)
    except Exception as exc:  # triage mode only: record each distinct crash once, go on
        targets.record_crash(KEEP_GOING, HARNESS, data, exc)


def main() -> None:
    targets.workdir()  # per-process set-up before the first input
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
