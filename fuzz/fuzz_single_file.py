#!/usr/bin/env python3
"""atheris harness for the single-file loader.

load_single_file (plain, then verify=True with globals allowed), the lazy
open() API (metadata, components, info, get, get_tensor) and load(), on any bytes written
to a file. A custom mutator rewrites the msgpack skeleton inside the header (components,
attributes, metadata values) and rebuilds the file around it.
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_single_file.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_single_file.py crash-<sha1>                              # replay one input
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

HARNESS = "single_file"
TARGET = targets.single_file


KEEP_GOING = os.environ.get("SAFECKPT_FUZZ_KEEP_GOING")  # set by run.py --keep-going


def TestOneInput(data: bytes) -> None:
    if not KEEP_GOING:
        TARGET(data)  # anything but SafeCkptError escapes: a crash
        return
    try:
        TARGET(data)
    except Exception as exc:  # triage mode only: record each distinct crash once, go on
        targets.record_crash(KEEP_GOING, HARNESS, data, exc)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Structure-aware: mutate the skeleton inside the header, not just the base64 text around it."""
    return targets.mutate_single_file(data, max_size, seed, atheris.Mutate)


def main() -> None:
    targets.workdir()  # per-process set-up before the first input
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
