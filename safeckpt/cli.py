"""The ``safeckpt`` command line (also ``python -m safeckpt``).

Commands: ``inspect``, ``convert``, ``scan``, ``verify``, ``split``, ``merge`` and
``diff``. Each prints a human-readable report, or one JSON document on stdout
with ``--json``; errors are one escaped line on stderr (a traceback only with
``--debug``). Exit codes: :data:`EXIT_OK` (0), :data:`EXIT_FAILED` (1: a
dangerous file, a digest mismatch, differences found, a refused conversion) and
:data:`EXIT_USAGE` (2: bad arguments, a file that is not a checkpoint, any
other error). Nothing here ever unpickles: legacy files go through the no-exec
reader.

Start-up: this module imports neither torch nor the commands. Each subcommand
is a row of :data:`SUBCOMMANDS` naming the function that runs it
(``"module:function"`` inside this package), imported only when it runs, so
``--help``, ``--version`` and ``scan`` stay fast. A new command is one more row.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .version import __version__
from .cli_output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, JSON_SCHEMA_VERSION, Out, error_fields, message, print_error, terminal_text
from .errors import IntegrityError, SafeCkptError, UnsafeCheckpointError

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "JSON_SCHEMA_VERSION", "SUBCOMMANDS", "Subcommand", "main"]



@dataclass(frozen=True)
class Subcommand:
    """One ``safeckpt`` subcommand.

    Attributes:
        name: the command word.
        target: ``"module:function"`` (module relative to this package); the
            function takes ``(Out, argparse.Namespace)`` and returns the exit code.
        help: one line for ``--help``.
        arguments: adds the command's own arguments to its parser.
    """

    name: str
    target: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="a safeckpt file, multi-file set (base path or manifest), safetensors or torch.save file, "
        "a checkpoint manager directory or step, or a Hugging Face *.index.json",
    )
    p.add_argument("--tensors", action="store_true", help="list every tensor with its dtype and shape")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="SRC [DST]: one file, to DST or to SRC with the suffix .safetensors; several sources (files or "
        "directories) go to --out-dir DIR or each next to itself. A DST that is itself a torch.save file is "
        "taken as a second source, never overwritten",
    )
    p.add_argument("-o", "--out-dir", metavar="DIR", help="write every output into DIR")
    p.add_argument("--multi", action="store_true", help="write a multi-file set (the destination is its base path)")
    p.add_argument(
        "--keys", nargs="+", metavar="K", help="components of the multi-file set (default: every top-level key)"
    )
    p.add_argument(
        "--allow-global",
        nargs="+",
        action="extend",
        metavar="M:Q",
        default=[],
        help="module:qualname to import (the working directory first on the path) and rebuild while reading; "
        "inert references convert as well",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="also convert files in subdirectories")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--in-place", action="store_true", help="replace each source with its conversion")
    p.add_argument("--hf", action="store_true",
                   help="PATH is a Hugging Face model folder SRC_DIR [DST_DIR]: write model.safetensors (or shards "
                        "and model.safetensors.index.json) from pytorch_model*.bin")
    p.add_argument("--max-shard-size", metavar="SIZE", help="with --hf: reshard, e.g. 5GB or 500MiB")
    p.add_argument("--remove-legacy", action="store_true",
                   help="with --hf, in place: delete the converted .bin files after writing")
    p.add_argument("--trainer-files", action="store_true",
                   help="with --hf: also convert optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin")


def _scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    p.add_argument("-r", "--recursive", action="store_true", help="also scan files in subdirectories")


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="a safeckpt file or multi-file set, a checkpoint manager directory or step (others are checked "
        "for structure only)",
    )
    p.add_argument("--require-digests", action="store_true", help="exit 1 when the file records no digests")
    p.add_argument("--signature", metavar="SIG", help="verify this model_signing signature of PATH")
    p.add_argument("--public-key", metavar="PEM", help="with --signature: the signer's public key")
    p.add_argument("--certificate-chain", nargs="+", metavar="PEM",
                   help="with --signature: verify a certificate signature against these certificates")
    p.add_argument("--identity", help="with --signature: the Sigstore identity (with --oidc-issuer)")
    p.add_argument("--oidc-issuer", help="with --signature: the Sigstore OIDC issuer")


def _sign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint file, a multi-file set (base path or manifest), or a directory")
    p.add_argument("--key", metavar="PEM", help="elliptic-curve private key (offline signing)")
    p.add_argument("--password", help="the private key's password, if it is encrypted")
    p.add_argument("--certificate", metavar="PEM", help="with --key: the signing certificate")
    p.add_argument("--certificate-chain", nargs="+", metavar="PEM", default=[], help="with --certificate")
    p.add_argument("--sigstore", action="store_true", help="sign keyless with Sigstore (interactive, online)")
    p.add_argument("--signature", metavar="SIG", help="where to write the signature (default PATH.sig)")


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the single file")
    p.add_argument("--keys", nargs="+", metavar="K", help="components to write (default: the seed's three)")
    p.add_argument("--all", action="store_true", help="write every component with a str key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the set's base path or manifest")
    p.add_argument("out", help="the single file to write")
    p.add_argument("--verify", action="store_true", help="check the digests while reading")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="checkpoint A (any supported format)")
    p.add_argument("b", metavar="B", help="checkpoint B (any supported format)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default: exact)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: exact)")


SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "inspect",
        "cli_commands:cmd_inspect",
        "show a checkpoint's format, components, tensors, metadata and class references",
        _inspect_args,
    ),
    Subcommand(
        "convert", "cli_convert:cmd_convert", "convert torch.save files to the safe format, never executing them", _convert_args
    ),
    Subcommand(
        "scan", "cli_scan:cmd_scan", "report the globals a checkpoint names and its verdict; exit 1 if any is dangerous", _scan_args
    ),
    Subcommand(
        "verify", "cli_commands:cmd_verify", "recompute the recorded SHA-256 digests and decode the whole structure", _verify_args
    ),
    Subcommand("split", "cli_commands:cmd_split", "split a single-file checkpoint into a multi-file set next to it", _split_args),
    Subcommand("merge", "cli_commands:cmd_merge", "merge a multi-file set into one safeckpt file", _merge_args),
    Subcommand("diff", "cli_commands:cmd_diff", "compare two checkpoints tensor by tensor; exit 1 when they differ", _diff_args),
    Subcommand(
        "sign", "cli_integrations:cmd_sign", "sign a checkpoint (file, multi-file set or directory) with model_signing",
        _sign_args,
    ),
]
"""The subcommands, in ``--help`` order."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its messages (which echo arguments, such as hostile file names) escaped."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (file or sys.stderr).write(terminal_text(message, keep_newlines=True))


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for URL arguments (s3://, gs://...); VALUE is JSON or text, a dotted KEY nests: "
        "client_kwargs.endpoint_url=http://localhost:9000",
    )
    parser = _Parser(
        prog="safeckpt",
        description="Inspect, convert, scan, verify, split, merge and compare PyTorch checkpoints without pickle.",
        epilog="exit codes: 0 ok, 1 unsafe file / digest mismatch / differences, 2 usage or format error",
    )
    parser.add_argument("--version", action="version", version=f"safeckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, parents=[common], help=command.help, description=command.help)
        p.set_defaults(target=command.target)
        command.arguments(p)
    return parser


def _run(target: str, out: Out, args: argparse.Namespace) -> int:
    """Import the command's module and :mod:`.cli_remote` (URL arguments, ``--storage-option``) and run it."""
    module_name, _, function = target.partition(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    remote = importlib.import_module(f"{__package__}.cli_remote")
    out.remote = remote.Remote(remote.parse_storage_options(args.storage_option))
    return int(getattr(module, function)(out, args))


def _exit_code(exc: BaseException) -> int:
    return EXIT_FAILED if isinstance(exc, (UnsafeCheckpointError, IntegrityError)) else EXIT_USAGE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (in-process callers)
        pass


def _report(exc: BaseException, args: argparse.Namespace, out: Out) -> int:
    """One escaped error line on stderr (and the ``--json`` document); returns the exit code."""
    if args.debug:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(terminal_text(out.remote.shown(text), keep_newlines=True))
    text = message(exc)
    if not isinstance(exc, (SafeCkptError, OSError, ValueError, TypeError)):
        text = f"internal error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)"
    out.error(text)
    if isinstance(exc, UnsafeCheckpointError) and exc.globals:
        print_error(args.command, f"dangerous globals: {', '.join(exc.globals)}")
    out.document({"ok": False, "error": error_fields(exc)})
    return _exit_code(exc)


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
        print_error(None, "error: name a command (safeckpt --help lists them)")
        return EXIT_USAGE
    out = Out(args)
    try:
        return _run(args.target, out, args)
    except KeyboardInterrupt:
        print_error(args.command, "interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as a process killed by SIGPIPE would
        _silence_stdout()
        return 141
    except Exception as exc:  # noqa: BLE001  # every error becomes one line and an exit code; a traceback with --debug
        return _report(exc, args, out)
    finally:
        out.remote.close()

