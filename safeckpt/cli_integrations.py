"""The command line of the integrations: ``convert --hf``, ``sign``, and ``verify --signature``.

:mod:`safeckpt.cli` registers these with a few lines; the commands write through its
output object (``line``/``document``) and return its exit codes (0 ok, 1 a signature
that does not verify, 2 usage or format error).

Start-up: importing this module imports neither torch nor ``model_signing``; each
command imports what it runs (:mod:`safeckpt.hf`, :mod:`safeckpt.signing`) when it runs,
so ``safeckpt --help`` stays fast. The argument adders (``add_hf_options``,
``sign_arguments``, ``add_signature_options``) fit a table of lazily run subcommands.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_output import EXIT_FAILED, EXIT_OK, terminal_text as _shown
from .errors import SignatureError
from .hf import convert_folder
from .signing import sign, verify_signature

__all__ = ["cmd_convert_hf", "cmd_sign", "cmd_verify_signature"]


# --------------------------------------------------------------------------- convert --hf


def cmd_convert_hf(out: Any, args: argparse.Namespace, allowed: list[Any] | None = None) -> int:
    """``safeckpt convert --hf SRC_DIR [DST_DIR]`` (either may be a URL: converted in a local copy, then uploaded).

    Args:
        allowed: the ``--allow-global`` names, already resolved (default: the names as given).
    """
    if len(args.paths) > 2:
        raise ValueError("--hf takes SRC_DIR [DST_DIR]")
    remote = out.remote
    src_arg, dst_arg = args.paths[0], (args.paths[1] if len(args.paths) == 2 else None)
    upload_to = dst_arg if dst_arg is not None and remote.is_remote(dst_arg) else None
    in_place_url = src_arg if dst_arg is None and remote.is_remote(src_arg) else None
    if (upload_to or in_place_url) and args.remove_legacy:
        raise ValueError("--remove-legacy deletes files of a local folder only; delete the remote .bin files yourself")
    src = Path(remote.local(src_arg))
    dst: Path | None = None
    if upload_to is not None:
        dst = Path(remote.local(upload_to) if remote.exists(upload_to) else remote.workspace(upload_to))
    elif dst_arg is not None:
        dst = Path(dst_arg)
    written = convert_folder(
        src, dst, max_shard_size=args.max_shard_size, remove_legacy=args.remove_legacy,
        trainer_files=args.trainer_files, overwrite=args.overwrite,
        allowed_globals=args.allow_global if allowed is None else allowed,
    )
    if upload_to is not None and dst is not None:
        remote.upload(str(dst), upload_to)
    elif in_place_url is not None:
        remote.upload(str(src), in_place_url, [str(p) for p in written])
    shown_dst = dst_arg if dst_arg is not None else src_arg
    out.document({"ok": True, "source": src_arg, "outputs": [str(p) for p in written], "error": None})
    out.line(f"converted {_shown(src_arg)} -> {_shown(shown_dst)}: {', '.join(_shown(p.name) for p in written)}")
    return EXIT_OK


# --------------------------------------------------------------------------- sign, verify --signature


def cmd_sign(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt sign PATH --key KEY`` (PATH and the signature may be URLs: signed from a local copy)."""
    if not args.key and not args.sigstore:
        raise ValueError("pass --key PEM (offline) or --sigstore")
    remote = out.remote
    path = remote.local(args.path)
    sig_url = args.signature if remote.is_remote(args.signature) else None
    if sig_url is None and args.signature is None and remote.is_remote(args.path):
        sig_url = args.path.rstrip("/") + ".sig"
    local_sig = args.signature
    if sig_url is not None:
        parent, _, name = sig_url.rstrip("/").rpartition("/")
        local_sig = str(Path(remote.workspace(parent)) / name)
    sig = sign(path, local_sig, private_key=args.key and remote.local(args.key), password=args.password,
               certificate=args.certificate and remote.local(args.certificate),
               certificate_chain=[remote.local(c) for c in args.certificate_chain], sigstore=args.sigstore)
    if sig_url is not None:
        remote.upload(str(Path(sig).parent), sig_url.rpartition("/")[0], [str(sig)])
    shown_sig = sig_url or str(sig)
    out.document({"ok": True, "path": str(args.path), "signature": shown_sig, "error": None})
    out.line(f"signed {_shown(args.path)} -> {_shown(shown_sig)}")
    return EXIT_OK


def cmd_verify_signature(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt verify PATH --signature SIG --public-key PUB``."""
    if not args.signature:
        raise ValueError("--public-key, --certificate-chain and --identity verify a signature: pass --signature SIG")
    try:
        local = out.remote.local
        names = verify_signature(local(args.path), local(args.signature),
                                 public_key=args.public_key and local(args.public_key),
                                 certificate_chain=args.certificate_chain and [local(c) for c in args.certificate_chain],
                                 identity=args.identity, oidc_issuer=args.oidc_issuer)
    except SignatureError as exc:
        out.document({"ok": False, "path": str(args.path), "signature": str(args.signature),
                      "error": {"type": type(exc).__name__, "message": str(exc), "file": exc.file}})
        out.line(f"FAILED: {_shown(out.remote.shown(str(exc)))}")
        return EXIT_FAILED
    out.document({"ok": True, "path": str(args.path), "signature": str(args.signature), "signed_files": names,
                  "error": None})
    out.line(f"OK {_shown(args.path)}: the signature verifies; {len(names)} signed file(s): "
             f"{', '.join(_shown(n) for n in names)}")
    return EXIT_OK
