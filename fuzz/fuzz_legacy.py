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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz, targets  # noqa: E402  (instruments safeckpt on import)


if __name__ == "__main__":
    fuzz("legacy", targets.legacy)
