#!/usr/bin/env python3
"""Generate the seed corpora and run every fuzz harness for a bounded time or number of runs.

    python fuzz/run.py --seconds 60               # each harness for 60 s (-max_total_time=60)
    python fuzz/run.py --runs 5000                # each harness for 5000 inputs (-runs=5000)
    python fuzz/run.py --seconds 3600 --harness legacy --corpus-dir fuzz-corpus   # one, for an hour, keeping its corpus

Every harness runs with ``-rss_limit_mb=2048 -timeout=10 -max_len=65536`` and its
dictionary ``fuzz/dicts/<harness>.dict``. Prints
per harness the number of inputs executed (libFuzzer's ``Done N runs`` line) and
its outcome, and exits 1 when any harness crashed (a non-SafeCkptError exception,
a timeout or running out of memory): the crashing input is kept under
``--artifacts`` (default ``fuzz/artifacts/<harness>/``) and its traceback is printed.

``--keep-going`` (triage, for long runs) does not stop at the first crash: each
harness records the first (then smallest) input of every distinct crash signature
(exception type and innermost safeckpt frame) under ``<artifacts>/<harness>/``
with its traceback, and the run still fails when any was recorded.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("single_file", "skeleton", "manifest", "legacy", "scan", "sharded", "vm_budget", "names", "scan_archive", "views", "values", "integrations", "hashflood")
FLAGS = ("-rss_limit_mb=2048", "-timeout=10", "-max_len=65536", "-print_final_stats=1")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)
_STAT = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.M)
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)


@dataclass
class Result:
    harness: str
    returncode: int
    runs: int
    seconds: float
    log: Path
    artifacts: list[Path]

    @property
    def crashed(self) -> bool:
        return self.returncode != 0


def executions(output: str) -> int:
    """Inputs executed, from libFuzzer's output: ``Done N runs``, else its final stats, else the last ``#N`` line."""
    for pattern in (_DONE, _STAT, _PROGRESS):
        found = pattern.findall(output)
        if found:
            last = found[-1]
            return int(last[0] if isinstance(last, tuple) else last)
    return 0


def run_harness(
    harness: str, seeds: Path, corpus: Path, artifacts: Path, budget: list[str], logs: Path, keep_going: bool
) -> Result:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = logs / f"{harness}.log"
    command = [
        sys.executable,
        str(HERE / f"fuzz_{harness}.py"),
        str(corpus),  # new inputs go to the first directory
        str(seeds),
        *FLAGS,
        *budget,
        *([f"-dict={HERE / 'dicts' / f'{harness}.dict'}"] if (HERE / "dicts" / f"{harness}.dict").exists() else []),
        f"-artifact_prefix={artifacts}/",
    ]
    env = dict(os.environ)
    env.pop("SAFECKPT_FUZZ_KEEP_GOING", None)
    if keep_going:
        env["SAFECKPT_FUZZ_KEEP_GOING"] = str(artifacts)
    before = set(artifacts.iterdir())
    start = time.monotonic()
    with open(log, "wb") as out:
        returncode = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=str(corpus), env=env)
    elapsed = time.monotonic() - start
    output = log.read_text(errors="replace")
    found = sorted(p for p in set(artifacts.iterdir()) - before if p.suffix != ".txt")
    if found and returncode == 0:  # keep-going mode recorded crashes
        returncode = 1
    return Result(harness, returncode, executions(output), elapsed, log, found)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the safeckpt fuzz harnesses for a bounded time.")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--seconds", type=int, help="per harness: -max_total_time=SECONDS")
    budget.add_argument("--runs", type=int, help="per harness: -runs=N")
    parser.add_argument("--harness", action="append", choices=HARNESSES, help="only these (repeatable); default all")
    parser.add_argument("--corpus-dir", type=Path, help="keep the growing corpora here (default: a temp dir, removed)")
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts", help="where crash inputs go")
    parser.add_argument("--keep-going", action="store_true", help="record every distinct crash instead of stopping")
    parser.add_argument("--parallel", type=int, default=1, help="harnesses run at once (default 1)")
    args = parser.parse_args(argv)
    chosen = args.harness or list(HARNESSES)
    limit = [f"-max_total_time={args.seconds}"] if args.seconds is not None else [f"-runs={args.runs}"]

    tmp = Path(tempfile.mkdtemp(prefix="safeckpt-fuzz-run-"))
    try:
        seeds = tmp / "seeds"
        made = subprocess.run([sys.executable, str(HERE / "make_corpus.py"), str(seeds)], capture_output=True, text=True)
        if made.returncode:
            print(made.stdout, made.stderr, sep="\n", file=sys.stderr)
            print("fuzz: make_corpus.py failed", file=sys.stderr)
            return 2
        corpora = args.corpus_dir.resolve() if args.corpus_dir else tmp / "corpus"
        artifacts = args.artifacts.resolve()
        logs = tmp / "logs"
        logs.mkdir()
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            results = list(
                pool.map(
                    lambda h: run_harness(h, seeds / h, corpora / h, artifacts / h, limit, logs, args.keep_going), chosen
                )
            )
        print(f"{'harness':<12} {'runs':>9} {'seconds':>8}  result")
        for r in results:
            outcome = "CRASH " + ", ".join(str(a) for a in r.artifacts) if r.crashed else "ok"
            print(f"{r.harness:<12} {r.runs:>9} {r.seconds:>8.0f}  {outcome}")
        crashed = [r for r in results if r.crashed]
        for r in crashed:
            print(f"\n===== {r.harness}: exit {r.returncode}; log tail =====\n{_tail(r.log)}", file=sys.stderr)
            for artifact in r.artifacts:
                trace = artifact.with_suffix(".txt")
                if trace.exists():
                    print(f"--- {artifact.name}\n{_tail(trace, 12)}", file=sys.stderr)
        if crashed:
            print(
                "\nReplay an input with: python fuzz/fuzz_<harness>.py <crash file>; once fixed, keep it as "
                "tests/fuzz_regressions/<harness>/<what-it-exploits>.bin",
                file=sys.stderr,
            )
        return 1 if crashed else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
