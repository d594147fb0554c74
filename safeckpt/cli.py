"""The ``safeckpt`` command line (also ``python -m safeckpt``).

Commands: ``inspect``, ``convert``, ``scan``, ``verify``, ``split``, ``merge`` and
``diff``. Each prints a human-readable report, or one JSON document on stdout
with ``--json``; errors are one line on stderr (a traceback only with
``--debug``). Exit codes: :data:`EXIT_OK` (0), :data:`EXIT_FAILED` (1: a
dangerous file, a digest mismatch, differences found, a refused conversion) and
:data:`EXIT_USAGE` (2: bad arguments, a file that is not a checkpoint, any
other error). Nothing here ever unpickles: legacy files go through the no-exec
reader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .cli_diff import diff_states
from .cli_report import (
    TORCH_KINDS,
    FileView,
    Progress,
    collect_files,
    component_keys,
    format_of,
    human_bytes,
    is_multi,
    json_key,
    plural,
    verify_file,
    view_file,
)
from .cli_integrations import add_hf_options, add_sign_command, add_signature_options, cmd_convert_hf, cmd_verify_signature
from .convert import convert
from .detect import Kind, detect
from .errors import IntegrityError, SafeCkptError, UnsafeCheckpointError
from .legacy import scan
from .limits import DEFAULT_LIMITS
from .loading import load, load_multi_files
from .multifile import DEFAULT_KEYS, discover, find_manifest, manifest_path, read_manifest
from .saving import save_multi_from_single, save_single_file

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "JSON_SCHEMA_VERSION", "main"]

EXIT_OK = 0
"""The command succeeded: the file is safe, digests match, the checkpoints are identical."""
EXIT_FAILED = 1
"""A finding: a dangerous file or refused conversion, a digest mismatch, differences between checkpoints."""
EXIT_USAGE = 2
"""An error: bad arguments, a file that is not a checkpoint, a missing file, anything else that went wrong."""
JSON_SCHEMA_VERSION = 1
"""``schema_version`` of every ``--json`` document; bumped when a field changes meaning or goes away."""

MAX_SHOWN = 100  # differences listed in human output; --json lists them all


class _Out:
    """Where a command writes: human lines or one JSON document on stdout, progress on stderr."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = args.json

    def line(self, text: str = "") -> None:
        if not self.json:
            print(text, file=sys.stdout)

    def table(self, rows: Sequence[Sequence[str]], indent: int = 2) -> None:
        """Rows of columns, every column but the last padded to its widest cell (at most 48)."""
        if not rows or self.json:
            return
        widths = [min(48, max(len(r[i]) for r in rows if len(r) > i)) for i in range(max(map(len, rows)) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
            self.line((" " * indent + "  ".join(cells)).rstrip())

    def document(self, doc: dict[str, Any]) -> None:
        if self.json:
            body = {"schema_version": JSON_SCHEMA_VERSION, "command": self.args.command, **doc}
            print(json.dumps(body, indent=2, default=str), file=sys.stdout)

    def progress(self, label: str, total: int = 0, unit: str = "") -> Progress:
        return Progress(label, total, enabled=not self.args.quiet, unit=unit)


def _error_fields(exc: BaseException) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": _message(exc)}
    for attr in ("file", "tensor_name", "path_in_state", "limit"):
        if getattr(exc, attr, None) is not None:
            fields[attr] = getattr(exc, attr)
    if isinstance(exc, UnsafeCheckpointError):
        fields["globals"] = list(exc.globals)
    return fields


def _message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.filename}: no such file"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _exit_code(exc: BaseException) -> int:
    return EXIT_FAILED if isinstance(exc, (UnsafeCheckpointError, IntegrityError)) else EXIT_USAGE


# --------------------------------------------------------------------------- inspect


def _render_view(out: _Out, view: FileView, with_tensors: bool) -> None:
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
        rows.append((str(c.key), *stored, c.summary))
        if with_tensors and c.tensors and not (len(c.tensors) == 1 and c.tensors[0].name == str(c.key)):
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


def cmd_inspect(out: _Out, args: argparse.Namespace) -> int:
    with out.progress(f"reading {args.path}") as bar:
        view = view_file(args.path, bar)
    out.document({"ok": True, **view.to_json(args.tensors)})
    _render_view(out, view, args.tensors)
    return EXIT_OK


# --------------------------------------------------------------------------- scan


def cmd_scan(out: _Out, args: argparse.Namespace) -> int:
    files = collect_files(args.paths, args.recursive, lambda f: detect(f) is not Kind.UNKNOWN)
    if not files:
        raise ValueError(f"no checkpoint files in {', '.join(args.paths)}")
    results: list[dict[str, Any]] = []
    with out.progress("scanning", len(files)) as bar:
        for f in files:
            try:
                report = scan(f)
            except (SafeCkptError, OSError) as exc:
                results.append(
                    {
                        "path": str(f),
                        "format": None,
                        "verdict": None,
                        "globals": [],
                        "findings": [],
                        "error": _error_fields(exc),
                    }
                )
            else:
                results.append(
                    {
                        "path": str(f),
                        "format": report.format,
                        "verdict": report.verdict,
                        "globals": [
                            {"name": g.name, "uses": sorted(g.uses), "status": g.status} for g in report.globals
                        ],
                        "findings": [
                            {"kind": x.kind, "severity": x.severity, "message": x.message, "offset": x.offset}
                            for x in report.findings
                        ],
                        "error": None,
                    }
                )
            bar.advance()
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("safe", "suspicious", "dangerous")}
    counts["error"] = sum(r["error"] is not None for r in results)
    code = EXIT_FAILED if counts["dangerous"] else EXIT_USAGE if counts["error"] else EXIT_OK
    out.document({"ok": code == EXIT_OK, "files": results, "summary": counts})
    order = {"dangerous": 0, "unknown": 1, "allowed": 2}
    for r in results:
        if r["error"] is not None:
            out.line(f"{r['path']}: ERROR: {r['error']['message']}")
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


# --------------------------------------------------------------------------- convert


def _convert_plan(args: argparse.Namespace) -> list[tuple[Path, Path | None]]:
    """``(source, destination)`` pairs; the destination is the file (with ``--multi``: the base path)
    to write, ``None`` for the default next to the source.

    Accepted: ``SRC``, ``SRC DST``, ``SRC... DIR`` (an existing directory, a name ending
    with ``/``, or any DST after a source directory) and three or more sources, each
    converted next to itself.
    """
    paths = [Path(p) for p in args.paths]
    last_is_dir = paths[-1].is_dir() or args.paths[-1].endswith(("/", os.sep))
    if len(paths) == 2 and not paths[0].is_dir() and not last_is_dir:
        return [(paths[0], paths[1])]
    into: Path | None = None
    if len(paths) >= 2 and (last_is_dir or (len(paths) == 2 and paths[0].is_dir())):
        into = paths.pop()
    plan: list[tuple[Path, Path | None]] = []
    for p in paths:
        if p.is_dir():
            files = collect_files([str(p)], args.recursive, lambda f: detect(f) in TORCH_KINDS)
            if not files:
                raise ValueError(f"no torch.save files in {p}")
            pairs = [(f, f.relative_to(p)) for f in files]
        else:
            pairs = [(p, Path(p.name))]
        for src, rel in pairs:
            dst = None if into is None else into / rel
            plan.append((src, dst if dst is None or args.multi else dst.with_suffix(".safetensors")))
    return plan


def _convert_one(src: Path, dst: Path | None, args: argparse.Namespace) -> list[str]:
    """Convert ``src`` to ``dst`` (see :func:`_convert_plan`); returns the files written."""
    target = manifest_path(dst or src) if args.multi else dst or src.with_suffix(".safetensors")
    if not src.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(src))
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    written = convert(src, dst, multi=args.multi, keys_to_save=args.keys, allowed_globals=args.allow_global)
    if isinstance(written, dict):
        return [str(p) for p in written.values()] + [str(target)]
    return [str(written)]


def cmd_convert(out: _Out, args: argparse.Namespace) -> int:
    if args.hf:
        return cmd_convert_hf(out, args)
    if args.keys and not args.multi:
        raise ValueError("--keys chooses the files of a multi-file set: pass --multi too")
    plan = _convert_plan(args)
    results: list[dict[str, Any]] = []
    with out.progress("converting", len(plan)) as bar:
        for src, dst in plan:
            entry: dict[str, Any] = {
                "source": str(src),
                "status": "converted",
                "outputs": [],
                "globals": [],
                "error": None,
            }
            try:
                entry["outputs"] = _convert_one(src, dst, args)
            except UnsafeCheckpointError as exc:
                entry.update(status="refused", globals=list(exc.globals), error=_message(exc))
            except (SafeCkptError, OSError, ValueError, TypeError) as exc:
                entry.update(status="error", error=_message(exc))
            results.append(entry)
            bar.advance()
    counts = {s: sum(r["status"] == s for r in results) for s in ("converted", "refused", "error")}
    code = EXIT_FAILED if counts["refused"] else EXIT_USAGE if counts["error"] else EXIT_OK
    out.document({"ok": code == EXIT_OK, "results": results, "summary": counts})
    for r in results:
        if r["status"] == "converted":
            size = sum(Path(p).stat().st_size for p in r["outputs"])
            out.line(f"converted {r['source']} -> {', '.join(r['outputs'])} ({human_bytes(size)})")
        elif r["status"] == "refused":
            out.line(
                f"REFUSED {r['source']}: dangerous globals {', '.join(r['globals']) or '(none named)'}; "
                "nothing was written or executed"
            )
        else:
            out.line(f"error {r['source']}: {r['error']}")
    if len(results) > 1:
        out.line(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" of {len(results)} files")
    return code


# --------------------------------------------------------------------------- verify


def cmd_verify(out: _Out, args: argparse.Namespace) -> int:
    if args.signature or args.public_key or args.certificate_chain or args.identity:
        return cmd_verify_signature(out, args)
    path = Path(args.path)
    try:
        fields = verify_file(path, out.progress)
    except IntegrityError as exc:
        out.document(
            {"ok": False, "path": str(path), "format": format_of(path), "digests": True, "error": _error_fields(exc)}
        )
        out.line(f"FAILED: {_message(exc)}")
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


def cmd_split(out: _Out, args: argparse.Namespace) -> int:
    path = Path(args.path)
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
    manifest = manifest_path(path)
    if manifest.exists() and not args.overwrite:
        raise FileExistsError(f"{manifest} exists; pass --overwrite to replace the set")
    written = save_multi_from_single(path, keys)
    files = {k: str(p) for k, p in written.items()}
    out.document({"ok": True, "path": str(path), "manifest": str(manifest), "files": files})
    out.line(f"split {path} into {plural(len(files), 'component')}:")
    out.table([(k, p) for k, p in files.items()] + [("(manifest)", str(manifest))])
    return EXIT_OK


def cmd_merge(out: _Out, args: argparse.Namespace) -> int:
    base, target = Path(args.base), Path(args.out)
    if not is_multi(base):
        raise ValueError(f"{base} is a single file, not a multi-file set (name its manifest or base path)")
    if target.exists() and not args.overwrite:
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
    save_single_file(None, state, target)
    out.document(
        {"ok": True, "base": str(base), "output": str(target), "components": keys, "bytes": target.stat().st_size}
    )
    out.line(f"merged {plural(len(keys), 'component')} of {base} into {target} ({human_bytes(target.stat().st_size)})")
    return EXIT_OK


# --------------------------------------------------------------------------- diff


def _load_for_diff(path: Path) -> Any:
    is_multi(path)  # a clear error for a directory or a missing file
    return load(path)


def cmd_diff(out: _Out, args: argparse.Namespace) -> int:
    a_path, b_path = Path(args.a), Path(args.b)
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
                str(c.key),
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


# --------------------------------------------------------------------------- parser and main


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="safeckpt",
        description="Inspect, convert, scan, verify, split, merge and compare PyTorch checkpoints without pickle.",
        epilog="exit codes: 0 ok, 1 unsafe file / digest mismatch / differences, 2 usage or format error",
    )
    parser.add_argument("--version", action="version", version=f"safeckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[_Out, argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = command(
        "inspect", cmd_inspect, "show a checkpoint's format, components, tensors, metadata and class references"
    )
    p.add_argument(
        "path", help="a safeckpt file, multi-file set (base path or manifest), safetensors or torch.save file"
    )
    p.add_argument("--tensors", action="store_true", help="list every tensor with its dtype and shape")

    p = command("convert", cmd_convert, "convert torch.save files to the safe format, never executing them")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="SRC [DST]: one file, to DST or to SRC with the suffix .safetensors; or a directory, three or more "
        "files, or files then an existing DST directory",
    )
    p.add_argument("--multi", action="store_true", help="write a multi-file set (the destination is its base path)")
    p.add_argument(
        "--keys", nargs="+", metavar="K", help="components of the multi-file set (default: the seed's three)"
    )
    p.add_argument(
        "--allow-global",
        nargs="+",
        action="extend",
        metavar="M:Q",
        default=[],
        help="module:qualname to import and rebuild while reading (inert references convert as well)",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="also convert files in subdirectories")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_hf_options(p)

    p = command("scan", cmd_scan, "report the globals a checkpoint names and its verdict; exit 1 if any is dangerous")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    p.add_argument("-r", "--recursive", action="store_true", help="also scan files in subdirectories")

    p = command("verify", cmd_verify, "recompute the recorded SHA-256 digests and decode the whole structure")
    p.add_argument("path", help="a safeckpt file or multi-file set (others are checked for structure only)")
    p.add_argument("--require-digests", action="store_true", help="exit 1 when the file records no digests")
    add_signature_options(p)
    add_sign_command(command)

    p = command("split", cmd_split, "split a single-file checkpoint into a multi-file set next to it")
    p.add_argument("path", help="the single file")
    p.add_argument("--keys", nargs="+", metavar="K", help="components to write (default: the seed's three)")
    p.add_argument("--all", action="store_true", help="write every component with a str key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set")

    p = command("merge", cmd_merge, "merge a multi-file set into one safeckpt file")
    p.add_argument("base", help="the set's base path or manifest")
    p.add_argument("out", help="the single file to write")
    p.add_argument("--verify", action="store_true", help="check the digests while reading")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = command("diff", cmd_diff, "compare two checkpoints tensor by tensor; exit 1 when they differ")
    p.add_argument("a", metavar="A", help="checkpoint A (any supported format)")
    p.add_argument("b", metavar="B", help="checkpoint B (any supported format)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default: exact)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: exact)")
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (in-process callers)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the ``safeckpt`` command line.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: :data:`EXIT_OK`, :data:`EXIT_FAILED` or :data:`EXIT_USAGE`.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("safeckpt: error: name a command (safeckpt --help lists them)", file=sys.stderr)
        return EXIT_USAGE
    out = _Out(args)
    try:
        return int(args.func(out, args))
    except KeyboardInterrupt:
        print("safeckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as a process killed by SIGPIPE would
        _silence_stdout()
        return 141
    except Exception as exc:  # noqa: BLE001  # every error becomes one line and an exit code; a traceback with --debug
        code = _exit_code(exc)
        if args.debug:
            traceback.print_exc()
        message = _message(exc)
        if not isinstance(exc, (SafeCkptError, OSError, ValueError, TypeError)):
            message = f"internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"safeckpt {args.command}: error: {message}", file=sys.stderr)
        if isinstance(exc, UnsafeCheckpointError) and exc.globals:
            print(f"safeckpt {args.command}: dangerous globals: {', '.join(exc.globals)}", file=sys.stderr)
        out.document({"ok": False, "error": _error_fields(exc)})
        return code
