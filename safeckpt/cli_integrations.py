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

from .errors import SignatureError

__all__ = ["add_hf_options", "add_sign_command", "add_signature_options", "cmd_convert_hf", "cmd_sign",
           "cmd_verify_signature", "sign_arguments"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _shown(text: object) -> str:
    """A file-derived string made printable (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# --------------------------------------------------------------------------- convert --hf


def add_hf_options(p: argparse.ArgumentParser) -> None:
    """The ``convert`` options of a Hugging Face folder conversion."""
    p.add_argument("--hf", action="store_true",
                   help="PATH is a Hugging Face model folder SRC_DIR [DST_DIR]: write model.safetensors (or shards "
                        "and model.safetensors.index.json) from pytorch_model*.bin")
    p.add_argument("--max-shard-size", metavar="SIZE", help="with --hf: reshard, e.g. 5GB or 500MiB")
    p.add_argument("--remove-legacy", action="store_true",
                   help="with --hf, in place: delete the converted .bin files after writing")
    p.add_argument("--trainer-files", action="store_true",
                   help="with --hf: also convert optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin")


def cmd_convert_hf(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt convert --hf SRC_DIR [DST_DIR]``."""
    from .hf import convert_folder  # torch, only when the command runs

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


SIGN_HELP = "sign a checkpoint (file, multi-file set or directory) with model_signing"


def add_sign_command(command: Any) -> None:
    """Register ``sign`` through ``cli``'s ``command(name, func, help)`` factory."""
    sign_arguments(command("sign", cmd_sign, SIGN_HELP))


def sign_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``safeckpt sign``."""
    p.add_argument("path", help="a checkpoint file, a multi-file set (base path or manifest), or a directory")
    p.add_argument("--key", metavar="PEM", help="elliptic-curve private key (offline signing)")
    p.add_argument("--password", help="the private key's password, if it is encrypted")
    p.add_argument("--certificate", metavar="PEM", help="with --key: the signing certificate")
    p.add_argument("--certificate-chain", nargs="+", metavar="PEM", default=[], help="with --certificate")
    p.add_argument("--sigstore", action="store_true", help="sign keyless with Sigstore (interactive, online)")
    p.add_argument("--signature", metavar="SIG", help="where to write the signature (default PATH.sig)")


def cmd_sign(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt sign PATH --key KEY``."""
    from .signing import sign  # torch and model_signing, only when the command runs

    if not args.key and not args.sigstore:
        raise ValueError("pass --key PEM (offline) or --sigstore")
    sig = sign(args.path, args.signature, private_key=args.key, password=args.password,
               certificate=args.certificate, certificate_chain=args.certificate_chain, sigstore=args.sigstore)
    out.document({"ok": True, "path": str(args.path), "signature": str(sig), "error": None})
    out.line(f"signed {_shown(args.path)} -> {_shown(sig)}")
    return EXIT_OK


def add_signature_options(p: argparse.ArgumentParser) -> None:
    """The ``verify`` options that check a model_signing signature."""
    p.add_argument("--signature", metavar="SIG", help="verify this model_signing signature of PATH")
    p.add_argument("--public-key", metavar="PEM", help="with --signature: the signer's public key")
    p.add_argument("--certificate-chain", nargs="+", metavar="PEM",
                   help="with --signature: verify a certificate signature against these certificates")
    p.add_argument("--identity", help="with --signature: the Sigstore identity (with --oidc-issuer)")
    p.add_argument("--oidc-issuer", help="with --signature: the Sigstore OIDC issuer")


def cmd_verify_signature(out: Any, args: argparse.Namespace) -> int:
    """``safeckpt verify PATH --signature SIG --public-key PUB``."""
    from .signing import verify_signature  # torch and model_signing, only when the command runs

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
