#!/usr/bin/env python3
"""atheris harness for the skeleton decoder.

safeckpt.codec.Decoder(...).unpack (nothing allowed, then some stdlib globals allowed) with a
tensor source serving the sample states' entries (ComponentNotFoundError for other names),
and safeckpt.container.parse_root (embedded and standalone), on raw msgpack bytes.
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_skeleton.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_skeleton.py crash-<sha1>                              # replay one input
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

HARNESS = "skeleton"
TARGET = targets.skeleton


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
    targets.skeleton_tensors()  # per-process set-up before the first input
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
