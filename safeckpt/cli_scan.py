"""``safeckpt scan``: the verdict and globals of each file. Imports no torch of its own (start-up matters in CI)."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Out, collect_files, error_fields, plural
from .detect import Kind, detect
from .errors import SafeCkptError
from .legacy.scan import scan

__all__ = ["cmd_scan"]



def _row(f: Any) -> dict[str, Any]:
    try:
        report = scan(f)
    except (SafeCkptError, OSError) as exc:
        return {"path": str(f), "format": None, "verdict": None, "globals": [], "findings": [], "error": error_fields(exc, f)}
    return {
        "path": str(f),
        "format": report.format,
        "verdict": report.verdict,
        "globals": [{"name": g.name, "uses": sorted(g.uses), "status": g.status} for g in report.globals],
        "findings": [
            {"kind": x.kind, "severity": x.severity, "message": x.message, "offset": x.offset} for x in report.findings
        ],
        "error": None,
    }


def cmd_scan(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt scan``."""
    local = [out.remote.local(p, recursive=args.recursive) for p in args.paths]
    files = collect_files(local, args.recursive, lambda f: detect(f) is not Kind.UNKNOWN)
    if not files:
        raise ValueError(f"no checkpoint files in {', '.join(args.paths)}")
    results: list[dict[str, Any]] = []
    with out.progress("scanning", len(files)) as bar:
        for f in files:
            results.append(_row(f))
            bar.advance()
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("safe", "suspicious", "dangerous")}
    counts["error"] = sum(r["error"] is not None for r in results)
    code = EXIT_FAILED if counts["dangerous"] else EXIT_USAGE if counts["error"] else EXIT_OK
    out.document({"ok": code == EXIT_OK, "files": results, "summary": counts})
    order = {"dangerous": 0, "unknown": 1, "allowed": 2}
    for r in results:
        if r["error"] is not None:
            out.error(r["error"]["message"])
            continue
        verdict = "DANGEROUS" if r["verdict"] == "dangerous" else r["verdict"]
        out.line(f"{r['path']}: {verdict} ({r['format']}, {plural(len(r['globals']), 'global')})")
        out.table(
            [
                (g["status"], g["name"], ", ".join(g["uses"]))
                for g in sorted(r["globals"], key=lambda g: (order.get(g["status"], 3), g["name"]))
            ],
            indent=4,
        )
        out.table([(x["severity"], x["kind"], x["message"]) for x in r["findings"]], indent=4)
    if len(results) > 1:
        out.line(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" of {len(results)} files")
    return code
