"""``safeckpt inspect``, ``verify``, ``split``, ``merge`` and ``diff`` (``convert``: :mod:`.cli_convert`,
``scan``: :mod:`.cli_scan`). Imported only when one of them runs: this is where torch comes in."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_diff import diff_states
from .cli_integrations import cmd_verify_signature
from .cli_output import EXIT_FAILED, EXIT_OK, Out, error_fields, human_bytes, message, plural
from .text import segment
from .cli_report import FileView, component_keys, format_of, is_multi, json_key, verify_file, view_file
from .cli_targets import (
    HF_INDEX,
    MANAGER,
    STEP,
    Step,
    classify,
    read_hf_index,
    read_step,
    step_dirs,
    verify_hf_index,
    verify_step,
)
from .errors import IntegrityError, SafeCkptError
from .limits import DEFAULT_LIMITS
from .loading import load, load_multi_files
from .multifile import DEFAULT_KEYS, MANIFEST_SUFFIX, discover, find_manifest, manifest_path, read_manifest, split_base
from .saving import save_multi_from_single, save_single_file
from .storage import is_url

__all__ = ["cmd_diff", "cmd_inspect", "cmd_merge", "cmd_split", "cmd_verify"]

MAX_SHOWN = 100  # differences listed in human output; --json lists them all


# --------------------------------------------------------------------------- inspect


def _render_view(out: Out, view: FileView, with_tensors: bool) -> None:
    out.line(
        f"{view.path}: {view.format}, {plural(len(view.components), 'component')}, "
        f"{plural(view.tensor_count, 'tensor')}, {human_bytes(view.total_bytes)}"
    )
    meta = {k: v for k, v in view.metadata.items() if v is not None}
    if meta:
        out.line("metadata:")
        out.table([(f"{k}:", str(v)) for k, v in meta.items()])
    out.line("components:")
    rows: list[tuple[str, ...]] = []
    for c in view.components:
        stored = (plural(c.count, "tensor"), human_bytes(c.nbytes), ", ".join(c.dtypes)) if c.count else ("", "", "")
        rows.append((segment(c.key), *stored, c.summary))
        if with_tensors and c.tensors and not (len(c.tensors) == 1 and c.tensors[0].name == segment(c.key)):
            rows.extend(("  " + t.name, "", human_bytes(t.nbytes), t.dtype, str(list(t.shape))) for t in c.tensors)
    out.table(rows)
    if view.class_refs:
        out.line(f"class references ({len(view.class_refs)}):")
        out.table(
            [
                (name, ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""))
                for name, paths in sorted(view.class_refs.items())
            ]
        )


def _step_line(s: Step) -> str:
    if s.marker is None:
        return f"step {s.step if s.step is not None else '?'}: INCOMPLETE ({s.problem})"
    m = s.marker
    size = sum(f["size"] for f in m["files"])
    metrics = ", ".join(f"{k}={v}" for k, v in m["metrics"].items())
    return (
        f"step {s.step}: committed {m.get('created')}, {m['layout']} ({m['entry']}), "
        f"{plural(len(m['files']), 'file')}, {human_bytes(size)}" + (f"; {metrics}" if metrics else "")
    )


def _inspect_manager(out: Out, path: Path) -> int:
    steps = [read_step(d) for d in step_dirs(path).values()]
    complete = [s.step for s in steps if s.marker is not None]
    out.document(
        {
            "ok": True,
            "path": str(path),
            "format": MANAGER,
            "latest": complete[-1] if complete else None,
            "steps": [s.to_json() for s in steps],
        }
    )
    out.line(f"{path}: checkpoint manager directory, {plural(len(complete), 'complete step')} of {len(steps)}")
    for s in steps:
        out.line("  " + _step_line(s))
    return EXIT_OK


def _inspect_step(out: Out, path: Path, with_tensors: bool) -> int:
    s = read_step(path)
    view = view_file(s.entry) if s.entry is not None and s.entry.exists() else None
    out.document(
        {"ok": True, "path": str(path), "format": STEP, "step": s.to_json(), "checkpoint": view and view.to_json(with_tensors)}
    )
    out.line(f"{s.directory}: checkpoint manager {_step_line(s)}")
    if view is not None:
        _render_view(out, view, with_tensors)
    return EXIT_OK


def _inspect_hf_index(out: Out, path: Path) -> int:
    index = read_hf_index(path)
    shards = index.shards
    present = {shard: (path.parent / shard).is_file() for shard in shards}
    out.document(
        {
            "ok": True,
            "path": str(path),
            "format": HF_INDEX,
            "metadata": index.metadata,
            "tensors": len(index.weight_map),
            "shards": [{"file": shard, "tensors": len(names), "present": present[shard]} for shard, names in shards.items()],
        }
    )
    out.line(
        f"{path}: Hugging Face shard index (not a safeckpt checkpoint): {plural(len(index.weight_map), 'tensor')} "
        f"in {plural(len(shards), 'shard')}; inspect or convert the shards themselves"
    )
    out.table([(shard, plural(len(names), "tensor"), "" if present[shard] else "MISSING") for shard, names in shards.items()])
    return EXIT_OK


def cmd_inspect(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt inspect``."""
    path = Path(out.remote.local(args.path))
    kind = classify(path)
    if kind == MANAGER:
        return _inspect_manager(out, path)
    if kind == STEP:
        return _inspect_step(out, path, args.tensors)
    if kind == HF_INDEX:
        return _inspect_hf_index(out, path)
    with out.progress(f"reading {args.path}") as bar:
        view = view_file(path, bar)
    out.document({"ok": True, **view.to_json(args.tensors)})
    _render_view(out, view, args.tensors)
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def _verify_steps(out: Out, path: Path, steps: list[Step], *, single: bool) -> int:
    rows: list[dict[str, Any]] = []
    for s in steps:
        row: dict[str, Any] = {"step": s.step, "directory": str(s.directory), "complete": s.marker is not None, "error": None}
        if s.marker is None:
            row["error"] = {"type": "IncompleteStep", "message": f"{s.directory}: {s.problem}"}
        else:
            try:
                row["files"] = verify_step(s)
                assert s.entry is not None
                row.update(verify_file(s.entry, out.progress))
            except (SafeCkptError, OSError) as exc:
                row["error"] = error_fields(exc, s.directory)
        rows.append(row)
    failed = [r for r in rows if r["complete"] and r["error"] is not None]
    incomplete_step = single and not rows[0]["complete"]
    code = EXIT_FAILED if failed or incomplete_step else EXIT_OK
    out.document({"ok": code == EXIT_OK, "path": str(path), "format": STEP if single else MANAGER, "steps": rows})
    for r in rows:
        if r["error"] is None:
            digests = "every file matches its marker's size and SHA-256" + (
                ", every tensor digest matches" if r.get("digests") else ""
            )
            out.line(f"OK step {r['step']} ({r.get('format')}): {plural(r['files'], 'file')}; {digests}")
        elif not r["complete"]:
            out.line(f"INCOMPLETE {r['error']['message']} (restore ignores it)")
        else:
            out.line(f"FAILED step {r['step']}: {r['error']['message']}")
    return code


def _verify_hf_index(out: Out, path: Path) -> int:
    index = read_hf_index(path)
    problems = verify_hf_index(index)
    code = EXIT_FAILED if any(problems.values()) else EXIT_OK
    out.document(
        {
            "ok": code == EXIT_OK,
            "path": str(path),
            "format": HF_INDEX,
            "digests": False,
            "shards": [{"file": shard, "problem": problem} for shard, problem in problems.items()],
        }
    )
    for shard, problem in problems.items():
        if problem:
            out.line(f"FAILED {path.parent / shard}: {problem}")
    if code == EXIT_OK:
        out.line(
            f"OK {path} (Hugging Face shard index): {plural(len(problems), 'shard')} present with the "
            f"{plural(len(index.weight_map), 'tensor')} it maps; no digests recorded (verify each shard for its structure)"
        )
    return code


def cmd_verify(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt verify``."""
    if args.signature or args.public_key or args.certificate_chain or args.identity:
        return cmd_verify_signature(out, args)
    path = Path(out.remote.local(args.path))
    kind = classify(path)
    if kind == MANAGER:
        return _verify_steps(out, path, [read_step(d) for d in step_dirs(path).values()], single=False)
    if kind == STEP:
        return _verify_steps(out, path, [read_step(path)], single=True)
    if kind == HF_INDEX:
        return _verify_hf_index(out, path)
    try:
        fields = verify_file(path, out.progress)
    except IntegrityError as exc:
        out.document(
            {"ok": False, "path": str(path), "format": format_of(path), "digests": True, "error": error_fields(exc, path)}
        )
        out.line(f"FAILED: {message(exc, path)}")
        return EXIT_FAILED
    code = EXIT_FAILED if args.require_digests and not fields["digests"] else EXIT_OK
    out.document({"ok": code == EXIT_OK, "path": str(path), **fields, "error": None})
    what = f"{plural(fields['components'], 'component')}, {plural(fields['tensors'], 'tensor')}"
    if fields["digests"]:
        out.line(f"OK {path} ({fields['format']}): {what}; every SHA-256 digest matches and the structure decodes")
    else:
        verdict = "FAILED" if code else "OK"
        out.line(f"{verdict} {path} ({fields['format']}): {what}; structure checked only, the file records no digests")
    return code


# --------------------------------------------------------------------------- split, merge


def cmd_split(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt split``: the set is written next to the source (a URL's set through the storage layer)."""
    path = Path(out.remote.local(args.path))
    if is_multi(path):
        raise ValueError(f"{path} is already a multi-file set")
    available = component_keys(path)
    if args.all:
        keys = [k for k in available if isinstance(k, str)]
    else:
        keys = list(args.keys or DEFAULT_KEYS)
        absent = [k for k in keys if k not in available]
        if args.keys and absent:
            raise ValueError(f"{path} has no component {absent[0]!r}; it has {[json_key(k) for k in available]}")
        keys = [k for k in keys if k in available]
    if not keys:
        raise ValueError(f"{path} has none of the components {list(args.keys or DEFAULT_KEYS)}; pass --keys or --all")
    manifest = split_base(args.path) + MANIFEST_SUFFIX if is_url(args.path) else manifest_path(path)
    if out.remote.exists(str(manifest)) and not args.overwrite:
        raise FileExistsError(f"{manifest} exists; pass --overwrite to replace the set")
    if is_url(args.path):
        written = save_multi_from_single(args.path, keys, storage_options=out.remote.options or None)
    else:
        written = save_multi_from_single(path, keys)
    files = {k: str(p) for k, p in written.items()}
    out.document({"ok": True, "path": str(path), "manifest": str(manifest), "files": files})
    out.line(f"split {path} into {plural(len(files), 'component')}:")
    out.table([(k, p) for k, p in files.items()] + [("(manifest)", str(manifest))])
    return EXIT_OK


def cmd_merge(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt merge``: the output may be a URL (written through the storage layer)."""
    base = Path(out.remote.local(args.base))
    target: Any = args.out if is_url(args.out) else Path(args.out)
    if not is_multi(base):
        raise ValueError(f"{base} is a single file, not a multi-file set (name its manifest or base path)")
    if out.remote.exists(str(target)) and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    manifest_file = find_manifest(base)
    keys = (
        [e.key for e in read_manifest(manifest_file, DEFAULT_LIMITS).entries] if manifest_file else list(discover(base))
    )
    state: dict[str, Any] = {}
    with out.progress(f"reading {base}", len(keys)) as bar:
        for key in keys:
            state[key] = load_multi_files(base, [key], verify=args.verify)[key]
            bar.advance()
    save_single_file(None, state, target, storage_options=out.remote.options or None)
    size = out.remote.size(str(target))
    out.document({"ok": True, "base": str(base), "output": str(target), "components": keys, "bytes": size})
    out.line(f"merged {plural(len(keys), 'component')} of {base} into {target} ({human_bytes(size)})")
    return EXIT_OK



# --------------------------------------------------------------------------- diff


def _load_for_diff(path: Path) -> Any:
    is_multi(path)  # a clear error for a directory or a missing file
    return load(path)


def cmd_diff(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt diff``."""
    a_path, b_path = Path(out.remote.local(args.a)), Path(out.remote.local(args.b))
    a, b = _load_for_diff(a_path), _load_for_diff(b_path)
    with out.progress("comparing") as bar:
        result = diff_states(a, b, atol=args.atol, rtol=args.rtol, advance=bar.advance)
    code = EXIT_OK if result.identical else EXIT_FAILED
    out.document(
        {
            "ok": result.identical,
            "identical": result.identical,
            "a": {"path": str(a_path), "format": format_of(a_path)},
            "b": {"path": str(b_path), "format": format_of(b_path)},
            "atol": args.atol,
            "rtol": args.rtol,
            "compared": {"values": result.values, "tensors": result.tensors},
            "components": [c.to_json() for c in result.components],
            "differences": [d.to_json() for d in result.differences],
        }
    )
    if out.json:
        return code
    out.line(f"A: {a_path} ({format_of(a_path)})")
    out.line(f"B: {b_path} ({format_of(b_path)})")
    status = {"same": "same", "different": "DIFFERENT", "missing": "only in A", "extra": "only in B"}
    out.table(
        [
            (
                segment(c.key),
                plural(c.tensors, "tensor") if c.tensors else "",
                status[c.status] + (f" ({plural(c.differences, 'difference')})" if c.status == "different" else ""),
            )
            for c in result.components
        ]
    )
    if result.differences:
        out.line("differences:")
        rows = []
        for d in result.differences[:MAX_SHOWN]:
            delta = f"max abs diff {d.max_abs_diff:.6g}" if d.max_abs_diff is not None else ""
            rows.append((d.kind, d.path, f"{d.a or '(absent)'} -> {d.b or '(absent)'}", delta))
        out.table(rows)
        if len(result.differences) > MAX_SHOWN:
            out.line(f"  ... and {len(result.differences) - MAX_SHOWN} more (--json lists them all)")
        changed = sum(c.status != "same" for c in result.components)
        count = plural(len(result.differences), "difference")
        out.line(f"DIFFERENT: {count} in {changed} of {len(result.components)} components")
    else:
        out.line(
            f"identical: {plural(len(result.components), 'component')}, {plural(result.tensors, 'tensor')}, "
            f"{plural(result.values, 'value')}"
        )
    return code
