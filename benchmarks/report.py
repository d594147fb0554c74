"""Medians, paired ratios, target verdicts and the markdown tables.

Ratios are computed per repeat (the competitors of one repeat ran back to back,
interleaved) and the median of those per-repeat ratios is reported: on this
machine absolute timings drift 3-4x between runs, paired ratios much less.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .plan import BASELINES, TARGETS, Measure

__all__ = ["render", "summarize", "verdicts"]

Runs = dict[str, list[dict[str, Any] | None]]  # measure key -> one worker result per repeat


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _seconds(runs: Runs, key: str) -> list[float | None]:
    return [None if r is None else r["seconds"] for r in runs.get(key, [])]


def paired_ratios(runs: Runs, subject: str, baselines: Sequence[str]) -> list[float]:
    """Per repeat: subject time / the smallest of the baselines' times (repeats missing any are skipped)."""
    out = []
    columns = [_seconds(runs, subject), *(_seconds(runs, b) for b in baselines)]
    for values in zip(*columns):
        if all(v is not None and v > 0 for v in values):
            out.append(values[0] / min(values[1:]))
    return out


def _baselines(m: Measure) -> tuple[str | None, str | None]:
    section = m.group if m.group != "limit" else ("save" if m.phase == "save" else "load")
    torch_key, st_key = BASELINES[section]
    suffix = ".cold" if m.cold else ""
    return (torch_key and torch_key + suffix, st_key and st_key + suffix)


def summarize(measures: list[Measure], runs: Runs) -> dict[str, dict[str, Any]]:
    """Per row: times, median, range, paired ratios vs its section's baselines, peak RSS deltas, phases."""
    rows: dict[str, dict[str, Any]] = {}
    for m in measures:
        results = runs.get(m.key, [])
        seconds = [r["seconds"] for r in results if r is not None]
        row: dict[str, Any] = {
            "label": m.label,
            "group": m.group,
            "cold": m.cold,
            "seconds": seconds,
            "median_s": _median(seconds),
            "min_s": min(seconds, default=None),
            "max_s": max(seconds, default=None),
            "peak_rss_delta_mib": [r["peak_rss_delta_mib"] for r in results if r is not None],
            "peak_rss_delta_hwm_mib": [r.get("peak_rss_delta_hwm_mib") for r in results if r is not None],
            "phases": [r["phases"] for r in results if r is not None and r["phases"]],
            "failures": sum(r is None for r in results),
        }
        inner = [r["inner_median_seconds"] for r in results if r is not None and "inner_median_seconds" in r]
        if inner:
            row["inner_median_s"] = _median(inner)
        for name, base in zip(("vs_torch", "vs_safetensors"), _baselines(m)):
            if base is not None and base in runs:
                row[name] = _median(paired_ratios(runs, m.key, [base]))
        rows[m.key] = row
    return rows


def verdicts(case: str, runs: Runs, total_bytes: int) -> list[dict[str, Any]]:
    """Each target of ``case``: measured value (median, and range over repeats), limit, met or missed by how much."""
    out = []
    for t in TARGETS:
        if t.case != case or t.subject not in runs or not all(b in runs for b in t.baselines):
            continue
        if t.kind == "ratio":
            values = paired_ratios(runs, t.subject, t.baselines)
            limit = t.limit
        elif t.kind == "seconds":
            values = [v for v in _seconds(runs, t.subject) if v is not None]
            limit = t.limit
        else:  # rss: the worst repeat counts
            values = [r["peak_rss_delta_mib"] for r in runs[t.subject] if r is not None]
            values = [max(values)] if values else []
            limit = t.limit * total_bytes / 2**20 + 64
        measured = _median(values)
        entry: dict[str, Any] = {
            "case": case,
            "target": t.text,
            "kind": t.kind,
            "informative": t.informative,
            "measured": measured,
            "range": [min(values), max(values)] if values else None,
            "limit": limit,
        }
        if measured is None:
            entry["status"] = "not measured"
        elif measured <= limit:
            entry["status"] = "met"
        else:
            entry["status"] = f"missed by {100 * (measured / limit - 1):.0f}%"
        out.append(entry)
    return out


# --------------------------------------------------------------------------- markdown


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.3f} s"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _fmt_measured(v: dict[str, Any]) -> tuple[str, str]:
    if v["measured"] is None:
        return "—", "—"
    lo, hi = v["range"]
    if v["kind"] == "ratio":
        return f"{v['measured']:.2f}x ({lo:.2f}-{hi:.2f})", f"{v['limit']:.2f}x"
    if v["kind"] == "seconds":
        return f"{_fmt_s(v['measured'])} ({_fmt_s(lo)}-{_fmt_s(hi)})", _fmt_s(v["limit"])
    return f"{v['measured']:.0f} MiB (worst repeat)", f"{v['limit']:.0f} MiB"


_SECTIONS = (("save", "**save**"), ("limit", "**physical limits**"), ("load", "**full load, every tensor touched**"),
             ("open", "**lazy open + one tensor**"))


def render_case(title: str, rows: dict[str, dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    """One case: the timing table, then its targets."""
    lines = [f"### {title}", "",
             "| operation | median | range | x torch | x safetensors | peak RSS delta |",
             "|---|---:|---:|---:|---:|---:|"]
    for group, heading in _SECTIONS:
        section = [(k, r) for k, r in rows.items() if r["group"] == group]
        if not section:
            continue
        lines.append(f"| {heading} | | | | | |")
        for _, r in section:
            rss = r["peak_rss_delta_mib"]
            rss_text = f"{max(rss):.0f} MiB" if rss else "—"
            fail = f" ({r['failures']} failed)" if r["failures"] else ""
            lines.append(
                f"| {r['label']}{fail} | {_fmt_s(r['median_s'])} | {_fmt_s(r['min_s'])}-{_fmt_s(r['max_s'])} | "
                f"{_fmt_ratio(r.get('vs_torch'))} | {_fmt_ratio(r.get('vs_safetensors'))} | {rss_text} |"
            )
    lines += ["", "| target | measured (median, range) | limit | status |", "|---|---:|---:|---|"]
    for v in targets:
        measured, limit = _fmt_measured(v)
        name = v["target"] + (" *(informative)*" if v["informative"] else "")
        lines.append(f"| {name} | {measured} | {limit} | {v['status']} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The whole markdown report: one section per case, then the notes."""
    repeats = report["config"]["repeats"]
    parts = [f"## safeckpt benchmark ({repeats} repeats, medians; ratios are medians of per-repeat ratios)", ""]
    for case, data in report["cases"].items():
        info = data["info"]
        title = (f"{case}: {info['total_bytes'] / 2**20:.0f} MiB of tensors in {info['tensors']} tensors "
                 f"(model {info['model_bytes'] / 2**20:.0f} MiB + Adam state) + NNHandler metadata")
        parts += [render_case(title, data["rows"], data["targets"]), ""]
    parts += ["Notes:", *(f"- {n}" for n in report["notes"])]
    return "\n".join(parts)
