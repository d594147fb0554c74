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


def cmd_convert_hf(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt convert --hf SRC_DIR [DST_DIR]``."""
    if len(args.paths) > 2:
        raise ValueError("--hf takes SRC_DIR [DST_DIR]")
    src = Path(args.paths[0])
    dst = Path(args.paths[1]) if len(args.paths) == 2 else None
    written = convert_folder(
        src, dst, max_shard_size=args.max_shard_size, remove_legacy=args.remove_legacy,
        trainer_files=args.trainer_files, overwrite=args.overwrite, allowed_globals=args.allow_global,
    )
    out.document({"ok": True, "source": str(src), "outputs": [str(p) for p in written], "error": None})
    out.line(f"converted {_shown(src)} -> {_shown(dst or src)}: {', '.join(_shown(p.name) for p in written)}")
    return EXIT_OK


# --------------------------------------------------------------------------- sign, verify --signature


def cmd_sign(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt sign PATH --key KEY``."""
    if not args.key and not args.sigstore:
        raise ValueError("pass --key PEM (offline) or --sigstore")
    sig = sign(args.path, args.signature, private_key=args.key, password=args.password,
               certificate=args.certificate, certificate_chain=args.certificate_chain, sigstore=args.sigstore)
    out.document({"ok": True, "path": str(args.path), "signature": str(sig), "error": None})
    out.line(f"signed {_shown(args.path)} -> {_shown(sig)}")
    return EXIT_OK


def cmd_verify_signature(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt verify PATH --signature SIG --public-key PUB``."""
    if not args.signature:
        raise ValueError("--public-key, --certificate-chain and --identity verify a signature: pass --signature SIG")
    try:
        names = verify_signature(args.path, args.signature, public_key=args.public_key,
                                 certificate_chain=args.certificate_chain, identity=args.identity,
                                 oidc_issuer=args.oidc_issuer)
    except SignatureError as exc:
        out.document({"ok": False, "path": str(args.path), "signature": str(args.signature),
                      "error": {"type": type(exc).__name__, "message": str(exc), "file": exc.file}})
        out.line(f"FAILED: {_shown(exc)}")
        return EXIT_FAILED
    out.document({"ok": True, "path": str(args.path), "signature": str(args.signature), "signed_files": names,
                  "error": None})
    out.line(f"OK {_shown(args.path)}: the signature verifies; {len(names)} signed file(s): "
             f"{', '.join(_shown(n) for n in names)}")
    return EXIT_OK
