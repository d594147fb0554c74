#!/usr/bin/env python3
"""atheris harness for the scanner's archive reading.

Any bytes opened as torch's zip reader would open them, then scanned: only SafeCkptError
is expected, a member name torch would read is never skipped, and an ambiguous archive
is never scanned as anything but dangerous.

    python fuzz/fuzz_scan_archive.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_scan_archive.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

with atheris.instrument_imports(include=["safeckpt"]):  # the archive reader, however the package imports
    from targets_scan_archive import scan_archive  # noqa: E402

if __name__ == "__main__":
    fuzz("scan_archive", scan_archive)
