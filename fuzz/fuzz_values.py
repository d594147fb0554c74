#!/usr/bin/env python3
"""atheris harness for hostile values in well-formed files (see targets_values.py).

    python fuzz/fuzz_values.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_values.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

import targets_values  # noqa: E402

if __name__ == "__main__":
    fuzz("values", targets_values.run)
