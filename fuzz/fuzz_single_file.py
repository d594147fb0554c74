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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import atheris, fuzz, targets  # noqa: E402  (instruments safeckpt on import)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """Structure-aware: mutate the skeleton inside the header, not just the base64 text around it."""
    return targets.mutate_single_file(data, max_size, seed, atheris.Mutate)


if __name__ == "__main__":
    fuzz("single_file", targets.single_file, mutator=mutate)
