#!/usr/bin/env python3
"""atheris harness for the sharded checkpoint loader (DCP shards + safeckpt index).

load_sharded and consolidate, in this process, on a fuzzed shard file (with an index
recording its size) or a fuzzed index next to a fixed valid shard (the first byte picks
the mode: see targets.sharded). Only SafeCkptError is an expected outcome; any other
exception (torch.distributed.checkpoint's included) is a crash.

    python fuzz/fuzz_sharded.py CORPUS_DIR [SEED_DIR] [libFuzzer flags]   # fuzz
    python fuzz/fuzz_sharded.py crash-<sha1>                              # replay one input
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fuzz, targets  # noqa: E402  (instruments safeckpt on import)


if __name__ == "__main__":
    fuzz("sharded", targets.sharded)
