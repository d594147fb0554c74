"""Checkpoints on fsspec storage: ``memory://``, ``file://`` and a real S3 API (moto's server on loopback, via s3fs)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fixtures import s3_server

import safeckpt
from safeckpt import remote
from safeckpt.errors import IntegrityError
from safeckpt.manager import CheckpointManager


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model_state_dict": {"big": torch.randn(1024, 1024, generator=g), "small": torch.arange(4), "half": torch.ones(3, dtype=torch.bfloat16)},
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "model_kwargs": {"width": 1024},
        "epoch": seed,
    }


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture
def memory_url() -> Iterator[str]:
    root = f"memory://safeckpt-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


class Spy:
    """Records the byte ranges read through ``cat_file`` on an fsspec filesystem class."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.ranges: list[tuple[int | None, int | None]] = []
        real = cls.cat_file

        def cat_file(fs: Any, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> Any:
            self.ranges.append((start, end))
            return real(fs, path, start=start, end=end, **kw)

        monkeypatch.setattr(cls, "cat_file", cat_file)

    @property
    def bytes_read(self) -> int:
        return sum((end or 0) - (start or 0) for start, end in self.ranges)


# --------------------------------------------------------------------------- memory:// and file://


def test_single_file_round_trip_on_memory(memory_url: str) -> None:
    url = f"{memory_url}/run/ckpt.safeckpt"
    assert remote.save_single_file(None, _state(1), url) == url
    _same(remote.load(url, verify=True), _state(1))
    _same(remote.load_single_file(url), _state(1))


def test_lazy_open_reads_only_the_header_and_the_tensor_asked_for(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    url = f"{memory_url}/ckpt.safeckpt"
    remote.save_single_file(None, _state(2), url)
    size = fsspec.filesystem("memory").size(url)
    spy = Spy(monkeypatch, MemoryFileSystem)
    with remote.open(url, verify=True) as ckpt:
        assert ckpt.components() == ["model_state_dict", "optimizer_state_dict", "model_kwargs", "epoch"]
        header_reads = spy.bytes_read
        small = ckpt.get_tensor("model_state_dict/small")
        assert torch.equal(small, torch.arange(4))
        assert ckpt.get("model_kwargs") == {"width": 1024}
        assert ckpt.info()["model_state_dict"].tensors == 3
    assert header_reads <= 64 * 1024 and spy.bytes_read <= header_reads + 32 < size // 50  # the 4 MiB tensor is never fetched
    assert all(start is not None and end is not None for start, end in spy.ranges)


def test_multi_file_set_on_memory(memory_url: str) -> None:
    url = f"{memory_url}/m.pth"
    written = remote.save_multi_files(None, _state(3), url)
    assert sorted(written) == ["model_kwargs", "model_state_dict", "optimizer_state_dict"]
    fs = fsspec.filesystem("memory")
    assert fs.isfile(f"{memory_url}/m.safeckpt.json")
    loaded = remote.load(url, verify=True)
    expected = _state(3)
    _same(loaded["model_state_dict"], expected["model_state_dict"])
    assert loaded["model_kwargs"]["width"] == 1024
    assert remote.load_multi_files(f"{memory_url}/m.safeckpt.json", keys=["model_kwargs"]).keys() == {"model_kwargs"}
    component = f"{memory_url}/m_model_state_dict.safetensors"
    data = bytearray(fs.cat_file(component))
    data[-1] ^= 1
    fs.pipe_file(component, bytes(data))
    with pytest.raises(IntegrityError):
        remote.load(url, verify=True)


def test_torch_format_on_memory_is_read_without_unpickling(memory_url: str) -> None:
    url = f"{memory_url}/legacy.pt"
    remote.save_single_file(None, {"w": torch.ones(2)}, url, format="torch")
    assert fsspec.filesystem("memory").cat_file(url)[:2] == b"PK"
    _same(remote.load(url), {"w": torch.ones(2)})


def test_file_url_is_a_local_atomic_path(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/sub/ckpt.safeckpt"
    remote.save_single_file(None, _state(4), url)
    _same(safeckpt.load(tmp_path / "sub" / "ckpt.safeckpt"), _state(4))
    mgr = CheckpointManager(f"file://{tmp_path}/run", max_to_keep=1)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2), blocking=False)
    _same(mgr.restore(), _state(2))
    assert os.listdir(tmp_path / "run") == ["step_000000000002"]


def test_manager_on_memory(memory_url: str) -> None:
    mgr = CheckpointManager(f"{memory_url}/run", max_to_keep=2, keep_best=1, metric="loss", multi=True)
    for step, loss in enumerate([0.1, 0.9, 0.8, 0.7]):
        mgr.save(step, _state(step), {"loss": loss}, blocking=step % 2 == 1)
    mgr.wait()
    assert mgr.all_steps() == [0, 2, 3] and mgr.best() == 0
    _same(mgr.restore(0, verify=True), _state(0))
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{memory_url}/run/step_000000000009/checkpoint_model_state_dict.safetensors", b"torn")
    fresh = CheckpointManager(f"{memory_url}/run", max_to_keep=2, keep_best=1, metric="loss", multi=True)
    assert fresh.latest() == 3  # the incomplete step 9 (no marker, no lock) is ignored
    fresh.save(10, _state(10), {"loss": 9.0})
    assert not fs.exists(f"{memory_url}/run/step_000000000009")  # older than the newest complete step: cleaned
    assert fresh.all_steps() == [0, 3, 10]


# --------------------------------------------------------------------------- S3 (moto server on loopback)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    with s3_server("ckpts") as options:
        yield options


def test_s3_single_file_and_lazy_reads(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    url = "s3://ckpts/single/ckpt.safeckpt"
    remote.save_single_file(None, _state(5), url, storage_options=s3)
    _same(remote.load(url, storage_options=s3, verify=True), _state(5))
    spy = Spy(monkeypatch, s3fs.S3FileSystem)
    with remote.open(url, storage_options=s3) as ckpt:
        assert torch.equal(ckpt.get_tensor("model_state_dict/small"), torch.arange(4))
    assert spy.ranges and spy.bytes_read <= 64 * 1024 + 32  # the header and 32 bytes, not the 4 MiB tensor


def test_s3_failed_upload_leaves_no_object(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    url = "s3://ckpts/failed/ckpt.safeckpt"
    import safeckpt.writer

    real = safeckpt.writer.stream_single

    def half_then_fail(f: Any, encoded: Any) -> Any:
        f.write(b"\x00" * 1000)
        raise OSError(5, "connection reset")

    monkeypatch.setattr(safeckpt.writer, "stream_single", half_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        remote.save_single_file(None, _state(6), url, storage_options=s3)
    monkeypatch.setattr(safeckpt.writer, "stream_single", real)
    fs = fsspec.filesystem("s3", **s3)
    assert not fs.exists(url)


def test_s3_multi_files_and_manager(s3: dict[str, Any]) -> None:
    url = "s3://ckpts/multi/m.pth"
    remote.save_multi_files(None, _state(7), url, storage_options=s3)
    assert remote.load(url, storage_options=s3, verify=True)["model_kwargs"]["width"] == 1024

    mgr = CheckpointManager("s3://ckpts/run", max_to_keep=2, storage_options=s3)
    for step in range(4):
        mgr.save(step, _state(step), {"loss": float(step)}, blocking=bool(step % 2))
    mgr.wait()
    assert mgr.all_steps() == [2, 3]
    _same(mgr.restore(verify=True), _state(3))
    fresh = CheckpointManager("s3://ckpts/run", storage_options=s3)
    assert fresh.all_steps() == [2, 3] and fresh.metrics(2) == {"loss": 2.0}
    fs = fsspec.filesystem("s3", **s3)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("ckpts/run/step_000000000003", refresh=True)) == [
        "COMMITTED",
        "checkpoint.safeckpt",
    ]


def test_public_functions_take_urls() -> None:
    state = {"model_state_dict": {"w": torch.arange(6.0)}, "model_kwargs": {"width": 3}, "seed": 7}
    url = "memory://public-api/run/ckpt.safeckpt"
    assert safeckpt.save_single_file(None, state, url) == url
    assert torch.equal(safeckpt.load(url)["model_state_dict"]["w"], torch.arange(6.0))
    assert safeckpt.load_single_file(url, verify=True)["seed"] == 7
    with safeckpt.open(url) as ckpt:
        assert ckpt.components() == ["model_state_dict", "model_kwargs", "seed"]
    written = safeckpt.save_multi_files(None, state, "memory://public-api/run/m.pth")
    assert set(written) == {"model_state_dict", "model_kwargs"}
    parts = safeckpt.load_multi_files("memory://public-api/run/m.pth", verify=True)
    assert parts["model_kwargs"]["seed"] == 7 and torch.equal(parts["model_state_dict"]["w"], torch.arange(6.0))


def test_s3_interrupted_rewrite_keeps_the_old_set_and_step(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Atomicity through the one writer on S3: a failed component upload leaves the committed set
    (manifest last) and the committed manager step loadable, and the failed object absent."""
    import safeckpt.writer

    url = "s3://ckpts/rewrite/m.pth"
    safeckpt.save_multi_files(None, _state(8), url, storage_options=s3)
    mgr = CheckpointManager("s3://ckpts/rewrite-run", multi=True, storage_options=s3)
    mgr.save(1, _state(8))

    def fail(f: Any, encoded: Any) -> Any:
        f.write(b"\x00" * 100)
        raise OSError(5, "connection reset")

    monkeypatch.setattr(safeckpt.writer, "stream_single", fail)
    with pytest.raises(OSError, match="connection reset"):
        safeckpt.save_multi_files(None, _state(9), url, storage_options=s3)
    with pytest.raises(OSError, match="connection reset"):
        mgr.save(2, _state(9))
    monkeypatch.undo()
    _same(safeckpt.load(url, storage_options=s3, verify=True)["model_state_dict"], _state(8)["model_state_dict"])
    assert CheckpointManager("s3://ckpts/rewrite-run", storage_options=s3).all_steps() == [1]
    _same(mgr.restore(verify=True)["model_state_dict"], _state(8)["model_state_dict"])
