"""The legacy row: reading ``torch.save`` files of many small tensors, safeckpt vs ``torch.load``.

``python -m benchmarks.legacy [--tensors 20000] [--repeats 7] [--formats zip,legacy] [--rows ...]``

A flat state dict of ``--tensors`` small float32 tensors (the shapes of the
``small`` case of :mod:`benchmarks.state`) is written with ``torch.save`` as a
zip archive (``zip``) and as a pre-1.6 stream (``legacy``,
``_use_new_zipfile_serialization=False``). Each row then reads it in a fresh
process, the rows interleaved within a repeat (order rotated per repeat), the
file read through once before the clock starts (warm page cache):

- ``torch``: ``torch.load(path, weights_only=True)``, the baseline;
- ``safeckpt``: ``safeckpt.load(path)`` (the no-exec legacy reader);
- ``convert``: ``safeckpt.convert(path, dst)`` (the same read, then a safe file written);
- ``torch_convert``: ``torch.load(weights_only=True)`` + ``safetensors.torch.save_file``, convert's baseline.

Loads are timed with every tensor touched afterwards (a numpy max per tensor)
and without. Printed per row: medians of wall time and of process CPU time
(user + system: steadier than wall time on a shared machine), the median of the
per-repeat ratios to the baseline, and the worst peak-RSS rise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = ("torch", "safeckpt", "convert", "torch_convert")
BASELINE = {"torch": None, "safeckpt": "torch", "convert": "torch_convert", "torch_convert": None}
FORMATS = ("zip", "legacy")


def _generate(path: Path, tensors: int, zip_format: bool) -> None:
    import torch

    from benchmarks.state import _SMALL_SHAPES

    g = torch.Generator().manual_seed(0)
    state: OrderedDict[str, Any] = OrderedDict()
    for i in range(tensors):
        layer, part = divmod(i, 2)
        state[f"layers.{layer}.{'weight' if part == 0 else 'bias'}"] = torch.randn(
            _SMALL_SHAPES[i % len(_SMALL_SHAPES)], generator=g
        )
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed read in this (fresh) process."""
    import gc

    import numpy as np
    import safetensors.torch
    import torch

    import safeckpt
    import safeckpt.legacy.torchfile  # imports before the clock

    path, row = spec["path"], spec["row"]
    Path(path).read_bytes()  # warm page cache
    gc.collect()
    gc.disable()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, t0 = _cpu(), time.perf_counter()
    if row == "torch":
        value = torch.load(path, weights_only=True)
    elif row == "safeckpt":
        value = safeckpt.load(path)
    elif row == "convert":
        value = safeckpt.convert(path, spec["dst"])
    else:
        value = torch.load(path, weights_only=True)
        safetensors.torch.save_file(value, spec["dst"])
    t1, cpu1 = time.perf_counter(), _cpu()
    if isinstance(value, dict):
        for t in value.values():
            if t.numel():
                np.asarray(t.numpy()).view(np.uint8).max()
    t2, cpu2 = time.perf_counter(), _cpu()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": t1 - t0, "cpu": cpu1 - cpu0, "touched": t2 - t0, "touched_cpu": cpu2 - cpu0,
            "rss_mib": (rss1 - rss0) / 1024}


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run([sys.executable, "-m", "benchmarks.legacy", "--worker", json.dumps(spec)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec['row']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.legacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=20000, help="tensors in the state dict (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of every row (default 7)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of: zip,legacy")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {','.join(ROWS)}")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir, removed)")
    parser.add_argument("--out", default=None, help="write every raw measurement as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    args.rows = [r for r in args.rows.split(",") if r]
    if not set(args.formats) <= set(FORMATS) or not set(args.rows) <= set(ROWS) or args.repeats < 1:
        parser.error("unknown format or row, or --repeats < 1")
    return args


def _ratio(runs: dict[str, list[dict[str, Any]]], row: str, base: str, field: str) -> float | None:
    pairs = [a[field] / b[field] for a, b in zip(runs.get(row, []), runs.get(base, [])) if b[field] > 0]
    return statistics.median(pairs) if pairs else None


def _table(fmt: str, runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"### {fmt}", "",
             "| row | wall s | cpu s | wall+touch s | ratio wall | ratio cpu | ratio wall+touch | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("seconds", "cpu", "touched")}
        base = BASELINE[row]
        ratios = [_ratio(runs, row, base, k) if base else None for k in ("seconds", "cpu", "touched")]
        shown = ["-" if r is None else f"{r:.3f}x" for r in ratios]
        lines.append(f"| {row} | {med['seconds']:.3f} | {med['cpu']:.3f} | {med['touched']:.3f} | "
                     f"{' | '.join(shown)} | {max(r['rss_mib'] for r in results):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Generate the files, run the interleaved rows, print a table per format."""
    args = _parse(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="safeckpt-legacy-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = {fmt: workdir / f"state_{fmt}_{args.tensors}.pt" for fmt in args.formats}
    for fmt, path in files.items():
        if not path.exists():
            _generate(path, args.tensors, fmt == "zip")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {fmt: {row: [] for row in args.rows} for fmt in args.formats}
    try:
        for repeat in range(args.repeats):
            for fmt in args.formats:
                shift = repeat % len(args.rows)
                for row in args.rows[shift:] + args.rows[:shift]:
                    dst = workdir / f"out_{row}.safetensors"
                    result = _run_worker({"row": row, "path": str(files[fmt]), "dst": str(dst)})
                    dst.unlink(missing_ok=True)
                    runs[fmt][row].append(result)
                    print(f"[{time.strftime('%H:%M:%S')}] {fmt} r{repeat + 1} {row}: {result['seconds']:.3f} s "
                          f"(cpu {result['cpu']:.3f} s)", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
    print(f"{args.tensors} tensors, {args.repeats} repeats, medians; ratios are medians of per-repeat ratios "
          f"(safeckpt vs torch.load(weights_only=True), convert vs torch.load + save_file); load avg "
          f"{os.getloadavg()[0]:.2f}\n")
    for fmt in args.formats:
        print(_table(fmt, runs[fmt]) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
