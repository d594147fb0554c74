"""``safeckpt.distributed``: DDP saves on rank 0, per-rank files, FSDP2/DTensor sharded checkpoints.

Real multi-process runs: ``torch.multiprocessing`` with the spawn start method,
the gloo backend on 127.0.0.1, CPU only. Each run has an overall deadline; a
run that hangs past it is killed and the test fails. Workers are module-level
functions (spawn imports this module in the children) and report by raising
(the parent re-raises) or by writing small JSON files into ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import safeckpt
from safeckpt.detect import Kind, detect
from safeckpt.distributed import (
    consolidate,
    load_on_all_ranks,
    load_per_rank,
    load_sharded,
    per_rank_path,
    save_on_rank0,
    save_per_rank,
    save_sharded,
)
from safeckpt.distributed._comm import Outcome, describe
from safeckpt.distributed.sharded import META_NAME, SHARD_DIR
from safeckpt.distributed.tree import merge_tensors, split_tensors

RUN_DEADLINE_S = 120.0


# --------------------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while another is still inside a collective
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; fail on error or hang."""
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + RUN_DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish within {RUN_DEADLINE_S} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


class Handler:
    """An nn_handler whose log lines are kept, as the seed's handler does."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


# --------------------------------------------------------------------------- DDP: save_on_rank0, load, per-rank files


def _ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    torch.manual_seed(0)  # the same replicated model on every rank, as DDP keeps it
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {
        "model_state_dict": model.module.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "model_kwargs": {"hidden": 3},
        "sde_class": nn.Linear,
        "epoch": 4,
    }
    handler = Handler()
    single = save_on_rank0(handler, state, Path(tmp) / "ddp" / "m.safeckpt")
    multi = save_on_rank0(handler, state, Path(tmp) / "ddp" / "m.pth", multi=True)
    assert single == Path(tmp) / "ddp" / "m.safeckpt"
    assert set(multi) == {"model_state_dict", "optimizer_state_dict", "model_kwargs"}
    assert all(p.is_file() for p in multi.values())
    assert handler.lines and all(f"Rank {rank}" in line for line in handler.lines)

    loaded = load_on_all_ranks(single)
    assert loaded["epoch"] == 4 and loaded["model_kwargs"] == {"hidden": 3}
    for name, tensor in model.module.state_dict().items():
        assert torch.equal(loaded["model_state_dict"][name], tensor)
        assert loaded["model_state_dict"][name].device == torch.device("cpu")
    assert torch.equal(loaded["optimizer_state_dict"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    parts = load_on_all_ranks(Path(tmp) / "ddp" / "m.pth")
    assert parts["model_kwargs"]["hidden"] == 3 and "model_state_dict" in parts

    mine = {"rank": rank, "rng": torch.full((2,), float(rank))}
    written = save_per_rank(handler, mine, Path(tmp) / "ddp" / "rng.safeckpt")
    assert written == Path(tmp) / "ddp" / f"rng.rank{rank:05d}-of-{world_size:05d}.safeckpt"
    dist.barrier()
    for other in range(world_size):
        theirs = load_per_rank(Path(tmp) / "ddp" / "rng.safeckpt", rank=other)
        assert theirs["rank"] == other and torch.equal(theirs["rng"], torch.full((2,), float(other)))
    _write_json(Path(tmp) / f"ddp-ok-{rank}.json", handler.lines)


def test_ddp_save_on_rank0_then_every_rank_loads(tmp_path: Path) -> None:
    run_ranks(_ddp_worker, 2, str(tmp_path))
    lines = [json.loads((tmp_path / f"ddp-ok-{r}.json").read_text()) for r in range(2)]
    assert any("saved successfully by Rank 0" in line for line in lines[0])
    assert any("seen by Rank 1" in line for line in lines[1])
    # the checkpoint written by rank 0 is an ordinary one: it loads without torch.distributed
    assert safeckpt.load(tmp_path / "ddp" / "m.safeckpt")["epoch"] == 4
    assert sorted(p.name for p in (tmp_path / "ddp").glob("rng.*")) == [
        "rng.rank00000-of-00002.safeckpt",
        "rng.rank00001-of-00002.safeckpt",
    ]


def _failing_save_worker(rank: int, world_size: int, tmp: str) -> None:
    blocker = Path(tmp) / "blocker"
    if rank == 0:
        blocker.write_bytes(b"a regular file, not a directory")
    dist.barrier()
    target = blocker / "sub" / "m.safeckpt"  # under a regular file: fails even for root
    with pytest.raises(OSError) as info:
        save_on_rank0(None, {"w": torch.ones(2)}, target)
    exc = info.value
    report = {"type": type(exc).__name__, "message": str(exc), "errno": exc.errno}
    if rank != 0:
        assert exc.source_rank == 0  # type: ignore[attr-defined]
        assert "rank 0 failed" in str(exc) and f"raised on rank {rank}" in str(exc)

    # a failure on rank 1 of a per-rank save is raised on rank 0 too
    base = (blocker / "x.safeckpt") if rank == 1 else (Path(tmp) / "ok" / "x.safeckpt")
    with pytest.raises(OSError) as per_rank_info:
        save_per_rank(None, {"w": torch.ones(1)}, base)
    report["per_rank"] = type(per_rank_info.value).__name__
    _write_json(Path(tmp) / f"fail-{rank}.json", report)


def test_rank0_failure_is_raised_on_every_rank(tmp_path: Path) -> None:
    run_ranks(_failing_save_worker, 2, str(tmp_path))
    reports = [json.loads((tmp_path / f"fail-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["type"] == reports[1]["type"]  # same class on every rank (NotADirectoryError or FileExistsError)
    assert reports[0]["errno"] == reports[1]["errno"] is not None
    assert reports[0]["per_rank"] == reports[1]["per_rank"]
    assert not list(tmp_path.glob("**/m.safeckpt"))


def test_save_on_rank0_without_process_group_is_a_plain_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="safeckpt"):
        out = save_on_rank0(None, {"w": torch.arange(3)}, tmp_path / "m.safeckpt")
    assert torch.equal(load_on_all_ranks(out)["w"], torch.arange(3))
    assert "Rank 0" in caplog.text
    with pytest.raises(ValueError, match="multi=True"):
        save_on_rank0(None, {"w": torch.arange(3)}, tmp_path / "n.safeckpt", keys_to_save=["w"])


# --------------------------------------------------------------------------- small pieces, in process


def test_per_rank_path_names_rank_and_world_size() -> None:
    assert per_rank_path("c/m.safeckpt", 3, 16) == Path("c/m.rank00003-of-00016.safeckpt")
    assert per_rank_path("c/m", 0, 1) == Path("c/m.rank00000-of-00001")
    assert per_rank_path("c/m.safeckpt") == Path("c/m.rank00000-of-00001.safeckpt")
    names = {per_rank_path("m.pt", r, w) for w in (1, 2, 10) for r in range(w)}
    assert len(names) == 13
    with pytest.raises(ValueError):
        per_rank_path("m.pt", 2, 2)


def test_load_per_rank_names_other_world_sizes(tmp_path: Path) -> None:
    safeckpt.save_single_file(None, {"a": 1}, per_rank_path(tmp_path / "s.safeckpt", 1, 4))
    with pytest.raises(FileNotFoundError, match=r"world size\(s\) \[4\]"):
        load_per_rank(tmp_path / "s.safeckpt", rank=1, world_size=2)
    assert load_per_rank(tmp_path / "s.safeckpt", rank=1, world_size=4) == {"a": 1}


def test_outcome_rebuilds_allowlisted_classes_only() -> None:
    err = safeckpt.UnsupportedValueError("bad", path_in_state="state['f']", value_type="function")
    rebuilt = Outcome(0, False, error=describe(err)).exception(1, "save x")
    assert type(rebuilt) is safeckpt.UnsupportedValueError
    assert rebuilt.path_in_state == "state['f']" and "raised on rank 1" in str(rebuilt)
    os_err = Outcome(0, False, error=describe(NotADirectoryError(20, "Not a directory", "/a/b"))).exception(2, "save")
    assert type(os_err) is NotADirectoryError and os_err.errno == 20 and os_err.filename == "/a/b"

    class Custom(Exception):
        pass

    other = Outcome(0, False, error=describe(Custom("boom"))).exception(1, "save")
    assert type(other) is RuntimeError and "Custom: boom" in str(other)
    forged = Outcome(0, False, error={"type": "os.system", "message": "x"}).exception(1, "save")
    assert type(forged) is RuntimeError


def test_split_and_merge_tensors_round_trip() -> None:
    sd = OrderedDict(w=torch.ones(2), b=torch.zeros(1))
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    state = {"m": sd, "o": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "pair": (torch.ones(1), 5), "a/b": torch.ones(1), "a%2Fb": torch.ones(1)}
    skeleton, slots, tensors = split_tensors(state)
    assert skeleton["m"]["w"] is None and skeleton["pair"] == (None, 5)
    assert len({s.key for s in slots}) == len(slots) == len(tensors) == 6
    merged = merge_tensors(skeleton, {s.path: tensors[s.key] for s in slots})
    assert merged["m"]._metadata == {"": {"version": 1}} and type(merged["m"]) is OrderedDict
    assert merged["o"]["state"][0]["step"] is state["o"]["state"][0]["step"] and merged["pair"][1] == 5
    assert state["m"]["w"] is sd["w"]  # the input is untouched
    with pytest.raises(safeckpt.CheckpointFormatError):
        merge_tensors(skeleton, {("nowhere",): torch.ones(1)})


# --------------------------------------------------------------------------- FSDP2 / DTensor sharded


def _build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _fsdp(model: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model_state_dict": msd, "optimizer_state_dict": osd}


def _sharded_save_worker(rank: int, world_size: int, tmp: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp(_build(0), world_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for step in range(2):
        torch.manual_seed(10 + step)
        model(torch.randn(4, 5)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    assert any(isinstance(v, torch.distributed.tensor.DTensor) for v in msd.values())
    state = {"model_state_dict": msd, "optimizer_state_dict": osd, "model_kwargs": {"hidden": 7},
             "sde_class": nn.Linear, "epoch": 2}
    handler = Handler()
    assert save_sharded(handler, state, Path(tmp) / "sharded") == Path(tmp) / "sharded"
    assert any(f"Rank {rank}" in line for line in handler.lines)
    reference = _full_state(model, opt)  # collective; complete on rank 0 only
    save_on_rank0(None, {**reference, "model_kwargs": {"hidden": 7}, "epoch": 2}, Path(tmp) / "reference.safeckpt")


def _flat(state: Any, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    if isinstance(state, dict):
        out: dict[tuple[Any, ...], Any] = {}
        for key, value in state.items():
            out.update(_flat(value, (*prefix, key)))
        return out
    if isinstance(state, list):
        return _flat(dict(enumerate(state)), prefix)
    return {prefix: state}


def _assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    a, e = _flat(actual), _flat(expected)
    assert set(a) == set(e)
    for path, value in e.items():
        if isinstance(value, torch.Tensor):
            assert a[path].dtype == value.dtype and torch.equal(a[path], value), path
        else:
            assert a[path] == value, path


def _sharded_load_worker(rank: int, world_size: int, tmp: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp(_build(seed=99), world_size)  # different weights, different world size
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    msd, osd = get_state_dict(model, opt)
    loaded = load_sharded(Path(tmp) / "sharded", {"model_state_dict": msd, "optimizer_state_dict": osd})
    assert loaded["model_kwargs"] == {"hidden": 7} and loaded["epoch"] == 2
    assert loaded["sde_class"] == safeckpt.GlobalRef("torch.nn.modules.linear", "Linear")
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.8, 0.9)
    set_state_dict(model, opt, model_state_dict=loaded["model_state_dict"], optim_state_dict=loaded["optimizer_state_dict"])
    full = _full_state(model, opt)
    if rank == 0:
        reference = safeckpt.load(Path(tmp) / "reference.safeckpt")
        _assert_same_state(full["model_state_dict"], reference["model_state_dict"])
        _assert_same_state(full["optimizer_state_dict"], reference["optimizer_state_dict"])
        assert opt.param_groups[0]["lr"] == 1e-2
        (Path(tmp) / f"sharded-loaded-on-{world_size}").touch()


def _assert_no_pickle(directory: Path) -> None:
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    for file in files:
        head = file.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and len(head) == 2 and head[1] <= 5), f"{file} is a pickle"
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                assert not [n for n in archive.namelist() if n.endswith(".pkl")], f"{file} holds a pickle"
        assert file.name != ".metadata" and not file.name.endswith(".metadata")
        assert detect(file) in (Kind.SAFETENSORS, Kind.SKELETON), file


def test_fsdp2_sharded_checkpoint_reshards_and_consolidates(tmp_path: Path) -> None:
    run_ranks(_sharded_save_worker, 2, str(tmp_path))
    directory = tmp_path / "sharded"
    _assert_no_pickle(directory)
    shard_files = sorted((directory / SHARD_DIR).iterdir())
    assert len(shard_files) == 2  # each rank wrote its own shards
    with safetensors.safe_open(str(shard_files[0]), "pt") as f:  # plain safetensors that holds one rank's slices
        shape = f.get_slice("model_state_dict/0.weight").get_shape()
        assert shape[0] < 7

    reference = safeckpt.load(tmp_path / "reference.safeckpt")
    for world_size in (2, 3):
        run_ranks(_sharded_load_worker, world_size, str(tmp_path))
        assert (tmp_path / f"sharded-loaded-on-{world_size}").exists()

    # one process, no torch.distributed: a plain model and optimizer
    model = _build(seed=99)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    loaded = load_sharded(directory, {"model_state_dict": msd, "optimizer_state_dict": osd})
    set_state_dict(model, opt, model_state_dict=loaded["model_state_dict"], optim_state_dict=loaded["optimizer_state_dict"])
    _assert_same_state(model.state_dict(), reference["model_state_dict"])

    out = consolidate(directory, tmp_path / "consolidated.safeckpt")
    merged = safeckpt.load(out)
    _assert_same_state(merged["model_state_dict"], reference["model_state_dict"])
    _assert_same_state(merged["optimizer_state_dict"], reference["optimizer_state_dict"])
    assert merged["model_kwargs"] == {"hidden": 7} and merged["sde_class"].qualname == "Linear"


SHARD = "shard-00001-model-00001-of-00001.safetensors"


def _edit_shard_header(directory: Path, old: str, new: str, shard: str = SHARD) -> None:
    """Replace ``old`` by ``new`` in a shard's JSON header, padding with spaces so the file keeps its size."""
    path = directory / SHARD_DIR / shard
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length].decode()
    assert old in header and len(new) <= len(old)
    edited = header.replace(old, new).encode()
    path.write_bytes(raw[:8] + edited + b" " * (length - len(edited)) + raw[8 + length :])


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('"w\\": {\\"saved_offsets\\": [0, 0]', '"w\\": {\\"saved_offsets\\": [1, 0]', "does not fit"),
        ('"w\\": {\\"saved_offsets\\": [0, 0]', '"w\\": {\\"saved_offsets\\": [0]', "does not fit"),
        ('"w\\": {\\"saved_offsets\\": [0, 0]', '"w\\": {\\"saved_offsets\\": \\"00\\"', "malformed saved offsets"),
        ("DCP_SHARDING_INFO", "DCP_SHARDING_INFX", "no valid DCP_SHARDING_INFO"),
        ('{\\"w', '[\\"w', "no valid DCP_SHARDING_INFO"),
        ('"b":{"dtype"', '"c":{"dtype"', "not in the checkpoint's table"),
        ('"w":{"dtype":"F32"', '"w":{"dtype":"I32"', "does not fit"),
        ('"shape":[2,3]', '"shape":[3,2]', "does not fit"),
        ('"data_offsets":[12,36]', '"data_offsets":[12,37]', "outside|needs 24 bytes"),
    ],
)
def test_hostile_shards_are_refused_before_dcp_reads_them(tmp_path: Path, old: str, new: str, message: str) -> None:
    save_sharded(None, {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, tmp_path / "c")
    _edit_shard_header(tmp_path / "c", old, new)
    with pytest.raises(safeckpt.CheckpointFormatError, match=message):
        load_sharded(tmp_path / "c")


def _rewrite_index(directory: Path, shape: list[int] | None = None, second_shard: bool = False,
                   change: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Rewrite the index as a hostile one would: every tensor of ``shape``, with ``second_shard``
    a copy of the shard as a second rank's file, then ``change`` applied to the document."""
    from safeckpt.distributed.sharded_index import index_writer
    from safeckpt.storage import atomic_write

    shards = directory / SHARD_DIR
    if second_shard:
        (shards / SECOND_SHARD).write_bytes((shards / SHARD).read_bytes())
    with safeckpt.Checkpoint(directory / META_NAME) as ckpt:
        doc = ckpt.load()
    if shape is not None:
        doc["tensors"] = [[*item[:3], shape] for item in doc["tensors"]]
    doc["shards"] = [[p.name, p.stat().st_size] for p in sorted(shards.iterdir())]
    if change is not None:
        change(doc)
    atomic_write(directory / META_NAME, index_writer(doc))


SECOND_SHARD = SHARD.replace("00001-model", "00002-model")


@pytest.mark.parametrize(
    "shape, message",
    [
        ([1 << 40, 3], "hold 6 of its 3298534883328 elements"),  # 12 TB: refused before anything is allocated
        ([4, 3], "hold 6 of its 12 elements"),
        ([2, 4], "hold 6 of its 8 elements"),
    ],
)
def test_an_index_promising_more_than_its_shards_hold_is_refused(tmp_path: Path, shape: list[int], message: str) -> None:
    save_sharded(None, {"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "c")
    _rewrite_index(tmp_path / "c", shape)
    with pytest.raises(safeckpt.CheckpointFormatError, match=message):
        load_sharded(tmp_path / "c")


def test_chunks_must_tile_the_tensor(tmp_path: Path) -> None:
    # one saved chunk, copied as a second rank's file: both at offset 0 of a tensor twice as long
    save_sharded(None, {"w": torch.arange(4.0)}, tmp_path / "c")
    _rewrite_index(tmp_path / "c", [8], second_shard=True)
    with pytest.raises(safeckpt.CheckpointFormatError, match=r"reach \[4\], not its far corner \[8\]"):
        load_sharded(tmp_path / "c")
    _edit_shard_header(tmp_path / "c", "[0]", "[4]", SECOND_SHARD)  # [0, 4) and [4, 8): a valid set
    assert torch.equal(load_sharded(tmp_path / "c")["w"], torch.arange(4.0).repeat(2))

    # a [1, 2] and a [2, 1] chunk at the same corner of a [2, 2] tensor: count and reach are right
    save_sharded(None, {"w": torch.tensor([[1.0, 2.0]])}, tmp_path / "d")
    _rewrite_index(tmp_path / "d", [2, 2], second_shard=True)
    _edit_shard_header(tmp_path / "d", '"shape":[1,2]', '"shape":[2,1]', SECOND_SHARD)
    with pytest.raises(safeckpt.CheckpointFormatError, match="two of its chunks start at the same offset"):
        load_sharded(tmp_path / "d")
    _edit_shard_header(tmp_path / "d", '"shape":[2,1]', '"shape":[1,2]', SECOND_SHARD)
    _edit_shard_header(tmp_path / "d", "[0, 0]", "[1, 0]", SECOND_SHARD)
    assert torch.equal(load_sharded(tmp_path / "d")["w"], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))

    # empty chunks at the same offset (ranks past the end of an uneven sharding) cover nothing: accepted
    save_sharded(None, {"e": torch.zeros(0, 2)}, tmp_path / "e")
    _rewrite_index(tmp_path / "e", [0, 2], second_shard=True)
    assert load_sharded(tmp_path / "e")["e"].shape == (0, 2)
    _rewrite_index(tmp_path / "e", [0, 3])  # even an empty tensor's chunks must reach its corner
    with pytest.raises(safeckpt.CheckpointFormatError, match=r"reach \[0, 2\], not its far corner \[0, 3\]"):
        load_sharded(tmp_path / "e")


def test_a_tensor_of_the_index_that_no_shard_holds_is_refused(tmp_path: Path) -> None:
    save_sharded(None, {"w": torch.ones(2), "e": torch.zeros(0)}, tmp_path / "c")

    def add_tensor(doc: dict[str, Any]) -> None:
        doc["tensors"].append([("x",), "x", torch.float32, [0]])  # even an empty one: DCP would look for it
        doc["state"]["x"] = None

    _rewrite_index(tmp_path / "c", change=add_tensor)
    with pytest.raises(safeckpt.CheckpointFormatError, match="tensor 'x': no shard holds any of it"):
        load_sharded(tmp_path / "c")


def _second_entry_at(doc: dict[str, Any], place: tuple[Any, ...]) -> None:
    doc["tensors"][1][0] = place


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda doc: _second_entry_at(doc, doc["tensors"][0][0]), "share the place"),  # found by fuzz_sharded
        (lambda doc: doc["tensors"][1].__setitem__(1, doc["tensors"][0][1]), "or the key"),
        (lambda doc: _second_entry_at(doc, ("x", [1])), "malformed tensor entry"),  # an unhashable place
        (lambda doc: doc["shards"].append(list(doc["shards"][0])), "listed twice"),
    ],
    ids=["same-place", "same-key", "unhashable-place", "same-shard"],
)
def test_malformed_tensor_tables_are_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str) -> None:
    save_sharded(None, {"w": torch.arange(12.0).reshape(3, 4), "s": torch.tensor(7)}, tmp_path / "c")
    _rewrite_index(tmp_path / "c", change=change)
    with pytest.raises(safeckpt.CheckpointFormatError, match=message):
        load_sharded(tmp_path / "c")


class Raising(Handler):
    """An nn_handler with ``raise_error``, as the seed's handler has."""

    def raise_error(self, kind: type, message: str, exc: BaseException) -> None:
        raise RuntimeError(f"routed {kind.__name__}: {message}") from exc


def test_dcp_failures_reach_the_handler_although_they_are_not_exceptions(tmp_path: Path, monkeypatch: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    save_sharded(None, {"w": torch.ones(2)}, tmp_path / "c")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise CheckpointException("dcp failed", {})

    for name, call in (("load", lambda: load_sharded(tmp_path / "c", nn_handler=Raising())),
                       ("save", lambda: save_sharded(Raising(), {"w": torch.ones(2)}, tmp_path / "d"))):
        monkeypatch.setattr(dcp, name, fail)
        with pytest.raises(RuntimeError, match=f"routed CheckpointException: Rank 0 failed to {name}"):
            call()


def test_sharded_limits_apply_to_shards_and_consolidate(tmp_path: Path) -> None:
    save_sharded(None, {"w": torch.zeros(2, 3, 4), "b": torch.ones(3)}, tmp_path / "c")
    for load in (lambda limits: load_sharded(tmp_path / "c", limits=limits),
                 lambda limits: consolidate(tmp_path / "c", tmp_path / "one.safeckpt", limits=limits)):
        with pytest.raises(safeckpt.LimitExceededError) as info:
            load(safeckpt.Limits(max_dims=2))  # checked in the index's table
        assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_dims", 2, 3)
        with pytest.raises(safeckpt.LimitExceededError) as info:
            load(safeckpt.Limits(max_tensors=1))  # checked in the shard's header (the index holds no tensor)
        assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_tensors", 1, 2)
        load(safeckpt.Limits(max_dims=3, max_tensors=2))
    assert torch.equal(safeckpt.load(tmp_path / "one.safeckpt")["w"], torch.zeros(2, 3, 4))


def test_sharded_checkpoint_in_one_process_and_its_integrity_checks(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3).t(), "tied": {"a": torch.ones(3)}, "n": [1, "x"]}
    state["tied"]["b"] = state["tied"]["a"]
    save_sharded(None, state, tmp_path / "c")
    back = load_sharded(tmp_path / "c")
    assert torch.equal(back["w"], state["w"]) and back["n"] == [1, "x"]
    assert torch.equal(back["tied"]["b"], torch.ones(3))
    target = {"w": torch.zeros(3, 2), "tied": {"a": torch.zeros(3), "b": torch.zeros(3)}}
    assert load_sharded(tmp_path / "c", target)["w"] is target["w"] and torch.equal(target["w"], state["w"])

    with pytest.raises(ValueError, match="in the state to load into"):
        load_sharded(tmp_path / "c", {"w": torch.zeros(2, 3)})
    with pytest.raises(safeckpt.ComponentNotFoundError):
        load_sharded(tmp_path / "c", {"extra": torch.zeros(1)})
    assert "extra" not in load_sharded(tmp_path / "c", {"extra": torch.zeros(1)}, strict=False)

    stale = tmp_path / "c" / SHARD_DIR / "shard-00009-model-00001-of-00001.safetensors"
    stale.write_bytes((tmp_path / "c" / SHARD_DIR / "shard-00001-model-00001-of-00001.safetensors").read_bytes())
    with pytest.raises(safeckpt.IntegrityError, match="unexpected"):
        load_sharded(tmp_path / "c")
    save_sharded(None, {"v": torch.ones(1)}, tmp_path / "c")  # a new save replaces the old shards
    assert list(load_sharded(tmp_path / "c")) == ["v"]
    (tmp_path / "c" / META_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="not a complete sharded"):
        load_sharded(tmp_path / "c")
    with pytest.raises(safeckpt.UnsupportedValueError):
        save_sharded(None, {"f": lambda: 0, "w": torch.ones(1)}, tmp_path / "d")
    assert not (tmp_path / "d" / SHARD_DIR).exists()


def test_sharded_checkpoints_take_paths_and_file_urls_but_refuse_other_urls(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'c'}"
    assert save_sharded(None, {"w": torch.arange(3.0)}, url) == tmp_path / "c"
    assert torch.equal(load_sharded(url)["w"], torch.arange(3.0))
    for call in (lambda: save_sharded(None, {"w": torch.ones(1)}, "memory://x/c"), lambda: load_sharded("memory://x/c")):
        with pytest.raises(ValueError, match="use a path, not a URL"):
            call()
    assert not Path("memory:").exists()
