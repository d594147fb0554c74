#!/usr/bin/env python3
"""atheris harness for the manifest / multi-file loader.

load_multi_files and load on a fuzzed manifest next to a fixed valid set of component
files, or on a fuzzed component file (the first byte picks the mode: see targets.manifest).
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_manifest.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_manifest.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz, targets  # noqa: E402  (instruments safeckpt on import)


if __name__ == "__main__":
    fuzz("manifest", targets.manifest)
