"""The same behaviour on every backend: a local directory and ``memory://`` go through one reader and one writer.

The four drift bugs of the two-road design are pinned here, then the multi-file,
realistic-state and manager behaviours run over both backends.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

import safeckpt
from safeckpt.distributed import save_on_rank0
from safeckpt.manager import CheckpointManager
from safeckpt.multifile import manifest_bytes, read_manifest_in
from safeckpt.storage import open_storage, display_path


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    url = f"memory://safeckpt-backends-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _join(root: str, name: str) -> str:
    return f"{root}/{name}"


def _names(root: str) -> list[str]:
    return sorted(open_storage(root).listdir())


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model_state_dict": {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "model_kwargs": {"width": 4, "arr": np.arange(3.0)},
        "epoch": seed,
    }


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


# --------------------------------------------------------------------------- the four drift bugs


def test_numpy_state_loads_from_memory_as_it_does_locally(root: str) -> None:
    url = _join(root, "a.safeckpt")
    safeckpt.save_single_file(None, {"a": np.arange(4.0)}, url)
    for loaded in (safeckpt.load(url), safeckpt.load_single_file(url)):
        assert np.array_equal(loaded["a"], np.arange(4.0)) and loaded["a"].dtype == np.float64
    with safeckpt.open(url) as ckpt:
        assert isinstance(ckpt, safeckpt.Checkpoint)
        assert np.array_equal(ckpt.get("a"), np.arange(4.0))


def test_auto_fallback_warning_points_at_the_callers_line(root: str) -> None:
    state = {"model_state_dict": {"w": torch.ones(2)}, "model_kwargs": {"m": torch.ones(2).to_sparse()}}
    with pytest.warns(safeckpt.FallbackWarning) as single:
        safeckpt.save_single_file(None, state, _join(root, "s.pth"), format="auto")
    with pytest.warns(safeckpt.FallbackWarning) as multi:
        safeckpt.save_multi_files(None, state, _join(root, "m.pth"), format="auto")
    with pytest.warns(safeckpt.FallbackWarning) as managed:
        CheckpointManager(_join(root, "run"), format="auto").save(1, state)
    for w in [*single, *multi, *managed]:
        assert Path(w.filename).resolve() == Path(__file__).resolve(), w.filename
    for w in [*single, *multi]:
        assert "state['model_kwargs']" in str(w.message)


def test_save_on_rank0_to_a_url_creates_no_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"memory://safeckpt-rank0-{uuid.uuid4().hex}/r0.safeckpt"
    written = save_on_rank0(None, {"w": torch.ones(2)}, url)
    assert written == url
    written_multi = save_on_rank0(None, _state(1), url.replace("r0", "m0"), multi=True)
    assert all(isinstance(v, str) and v.startswith("memory://") for v in written_multi.values())
    assert os.listdir(tmp_path) == []  # no directory named "memory:"
    assert torch.equal(safeckpt.load(url)["w"], torch.ones(2))
    assert safeckpt.distributed.per_rank_path(url, 1, 4) == url.replace("r0.safeckpt", "r0.rank00001-of-00004.safeckpt")


def test_torch_format_sets_have_one_layout_on_every_backend(root: str) -> None:
    state = _state(2)
    base = _join(root, "m.pth")
    written = safeckpt.save_multi_files(None, state, base, format="torch")
    assert _names(root) == sorted(f"m_{k}.pth" for k in ("model_kwargs", "model_state_dict", "optimizer_state_dict"))
    assert sorted(str(v).rpartition("/")[2] for v in written.values()) == _names(root)
    for trust in (False, True):
        loaded = safeckpt.load(base, trust_pickle=trust)
        _same(loaded["model_state_dict"], state["model_state_dict"])
        assert loaded["model_kwargs"]["width"] == 4


# --------------------------------------------------------------------------- multi-file sets


def test_multi_file_round_trip_and_verify(root: str) -> None:
    state = _state(3)
    base = _join(root, "m.pth")
    written = safeckpt.save_multi_files(None, state, base)
    assert "m.safeckpt.json" in _names(root)
    loaded = safeckpt.load_multi_files(base, verify=True)
    _same(loaded["model_state_dict"], state["model_state_dict"])
    _same(safeckpt.load(_join(root, "m.safeckpt.json"))["optimizer_state_dict"], state["optimizer_state_dict"])
    assert safeckpt.load_multi_files(base, keys=["model_kwargs"]).keys() == {"model_kwargs"}
    assert set(written) == {"model_state_dict", "optimizer_state_dict", "model_kwargs"}


def test_rewritten_set_removes_the_files_its_new_manifest_no_longer_names(root: str) -> None:
    base = _join(root, "m.pth")
    storage = open_storage(root)
    storage.makedirs("")
    storage.write_bytes("m_notes.txt", b"not ours")  # a foreign file next to the set
    safeckpt.save_multi_files(None, _state(4), base)
    assert "m_optimizer_state_dict.safetensors" in _names(root)
    safeckpt.save_multi_files(None, _state(5), base, ["model_state_dict"])
    assert _names(root) == ["m.safeckpt.json", "m_model_state_dict.safetensors", "m_notes.txt"]
    assert list(safeckpt.load(base)) == ["model_state_dict"]


def test_a_torn_set_is_detected(root: str) -> None:
    base = _join(root, "m.pth")
    safeckpt.save_multi_files(None, _state(6), base)
    storage = open_storage(root)
    data = bytearray(storage.read("m_model_state_dict.safetensors", 1 << 30))
    storage.write_bytes("m_model_state_dict.safetensors", bytes(data[:-4]))
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load(base)


def test_components_hold_exactly_their_key_on_every_backend(root: str) -> None:
    base = _join(root, "m.pth")
    safeckpt.save_multi_files(None, _state(7), base)
    storage = open_storage(root)
    manifest = read_manifest_in(storage, "m.safeckpt.json", safeckpt.Limits())
    entries = {e.key: e for e in manifest.entries}
    for impostor in ("optimizer_state_dict", "model_kwargs"):  # another key's file, a skeleton file
        swapped = replace(entries[impostor], key="model_state_dict")
        storage.write_bytes("m.safeckpt.json", manifest_bytes([swapped]))
        with pytest.raises(safeckpt.CheckpointFormatError, match=f"holds component '{impostor}'") as info:
            safeckpt.load_multi_files(base, verify=True)
        assert info.value.file is not None and info.value.file.endswith(entries[impostor].name)


# --------------------------------------------------------------------------- realistic state, missing files, errors


def test_realistic_state_round_trips_single_file(root: str) -> None:
    state = _state(8)
    state["sched"] = {"milestones": [1, 2], "gamma": 0.5}
    state["rng"] = torch.get_rng_state()
    url = _join(root, "ckpt.safeckpt")
    safeckpt.save_single_file(None, state, url)
    _same(safeckpt.load(url, verify=True), state)
    with safeckpt.open(url, verify=True) as ckpt:
        assert ckpt.components() == list(state)
        _same(ckpt.get("model_state_dict"), state["model_state_dict"])


def test_missing_file_says_no_such_file(root: str) -> None:
    missing = _join(root, "nonexistent.pth")
    for call in (safeckpt.load, safeckpt.load_single_file, safeckpt.open):
        with pytest.raises(FileNotFoundError, match="no such file") as info:
            call(missing)
        assert "nonexistent.pth" in str(info.value)


def test_any_other_json_is_not_a_checkpoint(root: str) -> None:
    storage = open_storage(root)
    storage.makedirs("")
    storage.write_bytes("config.json", b'{"hidden_size": 4}')
    storage.write_bytes("pytorch_model.bin.index.json", b'{"metadata": {}, "weight_map": {}}')
    for name in ("config.json", "pytorch_model.bin.index.json"):
        for call in (safeckpt.load, safeckpt.load_single_file, safeckpt.load_multi_files):
            with pytest.raises(safeckpt.CheckpointFormatError, match="not a safeckpt checkpoint") as info:
                call(_join(root, name))
            assert info.value.file is not None and name in info.value.file


def test_errors_reading_a_file_name_it(root: str) -> None:
    storage = open_storage(root)
    storage.makedirs("")
    storage.write_bytes("notes.pth", b"just some text, not a checkpoint\n" * 4)
    with pytest.raises(safeckpt.CheckpointFormatError) as info:
        safeckpt.load(_join(root, "notes.pth"))
    assert _join(root, "notes.pth") in str(info.value) and info.value.file is not None and info.value.file.endswith("notes.pth")
    if root.startswith("memory://"):
        assert tempfile.gettempdir() not in str(info.value) and info.value.file == _join(root, "notes.pth")  # never a temp copy


def test_convert_and_scan_take_urls(root: str) -> None:
    src = _join(root, "legacy.pth")
    storage = open_storage(root)
    storage.makedirs("")
    with storage.atomic_path("legacy.pth") as temp:
        torch.save({"model_state_dict": {"w": torch.ones(3)}, "epoch": 1}, temp)
    out = safeckpt.convert(src)
    assert str(out).endswith("legacy.safetensors")
    assert torch.equal(safeckpt.load(out)["model_state_dict"]["w"], torch.ones(3))


# --------------------------------------------------------------------------- the manager


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("format", ["safe", "torch"])
def test_manager_save_retain_restore(root: str, multi: bool, format: str) -> None:
    mgr = CheckpointManager(_join(root, "run"), max_to_keep=2, metric="loss", multi=multi, format=format)
    for step in (1, 2, 3):
        mgr.save(step, _state(step), {"loss": 1.0 / step})
    assert mgr.all_steps() == [2, 3]
    restored = mgr.restore(trust_pickle=format == "torch")
    _same(restored["model_state_dict"], _state(3)["model_state_dict"])
    assert restored["epoch"] == 3
    assert CheckpointManager(_join(root, "run")).latest() == 3
    assert [f.name for f in mgr.step_files(3)]


def test_scan_takes_urls_and_names_them(root: str) -> None:
    storage = open_storage(root)
    storage.makedirs("")
    with storage.atomic_path("legacy.pth") as temp:
        torch.save({"w": torch.ones(2)}, temp)
    report = safeckpt.scan(_join(root, "legacy.pth"))
    assert report.verdict == "safe" and report.format == "torch-zip"
    assert report.path == display_path(_join(root, "legacy.pth"))
