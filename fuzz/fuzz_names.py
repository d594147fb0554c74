#!/usr/bin/env python3
"""atheris harness for global names: classification and resolution of every spelling.

Builds STACK_GLOBAL / GLOBAL pickles from fuzzed module/qualname strings (see
targets_names): a name that Python 3's unpickler would resolve to a dangerous target is
classed dangerous and refused, nothing runs, and ``GlobalRef.resolve`` never returns a
module. Only SafeCkptError is an expected outcome.

    python fuzz/fuzz_names.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_names.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

with atheris.instrument_imports(include=["targets_names"]):
    import targets_names  # noqa: E402


if __name__ == "__main__":
    fuzz("names", targets_names.names)
