"""Run the safeckpt benchmark suite: ``python -m benchmarks`` or ``python benchmarks/run.py``.

Examples::

    python -m benchmarks                      # 256 MiB + 20,000 small tensors, 3 repeats: ~4 min here
    python -m benchmarks --lean               # without the context rows: ~3 min
    python -m benchmarks --size-mib 1536 --small 20000 --repeats 3 --cold --profile --out results.json
    python -m benchmarks --size-mib 1536 --repeats 0 --profile   # only the safeckpt profiles
    python -m benchmarks.adversarial --mib 1                      # the worst legacy pickles, per input MiB

For each case (``large``: a model + its Adam state, ``--size-mib`` MiB of
tensors in about 1,170 tensors; ``small``: ``--small`` tiny tensors; both with
NNHandler metadata, see :mod:`benchmarks.state`) and each repeat, every row of
:mod:`benchmarks.plan` runs in a fresh Python process (:mod:`benchmarks.worker`):
the saves first, in an order rotated each repeat, then the loads of the files
just written (warm page cache), then with ``--cold`` the same loads with the
file evicted from the page cache first. Before each measurement the parent runs
``sync`` and, once the worker has prepared (imports, state read into memory),
prefaults the machine's free memory (:class:`Prefaulter`) and lets it go. The
tensors are generated once (untimed) into a source file that each save worker
reads into memory before its clock starts.

Prints a markdown table per case (medians, ranges, per-repeat paired ratios,
peak RSS) and the issue's targets met or missed; writes everything, each
repeat's raw numbers included, as JSON to ``--out``. ``--profile`` adds, per
case, the timed steps of a safeckpt save and cProfiles of its save, full load
and open + one tensor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plan import FILES, Measure, measures
from benchmarks.report import render, summarize, verdicts
from benchmarks.worker import READY

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = ("large", "small")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=256,
                        help="large case: tensor bytes of the whole checkpoint, model + Adam state (default 256)")
    parser.add_argument("--model-mib", type=float, default=None,
                        help="large case: size the model instead (the checkpoint is then about 3x this)")
    parser.add_argument("--small", type=int, default=20000, help="small case: number of tensors in all (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: large,small")
    parser.add_argument("--cold", action="store_true",
                        help="also measure loads with the file evicted from the page cache (posix_fadvise DONTNEED)")
    parser.add_argument("--lean", action="store_true",
                        help="skip the context rows (torch.save/save_file + fsync, the pickle load, the touch floor)")
    parser.add_argument("--fresh-memory", action="store_true",
                        help="do not prefault free memory before each timed operation (see Prefaulter)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile safeckpt's save, load and open of each case; time the steps of its save")
    parser.add_argument("--out", default=None, help="write the JSON report here ('-' for stdout)")
    parser.add_argument("--workdir", default=None,
                        help="where the checkpoint files go (default: a new temp dir, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    if not set(args.cases) <= set(CASES) or args.repeats < 0 or (args.repeats == 0 and not args.profile):
        parser.error("--cases takes large and/or small; --repeats must be >= 1 (or 0 with --profile: profiles only)")
    return args


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Prefaulter:
    """A helper process that allocates, touches and frees N bytes on request (see :func:`worker.prefault_server`).

    This VM hands freed memory back to its host about a second after it is freed
    (free page reporting); the next first touch of it is then several times
    slower, and how much of the free memory is in that state varies from moment
    to moment. Freeing a touched ballast just before the timed operation makes
    every competitor start from the same, backed state, so timings show the
    software's work rather than the host's. ``--fresh-memory`` turns this off.

    It is a process of its own because a child inherits its parent's peak RSS
    across fork + exec: the parent stays small so workers' ``ru_maxrss`` starts low.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", json.dumps({"op": "prefault_server"})],
            cwd=REPO_ROOT, env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def __call__(self, nbytes: int) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{nbytes}\n")
        self._proc.stdin.flush()
        if self._proc.stdout.readline().strip() != "done":
            raise RuntimeError("the prefault helper died")

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on 2 busy cores
    return env


def run_worker(spec: dict[str, Any], timeout: float = 1800, before: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one worker process; returns its JSON result.

    With ``spec["handshake"]`` the worker says when it is prepared; ``before()``
    then runs (the prefault) and the worker is told to go.

    Raises:
        RuntimeError: with the worker's stderr if it failed.
    """
    with subprocess.Popen(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        cwd=REPO_ROOT, env=_worker_env(), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        if spec.get("handshake"):
            line = proc.stdout.readline()
            if line.strip() == READY:
                if before is not None:
                    before()
                proc.stdin.write("go\n")
                proc.stdin.flush()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['op']} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _layout_args(case: str, args: argparse.Namespace) -> dict[str, Any]:
    if case == "large":
        return {"model_mib": args.model_mib} if args.model_mib else {"total_mib": args.size_mib}
    return {"tensors": args.small}


def _spec(m: Measure, case: str, directory: Path, info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    spec = {
        "op": m.op,
        "case": case,
        "layout": _layout_args(case, args),
        "source": str(directory / FILES["source"]),
        "bytes": info["total_bytes"],
        "tensor": info["one_tensor"],
        **m.options,
    }
    if m.file is not None:
        spec["target"] = str(directory / FILES[m.file])
    return spec


def _rotated(items: list[Measure], repeat: int, repeats: int) -> list[Measure]:
    if not items:
        return items
    shift = (repeat * max(1, len(items) // repeats)) % len(items)
    return items[shift:] + items[:shift]


def _measure_case(case: str, directory: Path, info: dict[str, Any], rows: list[Measure], repeat: int,
                  args: argparse.Namespace, runs: dict[str, list[Any]], prefault: Prefaulter | None) -> None:
    for phase in ("save", "load", "cold"):
        for m in _rotated([r for r in rows if r.phase == phase], repeat, args.repeats):
            spec = _spec(m, case, directory, info, args)
            if phase == "save" and "target" in spec:
                Path(spec["target"]).unlink(missing_ok=True)
            spec["handshake"] = True
            os.sync()
            try:
                ballast = info["total_bytes"] + 64 * 2**20
                result = run_worker(spec, before=None if prefault is None else lambda: prefault(ballast))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
                _log(f"{case} {m.key}: FAILED: {exc}")
                result = None
            runs.setdefault(m.key, []).append(result)
            if result is not None:
                rss = result["peak_rss_delta_mib"]
                _log(f"{case} r{repeat + 1} {m.key}: {result['seconds']:.4f} s, peak RSS +{rss:.0f} MiB")


def _profile(case: str, directory: Path, info: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    """cProfile safeckpt's save, load and open of ``case``, and time the steps of its save; as text."""
    out: dict[str, str] = {}
    prefault = None if args.fresh_memory else Prefaulter()
    ballast = info["total_bytes"] + 64 * 2**20
    try:
        for what in ("breakdown", "save", "load", "open"):
            spec = {"op": "save_breakdown" if what == "breakdown" else "profile", "what": what, "case": case,
                    "layout": _layout_args(case, args), "source": str(directory / FILES["source"]),
                    "target": str(directory / (FILES["raw"] if what == "breakdown" else FILES["safeckpt"])),
                    "tensor": info["one_tensor"], "handshake": True}
            if what in ("breakdown", "save"):
                Path(spec["target"]).unlink(missing_ok=True)
            os.sync()
            _log(f"profiling {case} {what}")
            try:
                result = run_worker(spec, before=None if prefault is None else lambda: prefault(ballast))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
                out[f"{case}.{what}"] = f"failed: {exc}"
                continue
            if what == "breakdown":
                steps = result["phases"].items()
                out[f"{case}.save steps"] = "\n".join(f"{seconds:8.3f} s  {step}" for step, seconds in steps)
            else:
                out[f"{case}.{what}"] = result["profile"]
    finally:
        if prefault is not None:
            prefault.close()
    return out


def _source_version() -> dict[str, Any]:
    """The commit measured and the safeckpt files that differ from it (read-only git calls)."""
    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            return done.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"git_head": git("rev-parse", "HEAD"),
            "safeckpt_uncommitted": git("status", "--porcelain", "safeckpt").splitlines()}


def _notes(args: argparse.Namespace, env: dict[str, Any], load: tuple[Any, Any]) -> list[str]:
    if args.model_mib:
        sizing = f"--model-mib {args.model_mib:g} (the checkpoint is about 3x that)"
    else:
        sizing = f"--size-mib {args.size_mib:g} = tensor bytes of the whole checkpoint (model ~1/3, Adam state ~2/3)"
    cold = ("cold rows: the file was fsynced and its pages dropped with posix_fadvise(DONTNEED) just before the timed "
            "load (targeted, needs no root; drop_caches would evict the whole machine's cache, it is "
            f"{'writable' if env['drop_caches_writable'] else 'not writable'} here and not used)")
    return [
        "Every measurement ran in its own fresh Python process; competitors interleaved within each repeat (order "
        "rotated per repeat); `sync` before each; times are medians, ratios the median of per-repeat ratios.",
        "safeckpt saves are atomic: temp file in a private sibling dir, fsync, rename, fsync of the directory; and "
        "every tensor is hashed with SHA-256 (two threads copy and hash their ranges of the file; files of 64 MiB and "
        "more are written with O_DIRECT). torch.save and save_file do neither: the '+ fsync' rows and 'raw write + "
        "fsync' put them on an equal footing.",
        "torch.load(weights_only=True) cannot read the full NNHandler state (class references, TorchVersion), so loads "
        "compare equal TENSOR content: torch.load reads a file of model_state_dict + optimizer_state_dict only, "
        "load_file a flat dict of the same tensors, safeckpt the full state (its extra work is the metadata skeleton) "
        "and the tensors-only state. Every load touches every byte of every tensor (a uint8 max per tensor).",
        "Warm page cache: loads read files written moments before in the same repeat, read through once (untimed) "
        "first, since safeckpt's direct-I/O saves leave nothing in the page cache. "
        + (cold if args.cold else "Cold-cache rows: run with --cold."),
        "Peak RSS delta: rise of ru_maxrss across the timed operation, worst repeat. Resident pages of a file mapping "
        "count in RSS, so mmap loads show about the file size there though it is page cache, not anonymous memory.",
        ("Fresh memory (--fresh-memory): no prefault, so each operation also pays the VM host's first touch of the "
         "memory it needs (page cache for writes, buffers for copying loads): absolute times and ratios swing 3-5x."
         if args.fresh_memory else
         "Prefaulted memory: just before each timed operation a helper process allocated, touched and freed "
         "checkpoint-size + 64 MiB, so every competitor starts with host-backed free memory (this VM returns freed "
         "memory to its host within about a second, and re-touching it made a raw 256 MiB write 0.26-0.73 s instead "
         "of 0.06-0.09 s). Use --fresh-memory to include that effect."),
        "Workers run with OMP_WAIT_POLICY=PASSIVE (unless set): spinning OpenMP threads made timings on 2 shared "
        "cores swing 50x.",
        "Lazy open: the first open + get_tensor in a fresh process (the in-process median of 5 more is in the JSON).",
        f"Large case sizing: {sizing}. "
        "The model is untied (safetensors refuses shared tensors).",
        f"Machine: {env['cpus']} CPUs, {env['memory_gib']} GiB; load average at start {load[0]}, at end {load[1]} "
        "(other work on the machine inflates absolute times; ratios are what to read).",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns a process exit code (0, or 1 if any measurement failed)."""
    args = _parse(argv)
    load_start = tuple(round(x, 2) for x in os.getloadavg())
    clock_keys = ("seconds", "phases")
    env = {k: v for k, v in run_worker({"op": "environment"}).items() if "rss" not in k and k not in clock_keys}
    env.update(_source_version())
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="safeckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = measures(args.cold, args.lean)
    report: dict[str, Any] = {"config": {**vars(args), "workdir": str(workdir)}, "environment": env,
                              "started": datetime.datetime.now().isoformat(timespec="seconds"), "cases": {}}
    runs: dict[str, dict[str, list[Any]]] = {case: {} for case in args.cases}
    infos: dict[str, dict[str, Any]] = {}
    try:
        for case in args.cases:
            directory = workdir / case
            directory.mkdir(exist_ok=True)
            _log(f"generating the {case} state (untimed)")
            infos[case] = run_worker({"op": "generate", "case": case, "layout": _layout_args(case, args),
                                      "source": str(directory / FILES["source"])})
        prefault = None if args.fresh_memory else Prefaulter()
        try:
            for repeat in range(args.repeats):
                for case in args.cases:
                    _measure_case(case, workdir / case, infos[case], rows, repeat, args, runs[case], prefault)
        finally:
            if prefault is not None:
                prefault.close()
        profiles: dict[str, str] = {}
        if args.profile:
            for case in args.cases:
                profiles.update(_profile(case, workdir / case, infos[case], args))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    load_end = tuple(round(x, 2) for x in os.getloadavg())
    for case in args.cases if args.repeats else ():
        info = {k: infos[case][k] for k in ("total_bytes", "tensors", "model_bytes")}
        report["cases"][case] = {
            "info": info,
            "rows": summarize(rows, runs[case]),
            "targets": verdicts(case, runs[case], info["total_bytes"]),
            "runs": runs[case],
        }
    report["profiles"] = profiles
    report["notes"] = _notes(args, env, (load_start, load_end))
    text = render(report)
    print(text)
    if args.profile:
        for name, profile in profiles.items():
            kind = "timed steps" if name.endswith("steps") else "cProfile (main thread)"
            print(f"\n#### {kind}: safeckpt {name}\n\n```\n{profile.strip(chr(10)).rstrip()}\n```")
    if args.out == "-":
        print(json.dumps(report, indent=1))
    elif args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        _log(f"JSON written to {args.out}")
    failed = any(r is None for case in runs.values() for results in case.values() for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
