"""The seed's multi-file API and its ``format`` modes.

``save_multi_files`` / ``load_multi_files`` / ``save_multi_from_single``, the
manifest (SPEC section 2, FORMAT.md section 3), the seed's folding of metadata
into ``model_kwargs``, ``format="torch"`` and ``format="auto"``, and error
routing through ``nn_handler.raise_error``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import safeckpt
import safeckpt.saving

DEFAULT_KEYS = ["model_state_dict", "optimizer_state_dict", "model_kwargs"]


# --------------------------------------------------------------------------- fixtures and helpers


class TiedNet(nn.Module):
    """Embedding -> Linear -> Linear whose weight is the embedding's (tied)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.emb(tokens))))


class SubVPSDE:
    """A module-level class referenced by the state as ``sde_class``."""


def make_state(seed: int = 0, **extra: Any) -> tuple[dict[str, Any], TiedNet]:
    """A real model after two Adam steps, and a seed-style training state around it."""
    torch.manual_seed(seed)
    model = TiedNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 11, (5,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), tokens).backward()
        opt.step()
    state: dict[str, Any] = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "model_kwargs": {"vocab": 11, "dim": 6, "tag": f"run-{seed}"},
        "epoch": 3 + seed,
        "scheduler_state_dict": None,
    }
    state.update(extra)
    return state, model


def assert_equal(actual: Any, expected: Any, where: str = "value") -> None:
    """Recursive equality with tensors compared bit for bit (dtype and shape included)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual)} is not a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual.detach().cpu(), expected.detach().cpu()), f"{where}: tensors differ"
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual)} is not a dict"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_equal(actual[key], expected[key], f"{where}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal(a, e, f"{where}[{i}]")
        return
    assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def expected_kwargs(state: dict[str, Any]) -> dict[str, Any]:
    """The seed's folded ``model_kwargs`` for ``state``."""
    kwargs = dict(state.get("model_kwargs") or {})
    if state.get("seed") is not None:
        kwargs["seed"] = state["seed"]
    if state.get("sde_class") is not None:
        kwargs["sde_class_name"] = state["sde_class"].__name__
        kwargs["sde_kwargs"] = state.get("sde_kwargs")
    kwargs["nn_handler_version"] = state.get("nn_handler_version")
    kwargs["pytorch_version"] = state.get("pytorch_version")
    return kwargs


def temp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


class Handler:
    """An nn_handler stand-in: rank 1, records log lines, raise_error raises its own error."""

    class Raised(Exception):
        pass

    def __init__(self) -> None:
        self._rank = 1
        self.logs: list[str] = []
        self.errors: list[tuple[type, str, BaseException]] = []

    def log(self, msg: str) -> None:
        self.logs.append(msg)

    def raise_error(self, exc_type: type, message: str, cause: BaseException) -> None:
        self.errors.append((exc_type, message, cause))
        raise Handler.Raised(message) from cause


@pytest.fixture
def saved_set(tmp_path: Path) -> tuple[dict[str, Any], Path, dict[str, Path]]:
    state, _ = make_state(seed=1)
    state["seed"] = 7
    base = tmp_path / "models" / "m.pth"
    written = safeckpt.save_multi_files(None, state, base)
    return state, base, written


# --------------------------------------------------------------------------- layout and manifest


def test_layout_manifest_and_returned_paths(tmp_path: Path) -> None:
    state, _ = make_state()
    base = tmp_path / "models" / "m.pth"
    assert not base.parent.exists()
    written = safeckpt.save_multi_files(None, state, base)

    d = tmp_path / "models"
    assert d.is_dir()
    model_file = d / "m_model_state_dict.safetensors"
    opt_file = d / "m_optimizer_state_dict.safetensors"  # Adam state holds tensors
    kwargs_file = d / "m_model_kwargs.msgpack"
    manifest_file = d / "m.safeckpt.json"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [model_file.name, opt_file.name, kwargs_file.name, manifest_file.name]
    )
    assert list(written) == DEFAULT_KEYS
    assert {k: Path(v) for k, v in written.items()} == {
        "model_state_dict": model_file,
        "optimizer_state_dict": opt_file,
        "model_kwargs": kwargs_file,
    }
    assert all(isinstance(v, Path) for v in written.values())

    manifest = json.loads(manifest_file.read_text("utf-8"))
    assert manifest["format"] == "safeckpt-multi"
    assert type(manifest["format_version"]) is int and manifest["format_version"] >= 1
    components = manifest["components"]
    assert [c["key"] for c in components] == DEFAULT_KEYS
    for c in components:
        f = d / c["file"]
        assert c["file"] == Path(written[c["key"]]).name
        assert c["size"] == f.stat().st_size
        raw = f.read_bytes()
        if f.suffix == ".safetensors":  # digest of the length prefix and JSON header (FORMAT.md 3)
            (n,) = struct.unpack("<Q", raw[:8])
            covered = raw[: 8 + n]
        else:  # digest of the whole skeleton file
            covered = raw
        assert c["sha256"] == hashlib.sha256(covered).hexdigest(), c["key"]


def test_component_without_tensors_is_msgpack(tmp_path: Path) -> None:
    state = {"model_state_dict": {"w": torch.ones(3)}, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    written = safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    assert Path(written["model_state_dict"]).name == "m_model_state_dict.safetensors"
    assert Path(written["optimizer_state_dict"]).name == "m_optimizer_state_dict.msgpack"
    assert Path(written["model_kwargs"]).name == "m_model_kwargs.msgpack"
    loaded = safeckpt.load_multi_files(tmp_path / "m.pth", verify=True)
    assert_equal(loaded["optimizer_state_dict"], state["optimizer_state_dict"])


def test_model_file_is_a_plain_state_dict_and_tied_weights(tmp_path: Path) -> None:
    state, model = make_state()
    base = tmp_path / "models" / "m.pth"
    written = safeckpt.save_multi_files(None, state, base)

    plain = safetensors.torch.load_file(str(written["model_state_dict"]))
    assert set(plain) == set(model.state_dict())
    # the tied weight is there under both names for a plain reader
    assert torch.equal(plain["emb.weight"], model.emb.weight.detach())
    assert torch.equal(plain["out.weight"], model.emb.weight.detach())
    fresh = TiedNet()
    fresh.load_state_dict(plain, strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name

    loaded = safeckpt.load_multi_files(base)
    sd = loaded["model_state_dict"]
    assert_equal(sd, dict(state["model_state_dict"]))
    assert sd["emb.weight"].data_ptr() == sd["out.weight"].data_ptr()
    assert_equal(loaded["optimizer_state_dict"], state["optimizer_state_dict"])


# --------------------------------------------------------------------------- keys_to_save


def test_same_tensor_object_under_two_names_is_in_the_plain_file(tmp_path: Path) -> None:
    # state_dict(keep_vars=True) gives the tied Parameter itself under both names
    _, model = make_state()
    state = {"model_state_dict": model.state_dict(keep_vars=True)}
    assert state["model_state_dict"]["emb.weight"] is state["model_state_dict"]["out.weight"]
    written = safeckpt.save_multi_files(None, state, tmp_path / "m.pth", ["model_state_dict"])
    plain = safetensors.torch.load_file(str(written["model_state_dict"]))
    assert set(plain) == set(state["model_state_dict"])
    TiedNet().load_state_dict(plain, strict=True)
    sd = safeckpt.load_multi_files(tmp_path / "m.pth")["model_state_dict"]
    assert sd["emb.weight"].data_ptr() == sd["out.weight"].data_ptr()
    assert torch.equal(sd["out.weight"], model.emb.weight.detach())


def test_default_keys_skip_other_entries(tmp_path: Path) -> None:
    state, _ = make_state(extra_key=torch.zeros(2))
    written = safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    assert list(written) == DEFAULT_KEYS
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not any("epoch" in n or "extra_key" in n or "scheduler" in n for n in names)
    loaded = safeckpt.load_multi_files(tmp_path / "m.pth")
    assert list(loaded) == DEFAULT_KEYS


def test_custom_keys_missing_and_none_are_skipped(tmp_path: Path) -> None:
    state, _ = make_state()
    keys = ["epoch", "model_state_dict", "scheduler_state_dict", "not_in_state"]
    written = safeckpt.save_multi_files(None, state, tmp_path / "m.pth", keys)
    assert list(written) == ["epoch", "model_state_dict"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.safeckpt.json",
        "m_epoch.msgpack",
        "m_model_state_dict.safetensors",
    ]
    loaded = safeckpt.load_multi_files(tmp_path / "m.pth")
    assert list(loaded) == ["epoch", "model_state_dict"]
    assert loaded["epoch"] == state["epoch"] and type(loaded["epoch"]) is int
    assert_equal(loaded["model_state_dict"], dict(state["model_state_dict"]))


def test_custom_keys_positionally_and_via_seed_module(tmp_path: Path) -> None:
    state, _ = make_state()
    written = safeckpt.saving.save_multi_files(None, state, tmp_path / "m.pth", ["model_kwargs"])
    assert list(written) == ["model_kwargs"]
    assert safeckpt.load_multi_files(tmp_path / "m.pth")["model_kwargs"] == expected_kwargs(state)


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "", "a\0b", ".."])
def test_unsafe_keys_are_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    state, _ = make_state()
    state[bad] = {"w": torch.ones(2)}
    d = tmp_path / "d"
    d.mkdir()
    for keys in ([bad], ["model_state_dict", "model_kwargs", bad]):
        with pytest.raises(ValueError):
            safeckpt.save_multi_files(None, state, d / "m.pth", keys)
        assert list(d.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# --------------------------------------------------------------------------- the seed's model_kwargs folding


def test_folding_into_saved_model_kwargs_leaves_state_untouched(tmp_path: Path) -> None:
    state, _ = make_state(
        seed=5,
        sde_class=SubVPSDE,
        sde_kwargs={"beta_min": 0.1, "beta_max": 20.0},
        nn_handler_version="0.9.3",
        pytorch_version=torch.__version__,
    )
    state["seed"] = 1234
    kwargs_obj = state["model_kwargs"]
    kwargs_before = copy.deepcopy(kwargs_obj)
    keys_before = list(state)
    ids_before = {k: id(v) for k, v in state.items()}

    safeckpt.save_multi_files(None, state, tmp_path / "m.pth")

    assert list(state) == keys_before
    assert {k: id(v) for k, v in state.items()} == ids_before
    assert state["model_kwargs"] is kwargs_obj
    assert kwargs_obj == kwargs_before

    saved = safeckpt.load_multi_files(tmp_path / "m.pth", ["model_kwargs"])["model_kwargs"]
    assert saved == {
        "vocab": 11,
        "dim": 6,
        "tag": "run-5",
        "seed": 1234,
        "sde_class_name": "SubVPSDE",
        "sde_kwargs": {"beta_min": 0.1, "beta_max": 20.0},
        "nn_handler_version": "0.9.3",
        "pytorch_version": torch.__version__,
    }
    assert saved["pytorch_version"] == str(torch.__version__)


@pytest.mark.parametrize("how", ["absent", "none"])
def test_folding_without_model_kwargs(tmp_path: Path, how: str) -> None:
    state, _ = make_state(seed=2, sde_class=SubVPSDE, sde_kwargs={"N": 10}, nn_handler_version="1.0")
    state["seed"] = 99
    if how == "absent":
        del state["model_kwargs"]
    else:
        state["model_kwargs"] = None
    before = dict(state)

    written = safeckpt.save_multi_files(None, state, tmp_path / "m.pth")

    assert "model_kwargs" in written
    saved = safeckpt.load_multi_files(tmp_path / "m.pth")["model_kwargs"]
    assert saved == {
        "seed": 99,
        "sde_class_name": "SubVPSDE",
        "sde_kwargs": {"N": 10},
        "nn_handler_version": "1.0",
        "pytorch_version": None,
    }
    assert state == before
    assert ("model_kwargs" in state) == (how == "none")
    if how == "none":
        assert state["model_kwargs"] is None


# --------------------------------------------------------------------------- loading


def test_load_by_base_manifest_subset_and_unknown_key(saved_set: Any) -> None:
    state, base, _ = saved_set
    manifest = base.parent / "m.safeckpt.json"
    expected = {
        "model_state_dict": dict(state["model_state_dict"]),
        "optimizer_state_dict": state["optimizer_state_dict"],
        "model_kwargs": expected_kwargs(state),
    }
    for target in (base, str(base), manifest):
        assert_equal(safeckpt.load_multi_files(target), expected, f"load_multi_files({target})")
        assert_equal(safeckpt.load_multi_files(target, verify=True), expected)
        assert_equal(safeckpt.load(target), expected, f"load({target})")

    subset = safeckpt.load_multi_files(base, keys=["model_kwargs", "model_state_dict"])
    assert sorted(subset) == ["model_kwargs", "model_state_dict"]
    assert subset["model_kwargs"] == expected["model_kwargs"]
    assert_equal(subset["model_state_dict"], expected["model_state_dict"])

    with pytest.raises(safeckpt.ComponentNotFoundError) as info:
        safeckpt.load_multi_files(base, keys=["model_kwargs", "nope"])
    assert isinstance(info.value, KeyError)
    assert "nope" in str(info.value)


def test_discovery_without_manifest(saved_set: Any) -> None:
    state, base, _ = saved_set
    (base.parent / "m.safeckpt.json").unlink()
    loaded = safeckpt.load_multi_files(base)
    assert sorted(loaded) == sorted(DEFAULT_KEYS)
    assert_equal(loaded["model_state_dict"], dict(state["model_state_dict"]))
    assert_equal(loaded["optimizer_state_dict"], state["optimizer_state_dict"])
    assert loaded["model_kwargs"] == expected_kwargs(state)
    assert sorted(safeckpt.load(base)) == sorted(DEFAULT_KEYS)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_pointing_outside_is_refused(saved_set: Any, where: str) -> None:
    _, base, written = saved_set
    d = base.parent
    outside = d.parent / "outside.msgpack"
    # a valid component file with the right size and digest: it would load if followed
    shutil.copyfile(written["model_kwargs"], outside)
    manifest_file = d / "m.safeckpt.json"
    manifest = json.loads(manifest_file.read_text("utf-8"))
    for c in manifest["components"]:
        if c["key"] == "model_kwargs":
            c["file"] = "../outside.msgpack" if where == "relative" else str(outside.resolve())
    manifest_file.write_text(json.dumps(manifest), "utf-8")
    (d / "m_model_kwargs.msgpack").unlink()

    for call in (
        lambda: safeckpt.load_multi_files(base),
        lambda: safeckpt.load_multi_files(manifest_file, keys=["model_kwargs"]),
        lambda: safeckpt.load(base),
        lambda: safeckpt.load(manifest_file),
    ):
        with pytest.raises(safeckpt.CheckpointFormatError):
            call()


def test_torn_set_is_detected_by_verify(tmp_path: Path) -> None:
    old, _ = make_state(seed=1)
    new, _ = make_state(seed=2)
    base = tmp_path / "a" / "m.pth"
    safeckpt.save_multi_files(None, old, base)
    other = safeckpt.save_multi_files(None, new, tmp_path / "b" / "m.pth")
    target = base.parent / "m_model_state_dict.safetensors"
    assert other["model_state_dict"].stat().st_size == target.stat().st_size  # only the digest can tell
    shutil.copyfile(other["model_state_dict"], target)

    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load_multi_files(base, verify=True)
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load_multi_files(base, keys=["model_state_dict"], verify=True)
    # components the swap did not touch still verify
    assert safeckpt.load_multi_files(base, keys=["model_kwargs"], verify=True)["model_kwargs"] == expected_kwargs(old)


def test_truncated_component_fails_without_verify(saved_set: Any) -> None:
    _, base, written = saved_set
    f = written["optimizer_state_dict"]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 16])
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load_multi_files(base)
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load(base)


# --------------------------------------------------------------------------- save_multi_from_single


def test_save_multi_from_single(tmp_path: Path) -> None:
    state, model = make_state(seed=3, sde_class=SubVPSDE, sde_kwargs={"N": 100}, nn_handler_version="0.9")
    state["seed"] = 11
    single = tmp_path / "ck.safeckpt"
    safeckpt.save_single_file(None, state, single)
    single_bytes = single.read_bytes()

    written = safeckpt.save_multi_from_single(single)
    assert {k: Path(v).name for k, v in written.items()} == {
        "model_state_dict": "ck_model_state_dict.safetensors",
        "optimizer_state_dict": "ck_optimizer_state_dict.safetensors",
        "model_kwargs": "ck_model_kwargs.msgpack",
    }
    assert (tmp_path / "ck.safeckpt.json").is_file()
    assert single.read_bytes() == single_bytes

    loaded = safeckpt.load_multi_files(single, verify=True)
    kwargs = loaded["model_kwargs"]
    assert kwargs["sde_class_name"] == "SubVPSDE"
    assert kwargs == expected_kwargs(state)
    assert_equal(loaded["model_state_dict"], dict(state["model_state_dict"]))
    sd = loaded["model_state_dict"]
    assert sd["emb.weight"].data_ptr() == sd["out.weight"].data_ptr()
    assert_equal(loaded["optimizer_state_dict"], state["optimizer_state_dict"])
    plain = safetensors.torch.load_file(str(written["model_state_dict"]))
    TiedNet().load_state_dict(plain, strict=True)

    only = safeckpt.save_multi_from_single(single, ["model_kwargs"])
    assert list(only) == ["model_kwargs"]


# --------------------------------------------------------------------------- format="torch"


def test_multi_torch_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state, _ = make_state(seed=4, sde_class=SubVPSDE, sde_kwargs={"N": 3}, pytorch_version=torch.__version__)
    state["seed"] = 21
    base = tmp_path / "m.pth"
    written = safeckpt.save_multi_files(None, state, base, format="torch")
    assert {k: Path(v) for k, v in written.items()} == {k: tmp_path / f"m_{k}.pth" for k in DEFAULT_KEYS}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"m_{k}.pth" for k in DEFAULT_KEYS)

    folded = {"model_state_dict": state["model_state_dict"], "optimizer_state_dict": state["optimizer_state_dict"],
              "model_kwargs": expected_kwargs(state)}
    for key, f in written.items():
        assert zipfile.is_zipfile(f)
        assert_equal(torch.load(f, weights_only=False), folded[key], key)
    assert "sde_class_name" not in state["model_kwargs"]

    f = written["model_kwargs"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        assert safeckpt.load_single_file(f) == folded["model_kwargs"]  # read without unpickling
    assert not any(r.name == "safeckpt" and r.levelno >= logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        value = safeckpt.load_single_file(f, trust_pickle=True)
    assert value == folded["model_kwargs"]
    assert any(r.name == "safeckpt" and r.levelno >= logging.WARNING for r in caplog.records)

    for trust in (False, True):
        loaded = safeckpt.load_multi_files(base, trust_pickle=trust)
        assert_equal(loaded["model_state_dict"], folded["model_state_dict"])
        assert loaded["model_kwargs"] == folded["model_kwargs"]


def test_single_torch_format_is_a_direct_torch_save(tmp_path: Path) -> None:
    state, _ = make_state(seed=6)
    path = tmp_path / "sub" / "ckpt.pth"
    assert safeckpt.save_single_file(None, state, path, format="torch") == path
    assert_equal(torch.load(path, weights_only=False), state)
    names = zipfile.ZipFile(path).namelist()
    assert names[0].split("/")[0] == path.stem
    assert {n.split("/")[0] for n in names} == {path.stem}
    direct = tmp_path / "ckpt.pth"
    torch.save(state, direct)
    assert zipfile.ZipFile(direct).namelist()[0].split("/")[0] == zipfile.ZipFile(path).namelist()[0].split("/")[0]
    assert temp_leftovers(path.parent) == []


# --------------------------------------------------------------------------- format="auto" and "safe" refusals


def test_auto_falls_back_with_warning_naming_the_path(tmp_path: Path) -> None:
    state, _ = make_state(seed=8)
    sparse = torch.tensor([[0.0, 1.5], [2.0, 0.0]]).to_sparse()  # torch.save holds it, the safe format does not
    state["model_kwargs"] = {"vocab": 11, "mask": sparse}
    base = tmp_path / "m.pth"
    with pytest.warns(safeckpt.FallbackWarning) as record:
        written = safeckpt.save_multi_files(None, state, base, format="auto")
    messages = [str(w.message) for w in record if issubclass(w.category, safeckpt.FallbackWarning)]
    assert len(messages) == 1
    assert "state['model_kwargs']" in messages[0], messages[0]
    assert "torch" in messages[0]
    assert issubclass(safeckpt.FallbackWarning, UserWarning)
    assert {k: Path(v) for k, v in written.items()} == {k: tmp_path / f"m_{k}.pth" for k in DEFAULT_KEYS}
    assert not (tmp_path / "m.safeckpt.json").exists()
    kwargs = torch.load(written["model_kwargs"], weights_only=False)
    assert torch.equal(kwargs["mask"].to_dense(), sparse.to_dense())
    assert kwargs["vocab"] == 11


def test_auto_with_a_value_neither_format_holds_raises_naming_its_path(tmp_path: Path) -> None:
    state, _ = make_state(seed=8)
    state["model_kwargs"] = {"act": lambda x: x}
    for save in (
        lambda: safeckpt.save_multi_files(None, state, tmp_path / "m.pth", format="auto"),
        lambda: safeckpt.save_single_file(None, state, tmp_path / "s.pth", format="auto"),
    ):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with pytest.raises(safeckpt.UnsupportedValueError) as info:
                save()
        assert info.value.path_in_state == "state['model_kwargs']['act']"
        assert "state['model_kwargs']['act']" in str(info.value) and "torch.save" in str(info.value)
        assert not [w for w in record if issubclass(w.category, safeckpt.FallbackWarning)]  # nothing was written
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_safe_refusal_names_the_path_in_the_state(tmp_path: Path) -> None:
    state, _ = make_state(seed=8)
    state["model_kwargs"] = {"vocab": 11, "act": lambda x: x}
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        safeckpt.save_multi_files(None, state, tmp_path / "m.pth")
    assert info.value.path_in_state == "state['model_kwargs']['act']"
    assert "state['model_kwargs']['act']" in str(info.value)
    assert not (tmp_path / "m.safeckpt.json").exists()


def test_auto_warning_points_at_the_caller(tmp_path: Path) -> None:
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"m": torch.ones(2).to_sparse()}}
    with pytest.warns(safeckpt.FallbackWarning) as record:
        safeckpt.save_multi_files(None, state, tmp_path / "m.pth", format="auto")
    with pytest.warns(safeckpt.FallbackWarning) as record_single:
        safeckpt.save_single_file(None, state, tmp_path / "s.pth", format="auto")
    for w in [*record, *record_single]:
        assert Path(w.filename).resolve() == Path(__file__).resolve(), w.filename


def test_auto_without_unsafe_values_writes_the_safe_set(tmp_path: Path) -> None:
    state, _ = make_state(seed=9)
    base = tmp_path / "m.pth"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        written = safeckpt.save_multi_files(None, state, base, format="auto")
        single = safeckpt.save_single_file(None, state, tmp_path / "s.safeckpt", format="auto")
    assert [w for w in record if issubclass(w.category, UserWarning)] == []
    assert {k: Path(v).name for k, v in written.items()} == {
        "model_state_dict": "m_model_state_dict.safetensors",
        "optimizer_state_dict": "m_optimizer_state_dict.safetensors",
        "model_kwargs": "m_model_kwargs.msgpack",
    }
    assert (tmp_path / "m.safeckpt.json").is_file()
    assert_equal(safeckpt.load_multi_files(base, verify=True)["model_state_dict"], dict(state["model_state_dict"]))
    with open(single, "rb") as f:
        assert f.read(2) != b"PK"
    assert_equal(safeckpt.load_single_file(single)["model_state_dict"], state["model_state_dict"])


# --------------------------------------------------------------------------- nn_handler


def test_errors_go_through_raise_error_with_rank(tmp_path: Path) -> None:
    state, _ = make_state()
    state["model_kwargs"] = {"act": lambda x: x}
    handler = Handler()
    with pytest.raises(Handler.Raised):
        safeckpt.save_multi_files(handler, state, tmp_path / "m.pth")
    exc_type, message, cause = handler.errors[-1]
    assert issubclass(exc_type, safeckpt.UnsupportedValueError)
    assert isinstance(cause, safeckpt.UnsupportedValueError)
    assert "1" in message and "rank" in message.lower()

    handler = Handler()
    with pytest.raises(Handler.Raised):
        safeckpt.save_multi_files(handler, state, tmp_path / "m.pth", ["../x"])
    exc_type, message, cause = handler.errors[-1]
    assert issubclass(exc_type, ValueError) and isinstance(cause, ValueError)
    assert "Rank 1" in message or "rank 1" in message.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_success_is_logged_through_handler_with_rank(tmp_path: Path) -> None:
    state, _ = make_state()
    handler = Handler()
    safeckpt.save_multi_files(handler, state, tmp_path / "m.pth")
    safeckpt.save_single_file(handler, state, tmp_path / "s.safeckpt")
    assert handler.errors == []
    assert len(handler.logs) == 2
    assert all("rank 1" in line.lower() for line in handler.logs), handler.logs


def test_handler_rank_from_rank_attribute_and_none_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state, _ = make_state()

    class RankOnly:
        rank = 3

        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, msg: str) -> None:
            self.lines.append(msg)

    h = RankOnly()
    safeckpt.save_multi_files(h, state, tmp_path / "a.pth")
    assert len(h.lines) == 1 and "rank 3" in h.lines[0].lower()
    with caplog.at_level(logging.INFO, logger="safeckpt"):
        safeckpt.save_multi_files(None, state, tmp_path / "b.pth")
    assert any(r.name == "safeckpt" and "rank 0" in r.getMessage().lower() for r in caplog.records)
