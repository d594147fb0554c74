#!/usr/bin/env python3
"""atheris harness for the legacy VM's budget: any opcodes, small Limits, memory and work bounded by the input size.

The target (``targets_vm_budget.vm_budget``) fails when the VM's work counter or the
memory allocated while it ran exceeds a bound proportional to the input's length.
Only SafeCkptError is an expected outcome; any other exception is a crash.

    python fuzz/fuzz_vm_budget.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_vm_budget.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz  # noqa: E402  (instruments safeckpt on import)

import targets_vm_budget  # noqa: E402

if __name__ == "__main__":
    fuzz("vm_budget", targets_vm_budget.vm_budget)
