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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz, targets  # noqa: E402  (instruments safeckpt on import)


if __name__ == "__main__":
    fuzz("skeleton", targets.skeleton, setup=targets.skeleton_tensors)
