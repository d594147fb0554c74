"""Fuzz targets of the integrations: model_signing signature files and Hugging Face folders.

:func:`integrations` takes a mode byte (``data[0] % 3``) and fuzzes the rest as:

0. a signature file, checked by ``safeckpt.load(..., signature=, public_key=)`` against a
   fixed signed checkpoint directory (what the unverified bundle names decides what is
   copied, so names outside the directory must be refused before anything is read);
1. ``pytorch_model.bin.index.json`` next to a fixed legacy shard, converted by
   ``safeckpt.hf.convert_folder``;
2. the legacy ``pytorch_model.bin`` itself, converted by ``convert_folder``.

Only ``SafeCkptError`` is expected; ``FileNotFoundError`` only in mode 1, for an index
naming a plain sibling file that does not exist (SPEC section 4: a missing file is the
standard ``FileNotFoundError``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import safeckpt
from safeckpt.errors import SafeCkptError
from safeckpt.hf import convert_folder
from safeckpt.limits import Limits
from safeckpt.signing import sign

__all__ = ["integrations", "seeds", "workdir"]

LIMITS = Limits(max_header_bytes=256 << 10, max_skeleton_bytes=256 << 10, max_depth=64, max_tensors=256,
                max_components=128, max_dims=8, max_container_len=1 << 14, max_str_len=256 << 10)
_WORK: Path | None = None


def workdir() -> Path:
    """The fixed files, made once per process: a key pair, a signed directory, a legacy shard."""
    global _WORK
    if _WORK is None:
        _WORK = Path(tempfile.mkdtemp(prefix="safeckpt-fuzz-integrations-"))
        atexit.register(shutil.rmtree, _WORK, True)
        key = ec.generate_private_key(ec.SECP256R1())
        (_WORK / "key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (_WORK / "key.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        safeckpt.save_single_file(None, {"w": torch.arange(4.0)}, _WORK / "step" / "checkpoint.safeckpt")
        sign(_WORK / "step", _WORK / "step.sig", private_key=_WORK / "key.pem")
        (_WORK / "secret").write_bytes(b"outside the signed directory")
        torch.save({"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}, _WORK / "shard.bin")
    return _WORK


def _fresh(name: str) -> Path:
    folder = workdir() / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    return folder


def integrations(data: bytes) -> None:
    """The target (see the module docstring)."""
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    work = workdir()
    try:
        if mode == 0:
            (work / "fuzzed.sig").write_bytes(body)
            safeckpt.load(work / "step" / "checkpoint.safeckpt", signature=work / "fuzzed.sig",
                          public_key=work / "key.pub")
        elif mode == 1:
            src = _fresh("hf_index")
            shutil.copyfile(work / "shard.bin", src / "pytorch_model-00001-of-00001.bin")
            (src / "pytorch_model.bin.index.json").write_bytes(body)
            try:
                convert_folder(src, _fresh("hf_index_out"), overwrite=True, limits=LIMITS)
            except FileNotFoundError as exc:
                if Path(str(exc.filename)).parent != src:
                    raise
        else:
            src = _fresh("hf_bin")
            (src / "pytorch_model.bin").write_bytes(body)
            convert_folder(src, _fresh("hf_bin_out"), overwrite=True, limits=LIMITS)
    except SafeCkptError:
        return


def seeds() -> Iterator[tuple[str, bytes]]:
    """Valid and near-valid inputs of each mode."""
    work = workdir()
    yield "i0_signature", b"\x00" + (work / "step.sig").read_bytes()
    yield "i1_index", b"\x01" + (b'{"metadata": {"total_size": 16}, "weight_map": {"a.weight": '
                                 b'"pytorch_model-00001-of-00001.bin", "b.bias": "pytorch_model-00001-of-00001.bin"}}')
    yield "i1_index_outside", b"\x01" + b'{"weight_map": {"a.weight": "../shard.bin"}}'
    yield "i2_bin", b"\x02" + (work / "shard.bin").read_bytes()
