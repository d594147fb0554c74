"""Signed checkpoints on model_signing: both directions, single files, sets, manager steps, checked before parsing."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import model_signing
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import safeckpt
from safeckpt import CheckpointManager
from safeckpt.errors import SignatureError
from safeckpt.cli import main
from safeckpt.signing import sign, signed_set, verify_signature


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """An offline EC P-256 key pair: (private PEM, public PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "keys" / "signer.pem", tmp_path / "keys" / "signer.pub"
    private.parent.mkdir()
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def other_public_key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "other.pub"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model_state_dict": {"w": torch.randn(4, 4), "b": torch.zeros(4)},
            "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
            "model_kwargs": {"hidden": 4}, "epoch": 7}


def assert_state(got: dict[str, Any]) -> None:
    want = state()
    assert torch.equal(got["model_state_dict"]["w"], want["model_state_dict"]["w"])
    assert got["model_kwargs"]["hidden"] == 4  # a multi-file set also folds versions into model_kwargs


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def ms_verify(model: Path, sig: Path, public: Path, *, ignore_unsigned: bool = False) -> None:
    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public)
    config.set_ignore_unsigned_files(ignore_unsigned).verify(model, sig)


class ParseSpy:
    """Records every file safeckpt's format detection or readers touch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safeckpt.reader as reader

        self.paths: list[str] = []
        real = reader.open_source

        def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
            self.paths.append(os.fspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(reader, "open_source", spy)  # every read of a checkpoint starts here


# --------------------------------------------------------------------------- single files


def test_single_file_signed_by_safeckpt_verifies_with_model_signing(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "run" / "ckpt.safetensors")
    sig = sign(ckpt, private_key=private)
    assert sig == tmp_path / "run" / "ckpt.safetensors.sig"
    ms_verify(ckpt, sig, public)  # model_signing's own API accepts it
    assert_state(safeckpt.load(ckpt, signature=sig, public_key=public))
    assert verify_signature(ckpt, sig, public_key=public) == ["."]


def test_single_file_signed_by_model_signing_verifies_with_safeckpt(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(ckpt, tmp_path / "ms.sig")
    assert_state(safeckpt.load(ckpt, signature=tmp_path / "ms.sig", public_key=public))


def test_tampered_file_is_refused_before_any_byte_is_parsed(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    sig = sign(ckpt, private_key=private)
    flip_last_byte(ckpt)
    spy = ParseSpy(monkeypatch)
    with pytest.raises(SignatureError, match="does not verify"):
        safeckpt.load(ckpt, signature=sig, public_key=public)
    assert spy.paths == []


def test_malicious_pickle_with_foreign_signature_is_never_parsed(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swapped-in torch.save file that would run code: refused as unsigned, not even scanned."""
    private, public = keys
    good = safeckpt.save_single_file(None, state(), tmp_path / "good.safetensors")
    sig = sign(good, private_key=private)
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {sentinel}",))

    torch.save({"x": Payload()}, good)
    spy = ParseSpy(monkeypatch)
    with pytest.raises(SignatureError):  # not UnsafeCheckpointError: the pickle was never looked at
        safeckpt.load(good, signature=sig, public_key=public)
    assert spy.paths == [] and not sentinel.exists()


def test_wrong_key_and_wrong_usage(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, _ = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    sig = sign(ckpt, private_key=private)
    with pytest.raises(SignatureError, match="does not verify"):
        safeckpt.load(ckpt, signature=sig, public_key=other_public_key(tmp_path))
    with pytest.raises(ValueError, match="together"):
        safeckpt.load(ckpt, signature=sig)


def test_the_verified_copy_is_what_is_loaded(tmp_path: Path, keys: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Swapping the file right after verification (TOCTOU) changes nothing: the private copy is parsed."""
    private, public = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    sig = sign(ckpt, private_key=private)
    import safeckpt.loading as loading

    real = loading.load_single_file

    def swap_then_load(path: Any, **kwargs: Any) -> Any:
        safeckpt.save_single_file(None, {"model_state_dict": {"w": torch.zeros(1)}}, ckpt)  # the attacker's swap
        assert Path(path) != ckpt
        return real(path, **kwargs)

    monkeypatch.setattr(loading, "load_single_file", swap_then_load)
    assert_state(safeckpt.load(ckpt, signature=sig, public_key=public))


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a code-signing leaf certificate: (leaf key, leaf certificate, CA certificate)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer_key: Any, ca: bool) -> x509.Certificate:
        usage = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"], False)
        usage.update(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(**usage), critical=True))
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "leaf.key", folder / "leaf.pem", folder / "ca.pem"
    paths[0].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[1].write_bytes(cert("signer", leaf_key, ca_key, False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(cert("test-ca", ca_key, ca_key, True).public_bytes(serialization.Encoding.PEM))
    return paths


def test_certificate_signing_both_directions(tmp_path: Path) -> None:
    leaf_key, leaf, ca = make_certificates(tmp_path)
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "run" / "ckpt.safetensors")
    sig = sign(ckpt, private_key=leaf_key, certificate=leaf, certificate_chain=[ca])
    model_signing.verifying.Config().use_certificate_verifier(certificate_chain=[ca]).verify(ckpt, sig)
    assert verify_signature(ckpt, sig, certificate_chain=[ca]) == ["."]
    (tmp_path / "other").mkdir()
    other_ca = make_certificates(tmp_path / "other")[2]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(ckpt, sig, certificate_chain=[other_ca])
    flip_last_byte(ckpt)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(ckpt, sig, certificate_chain=[ca])


# --------------------------------------------------------------------------- multi-file sets


def test_multi_file_set_signed_both_directions(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    run = tmp_path / "run"
    safeckpt.save_multi_files(None, state(), run / "m.pth")
    (run / "notes.txt").write_text("not part of the set\n")
    covered = signed_set(run / "m.pth")
    assert covered.names == ("m.safeckpt.json", "m_model_kwargs.msgpack", "m_model_state_dict.safetensors",
                             "m_optimizer_state_dict.safetensors")
    assert covered.ignored == ("notes.txt",)
    sig = sign(run / "m.pth", tmp_path / "m.sig", private_key=private)
    ms_verify(run, sig, public)  # model_signing verifies the directory, the other files being ignored
    (run / "later.bin").write_bytes(b"added after signing")
    ms_verify(run, sig, public, ignore_unsigned=True)
    got = safeckpt.load(run / "m.pth", signature=sig, public_key=public)
    assert_state(got)
    assert verify_signature(run / "m.safeckpt.json", sig, public_key=public) == list(covered.names)

    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["notes.txt", "later.bin"])
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(private_key=private).sign(
        run, tmp_path / "ms.sig")
    assert_state(safeckpt.load(run / "m.pth", signature=tmp_path / "ms.sig", public_key=public))


def test_tampered_component_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    safeckpt.save_multi_files(None, state(), tmp_path / "run" / "m.pth")
    sig = sign(tmp_path / "run" / "m.pth", tmp_path / "m.sig", private_key=private)
    flip_last_byte(tmp_path / "run" / "m_model_state_dict.safetensors")
    with pytest.raises(SignatureError, match="m_model_state_dict"):
        safeckpt.load(tmp_path / "run" / "m.pth", signature=sig, public_key=public)


def test_signature_not_covering_a_component_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    run = tmp_path / "run"
    safeckpt.save_multi_files(None, state(), run / "m.pth")
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["m_model_state_dict.safetensors"])
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(private_key=private).sign(
        run, tmp_path / "partial.sig")
    with pytest.raises(SignatureError, match="does not cover m_model_state_dict.safetensors"):
        safeckpt.load(run / "m.pth", signature=tmp_path / "partial.sig", public_key=public)


def test_single_file_signature_does_not_stand_for_a_set(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    safeckpt.save_multi_files(None, state(), tmp_path / "m.pth")
    sig = sign(tmp_path / "m_model_kwargs.msgpack", private_key=private)
    with pytest.raises(SignatureError, match="single file"):
        safeckpt.load(tmp_path / "m.pth", signature=sig, public_key=public)


# --------------------------------------------------------------------------- manager steps and the CLI


def test_manager_step_signed_with_the_cli(tmp_path: Path, keys: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    private, public = keys
    manager = CheckpointManager(tmp_path / "ckpts")
    manager.save(100, state())
    step = next((tmp_path / "ckpts").glob("step_*"))
    assert main(["sign", str(step), "--key", str(private), "--json"]) == 0
    sig = Path(json.loads(capsys.readouterr().out)["signature"])
    assert sig == step.with_name(step.name + ".sig")
    ms_verify(step, sig, public)
    assert main(["verify", str(step), "--signature", str(sig), "--public-key", str(public)]) == 0
    assert "OK" in capsys.readouterr().out
    ckpt = next(p for p in step.iterdir() if p.name.startswith("checkpoint"))
    assert_state(safeckpt.load(ckpt, signature=sig, public_key=public))
    flip_last_byte(ckpt)
    assert main(["verify", str(step), "--signature", str(sig), "--public-key", str(public), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["error"]["type"] == "SignatureError"


def test_signed_directory_refuses_a_symlinked_file(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    folder = tmp_path / "step"
    safeckpt.save_single_file(None, state(), folder / "checkpoint.safeckpt")
    sig = sign(folder, tmp_path / "step.sig", private_key=private)
    target = tmp_path / "elsewhere.safeckpt"
    os.replace(folder / "checkpoint.safeckpt", target)
    (folder / "checkpoint.safeckpt").symlink_to(target)
    with pytest.raises(SignatureError, match="symlink"):
        safeckpt.load(folder / "checkpoint.safeckpt", signature=sig, public_key=public)


def forged(sig: Path, names: list[str]) -> Path:
    bundle = json.loads(sig.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"] = [{"name": n, "algorithm": "sha256", "digest": "0" * 64} for n in names]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    out = sig.with_name("forged.sig")
    out.write_text(json.dumps(bundle))
    return out


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "a/../../secret", "a\\..\\b", "x\0y"])
def test_signature_naming_a_path_outside_is_refused_before_reading(tmp_path: Path, keys: tuple[Path, Path],
                                                                   name: str) -> None:
    private, public = keys
    folder = tmp_path / "step"
    safeckpt.save_single_file(None, state(), folder / "checkpoint.safeckpt")
    (tmp_path / "secret").write_text("outside")
    sig = forged(sign(folder, tmp_path / "step.sig", private_key=private), ["checkpoint.safeckpt", name])
    with pytest.raises(SignatureError, match="not a file under the checkpoint"):
        safeckpt.load(folder / "checkpoint.safeckpt", signature=sig, public_key=public)


@pytest.mark.parametrize("junk", [b"", b"{}", b"not json", b'{"dsseEnvelope": {"payload": "!!"}}',
                                  b"[" * 100000 + b"]" * 100000])
def test_malformed_signature_files(tmp_path: Path, keys: tuple[Path, Path], junk: bytes) -> None:
    _, public = keys
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    (tmp_path / "junk.sig").write_bytes(junk)
    with pytest.raises(SignatureError, match="not a model_signing signature"):
        safeckpt.load(ckpt, signature=tmp_path / "junk.sig", public_key=public)


def test_cli_sign_requires_a_key(tmp_path: Path, keys: tuple[Path, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = safeckpt.save_single_file(None, state(), tmp_path / "ckpt.safetensors")
    assert main(["sign", str(ckpt)]) == 2
    assert "--key" in capsys.readouterr().err
    assert main(["verify", str(ckpt), "--public-key", str(keys[1])]) == 2
    assert "pass --signature" in capsys.readouterr().err


def test_integrations_fuzz_seeds_replay_cleanly() -> None:
    """The seeds of fuzz/fuzz_integrations.py go through its target (only SafeCkptError is expected inside)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "fuzz" / "targets_integrations.py"
    spec = importlib.util.spec_from_file_location("safeckpt_fuzz_targets_integrations", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    seeds = list(module.seeds())
    assert len(seeds) == 4
    for _name, data in seeds:
        module.integrations(data)
