"""One measured operation in a process of its own: ``python -m benchmarks.worker '<json spec>'``.

The spec names an operation of :data:`OPS` and its files. The worker does the
untimed preparation (imports, reading the source state into memory, allocating
buffers); with ``spec["handshake"]`` it then prints ``READY`` and waits for a
line on stdin (the parent prefaults free memory meanwhile). Then it times the
operation with ``time.perf_counter``, reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` just before and just after it,
and prints one JSON line: ``seconds``, ``phases`` (e.g. load vs touch),
``peak_rss_delta_mib`` (the rise of the process's peak RSS during the
operation; ``peak_rss_delta_hwm_mib`` is the same from ``VmHWM``, reset just
before, as a cross-check) and ``rss_before_mib``. Resident pages of a file
mapping count in RSS: a load that maps the file and touches every tensor shows
the file's size there, though those pages belong to the page cache and cost no
anonymous memory.

Torch is imported only by operations that use it, so the raw disk and memcpy
lines start fast.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["OPS", "READY", "Clock", "main", "touch"]

_MIB = 2**20
READY = "READY"  # printed (with ``spec["handshake"]``) when prepared; the worker then waits for a line on stdin


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB


def _hwm_mib() -> float | None:
    """``VmHWM`` of /proc/self/status: this process's own peak RSS (unlike ``ru_maxrss``, not inherited at exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); a cross-check of the ``ru_maxrss`` delta."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Clock:
    """Times one operation: ``start()``, any ``mark(phase)``, ``stop()``; records the peak-RSS rise."""

    def __init__(self, handshake: bool = False) -> None:
        self.handshake = handshake
        self.phases: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self._t0 = self._last = 0.0
        self.seconds = 0.0
        self.rss_before = self.maxrss_before = self.maxrss_after = 0.0
        self.hwm_after: float | None = None

    def start(self) -> None:
        gc.collect()
        if self.handshake:  # let the parent prepare the machine's free memory (see benchmarks.run)
            print(READY, flush=True)
            sys.stdin.readline()
        gc.disable()  # no collector pause lands in one competitor's timing and not another's
        _reset_hwm()
        self.rss_before = _rss_mib()
        self.maxrss_before = _maxrss_mib()
        self._t0 = self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self._last
        self._last = now

    def stop(self) -> None:
        now = time.perf_counter()
        self.seconds = now - self._t0
        self.maxrss_after = _maxrss_mib()
        self.hwm_after = _hwm_mib()
        gc.enable()

    def result(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "phases": self.phases,
            "peak_rss_delta_mib": self.maxrss_after - self.maxrss_before,
            "rss_before_mib": self.rss_before,
            "maxrss_before_mib": self.maxrss_before,
            "peak_rss_delta_hwm_mib": None if self.hwm_after is None else self.hwm_after - self.rss_before,
            **self.extra,
        }


def touch(tensors: Any) -> int:
    """Read every byte of every tensor (a numpy uint8 max per tensor); returns a value so nothing is skipped.

    numpy, not torch: torch's reduction is OpenMP-parallel, and on 2 busy cores
    its spinning threads made this touch alone swing from 20 ms to 2 s.
    """
    import torch

    acc = 0
    for t in tensors:
        if t.numel():
            acc ^= int(t.reshape(-1).view(torch.uint8).numpy().max())
    return acc


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    from .state import assemble, large_layout, load_source, small_layout

    layout = large_layout(**spec["layout"]) if spec["case"] == "large" else small_layout(**spec["layout"])
    return assemble(layout, load_source(spec["source"]))


# --------------------------------------------------------------------------- saves


class _NoDigest:
    """Stands for ``hashlib.sha256`` in the saves that measure what hashing costs."""

    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def save_safeckpt(spec: dict[str, Any], clock: Clock) -> None:
    """``safeckpt.save_single_file`` of the full state (or of the tensors-only state with ``spec["tensors_only"]``)."""
    import safeckpt

    full, tensors, _ = _state(spec)
    state = tensors if spec.get("tensors_only") else full
    if spec.get("no_hash"):  # the SHA-256 digests' share of a save (SECURITY.md integrity promise)
        from safeckpt import container

        container._new_digest = _NoDigest
    clock.start()
    safeckpt.save_single_file(None, state, spec["target"])
    clock.stop()


def save_torch(spec: dict[str, Any], clock: Clock) -> None:
    """``torch.save`` of the full state (or tensors-only), optionally followed by an fsync of the file."""
    import torch

    full, tensors, _ = _state(spec)
    state = tensors if spec.get("tensors_only") else full
    clock.start()
    with open(spec["target"], "wb") as f:
        torch.save(state, f)
        if spec.get("fsync"):
            f.flush()
            os.fsync(f.fileno())
    clock.stop()


def save_safetensors(spec: dict[str, Any], clock: Clock) -> None:
    """``safetensors.torch.save_file`` of the flat dict of the same tensors, optionally fsynced."""
    from safetensors.torch import save_file

    _, _, flat = _state(spec)
    clock.start()
    save_file(flat, spec["target"])
    if spec.get("fsync"):
        _fsync_path(spec["target"])
    clock.stop()


def _filled(nbytes: int, value: int = 1) -> Any:
    import numpy as np

    array = np.empty(nbytes, dtype=np.uint8)
    array.fill(value)  # touched: resident, as a training state is
    return array


def raw_write(spec: dict[str, Any], clock: Clock) -> None:
    """One numpy array of the checkpoint's size written with ``tofile`` (optionally fsynced)."""
    array = _filled(spec["bytes"])
    clock.start()
    with open(spec["target"], "wb") as f:
        array.tofile(f)
        if spec.get("fsync"):
            f.flush()
            os.fsync(f.fileno())
    clock.stop()


def raw_memcpy(spec: dict[str, Any], clock: Clock) -> None:
    """``numpy.copyto`` of the checkpoint's size between two resident buffers."""
    import numpy as np

    src, dst = _filled(spec["bytes"]), _filled(spec["bytes"], 2)
    clock.start()
    np.copyto(dst, src)
    clock.stop()


def raw_read(spec: dict[str, Any], clock: Clock) -> None:
    """The raw file read into a preallocated, resident buffer (``readinto``)."""
    buffer = _filled(os.path.getsize(spec["target"]))
    view = memoryview(buffer)
    _set_cache(spec)
    clock.start()
    with open(spec["target"], "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(spec["target"])
            done += n
    clock.stop()


def raw_touch(spec: dict[str, Any], clock: Clock) -> None:
    """Only the touch of every tensor, resident in memory: the floor under every "load + touch" line."""
    _, _, flat = _state(spec)
    clock.start()
    touch(flat.values())
    clock.stop()


# --------------------------------------------------------------------------- loads


def _set_cache(spec: dict[str, Any]) -> None:
    """Put the file in the page cache, or with ``spec["cold"]`` drop its pages (it was fsynced first).

    Warm rows read the file through once, untimed: large safeckpt saves bypass
    the page cache (direct I/O), the competitors' saves leave their files in it.
    """
    fd = os.open(spec["target"], os.O_RDONLY)
    try:
        if spec.get("cold"):
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return
        while os.read(fd, 16 << 20):
            pass
    finally:
        os.close(fd)


def load_safeckpt(spec: dict[str, Any], clock: Clock) -> None:
    """``safeckpt.load`` of the file, then every tensor touched."""
    import safeckpt

    from .state import iter_tensors

    _set_cache(spec)
    clock.start()
    state = safeckpt.load(spec["target"])
    clock.mark("load")
    touch(iter_tensors(state))
    clock.mark("touch")
    clock.stop()


def load_torch(spec: dict[str, Any], clock: Clock) -> None:
    """``torch.load`` (``weights_only`` and ``mmap`` from the spec), then every tensor touched."""
    import torch

    from .state import iter_tensors

    _set_cache(spec)
    clock.start()
    state = torch.load(spec["target"], weights_only=spec.get("weights_only", True), mmap=spec.get("mmap", False))
    clock.mark("load")
    touch(iter_tensors(state))
    clock.mark("touch")
    clock.stop()


def load_safetensors(spec: dict[str, Any], clock: Clock) -> None:
    """``safetensors.torch.load_file``, then every tensor touched."""
    from safetensors.torch import load_file

    _set_cache(spec)
    clock.start()
    state = load_file(spec["target"])
    clock.mark("load")
    touch(state.values())
    clock.mark("touch")
    clock.stop()


def _open_one(spec: dict[str, Any], clock: Clock, read: Callable[[str, str], Any], inner: int = 5) -> None:
    """Time the first open + one tensor in the process, then ``inner`` more for the in-process median."""
    _set_cache(spec)
    clock.start()
    touch([read(spec["target"], spec["tensor"])])
    clock.stop()
    again = []
    for _ in range(inner):
        t0 = time.perf_counter()
        touch([read(spec["target"], spec["tensor"])])
        again.append(time.perf_counter() - t0)
    again.sort()
    clock.extra["inner_median_seconds"] = again[len(again) // 2]


def open_safeckpt(spec: dict[str, Any], clock: Clock) -> None:
    """``safeckpt.open(path).get_tensor(name)``, touched."""
    import torch  # noqa: F401  (imported before the timing, as for safe_open: the row times the open, not torch's import)

    import safeckpt

    def read(path: str, name: str) -> Any:
        with safeckpt.open(path) as ckpt:
            return ckpt.get_tensor(name)

    _open_one(spec, clock, read)


def open_safetensors(spec: dict[str, Any], clock: Clock) -> None:
    """``safetensors.safe_open(path).get_tensor(name)``, touched."""
    import torch  # noqa: F401  (safe_open(framework="pt") imports it on first use: not part of the timing)
    from safetensors import safe_open

    def read(path: str, name: str) -> Any:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    _open_one(spec, clock, read)


# --------------------------------------------------------------------------- untimed helpers


def generate(spec: dict[str, Any], clock: Clock) -> None:
    """Write the source file of a case (not a measurement)."""
    from .state import BLOCKS, large_layout, small_layout
    from .state import generate as write_source

    layout = large_layout(**spec["layout"]) if spec["case"] == "large" else small_layout(**spec["layout"])
    write_source(layout, spec["source"])
    names = [name for name, _ in layout.params]
    if spec["case"] == "large":  # a mid-model 4d x d MLP matrix
        one = next(n for n in names if n.endswith(".mlp.fc1.weight") and n.startswith(f"blocks.{BLOCKS // 2}."))
    else:
        one = [n for n in names if n.endswith(".weight")][len(names) // 4]
    clock.extra.update(total_bytes=layout.total_bytes, tensors=layout.tensor_count, model_bytes=layout.model_bytes,
                       one_tensor=f"model_state_dict/{one}")


def environment(spec: dict[str, Any], clock: Clock) -> None:
    """Versions and machine facts for the report (not a measurement)."""
    import platform

    import msgpack
    import numpy
    import safetensors
    import torch

    import safeckpt

    clock.extra.update(
        python=platform.python_version(),
        torch=torch.__version__,
        safetensors=safetensors.__version__,
        msgpack=".".join(map(str, msgpack.version)),
        numpy=numpy.__version__,
        safeckpt=safeckpt.__version__,
        cpus=os.cpu_count(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        platform=platform.platform(),
        drop_caches_writable=os.access("/proc/sys/vm/drop_caches", os.W_OK),
    )


def prefault_server(spec: dict[str, Any], clock: Clock) -> None:
    """For each line ``N`` on stdin: allocate, touch and free N bytes, answer ``done`` (see ``run.Prefaulter``)."""
    for line in sys.stdin:
        _filled(int(line))
        print("done", flush=True)


def profile(spec: dict[str, Any], clock: Clock) -> None:
    """cProfile (main thread) of safeckpt's save, full load + touch, or open + one tensor (``spec["what"]``)."""
    import cProfile
    import io
    import pstats

    import safeckpt

    from .state import iter_tensors

    def open_one() -> None:
        with safeckpt.open(spec["target"]) as ckpt:
            touch([ckpt.get_tensor(spec["tensor"])])

    profiler = cProfile.Profile()
    if spec["what"] == "save":
        full, _, _ = _state(spec)
        clock.start()
        profiler.runcall(safeckpt.save_single_file, None, full, spec["target"])
    elif spec["what"] == "load":
        clock.start()
        profiler.runcall(lambda: touch(iter_tensors(safeckpt.load(spec["target"]))))
    else:
        clock.start()
        profiler.runcall(open_one)
    clock.stop()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(spec.get("lines", 14))
    stats.sort_stats("cumulative").print_stats(spec.get("lines", 14))
    clock.extra["profile"] = out.getvalue()


def save_breakdown(spec: dict[str, Any], clock: Clock) -> None:
    """Where a safeckpt save's time goes, step by step in one process (uses safeckpt internals).

    1. ``encode_state`` (the skeleton and the tensor plan);
    2. ``write_single`` into a plain file: the streaming write with SHA-256 hashing and the fsync, as
       safeckpt does them (direct I/O for large files, see ``safeckpt/stream.py``);
    3. the same write with hashing replaced by a no-op;
    4. SHA-256 of every entry alone, on one thread.
    """
    import hashlib

    from safeckpt import container
    from safeckpt.limits import DEFAULT_LIMITS

    full, _, _ = _state(spec)
    target = spec["target"]
    clock.start()
    encoded = container.encode_state(full, DEFAULT_LIMITS)
    clock.mark("encode_state")
    with open(target, "wb") as f:
        container.write_single(f, encoded)
    clock.mark("write_single (stream + hash + fsync)")
    os.unlink(target)
    clock.mark("unlink")
    real = container._new_digest
    container._new_digest = _NoDigest
    try:
        with open(target, "wb") as f:
            container.write_single(f, encoded)
        clock.mark("write_single without hashing (stream + fsync)")
    finally:
        container._new_digest = real
    for entry in encoded.entries:
        hashlib.sha256(entry.cpu_bytes().numpy()).hexdigest()
    clock.mark("sha256 of every entry, one thread")
    clock.stop()


OPS: dict[str, Callable[[dict[str, Any], Clock], None]] = {
    "save_safeckpt": save_safeckpt,
    "save_torch": save_torch,
    "save_safetensors": save_safetensors,
    "raw_write": raw_write,
    "raw_memcpy": raw_memcpy,
    "raw_read": raw_read,
    "raw_touch": raw_touch,
    "load_safeckpt": load_safeckpt,
    "load_torch": load_torch,
    "load_safetensors": load_safetensors,
    "open_safeckpt": open_safeckpt,
    "open_safetensors": open_safetensors,
    "generate": generate,
    "environment": environment,
    "prefault_server": prefault_server,
    "profile": profile,
    "save_breakdown": save_breakdown,
}


def main(argv: list[str] | None = None) -> int:
    """Run the operation of the JSON spec in ``argv[0]`` and print its result as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    clock = Clock(handshake=bool(spec.get("handshake")))
    OPS[spec["op"]](spec, clock)
    print(json.dumps(clock.result()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
