"""Correctness of the fast paths the benchmarks time (no timing here: see benchmarks/).

* Loads map the file instead of copying it: tensors from ``safeckpt.load`` live in
  a (private, copy-on-write) mapping of the checkpoint, and views that shared a
  storage when saved share one again when loaded.
* Where a copy is expected it is one: tensors that were distinct stay distinct,
  ``Checkpoint.get_tensor`` of the same name twice returns fresh data, and writes
  to a returned tensor never reach the file or later reads.
* Device placement: ``"cpu"``, ``torch.device("cpu")`` and ``"meta"``.
* Partial reads: ``Checkpoint.get(component)`` reads only that component's byte
  range, shown by corrupting the other component's bytes on disk.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safeckpt

# --------------------------------------------------------------------------- helpers


def _save(tmp_path: Path, state: dict[str, Any], name: str = "ckpt.safeckpt") -> Path:
    path = tmp_path / name
    safeckpt.save_single_file(None, state, path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mapped_file(address: int) -> str | None:
    """The file backing the memory mapping that holds ``address`` (Linux ``/proc/self/maps``), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def _entry_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``[begin, end)`` file offsets of every tensor entry, from the safetensors header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    return {name: (start + spec["data_offsets"][0], start + spec["data_offsets"][1]) for name, spec in header.items()}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _views_state() -> dict[str, Any]:
    base = torch.arange(100, dtype=torch.float32)
    return {
        "model": {
            "base": base,
            "slice": base[10:20],  # a view at an offset
            "transposed": base.view(10, 10).t(),  # a non-contiguous view
            "separate": base.clone(),  # equal values, its own storage
        },
        "epoch": 3,
    }


# --------------------------------------------------------------------------- views and mappings


def test_views_of_one_stored_storage_share_memory_after_load(tmp_path: Path) -> None:
    original = _views_state()
    loaded = safeckpt.load(_save(tmp_path, original))["model"]
    for key in original["model"]:
        assert torch.equal(loaded[key], original["model"][key]), key
    assert loaded["transposed"].stride() == (1, 10)
    assert _storage(loaded["slice"]) == _storage(loaded["base"]) == _storage(loaded["transposed"])
    loaded["base"][15] = -1.0  # shared memory: visible through every view of it
    assert loaded["slice"][5].item() == -1.0
    assert loaded["transposed"][5, 1].item() == -1.0


def test_distinct_tensors_do_not_share_memory_after_load(tmp_path: Path) -> None:
    loaded = safeckpt.load(_save(tmp_path, _views_state()))["model"]
    assert _storage(loaded["separate"]) != _storage(loaded["base"])
    loaded["separate"][0] = 42.0
    assert loaded["base"][0].item() == 0.0


def test_a_tensor_referenced_twice_loads_once(tmp_path: Path) -> None:
    weight = torch.randn(8, 8)
    state = {"model_state_dict": {"w": weight}, "ema_state_dict": {"shadow_params": [weight]}}
    loaded = safeckpt.load(_save(tmp_path, state))
    assert loaded["ema_state_dict"]["shadow_params"][0] is loaded["model_state_dict"]["w"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_tensors_are_a_mapping_of_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path, {"model": {"w": torch.randn(256, 1024)}})
    loaded = safeckpt.load(path)
    assert _mapped_file(loaded["model"]["w"].data_ptr()) == str(path.resolve())
    with safeckpt.open(path) as ckpt:
        assert _mapped_file(ckpt.get_tensor("model/w").data_ptr()) == str(path.resolve())


def test_writes_to_loaded_tensors_never_reach_the_file(tmp_path: Path) -> None:
    original = _views_state()
    path = _save(tmp_path, original)
    digest = _sha256(path)
    loaded = safeckpt.load(path)
    loaded["model"]["base"].fill_(7.0)
    loaded["model"]["separate"].zero_()
    del loaded
    assert _sha256(path) == digest
    again = safeckpt.load(path, verify=True)["model"]
    assert torch.equal(again["base"], original["model"]["base"])
    assert torch.equal(again["separate"], original["model"]["separate"])


def test_get_tensor_twice_returns_fresh_data(tmp_path: Path) -> None:
    original = torch.arange(64, dtype=torch.float32)
    path = _save(tmp_path, {"model": {"w": original}})
    with safeckpt.open(path, verify=True) as ckpt:
        first = ckpt.get_tensor("model/w")
        first.fill_(-3.0)
        second = ckpt.get_tensor("model/w")  # verify=True: also re-hashed from what is read
        assert torch.equal(second, original)
        assert _storage(second) != _storage(first)
        assert torch.equal(first, torch.full((64,), -3.0))  # the caller's copy keeps the caller's writes
        second.add_(1.0)
        assert torch.equal(ckpt.get_tensor("model/w"), original)
    assert torch.equal(first, torch.full((64,), -3.0)), "tensors handed out stay valid after close()"


def test_get_tensor_of_different_names_do_not_disturb_each_other(tmp_path: Path) -> None:
    path = _save(tmp_path, {"model": {"a": torch.ones(16), "b": torch.zeros(16)}})
    with safeckpt.open(path) as ckpt:
        a = ckpt.get_tensor("model/a")
        a.mul_(5.0)
        b = ckpt.get_tensor("model/b")
        assert torch.equal(b, torch.zeros(16))
        assert torch.equal(a, torch.full((16,), 5.0))


# --------------------------------------------------------------------------- device placement


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_load_on_cpu(tmp_path: Path, device: str | torch.device) -> None:
    original = _views_state()
    path = _save(tmp_path, original)
    loaded = safeckpt.load(path, device=device)["model"]
    for key, tensor in loaded.items():
        assert tensor.device == torch.device("cpu"), key
        assert torch.equal(tensor, original["model"][key]), key
    assert _storage(loaded["slice"]) == _storage(loaded["base"])
    with safeckpt.open(path, device=device) as ckpt:
        assert ckpt.get_tensor("model/base").device == torch.device("cpu")


def test_load_on_meta_keeps_shapes_dtypes_and_views(tmp_path: Path) -> None:
    original = _views_state()
    original["model"]["half"] = torch.ones(3, 5, dtype=torch.float16)
    path = _save(tmp_path, original)
    loaded = safeckpt.load(path, device="meta")
    assert loaded["epoch"] == 3
    for key, tensor in loaded["model"].items():
        source = original["model"][key]
        assert tensor.is_meta, key
        assert (tensor.shape, tensor.dtype, tensor.stride()) == (source.shape, source.dtype, source.stride()), key
    with safeckpt.open(path, device=torch.device("meta")) as ckpt:
        tensor = ckpt.get_tensor("model/base")
        assert tensor.is_meta and tensor.shape == (100,)


# --------------------------------------------------------------------------- partial reads


def _two_components(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = {
        "small_component": {"bias": torch.arange(32, dtype=torch.float32), "steps": torch.tensor(7), "note": "kept"},
        "large_component": {"weight": torch.randn(512, 1024), "other": torch.randn(256, 256)},
    }
    return _save(tmp_path, state), state


def _corrupt(path: Path, names: list[str]) -> None:
    """Invert, in place, every byte of the named entries (file size and header unchanged)."""
    ranges = _entry_ranges(path)
    with open(path, "r+b") as f:
        for name in names:
            begin, end = ranges[name]
            f.seek(begin)
            data = f.read(end - begin)
            inverted = int.from_bytes(data, "little") ^ ((1 << (8 * len(data))) - 1)
            f.seek(begin)
            f.write(inverted.to_bytes(len(data), "little"))


def test_get_component_reads_only_its_range(tmp_path: Path) -> None:
    path, state = _two_components(tmp_path)
    large = [name for name in _entry_ranges(path) if name.startswith("large_component/")]
    assert large, "the large component's entries are named after it"
    _corrupt(path, large)
    with safeckpt.open(path, verify=True) as ckpt:
        small = ckpt.get("small_component")
        assert small["note"] == "kept"
        assert torch.equal(small["bias"], state["small_component"]["bias"])
        assert torch.equal(small["steps"], state["small_component"]["steps"])
        with pytest.raises(safeckpt.IntegrityError) as info:
            ckpt.get("large_component")
        assert info.value.tensor_name in large
        with pytest.raises(safeckpt.IntegrityError):
            ckpt.get_tensor(large[-1])
    with pytest.raises(safeckpt.IntegrityError):
        safeckpt.load(path, verify=True)


def test_corrupting_the_small_component_spares_the_large_one(tmp_path: Path) -> None:
    path, state = _two_components(tmp_path)
    _corrupt(path, ["small_component/bias"])
    with safeckpt.open(path, verify=True) as ckpt:
        large = ckpt.get("large_component")
        assert torch.equal(large["weight"], state["large_component"]["weight"])
        with pytest.raises(safeckpt.IntegrityError):
            ckpt.get("small_component")


def test_numpy_arrays_load_on_the_cpu_whatever_the_device(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {"arr": np.arange(3), "t": torch.ones(2)}, tmp_path / "m.safeckpt")
    loaded = safeckpt.load(path, device="meta")
    assert loaded["t"].device.type == "meta" and loaded["t"].shape == (2,)
    assert type(loaded["arr"]) is np.ndarray and loaded["arr"].tolist() == [0, 1, 2]


def test_nan_component_key_can_be_fetched(tmp_path: Path) -> None:
    path = safeckpt.save_single_file(None, {float("nan"): torch.arange(2), "b": 1}, tmp_path / "n.safeckpt")
    with safeckpt.open(path) as ckpt:
        key = ckpt.components()[0]
        assert key != key
        assert torch.equal(ckpt.get(float("nan")), torch.arange(2))


def test_copy_gives_tensors_independent_of_the_file_mapping(tmp_path: Path) -> None:
    state = {"w": torch.arange(1024, dtype=torch.float32), "v": torch.ones(3)}
    path = safeckpt.save_single_file(None, state, tmp_path / "c.safeckpt")
    legacy = tmp_path / "c.pth"
    torch.save(state, legacy)
    for source in (path, legacy):
        mapped = safeckpt.load(source)["w"]
        copied = safeckpt.load(source, copy=True)["w"]
        assert torch.equal(mapped, copied)
        maps = Path("/proc/self/maps").read_text()
        mapped_ranges = [line for line in maps.splitlines() if line.endswith(str(source))]
        assert mapped_ranges, "the zero-copy load maps the file"
        ranges = [tuple(int(x, 16) for x in r.split()[0].split("-")) for r in mapped_ranges]
        assert any(a <= mapped.data_ptr() < b for a, b in ranges), "the default load is a view of the mapping"
        assert not any(a <= copied.data_ptr() < b for a, b in ranges), "the copy lives outside the file mapping"
        del mapped
