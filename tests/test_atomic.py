"""Crash safety of saves, checked with real processes (SPEC section 1: "Writes are atomic").

A save killed with SIGKILL at a random moment, a save that hits the file-size
limit, a target whose parent is a regular file, and two processes saving to one
path at once must each leave at the path either the previous checkpoint or the
new one, whole, and no temporary files behind. A multi-file set interrupted
between files must be detected as torn (``verify=True``), never loaded as a mix.

Importing torch costs about a second per process, so the kill loops use a
"zygote": one helper process imports torch, builds the states once, and forks a
fresh saver process for every round; the test SIGKILLs that process by pid and
the zygote reaps it (so its pid is really gone, as after a crash).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import safeckpt

HELPER = r'''
"""Helper process for tests/test_atomic.py."""
import json
import os
import resource
import signal
import sys
import traceback

import torch

import safeckpt

SINGLE_TENSORS = 30
SINGLE_NUMEL = 640 * 1024          # 2.5 MiB of float32 each: 75 MiB in all


def make_single_state(seed, tensors=SINGLE_TENSORS, numel=SINGLE_NUMEL):
    """A deterministic training state: every tensor derives from ``seed``."""
    g = torch.Generator()
    sd = {}
    for i in range(tensors):
        g.manual_seed(seed * 100003 + i)
        sd[f"layer{i:02d}.weight"] = torch.randn(numel, generator=g).reshape(-1, 1024)
    return {"model_state_dict": sd, "meta": {"seed": seed, "note": "v" * seed}, "epoch": seed}


def make_multi_state(seed, tensors=12, numel=512 * 1024):
    """A deterministic multi-file state: model, optimizer (with tensors) and model_kwargs."""
    g = torch.Generator()
    sd, opt_state = {}, {}
    for i in range(tensors):
        g.manual_seed(seed * 100003 + i)
        sd[f"block{i:02d}.weight"] = torch.randn(numel, generator=g)
        if i % 2 == 0:
            opt_state[i] = {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(numel, generator=g)}
    return {
        "model_state_dict": sd,
        "optimizer_state_dict": {"state": opt_state, "param_groups": [{"lr": 1e-3 * seed, "params": list(range(tensors))}]},
        "model_kwargs": {"version": seed, "tag": f"run-{seed}"},
    }


def save(kind, state, path):
    if kind == "single":
        safeckpt.save_single_file(None, state, path)
    else:
        safeckpt.save_multi_files(None, state, path)


def child(body):
    """Run ``body`` in this forked process and leave without touching the parent's buffers."""
    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    os._exit(code)


def zygote(kind, path, tensors, seeds):
    torch.set_num_threads(1)  # nothing parallel runs in the forked savers
    make = make_single_state if kind == "single" else make_multi_state
    states = {s: make(s, tensors=tensors) for s in seeds}
    out = sys.stdout
    out.write(f"ready {safeckpt.__file__}\n")
    out.flush()
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "loop":  # save forever until killed
            state = states[int(args[0])]
            pid = os.fork()
            if pid == 0:
                def forever():
                    while True:
                        save(kind, state, path)
                child(forever)
            out.write(f"{pid}\n")
        elif cmd == "once":
            state = states[int(args[0])]
            pid = os.fork()
            if pid == 0:
                child(lambda: save(kind, state, path))
            _, status = os.waitpid(pid, 0)
            out.write(f"{os.waitstatus_to_exitcode(status)}\n")
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            out.write(f"{os.waitstatus_to_exitcode(status)}\n")
        elif cmd == "race":  # two savers released together by closing a pipe
            r, w = os.pipe()
            pids = []
            for seed in map(int, args):
                state = states[seed]
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)  # blocks until the zygote closes its end
                    child(lambda: save(kind, state, path))
                pids.append(pid)
            os.close(r)
            os.close(w)
            codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
            out.write(" ".join(map(str, codes)) + "\n")
        elif cmd == "quit":
            break
        out.flush()


def fsize(kind, path, limit, seed):
    """Save with RLIMIT_FSIZE set: the write fails with EFBIG (SIGXFSZ ignored)."""
    make = make_single_state if kind == "single" else make_multi_state
    state = make(seed, tensors=4, numel=1 << 20)  # 16 MiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = {"raised": None}
    try:
        save(kind, state, path)
    except BaseException as exc:
        result = {
            "raised": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "errno": getattr(exc, "errno", None),
            "text": "\n".join([str(exc), *getattr(exc, "__notes__", [])]),
        }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "zygote":
        zygote(sys.argv[2], sys.argv[3], int(sys.argv[4]), [int(s) for s in sys.argv[5:]])
    elif mode == "fsize":
        fsize(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
'''


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def helper(tmp_path: Path) -> tuple[Path, ModuleType]:
    """The helper script, written into its own folder, and the same code imported here."""
    folder = tmp_path / "helper"
    folder.mkdir()
    script = folder / "crashkit.py"
    script.write_text(HELPER, "utf-8")
    spec = importlib.util.spec_from_file_location("crashkit_for_test", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


def child_env() -> dict[str, str]:
    """The environment of helper processes: they import the same safeckpt as this test."""
    env = dict(os.environ)
    package_root = str(Path(safeckpt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    return env


class Zygote:
    def __init__(self, script: Path, kind: str, path: Path, seeds: list[int], tensors: int) -> None:
        """A helper holding ``make_{kind}_state(seed, tensors=tensors)`` for each seed."""
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "zygote", kind, str(path), str(tensors), *map(str, seeds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=script.parent,
            env=child_env(),
        )
        self.running: set[int] = set()  # saver processes started and not yet killed
        ready, _, module = self._read().partition(" ")
        assert ready == "ready"
        assert Path(module).resolve() == Path(safeckpt.__file__).resolve(), "the helper imports another safeckpt"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"helper process died (exit {self.proc.poll()})"
        return line.strip()

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start_loop(self, seed: int) -> int:
        pid = int(self.ask(f"loop {seed}"))
        self.running.add(pid)
        return pid

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        self.running.discard(pid)
        return int(self.ask(f"reap {pid}"))

    def once(self, seed: int) -> int:
        return int(self.ask(f"once {seed}"))

    def race(self, a: int, b: int) -> list[int]:
        return [int(c) for c in self.ask(f"race {a} {b}").split()]

    def close(self) -> None:
        for pid in list(self.running):  # a test that failed between start_loop and kill
            try:
                self.kill(pid)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def zygotes():
    started: list[Zygote] = []
    yield started
    for z in started:
        z.close()


def temp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def tensors_equal(actual: Any, expected: Any, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), f"{where}: tensor differs"
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys differ"
        for k in expected:
            tensors_equal(actual[k], expected[k], f"{where}[{k!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            tensors_equal(a, e, f"{where}[{i}]")
        return
    assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def which_single(path: Path, states: dict[int, dict[str, Any]]) -> int:
    """The seed whose state is at ``path``, bit for bit; fails on an error, a torn or a mixed file."""
    loaded = safeckpt.load(path)
    seed = loaded["meta"]["seed"]
    assert seed in states, f"unexpected seed {seed!r}"
    tensors_equal(loaded, states[seed], f"seed {seed}")
    return seed


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- SIGKILL during a single-file save


def test_sigkill_during_save_leaves_old_or_new(tmp_path: Path, helper: Any, zygotes: list[Zygote]) -> None:
    script, kit = helper
    d = tmp_path / "ckpts"
    path = d / "ckpt.safeckpt"
    old, new = kit.make_single_state(1), kit.make_single_state(2)
    states = {1: old, 2: new}
    safeckpt.save_single_file(None, old, path)
    assert which_single(path, states) == 1

    z = Zygote(script, "single", path, [2], kit.SINGLE_TENSORS)
    zygotes.append(z)
    # how long one save takes in a forked saver (fork, save, exit), to pick the kill delays
    durations = [timed(lambda: z.once(2) == 0 or pytest.fail("saver failed")) for _ in range(3)]
    save_time = statistics.median(durations)
    assert which_single(path, states) == 2

    rng = random.Random(20241128)
    low, high = 0.0, 1.5 * save_time
    outcomes: list[int] = []
    rounds = 0
    while rounds < 30 or len(set(outcomes)) < 2:
        assert rounds < 80, f"did not observe both outcomes in {rounds} rounds: {outcomes}"
        if not outcomes or outcomes[-1] != 1:
            safeckpt.save_single_file(None, old, path)  # the "previous checkpoint" of this round
        pid = z.start_loop(2)
        time.sleep(rng.uniform(low, high))
        assert z.kill(pid) == -signal.SIGKILL
        outcomes.append(which_single(path, states))
        rounds += 1
        if rounds >= 10 and 1 not in outcomes:  # every kill came too late: kill sooner
            high *= 0.6
        if rounds >= 10 and 2 not in outcomes:  # every kill came too early: wait longer
            low, high = high, high * 1.6

    assert set(outcomes) == {1, 2}, outcomes
    print(f"single-file kills: save {save_time:.3f}s, outcomes {outcomes}")
    assert z.once(2) == 0
    assert which_single(path, states) == 2
    assert temp_leftovers(d) == []
    assert sorted(p.name for p in d.iterdir()) == ["ckpt.safeckpt"]


# --------------------------------------------------------------------------- full disk


def run_fsize(script: Path, kind: str, path: Path, limit: int, seed: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(script), "fsize", kind, str(path), str(limit), str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
        env=child_env(),
    )
    assert proc.returncode == 0, f"helper exited {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_full_disk_keeps_previous_single_file(tmp_path: Path, helper: Any) -> None:
    script, kit = helper
    d = tmp_path / "ckpts"
    path = d / "ckpt.safeckpt"
    old = kit.make_single_state(4, tensors=3, numel=16 * 1024)  # 192 KiB
    safeckpt.save_single_file(None, old, path)
    before = path.read_bytes()
    limit = 1 << 20  # the new checkpoint is 16 MiB
    assert len(before) < limit

    result = run_fsize(script, "single", path, limit, 5)

    assert result["raised"] is not None, "the save succeeded despite the file-size limit"
    assert "OSError" in result["mro"] or "SafeCkptError" in result["mro"], result
    if "OSError" in result["mro"]:
        assert result["errno"] == errno.EFBIG, result
    assert "too large" in result["text"].lower() or "EFBIG" in result["text"], result["text"]
    assert str(path) in result["text"], result["text"]  # the message names the checkpoint
    assert path.read_bytes() == before
    tensors_equal(safeckpt.load(path, verify=True), old)
    assert temp_leftovers(d) == []
    assert sorted(p.name for p in d.iterdir()) == ["ckpt.safeckpt"]


def test_full_disk_keeps_previous_multi_file_set(tmp_path: Path, helper: Any) -> None:
    script, kit = helper
    d = tmp_path / "ckpts"
    base = d / "m.pth"
    old = kit.make_multi_state(4, tensors=2, numel=4096)
    safeckpt.save_multi_files(None, old, base)
    names_before = sorted(p.name for p in d.iterdir())
    bytes_before = {n: (d / n).read_bytes() for n in names_before}

    result = run_fsize(script, "multi", base, 1 << 20, 5)

    assert result["raised"] is not None, "the save succeeded despite the file-size limit"
    assert "OSError" in result["mro"] or "SafeCkptError" in result["mro"], result
    # the model component (the first written, 16 MiB) cannot be written: nothing changed
    assert {n: (d / n).read_bytes() for n in names_before} == bytes_before
    loaded = safeckpt.load_multi_files(base, verify=True)
    tensors_equal(loaded["model_state_dict"], old["model_state_dict"])
    tensors_equal(loaded["optimizer_state_dict"], old["optimizer_state_dict"])
    assert loaded["model_kwargs"]["version"] == 4
    assert temp_leftovers(d) == []
    assert sorted(p.name for p in d.iterdir()) == names_before


# --------------------------------------------------------------------------- a target that cannot be created


class Handler:
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


def test_target_under_a_regular_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory")
    state = {"model_state_dict": {"w": torch.arange(6.0)}, "model_kwargs": {"a": 1}}

    with pytest.raises(OSError) as info:
        safeckpt.save_single_file(None, state, afile / "ckpt.safeckpt")
    assert isinstance(info.value, (NotADirectoryError, FileExistsError)), type(info.value)
    with pytest.raises(OSError):
        safeckpt.save_single_file(None, state, afile / "sub" / "ckpt.safeckpt")
    with pytest.raises(OSError):
        safeckpt.save_multi_files(None, state, afile / "m.pth")
    with pytest.raises(OSError):
        safeckpt.save_single_file(None, state, afile / "ckpt.pth", format="torch")

    for call in (
        lambda h: safeckpt.save_single_file(h, state, afile / "ckpt.safeckpt"),
        lambda h: safeckpt.save_multi_files(h, state, afile / "m.pth"),
    ):
        handler = Handler()
        with pytest.raises(Handler.Raised):
            call(handler)
        assert len(handler.errors) == 1 and handler.logs == []
        exc_type, message, cause = handler.errors[0]
        assert issubclass(exc_type, OSError) and isinstance(cause, OSError)
        assert "rank 1" in message.lower(), message
        assert "afile" in message, message

    assert afile.read_bytes() == b"not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --------------------------------------------------------------------------- two writers at once


def test_two_processes_saving_to_one_path(tmp_path: Path, helper: Any, zygotes: list[Zygote]) -> None:
    script, kit = helper
    d = tmp_path / "ckpts"
    path = d / "ckpt.safeckpt"
    states = {s: kit.make_single_state(s, tensors=12) for s in (3, 4)}  # 30 MiB each
    z = Zygote(script, "single", path, [3, 4], 12)
    zygotes.append(z)
    winners = []
    for round_ in range(10):
        a, b = (3, 4) if round_ % 2 == 0 else (4, 3)
        assert z.race(a, b) == [0, 0]
        winners.append(which_single(path, states))
        assert temp_leftovers(d) == []
        assert sorted(p.name for p in d.iterdir()) == ["ckpt.safeckpt"]
    assert set(winners) <= {3, 4}


# --------------------------------------------------------------------------- SIGKILL during a multi-file save


def test_sigkill_during_multi_save_is_detected_or_whole(tmp_path: Path, helper: Any, zygotes: list[Zygote]) -> None:
    script, kit = helper
    d = tmp_path / "ckpts"
    base = d / "m.pth"
    states = {1: kit.make_multi_state(1, tensors=12), 2: kit.make_multi_state(2, tensors=12)}

    def expected(seed: int) -> dict[str, Any]:
        s = states[seed]
        kwargs = {**s["model_kwargs"], "nn_handler_version": None, "pytorch_version": None}
        return {"model_state_dict": s["model_state_dict"], "optimizer_state_dict": s["optimizer_state_dict"],
                "model_kwargs": kwargs}

    def outcome() -> str:
        try:
            loaded = safeckpt.load_multi_files(base, verify=True)
        except safeckpt.IntegrityError:
            return "torn"
        version = loaded["model_kwargs"]["version"]
        assert version in states
        # every component is of the same version: never a silent mix
        tensors_equal(loaded, expected(version), f"set version {version}")
        return {1: "old", 2: "new"}[version]

    safeckpt.save_multi_files(None, states[1], base)
    assert outcome() == "old"
    z = Zygote(script, "multi", base, [2], 12)
    zygotes.append(z)
    save_time = statistics.median(timed(lambda: z.once(2) == 0 or pytest.fail("saver failed")) for _ in range(3))
    assert outcome() == "new"

    rng = random.Random(7)
    low, high = 0.0, 1.5 * save_time
    outcomes: list[str] = []
    while len(outcomes) < 16 or not {"old", "new"} <= set(outcomes):
        assert len(outcomes) < 60, f"did not observe both whole outcomes: {outcomes}"
        if not outcomes or outcomes[-1] != "old":
            safeckpt.save_multi_files(None, states[1], base)
        pid = z.start_loop(2)
        time.sleep(rng.uniform(low, high))
        assert z.kill(pid) == -signal.SIGKILL
        outcomes.append(outcome())
        if len(outcomes) >= 8 and "old" not in outcomes:
            high *= 0.6
        if len(outcomes) >= 8 and "new" not in outcomes:
            low, high = high, high * 1.6

    print(f"multi-file kills: save {save_time:.3f}s, outcomes {outcomes}")
    assert z.once(2) == 0
    assert outcome() == "new"
    assert temp_leftovers(d) == []
    assert sorted(p.name for p in d.iterdir()) == [
        "m.safeckpt.json",
        "m_model_kwargs.msgpack",
        "m_model_state_dict.safetensors",
        "m_optimizer_state_dict.safetensors",
    ]
