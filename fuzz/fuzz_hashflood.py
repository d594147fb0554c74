#!/usr/bin/env python3
"""atheris harness for keys chosen to collide: no keyed container read holds more keys of one hash than the limit.

The target (``targets_hashflood.hashflood``) reads the input as a legacy pickle and a
skeleton, as given and as a program of colliding keys, and checks every dict and set
of the result. Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_hashflood.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_hashflood.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

import targets_hashflood  # noqa: E402

if __name__ == "__main__":
    fuzz("hashflood", targets_hashflood.hashflood)
