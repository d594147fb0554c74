#!/usr/bin/env python3
"""atheris harness for tensor views: shapes, strides, offsets and alignment a file claims.

A view spec (mode, dtype, shape, strides, offset, alignment shift, entry bytes) is written as a
safeckpt single file and loaded, or handed to the legacy reader's ``_rebuild_tensor_v2``
(see targets_views.views). Only SafeCkptError is an expected outcome; a tensor that comes
back must be aligned, read only its entry's bytes, and stay within Limits.max_expansion.

    python fuzz/fuzz_views.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_views.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)
import targets_views  # noqa: E402


if __name__ == "__main__":
    fuzz("views", targets_views.views)
