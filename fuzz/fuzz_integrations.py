#!/usr/bin/env python3
"""atheris harness for the integrations: signature files and Hugging Face folders.

See ``targets_integrations.integrations`` for the modes. Only SafeCkptError is an
expected outcome; any other exception is a crash.

    python fuzz/fuzz_integrations.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_integrations.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402
import model_signing  # noqa: E402,F401  (heavy dependencies first: only safeckpt is instrumented)
from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

with atheris.instrument_imports(include=["safeckpt"]):
    import safeckpt.hf  # noqa: F401
    import safeckpt.signing  # noqa: F401
    import targets_integrations


if __name__ == "__main__":
    fuzz("integrations", targets_integrations.integrations, setup=targets_integrations.workdir)
