"""``safeckpt convert``: which files to write, where, and never over a checkpoint the user did not name as output.

Rules:

- ``convert SRC`` writes ``SRC`` with ``.safetensors`` (``--multi``: a set based at ``SRC``).
- ``convert SRC DST`` writes ``DST``, unless ``DST`` is itself a ``torch.save``
  checkpoint: then it is a second source (what ``convert *.pth`` with two
  matches means), converted next to itself, never overwritten.
- Several sources go to ``--out-dir DIR`` (or a trailing existing directory),
  or each next to itself; a directory source is searched for ``torch.save`` files.
- A destination that is the source needs ``--in-place``; an existing output needs ``--overwrite``.
- ``--allow-global module:qualname`` names are imported with the working
  directory first on ``sys.path`` (as ``python -m`` does), from the console
  script and ``python -m safeckpt`` alike; names that cannot be imported are
  reported on stderr and left inert.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli_integrations import cmd_convert_hf
from .cli_output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Out, collect_files, human_bytes, message, plural
from .conversion import convert, default_destination
from .cli_remote import Remote
from .detect import Kind, detect, detect_bytes
from .errors import SafeCkptError, UnsafeCheckpointError
from .multifile import MANIFEST_SUFFIX, manifest_path, split_base
from .refs import import_allowed
from .storage import is_url, open_source

__all__ = ["cmd_convert", "convert_plan", "resolve_globals"]

TORCH_KINDS = (Kind.TORCH_ZIP, Kind.TORCH_LEGACY)


# --------------------------------------------------------------------------- --allow-global


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory first on ``sys.path`` while the user's modules are imported, as ``python -m`` has it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def resolve_globals(names: list[str]) -> tuple[list[Any], list[str]]:
    """Import ``module:qualname`` names (:func:`safeckpt.refs.import_allowed`, as the API resolves
    ``allowed_globals``) with the working directory on the path; returns ``(objects, problems)``,
    one problem line per name not found."""
    with _cwd_on_path():
        found, problems = import_allowed(names)
    return list(found.values()), [f"--allow-global {name}: {why}; ignored" for name, why in problems.items()]


# --------------------------------------------------------------------------- planning

Place = Any  # a local ``Path`` or a URL ``str`` (a ``Path`` would fold ``s3://`` into ``s3:/``)


def _place(arg: str) -> Place:
    return arg if is_url(arg) else Path(arg)


def _name(p: Place) -> str:
    return posixpath.basename(p.rstrip("/")) if isinstance(p, str) else p.name


def _is_torch_file(p: Place, remote: Remote) -> bool:
    try:
        if isinstance(p, str):
            if not remote.is_file(p):
                return False
            with open_source(p, remote.options) as source:
                return detect_bytes(source.read(0, min(source.size, 16))) in TORCH_KINDS
        return p.is_file() and detect(p) in TORCH_KINDS
    except OSError:
        return False


def _is_dir(p: Place, remote: Remote) -> bool:
    return remote.is_dir(p) if isinstance(p, str) else p.is_dir()


def _inside(directory: Place, rel: Path) -> Place:
    """``rel`` inside ``directory`` (a URL stays a URL)."""
    return posixpath.join(directory.rstrip("/"), rel.as_posix()) if isinstance(directory, str) else directory / rel


def _sources_in(p: Place, args: argparse.Namespace, remote: Remote) -> list[tuple[Place, Path]]:
    """``(file, path relative to p)`` of the torch.save files in the directory ``p``."""
    if isinstance(p, str):
        base = p.rstrip("/")
        files = [f for f in remote.files_in(p, args.recursive) if _is_torch_file(f, remote)]
        return [(f, Path(f[len(base) + 1 :])) for f in files]
    found = collect_files([str(p)], args.recursive, lambda f: _is_torch_file(f, remote))
    return [(f, f.relative_to(p)) for f in found]


def convert_plan(args: argparse.Namespace, notes: list[str], remote: Remote | None = None) -> list[tuple[Place, Place | None]]:
    """``(source, destination)`` pairs (``None``: the default next to the source); see the module docstring.

    Args:
        notes: lines for stderr about how the arguments were read.
        remote: the command's URL arguments (their storage options).

    Raises:
        ValueError: for contradictory arguments or two sources with one output.
    """
    remote = remote if remote is not None else Remote()
    paths = [_place(p) for p in args.paths]
    into: Place | None = _place(args.out_dir) if args.out_dir else None
    if into is None and len(paths) == 2 and not _is_dir(paths[0], remote):
        dst = paths[1]
        if _is_torch_file(dst, remote):
            notes.append(
                f"{dst} is itself a torch.save checkpoint: converting it as a second source, not writing over it "
                "(name an output with --out-dir DIR or a new file name)"
            )
        elif not (_is_dir(dst, remote) or args.paths[1].endswith(("/", os.sep))):
            if args.in_place:
                raise ValueError("--in-place converts each source into itself: name no destination")
            return [(paths[0], dst)]
    if into is None and len(paths) >= 2 and (_is_dir(paths[-1], remote) or args.paths[-1].endswith(("/", os.sep))):
        into = paths.pop()
    if args.in_place and into is not None:
        raise ValueError("--in-place converts each source into itself: it takes no --out-dir or destination")
    plan: list[tuple[Place, Place | None]] = []
    for p in paths:
        if _is_dir(p, remote):
            pairs = _sources_in(p, args, remote)
            if not pairs:
                raise ValueError(f"no torch.save files in {p}")
        else:
            pairs = [(p, Path(_name(p)))]
        for src, rel in pairs:
            if args.in_place:
                plan.append((src, src))
            elif into is None:
                plan.append((src, None))
            else:
                plan.append((src, _inside(into, default_destination(rel, multi=args.multi))))
    outputs: dict[Any, Place] = {}
    for source, destination in plan:
        output = _output_of(source, destination, args.multi)
        if output in outputs and outputs[output] != source:
            raise ValueError(f"{outputs[output]} and {source} would both be written to {output}; convert them separately")
        outputs[output] = source
    return plan


def _manifest_of(target: Place) -> Place:
    return split_base(target) + MANIFEST_SUFFIX if isinstance(target, str) else manifest_path(target)


def _output_of(src: Place, dst: Place | None, multi: bool) -> Any:
    target = dst if dst is not None else default_destination(src, multi=multi)
    output = _manifest_of(target) if multi else target
    return output if isinstance(output, str) else output.absolute()


# --------------------------------------------------------------------------- the command


def _same(a: Place, b: Place) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return os.path.samefile(a, b)


def _convert_one(src: Place, dst: Place | None, args: argparse.Namespace, allowed: list[Any], remote: Remote) -> list[str]:
    """Convert ``src`` to ``dst``; returns the files written."""
    target = dst if dst is not None else default_destination(src, multi=args.multi)
    if not (remote.is_file(src) if isinstance(src, str) else src.is_file()):
        raise FileNotFoundError(2, "No such file or directory", str(src))
    output = _manifest_of(target) if args.multi else target
    exists = remote.exists(str(output))
    if not args.in_place and exists and _same(src, output):
        raise FileExistsError(f"{output} is the source; pass --in-place to replace it with its conversion")
    if exists and not args.in_place and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    written = convert(
        src,
        target,
        multi=args.multi,
        keys_to_save=args.keys,
        allowed_globals=allowed,
        in_place=args.in_place,
        storage_options=remote.options or None,
    )
    if isinstance(written, dict):
        return [str(p) for p in written.values()] + [str(output)]
    return [str(written)]


def cmd_convert(out: Out, args: argparse.Namespace) -> int:
    """``safeckpt convert``."""
    if args.hf:
        hf_allowed, hf_problems = resolve_globals(list(args.allow_global))
        for problem in hf_problems:
            out.warning(problem)
        return cmd_convert_hf(out, args, hf_allowed)
    if args.keys and not args.multi:
        raise ValueError("--keys chooses the files of a multi-file set: pass --multi too")
    if args.in_place and args.multi:
        raise ValueError("--in-place replaces a file with its single-file conversion: it cannot be combined with --multi")
    notes: list[str] = []
    plan = convert_plan(args, notes, out.remote)
    for note in notes:
        out.warning(note)
    allowed, problems = resolve_globals(list(args.allow_global))
    for problem in problems:
        out.warning(problem)
    results: list[dict[str, Any]] = []
    with out.progress("converting", len(plan)) as bar:
        for src, dst in plan:
            entry: dict[str, Any] = {"source": str(src), "status": "converted", "outputs": [], "globals": [], "error": None}
            try:
                entry["outputs"] = _convert_one(src, dst, args, allowed, out.remote)
            except UnsafeCheckpointError as exc:
                entry.update(status="refused", globals=list(exc.globals), error=message(exc, src))
            except (SafeCkptError, OSError, ValueError, TypeError) as exc:
                entry.update(status="error", error=message(exc, src))
            results.append(entry)
            bar.advance()
    counts = {s: sum(r["status"] == s for r in results) for s in ("converted", "refused", "error")}
    code = EXIT_FAILED if counts["refused"] else EXIT_USAGE if counts["error"] else EXIT_OK
    out.document(
        {
            "ok": code == EXIT_OK,
            "results": results,
            "summary": counts,
            "unresolved_globals": problems,
        }
    )
    for r in results:
        if r["status"] == "converted":
            size = sum(out.remote.size(p) for p in r["outputs"])
            out.line(f"converted {r['source']} -> {', '.join(r['outputs'])} ({human_bytes(size)})")
        elif r["status"] == "refused":
            out.line(
                f"REFUSED {r['source']}: dangerous globals {', '.join(r['globals']) or '(none named)'}; "
                "nothing was written or executed"
            )
        else:
            out.error(r["error"])
    if len(results) > 1:
        out.line(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" of {plural(len(results), 'file')}")
    return code
