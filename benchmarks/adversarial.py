"""The adversarial row: what the worst legacy pickles cost per MiB of input.

``python -m benchmarks.adversarial [--mib 1] [--repeats 3] [--timeout 120]``

Each shape (floods of every container opcode, shared keys, long appends, deep
nesting, shared values copied by allowed constructors, keys chosen to collide) is written as a bare
pickle of about ``--mib`` MiB and read with ``safeckpt.load`` in a fresh
process, interleaved with a benign pickle of the same size (a list of small
dicts of ints, floats and strings). Printed per shape: the outcome (loaded, or
the ``Limits`` field that refused it), seconds and peak RSS rise per input MiB
(medians), and both as ratios to the benign pickle's. A shape that runs past
``--timeout`` is reported as such.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main", "shapes"]

MiB = 1 << 20
P4 = b"\x80\x04"
REPO_ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, time
import safeckpt
import safeckpt.legacy.torchfile  # imports done before the clock
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    safeckpt.load(path)
    outcome = "loaded"
except safeckpt.SafeCkptError as e:
    outcome = "refused: " + str(getattr(e, "limit", None) or type(e).__name__)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "seconds": seconds, "rss_mib": (after - before) / 1024}))
"""


def _flood(unit: bytes, size: int) -> bytes:
    return P4 + unit * (size // len(unit)) + b"N."


def shapes(size: int) -> dict[str, bytes]:
    """The worst pickles of about ``size`` bytes we know, plus ``benign`` for the ratios."""
    opaque = b"\x8c\x01m\x8c\x01C\x93)\x81"
    benign = pickle.dumps([{"i": i, "f": i / 3, "s": f"item{i}"} for i in range(size // 40)], 4)
    return {
        "benign": benign,
        "EMPTY_SET flood": _flood(b"\x8f", size),
        "EMPTY_DICT flood": _flood(b"}", size),
        "EMPTY_LIST flood": _flood(b"]", size),
        "MARK flood": _flood(b"(", size),
        "TUPLE2 of EMPTY_TUPLEs": _flood(b"))\x86", size),
        "FROZENSET flood": _flood(b"(\x91", size),
        "MEMOIZE flood": _flood(b"N\x94", size),
        "DUP flood": P4 + b"]" + b"2" * size + b".",
        "memo GET of one list": P4 + b"]\x94" + b"h\x00" * (size // 2) + b".",
        "deep tuples (TUPLE1)": P4 + b"N" + b"\x85" * size + b".",
        "deep lists": P4 + b"]" + b"]\x94a" * (size // 4) + b".",
        "shared tuple key in SETITEMs": P4 + b"}\x94(" + b"K\x01" * (size // 4) + b"t\x94" + b"0"
        + b"h\x01K\x00s" * (size // 10) + b".",
        "appends to an inert object": P4 + opaque + b"N" + b"a2" * (size // 2) + b".",
        "set() of a shared list": P4 + b"(" + b"K\x01" * (size // 4) + b"l\x94"
        + b"\x8c\x08builtins\x8c\x03set\x93\x94" + b"h\x01h\x00\x85R0" * (size // 14) + b".",
        "tuple DAG hashed": P4 + b"}K\x01" + b"".join(b"\x94h%c\x86" % (i % 256) for i in range(min(size // 5, 200)))
        + b"K\x00s.",
        **_collisions(size),
    }


_MODULUS = (1 << 61) - 1  # sys.hash_info.modulus on 64-bit CPython: k * _MODULUS + c hash alike for every k


def _long1(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _collisions(size: int, per: int = 64) -> dict[str, bytes]:
    """Keys chosen to collide: one flood (refused at Limits.max_equal_hash_keys) and the worst
    shapes that stay at the limit (groups of ``per`` keys per hash, in one dict or in many)."""
    group = [b"".join(_long1(k * _MODULUS + g) + b"N" for k in range(1, per + 1)) for g in range(size // (12 * per) + 1)]
    flood = b"".join(_long1(k * _MODULUS) for k in range(1, size // 11))
    pairs = b"".join(_long1(k * _MODULUS) + b"N" for k in range(1, size // 12))
    return {
        "colliding keys, one SETITEMS": P4 + b"}(" + pairs + b"u.",
        "colliding set elements, ADDITEMS": P4 + b"\x8f(" + flood + b"\x90.",
        "colliding keys at the limit, one dict": P4 + b"}" + b"".join(b"(" + g + b"u" for g in group) + b".",
        "colliding keys at the limit, many dicts": P4 + b"(" + b"".join(b"}(" + g + b"u" for g in group) + b"l.",
    }


def _run_one(path: Path, timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"outcome": f"over {timeout:.0f} s", "seconds": timeout, "rss_mib": None}
    if done.returncode != 0:
        return {"outcome": f"crashed ({done.returncode})", "seconds": None, "rss_mib": None}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main(argv: list[str] | None = None) -> int:
    """Measure every shape; print the markdown table (and JSON with ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adversarial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=1.0, help="input size of every shape (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a shape counts as hung")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args(argv)
    data = shapes(int(args.mib * MiB))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in data}
    with tempfile.TemporaryDirectory(prefix="safeckpt-adversarial-") as tmp:
        paths = {}
        for i, (name, body) in enumerate(data.items()):
            paths[name] = Path(tmp) / f"{i}.pkl"
            paths[name].write_bytes(body)
        for _ in range(args.repeats):
            for name in data:  # interleaved: each repeat runs every shape once
                results[name].append(_run_one(paths[name], args.timeout))
    benign_mib = len(data["benign"]) / MiB
    base_s = _median([r["seconds"] for r in results["benign"]]) or float("nan")
    base_rss = _median([r["rss_mib"] for r in results["benign"]]) or float("nan")
    lines = [f"### adversarial legacy pickles, about {args.mib:g} MiB each ({args.repeats} repeats, medians)", "",
             "| shape | outcome | s per input MiB | x benign | peak RSS MiB per input MiB | x benign |",
             "|---|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        mib = len(data[name]) / MiB
        seconds, rss = _median([r["seconds"] for r in runs]), _median([r["rss_mib"] for r in runs])
        s_text = "—" if seconds is None else f"{seconds / mib:.3f}"
        r_text = "—" if rss is None else f"{rss / mib:.1f}"
        sx = "—" if seconds is None else f"{(seconds / mib) / (base_s / benign_mib):.2f}x"
        rx = "—" if rss is None else f"{(rss / mib) / max(base_rss / benign_mib, 1e-9):.2f}x"
        lines.append(f"| {name} | {runs[-1]['outcome']} | {s_text} | {sx} | {r_text} | {rx} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
