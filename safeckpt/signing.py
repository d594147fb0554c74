"""Signed checkpoints on OpenSSF ``model_signing`` (the ``safeckpt[signing]`` extra).

What is signed (a ``model_signing`` signature, verifiable by ``model_signing``
itself, file serialization with SHA-256):

- a single file: the file itself (``model_signing`` names it ``.``);
- a multi-file set: its directory, restricted to exactly the manifest and the
  files the manifest names (every other entry of the directory is listed in the
  signature's ``ignore_paths``);
- a directory (a :class:`~safeckpt.CheckpointManager` step, a Hugging Face
  folder): every file in it, except the signature file itself.

Verifying before reading (:func:`verified_copy`): the signature file is read
once; the names it lists are only used to know which files to copy (relative
names under the checkpoint's directory, no ``..``, no symlinks, regular files
only). Those files are copied into a fresh private directory (mode 0700, in the
system temporary directory, ``TMPDIR`` moves it); ``model_signing`` then verifies
the *copy*, and the caller parses the copy. Nobody else can write the copy, so
the bytes verified are exactly the bytes parsed (no check-then-use race), and
files that are not signed are never read. The copy is deleted afterwards.

``model_signing`` is imported only when signing or verifying.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import SignatureError
from .limits import DEFAULT_LIMITS
from .multifile import find_manifest, read_manifest

__all__ = ["SignatureError", "SignedSet", "sign", "signed_set", "verified_copy", "verify_signature"]

MAX_SIGNATURE_BYTES = 16 << 20  # a model_signing bundle is a few KiB plus one line per file
SINGLE_FILE = "."  # the resource name model_signing gives a file signed on its own


@dataclass(frozen=True)
class SignedSet:
    """What a signature covers.

    Attributes:
        root: the signed file, or the directory the names are relative to.
        names: the signed files, relative to ``root`` (``(".",)`` for a single file).
        ignored: other entries of ``root`` left out of the signature.
    """

    root: Path
    names: tuple[str, ...]
    ignored: tuple[str, ...] = ()

    @property
    def is_file(self) -> bool:
        return self.names == (SINGLE_FILE,)


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as exc:  # pragma: no cover - the extra is installed by the test extra
        raise ImportError("signing needs the optional dependency: pip install 'safeckpt[signing]'") from exc
    return model_signing


def signed_set(path: str | os.PathLike[str], *, signature: str | os.PathLike[str] | None = None) -> SignedSet:
    """What :func:`sign` signs for ``path``: a file, a multi-file set, or a directory.

    Args:
        path: a checkpoint file, a multi-file set (base path or manifest), or a directory.
        signature: the signature file, left out of a signed directory.
    """
    p = Path(path)
    if p.is_dir():
        names = []
        for entry in sorted(p.rglob("*")):
            if entry.is_symlink():
                raise SignatureError(f"{entry} is a symlink; safeckpt signs regular files only", file=str(entry))
            if entry.is_file():
                names.append(entry.relative_to(p).as_posix())
        skip = _relative(signature, p)
        return SignedSet(p, tuple(n for n in names if n != skip), (skip,) if skip in names else ())
    manifest = find_manifest(p)
    if manifest is not None:
        read = read_manifest(manifest, DEFAULT_LIMITS)
        names = sorted({manifest.name, *(e.name for e in read.entries)})
        others = sorted(e.name for e in manifest.parent.iterdir() if e.name not in names)
        return SignedSet(manifest.parent, tuple(names), tuple(others))
    if not p.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    return SignedSet(p, (SINGLE_FILE,))


def _relative(path: str | os.PathLike[str] | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def sign(
    path: str | os.PathLike[str],
    signature: str | os.PathLike[str] | None = None,
    *,
    private_key: str | os.PathLike[str] | None = None,
    password: str | None = None,
    certificate: str | os.PathLike[str] | None = None,
    certificate_chain: Iterable[str | os.PathLike[str]] = (),
    sigstore: bool = False,
) -> Path:
    """Sign a checkpoint with ``model_signing``.

    Args:
        path: a single file, a multi-file set (base path or manifest) or a directory
            (see the module docstring for what is covered).
        signature: where to write the signature (default ``<path>.sig``).
        private_key: a PEM elliptic-curve private key (offline signing).
        password: the key's password, if it is encrypted.
        certificate: with ``private_key``, sign with this signing certificate instead.
        certificate_chain: the certificates that chain ``certificate`` to a root.
        sigstore: sign keyless with Sigstore (interactive OIDC login, needs the network).

    Returns:
        The signature file.
    """
    ms = _model_signing()
    sig = Path(signature) if signature is not None else Path(os.fspath(path).rstrip("/\\") + ".sig")
    covered = signed_set(path, signature=sig)
    config = ms.signing.Config()
    if sigstore:
        config.use_sigstore_signer()
    elif private_key is None:
        raise ValueError("pass private_key= (offline signing) or sigstore=True")
    elif certificate is not None:
        config.use_certificate_signer(
            private_key=private_key, signing_certificate=certificate, certificate_chain=list(certificate_chain)
        )
    else:
        config.use_elliptic_key_signer(private_key=private_key, password=password)
    if covered.ignored:
        config.set_hashing_config(ms.hashing.Config().set_ignored_paths(paths=list(covered.ignored)))
    config.sign(covered.root, sig)
    return sig


# --------------------------------------------------------------------------- verifying


def _signature_names(raw: bytes, where: str) -> list[str]:
    """The resource names of a model_signing bundle, not yet trusted (only used to know what to copy)."""
    try:
        bundle = json.loads(raw)
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        predicate = payload["predicate"]
        method = predicate["serialization"]["method"]
        names = [r["name"] for r in predicate["resources"]]
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeError) as exc:
        raise SignatureError(f"{where} is not a model_signing signature: {type(exc).__name__}", file=where) from exc
    if method != "files":
        raise SignatureError(
            f"{where} uses model_signing's {method!r} serialization; safeckpt verifies file signatures (the default)",
            file=where,
        )
    if not names or not all(type(n) is str for n in names) or len(set(names)) != len(names):
        raise SignatureError(f"{where} lists no files, a non-string name, or a name twice", file=where)
    for name in names:
        parts = PurePosixPath(name).parts
        if name != SINGLE_FILE and (
            not parts or name.startswith("/") or "\\" in name or "\0" in name or any(x in ("..", ".") for x in parts)
        ):
            raise SignatureError(f"{where} names {name!r:.200}, which is not a file under the checkpoint; refused",
                                 file=where)
    if SINGLE_FILE in names and len(names) != 1:
        raise SignatureError(f"{where} mixes a single-file signature with other names", file=where)
    return names


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through one descriptor, refusing symlinks and special files."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(src, flags)
    except FileNotFoundError:
        raise SignatureError(f"{src} is signed but missing", file=str(src)) from None
    except OSError as exc:
        raise SignatureError(f"{src} cannot be read (a symlink?): {exc.strerror}", file=str(src)) from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SignatureError(f"{src} is not a regular file", file=str(src))
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out, 1 << 20)


def _verifier(
    ms: Any,
    public_key: str | os.PathLike[str] | None = None,
    certificate_chain: Iterable[str | os.PathLike[str]] | None = None,
    identity: str | None = None,
    oidc_issuer: str | None = None,
) -> Any:
    config = ms.verifying.Config()
    if public_key is not None:
        return config.use_elliptic_key_verifier(public_key=public_key)
    if certificate_chain is not None:
        return config.use_certificate_verifier(certificate_chain=list(certificate_chain))
    if identity is not None and oidc_issuer is not None:
        return config.use_sigstore_verifier(identity=identity, oidc_issuer=oidc_issuer)
    raise ValueError("verifying a signature needs public_key=, certificate_chain=, or identity= and oidc_issuer=")


@contextmanager
def verified_copy(
    path: str | os.PathLike[str],
    signature: str | os.PathLike[str],
    *,
    public_key: str | os.PathLike[str] | None = None,
    certificate_chain: Iterable[str | os.PathLike[str]] | None = None,
    identity: str | None = None,
    oidc_issuer: str | None = None,
) -> Iterator[Path]:
    """Copy the signed files into a private directory, verify the copy, yield ``path`` inside it.

    Nothing of the checkpoint is parsed before the signature is verified: the files
    are copied as bytes, and only files the signature names are copied. The copy is
    removed when the context exits.

    Args:
        path: a signed single file, a file or set inside a signed directory, or the directory.
        signature: the signature file.
        public_key: the PEM public key of an elliptic-curve signature.
        certificate_chain: verify a certificate signature against these certificates.
        identity, oidc_issuer: verify a Sigstore signature (needs the network).

    Yields:
        The private copy of ``path``.

    Raises:
        SignatureError: if the signature is malformed, does not verify, does not cover
            every file of the set at ``path``, or a signed file is missing, a symlink or
            not a regular file.
    """
    with _verified(path, signature, _verifier(_model_signing(), public_key, certificate_chain, identity, oidc_issuer)
                   ) as (inside, _names):
        yield inside


@contextmanager
def _verified(path: str | os.PathLike[str], signature: str | os.PathLike[str], verifier: Any
              ) -> Iterator[tuple[Path, list[str]]]:
    sig = Path(signature)
    with open(sig, "rb") as f:
        raw = f.read(MAX_SIGNATURE_BYTES + 1)
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{sig} is larger than {MAX_SIGNATURE_BYTES} bytes: not a signature", file=str(sig))
    names = _signature_names(raw, str(sig))
    p = Path(path)
    private = Path(tempfile.mkdtemp(prefix="safeckpt-verified-"))
    try:
        (private / "signature.json").write_bytes(raw)
        model = private / "model"
        if names == [SINGLE_FILE]:
            if p.is_dir() or find_manifest(p) is not None:
                raise SignatureError(f"{sig} signs a single file; {path} is a set or directory", file=str(sig))
            _copy_regular(p, model / p.name)
            root = inside = model / p.name
        else:
            base = p if p.is_dir() else p.parent
            for name in names:
                _copy_regular(base / name, model / name)
            root, inside = model, (model if p.is_dir() else model / p.name)
        try:
            verifier.verify(root, private / "signature.json")
        except Exception as exc:  # model_signing raises ValueError, its crypto libraries their own errors
            raise SignatureError(f"{path}: signature {sig} does not verify: {exc}", file=os.fspath(path)) from exc
        _check_covers(inside, sig)
        yield inside, names
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _check_covers(inside: Path, sig: Path) -> None:
    """A verified multi-file set must have every file its (now verified) manifest names."""
    manifest = None if inside.is_dir() else find_manifest(inside)
    if manifest is None:
        return
    for entry in read_manifest(manifest, DEFAULT_LIMITS).entries:
        if not manifest.with_name(entry.name).is_file():
            raise SignatureError(
                f"{sig} does not cover {entry.name}, which the set's manifest names; sign the set again",
                file=entry.name,
            )


def verify_signature(path: str | os.PathLike[str], signature: str | os.PathLike[str], **verifier: Any) -> list[str]:
    """Verify ``path`` against ``signature`` (keyword arguments as for :func:`verified_copy`).

    Returns:
        The signed file names, relative to the checkpoint's directory (``["."]`` for a single file).

    Raises:
        SignatureError: if it does not verify.
    """
    with _verified(path, signature, _verifier(_model_signing(), **verifier)) as (_inside, names):
        return sorted(names)
