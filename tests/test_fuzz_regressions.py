"""Replay every input the fuzz harnesses ever crashed on, and the seed corpora.

``tests/fuzz_regressions/<harness>/<what-it-exploits>.bin`` holds each crash
input found by ``fuzz/`` (see ``fuzz/README.md``). Each is fed to the very
function its atheris harness fuzzes (``fuzz/targets.py``), which lets only
``SafeCkptError`` subclasses through as expected outcomes: any other exception
(IndexError, TypeError, RecursionError, an AssertionError from an oracle such
as "a Python 2 alias of a dangerous global must be refused"...) fails the test.
atheris is not needed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


targets = _import("safeckpt_fuzz_targets", ROOT / "fuzz" / "targets.py")

CASES = sorted(REGRESSIONS.glob("*/*.bin"))


def test_every_regression_names_a_harness() -> None:
    for case in CASES:
        assert case.parent.name in targets.TARGETS, f"{case}: no harness {case.parent.name!r}"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.stem}" for c in CASES])
def test_fuzz_regression(case: Path) -> None:
    targets.TARGETS[case.parent.name](case.read_bytes())


def test_seed_corpora_replay_cleanly(tmp_path: Path) -> None:
    """Every seed ``fuzz/make_corpus.py`` writes goes through its harness's target without a crash
    (so the harnesses start from a corpus that loads, and stay runnable without atheris)."""
    made = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "make_corpus.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    for harness in targets.TARGETS:
        assert any((tmp_path / harness).iterdir()), f"no seeds for {harness}"
    failures = []
    for harness, target in targets.TARGETS.items():
        for seed in sorted((tmp_path / harness).iterdir()):
            try:
                target(seed.read_bytes())
            except Exception as exc:  # collect them all, then fail once
                failures.append(f"{harness}/{seed.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


_MEMORY_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import targets
from pathlib import Path

def peak_mib():  # VmHWM: this process's peak RSS (ru_maxrss would include a forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM")

harness, bomb = sys.argv[2], Path(sys.argv[3]).read_bytes()
targets.TARGETS[harness](b"\\x80\\x02K\\x01.")  # warm up: every import and lazy table is in place
before = peak_mib()
targets.TARGETS[harness](bomb)
print(peak_mib() - before)
"""

BOMBS = [c for c in CASES if "bomb" in c.stem]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
@pytest.mark.parametrize("case", BOMBS, ids=[f"{c.parent.name}/{c.stem}" for c in BOMBS])
def test_fuzz_regression_memory_is_bounded(case: Path) -> None:
    """A small input that declares a large decompressed size must not make the reader allocate it
    (``*bomb*`` inputs: hundreds of bytes declaring 128 MiB). Measured in a child process."""
    probe = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(ROOT / "fuzz"), case.parent.name, str(case)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    grown_mib = int(probe.stdout.split()[-1])
    assert grown_mib < 64, f"{case.name} ({case.stat().st_size} bytes) made the reader's peak RSS grow by {grown_mib} MiB"


def test_single_file_mutator_survives_skeleton_roots_of_any_shape(tmp_path: Path) -> None:
    """The structure-aware mutator of ``fuzz_single_file.py`` re-decodes skeletons that earlier
    mutations wrote: a root whose ``attrs`` is an int (not bytes) stopped a 12-minute run."""
    import base64
    import json

    import msgpack

    import safeckpt

    path = safeckpt.save_single_file(None, {"a": 1, "b": [2]}, tmp_path / "m.safeckpt")
    header, body = targets.split_safetensors(path.read_bytes())
    root = msgpack.unpackb(base64.b64decode(header["__metadata__"]["safeckpt.skeleton"]), raw=False)
    calls = []

    def mutate(data: bytes, max_size: int) -> bytes:  # stands for atheris.Mutate, which takes bytes only
        assert type(data) is bytes, f"the mutator was handed {type(data).__name__}"
        calls.append(data)
        return data[::-1][:max_size]

    for attrs in (-26, "text", [1], None, b""):
        header["__metadata__"]["safeckpt.skeleton"] = base64.b64encode(msgpack.packb({**root, "attrs": attrs})).decode()
        data = targets.join_safetensors(json.loads(json.dumps(header)), body)
        for seed in range(300):
            assert type(targets.mutate_single_file(data, 1 << 16, seed, mutate)) is bytes
    assert calls
