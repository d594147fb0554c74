#!/usr/bin/env python3
"""atheris harness for the scanner.

safeckpt.scan on any bytes; the report must be well formed and must call dangerous every
global that Python 3's pickle would resolve to a dangerous one.
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_scan.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_scan.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz, targets  # noqa: E402  (instruments safeckpt on import)


if __name__ == "__main__":
    fuzz("scan", targets.scan_target)
