"""CheckpointManager on a local directory: commit markers, retention, async saves, crash and resume.

The crash test runs a real training loop in a subprocess that saves every step
in the background, SIGKILLs it at random moments (fixed seed) and resumes it
from ``latest()`` in a fresh process each time; its final weights must be
bit-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt.cli_targets import read_step
from safeckpt.errors import IntegrityError, UnsupportedValueError
from safeckpt.manager import CheckpointManager
import safeckpt.writer
from safeckpt.storage import open_storage


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g)},
        "step": step,
        "note": f"step {step}",
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key]


@pytest.mark.parametrize("multi", [False, True])
def test_save_commits_a_marker_last_and_restores(tmp_path: Path, multi: bool) -> None:
    mgr = CheckpointManager(tmp_path / "run", multi=multi)
    mgr.save(7, _state(7), {"loss": 0.5})
    step_dir = tmp_path / "run" / "step_000000000007"
    marker = json.loads((step_dir / "COMMITTED").read_text())
    assert marker["step"] == 7 and marker["metrics"] == {"loss": 0.5}
    assert {f["name"] for f in marker["files"]} | {"COMMITTED"} == set(os.listdir(step_dir))  # lock removed
    for f in marker["files"]:
        assert (step_dir / f["name"]).stat().st_size == f["size"]
    if multi:
        assert marker["entry"] == "checkpoint.safeckpt.json" and marker["files"][-1]["name"] == marker["entry"]
    _same(mgr.restore(verify=True), _state(7))
    _same(safeckpt.load(step_dir / marker["entry"]), _state(7))  # the public loaders read it as is
    assert mgr.latest() == 7 and mgr.all_steps() == [7] and mgr.metrics(7) == {"loss": 0.5}


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=3)
    for step in range(0, 60, 10):
        mgr.save(step, _state(step))
    assert mgr.all_steps() == [30, 40, 50]
    assert sorted(os.listdir(tmp_path)) == ["step_000000000030", "step_000000000040", "step_000000000050"]
    _same(mgr.restore(30), _state(30))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_retention_keeps_the_union_of_newest_and_best(tmp_path: Path, mode: str) -> None:
    losses = {0: 5.0, 1: 1.0, 2: 4.0, 3: 0.5, 4: 3.0, 5: 6.0, 6: 2.0}
    score = losses if mode == "min" else {k: -v for k, v in losses.items()}
    mgr = CheckpointManager(tmp_path, max_to_keep=2, keep_best=2, metric="loss", mode=mode)
    for step, value in score.items():
        mgr.save(step, _state(step), {"loss": value})
    assert mgr.all_steps() == [1, 3, 5, 6]  # best two (3, 1) and newest two (5, 6)
    assert mgr.best() == 3
    fresh = CheckpointManager(tmp_path, keep_best=2, metric="loss", mode=mode)  # recovered from the directory alone
    assert fresh.all_steps() == [1, 3, 5, 6] and fresh.best() == 3 and fresh.metrics(1) == {"loss": score[1]}


def test_keep_best_alone_never_deletes_the_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_best=1, metric="acc", mode="max")
    mgr.save(1, _state(1), {"acc": 0.9})
    mgr.save(2, _state(2), {"acc": 0.1})
    mgr.save(3, _state(3), {"acc": 0.2})
    mgr.save(4, _state(4), {"acc": 0.05})  # the worst, but the newest
    assert mgr.all_steps() == [1, 4]
    assert mgr.best() == 1 and mgr.latest() == 4


def test_max_to_keep_one_keeps_the_only_complete_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(1, _state(1))
    real_write = safeckpt.writer._write

    def failing(storage: Any, rel: str, payload: Any, **kw: Any) -> Any:
        if rel.endswith("checkpoint.safeckpt"):
            raise OSError(28, "No space left on device")
        return real_write(storage, rel, payload, **kw)

    monkeypatch.setattr(safeckpt.writer, "_write", failing)
    with pytest.raises(OSError, match="No space left"):
        mgr.save(2, _state(2))
    assert mgr.all_steps() == [1]
    _same(mgr.restore(), _state(1))
    monkeypatch.setattr(safeckpt.writer, "_write", real_write)
    mgr.save(3, _state(3))
    assert mgr.all_steps() == [3]
    assert sorted(os.listdir(tmp_path)) == ["step_000000000003"]  # the failed step 2 was cleaned up


def _incomplete(root: Path, step: int, pid: int | None, host: str | None = None) -> Path:
    d = root / f"step_{step:012d}"
    d.mkdir(parents=True)
    (d / "checkpoint.safeckpt").write_bytes(b"\x00" * 100)  # torn
    if pid is not None:
        (d / "WRITING").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "x"}))
    return d


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "marker",
    [
        b"[" * 200_000 + b"]" * 200_000,  # deeper than the JSON parser's recursion
        b"\xff\xfe{}",  # not UTF-8
        b'{"format": "safeckpt-step", "pad": "' + b"x" * (17 << 20) + b'"}',  # past MAX_MARKER_BYTES
        b"null",
    ],
    ids=["deep", "not-utf8", "oversized", "null"],
)
def test_hostile_markers_and_locks_make_a_step_incomplete(tmp_path: Path, marker: bytes) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, _state(5))
    hostile = tmp_path / "step_000000000007"
    hostile.mkdir()
    (hostile / "COMMITTED").write_bytes(marker)
    (hostile / "WRITING").write_bytes(marker)
    assert mgr.all_steps() == [5] and mgr.latest() == 5
    with pytest.raises(FileNotFoundError):
        mgr.restore(7)
    CheckpointManager(tmp_path)  # a lock it cannot read is never taken for this host's: the step stays
    assert hostile.exists()


def test_a_marker_read_stops_one_byte_past_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, _state(5), {"loss": 0.5})
    size = (tmp_path / "step_000000000005" / "COMMITTED").stat().st_size
    monkeypatch.setattr(safeckpt.manager, "MAX_MARKER_BYTES", size)
    assert CheckpointManager(tmp_path).all_steps() == [5]
    monkeypatch.setattr(safeckpt.manager, "MAX_MARKER_BYTES", size - 1)
    assert CheckpointManager(tmp_path).all_steps() == []
    store = open_storage(tmp_path)
    assert store.read("step_000000000005/COMMITTED", size) == (tmp_path / "step_000000000005" / "COMMITTED").read_bytes()
    with pytest.raises(ValueError, match=f"larger than {size - 1} bytes"):
        store.read("step_000000000005/COMMITTED", size - 1)


def test_metrics_too_large_for_a_marker_are_refused_before_writing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="metrics take"):
        mgr.save(1, _state(1), {"notes": "x" * (1 << 20)})
    assert os.listdir(tmp_path) == []
    mgr.save(1, _state(1), {"notes": "x" * 1000})
    assert mgr.metrics(1) == {"notes": "x" * 1000}


def test_incomplete_steps_are_ignored_and_cleaned_by_rule(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, _state(5))
    older = _incomplete(tmp_path, 3, pid=None)  # older than the newest complete step
    crashed = _incomplete(tmp_path, 9, pid=_dead_pid())  # newer, its writer is gone
    live = _incomplete(tmp_path, 10, pid=os.getppid())  # newer, its writer may still be running
    elsewhere = _incomplete(tmp_path, 11, pid=_dead_pid(), host="some-other-host")
    (tmp_path / "step_000000000012").mkdir()
    (tmp_path / "step_000000000012" / "COMMITTED").write_text("{not json")  # torn marker: incomplete
    assert mgr.all_steps() == [5] and mgr.latest() == 5
    _same(mgr.restore(), _state(5))
    with pytest.raises(FileNotFoundError):
        mgr.restore(9)

    CheckpointManager(tmp_path)  # a new manager cleans up
    assert not older.exists() and not crashed.exists()
    assert live.exists() and elsewhere.exists()
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(10, _state(10))  # replaces the incomplete directory of the same step
    _same(mgr.restore(), _state(10))
    assert mgr.all_steps() == [10]
    assert sorted(os.listdir(tmp_path)) == ["step_000000000010", "step_000000000011", "step_000000000012"]
    mgr.save(13, _state(13))  # now 11 and 12 are older than the newest complete step
    assert sorted(os.listdir(tmp_path)) == ["step_000000000013"]


@pytest.mark.parametrize(
    "change",
    [
        lambda marker: marker["files"][0].update(size=-1),  # a size no file has
        lambda marker: marker.update(step=True),  # True == 1, but a bool is not a step number
        lambda marker: marker.update(entry="elsewhere.safeckpt"),
    ],
)
def test_manager_and_inspect_agree_on_a_malformed_marker(tmp_path: Path, change: Any) -> None:
    CheckpointManager(tmp_path).save(1, _state(1))
    marker_file = tmp_path / "step_000000000001" / "COMMITTED"
    marker = json.loads(marker_file.read_text())
    change(marker)
    marker_file.write_text(json.dumps(marker))
    step = read_step(tmp_path / "step_000000000001")
    assert step.marker is None and step.problem  # inspect: incomplete, and why
    mgr = CheckpointManager(tmp_path)
    assert mgr.all_steps() == [] and mgr.latest() is None
    with pytest.raises(FileNotFoundError):
        mgr.restore(1)


def test_tampered_step_is_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(1))
    file = tmp_path / "step_000000000001" / "checkpoint.safeckpt"
    file.write_bytes(file.read_bytes() + b"x")
    with pytest.raises(IntegrityError):
        mgr.restore(1)
    data = bytearray(file.read_bytes()[:-1])
    data[-3] ^= 0xFF  # same size, one tensor byte flipped
    file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        mgr.restore(1, verify=True)


def test_invalid_uses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_best needs metric"):
        CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="best")
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(tmp_path, max_to_keep=0)
    mgr = CheckpointManager(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        mgr.restore()
    assert mgr.latest() is None and mgr.all_steps() == []
    with pytest.raises(ValueError, match="needs the manager to be created with metric"):
        mgr.best()
    mgr.save(1, _state(1))
    with pytest.raises(ValueError, match="already saved"):
        mgr.save(1, _state(1))
    with pytest.raises(ValueError, match="step must be"):
        mgr.save(-1, _state(1))
    with pytest.raises(TypeError, match="metric 'loss'"):
        mgr.save(2, _state(2), {"loss": [1.0]})
    with pytest.raises(UnsupportedValueError):
        mgr.save(2, {"fn": lambda: 0})
    assert mgr.all_steps() == [1]


def test_torch_and_auto_formats(tmp_path: Path) -> None:
    torch_mgr = CheckpointManager(tmp_path / "t", format="torch")
    torch_mgr.save(1, _state(1), {"loss": torch.tensor(0.25)})
    assert torch_mgr.metrics(1) == {"loss": 0.25}
    assert sorted(os.listdir(tmp_path / "t" / "step_000000000001")) == ["COMMITTED", "checkpoint.pt"]
    _same(torch_mgr.restore(), _state(1))  # read back without unpickling
    auto = CheckpointManager(tmp_path / "a", format="auto")
    with pytest.warns(safeckpt.FallbackWarning):
        # a functools.partial: refused by the safe format (it calls what it wraps), fine for torch.save
        auto.save(1, {**_state(1), "pick": functools.partial(max, 0)})
    assert sorted(os.listdir(tmp_path / "a" / "step_000000000001")) == ["COMMITTED", "checkpoint.pt"]
    assert auto.restore(trust_pickle=True)["pick"](-5, 7) == 7


# --------------------------------------------------------------------------- async


def test_async_save_stores_the_values_at_save_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_write = safeckpt.writer._write

    def gated(storage: Any, rel: str, payload: Any, **kw: Any) -> Any:
        release.wait()  # the write happens only after the caller changed its tensors
        return real_write(storage, rel, payload, **kw)

    monkeypatch.setattr(safeckpt.writer, "_write", gated)
    mgr = CheckpointManager(tmp_path, multi=True)
    state = _state(1)
    expected = _state(1)
    tied = {"model": state["model"], "tied": {"w": state["model"]["w"]}, "step": 1}
    mgr.save(1, tied, blocking=False)
    state["model"]["w"].add_(100.0)  # in place, right after save() returned
    state["model"]["b"].zero_()
    state["model"]["new"] = torch.ones(1)
    tied["step"] = 999
    assert mgr.latest() is None  # not committed while the write is held
    release.set()
    mgr.wait()
    restored = mgr.restore()
    _same(restored["model"], expected["model"])
    assert torch.equal(restored["tied"]["w"], expected["model"]["w"]) and restored["step"] == 1


def test_background_failure_surfaces_at_wait_and_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = safeckpt.writer._write
    fail = {"on": True}

    def failing(storage: Any, rel: str, payload: Any, **kw: Any) -> Any:
        if fail["on"] and rel.endswith("checkpoint.safeckpt"):
            raise OSError(28, "No space left on device")
        return real_write(storage, rel, payload, **kw)

    monkeypatch.setattr(safeckpt.writer, "_write", failing)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(1), blocking=False)
    with pytest.raises(OSError, match="No space left"):
        mgr.wait()
    mgr.wait()  # raised once, not again
    assert mgr.all_steps() == []

    mgr.save(2, _state(2), blocking=False)
    with pytest.raises(OSError, match="No space left"):
        mgr.save(3, _state(3))  # the next save joins the failed one and raises its error
    fail["on"] = False
    mgr.save(3, _state(3), blocking=False)
    with mgr:
        pass  # leaving the context waits
    assert mgr.all_steps() == [3]
    assert sorted(os.listdir(tmp_path)) == ["step_000000000003"]  # failed attempts cleaned up


# --------------------------------------------------------------------------- crash and resume

TRAIN = r'''
import sys
import torch
import safeckpt
from safeckpt.manager import CheckpointManager

torch.set_num_threads(1)
directory, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
mgr = CheckpointManager(directory, max_to_keep=3, keep_best=1, metric="loss")
start = 0
if mgr.latest() is not None:
    state = mgr.restore()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    start = state["step"] + 1
print("start", start, flush=True)
for step in range(start, total):
    x = torch.randn(64, 8)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}
    mgr.save(step, state, {"loss": loss.item()}, blocking=False)
    print("step", step, flush=True)
mgr.wait()
safeckpt.save_single_file(None, model.state_dict(), out)
print("done", flush=True)
'''


def _run(script: Path, directory: Path, total: int, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), str(directory), str(total), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(safeckpt.__file__).parents[1])},
    )


def test_sigkilled_training_resumes_bit_identically(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    total = 40
    reference = _run(script, tmp_path / "ref", total, tmp_path / "ref.safeckpt")
    assert reference.wait() == 0

    rng = random.Random(20240611)
    run_dir, out = tmp_path / "run", tmp_path / "run.safeckpt"
    kills, starts = 0, []
    while kills < 12:
        proc = _run(script, run_dir, total, out)
        assert proc.stdout is not None
        starts.append(int(proc.stdout.readline().split()[1]))
        target = starts[-1] + rng.randint(0, 2)
        finished = False
        for line in proc.stdout:
            if line.startswith("done"):
                finished = True
            if line.startswith("step") and int(line.split()[1]) >= target:
                if rng.random() < 0.5:
                    threading.Event().wait(rng.uniform(0, 0.02))  # land anywhere in the background write
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.stdout.close()
        proc.wait()
        assert not finished
        kills += 1
        assert not out.exists()
    final = _run(script, run_dir, total, out)
    assert final.wait() == 0
    assert starts[-1] > 0 and len(set(starts)) > 3  # it did resume, from several places

    ref, got = safeckpt.load(tmp_path / "ref.safeckpt"), safeckpt.load(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name].view(torch.int32), got[name].view(torch.int32)), name
    mgr = CheckpointManager(run_dir)
    assert mgr.latest() == total - 1
    assert sorted(os.listdir(run_dir)) == [f"step_{s:012d}" for s in mgr.all_steps()]  # no incomplete leftovers
    assert len(mgr.all_steps()) <= 4
