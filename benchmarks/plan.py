"""What is measured: every row of the tables, the operation and files behind it, and the targets.

A :class:`Measure` is one row: a worker operation (see :mod:`benchmarks.worker`)
with its options and the file it writes or reads. Saves write the files that
the loads of the same repeat then read (so loads see a warm page cache: the file
was just written). Variants that only add an fsync write the same path as their
plain twin: same bytes, so loads do not care which wrote last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BASELINES", "CONTEXT_KEYS", "FILES", "MEASURES", "TARGETS", "Measure", "Target", "measures"]

#: file key -> file name inside a case's directory
FILES = {
    "source": "source.pt",
    "safeckpt": "state.safeckpt",
    "safeckpt_tensors": "tensors.safeckpt",
    "torch_full": "state.pt",
    "torch_tensors": "tensors.pt",
    "safetensors": "flat.safetensors",
    "raw": "raw.bin",
}


@dataclass(frozen=True)
class Measure:
    """One row of the results: ``phase`` is when it runs in a repeat (``save`` before ``load``)."""

    key: str
    label: str
    phase: str  # "save" | "load"
    group: str  # "save" | "load" | "open" | "limit": its section of the table
    op: str
    file: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cold: bool = False


def _row(phase: str, group: str, key: str, label: str, op: str, file: str | None = None, **options: Any) -> Measure:
    return Measure(key, label, phase, group, op, file, options)


MEASURES: tuple[Measure, ...] = (
    # saves
    _row("save", "save", "save.safeckpt", "safeckpt `save_single_file`, full state (fsync + SHA-256)",
         "save_safeckpt", "safeckpt"),
    _row("save", "save", "save.safeckpt_tensors", "safeckpt `save_single_file`, tensors-only state (fsync + SHA-256)",
         "save_safeckpt", "safeckpt_tensors", tensors_only=True),
    _row("save", "save", "save.safeckpt_nohash", "safeckpt `save_single_file`, full state, digests not computed",
         "save_safeckpt", "safeckpt", no_hash=True),
    _row("save", "save", "save.torch", "`torch.save`, full state", "save_torch", "torch_full"),
    _row("save", "save", "save.torch_fsync", "`torch.save` + fsync, full state", "save_torch", "torch_full",
         fsync=True),
    _row("save", "save", "save.torch_tensors", "`torch.save`, tensors-only state", "save_torch", "torch_tensors",
         tensors_only=True),
    _row("save", "save", "save.safetensors", "`safetensors.torch.save_file`, flat dict", "save_safetensors",
         "safetensors"),
    _row("save", "save", "save.safetensors_fsync", "`save_file` + fsync, flat dict", "save_safetensors", "safetensors",
         fsync=True),
    _row("save", "limit", "limit.write", "raw write of the same bytes (numpy `tofile`)", "raw_write", "raw"),
    _row("save", "limit", "limit.write_fsync", "raw write + fsync", "raw_write", "raw", fsync=True),
    _row("save", "limit", "limit.memcpy", "memcpy of the same bytes (`numpy.copyto`)", "raw_memcpy"),
    # loads (every tensor touched)
    _row("load", "load", "load.safeckpt", "`safeckpt.load`, full state + touch", "load_safeckpt", "safeckpt"),
    _row("load", "load", "load.safeckpt_tensors", "`safeckpt.load`, tensors-only state + touch", "load_safeckpt",
         "safeckpt_tensors"),
    _row("load", "load", "load.safeckpt_legacy", "`safeckpt.load` of the `torch.save` file, tensors-only + touch "
         "(the no-exec legacy reader)", "load_safeckpt", "torch_tensors"),
    _row("load", "load", "load.torch", "`torch.load(weights_only=True)`, tensors-only + touch", "load_torch",
         "torch_tensors"),
    _row("load", "load", "load.torch_mmap", "`torch.load(weights_only=True, mmap=True)`, tensors-only + touch",
         "load_torch", "torch_tensors", mmap=True),
    _row("load", "load", "load.torch_unsafe", "`torch.load(weights_only=False)`, full state + touch (pickle)",
         "load_torch", "torch_full", weights_only=False),
    _row("load", "load", "load.safetensors", "`safetensors.torch.load_file` + touch", "load_safetensors",
         "safetensors"),
    _row("load", "open", "open.safeckpt", "`safeckpt.open(...).get_tensor(name)` + touch", "open_safeckpt", "safeckpt"),
    _row("load", "open", "open.safetensors", "`safe_open(...).get_tensor(name)` + touch", "open_safetensors",
         "safetensors"),
    _row("load", "limit", "limit.read", "raw read into a preallocated buffer", "raw_read", "raw"),
    _row("load", "limit", "limit.touch", "touch of every tensor already resident (floor of load + touch)", "raw_touch"),
)

_COLD_KEYS = (
    "load.safeckpt", "load.torch", "load.torch_mmap", "load.safetensors",
    "open.safeckpt", "open.safetensors", "limit.read",
)


#: rows that only add context (fair fsync comparisons, the pickle load, the touch floor): ``--lean`` skips them
CONTEXT_KEYS = frozenset({"save.torch_fsync", "save.safetensors_fsync", "load.torch_unsafe", "limit.touch"})


def measures(cold: bool, lean: bool = False) -> list[Measure]:
    """The rows to run; with ``cold``, also the loads with the file evicted from the page cache first."""
    rows = [m for m in MEASURES if not (lean and m.key in CONTEXT_KEYS)]
    if cold:
        for m in list(rows):
            if m.key in _COLD_KEYS:
                rows.append(Measure(m.key + ".cold", m.label + " [cold]", "cold", m.group, m.op, m.file,
                                    {**m.options, "cold": True}, cold=True))
    return rows


#: per table section: (the torch baseline, the safetensors baseline); a cold row uses the cold baselines,
#: a physical-limit row those of its phase
BASELINES = {
    "save": ("save.torch", "save.safetensors"),
    "load": ("load.torch", "load.safetensors"),
    "open": (None, "open.safetensors"),
}


@dataclass(frozen=True)
class Target:
    """A target of the issue: ``subject`` over the per-repeat ``baseline`` (``min`` of several) at most ``limit``."""

    case: str
    text: str
    subject: str
    baselines: tuple[str, ...]  # empty: an absolute limit in seconds (or MiB for "rss")
    limit: float
    kind: str = "ratio"  # "ratio" | "seconds" | "rss"
    informative: bool = False


TARGETS: tuple[Target, ...] = (
    Target("large", "save <= faster of torch.save and save_file", "save.safeckpt",
           ("save.torch", "save.safetensors"), 1.0),
    Target("large", "save <= 1.3x raw write", "save.safeckpt", ("limit.write",), 1.3),
    Target("large", "SHA-256 digests slow the save by <= 25%", "save.safeckpt", ("save.safeckpt_nohash",), 1.25),
    Target("large", "save peak RSS delta <= 10% of size + 64 MiB", "save.safeckpt", (), 0.10, "rss"),
    Target("large", "load + touch <= 1.05x load_file + touch", "load.safeckpt", ("load.safetensors",), 1.05),
    Target("large", "load + touch <= 0.25x torch.load(weights_only=True) + touch", "load.safeckpt", ("load.torch",),
           0.25),
    Target("large", "open + one tensor < 10 ms", "open.safeckpt", (), 0.010, "seconds"),
    Target("small", "save <= 1.0x torch.save", "save.safeckpt", ("save.torch",), 1.0),
    Target("small", "save peak RSS delta <= 10% of size + 64 MiB", "save.safeckpt", (), 0.10, "rss"),
    Target("small", "load + touch <= 1.2x load_file + touch", "load.safeckpt", ("load.safetensors",), 1.2),
    Target("small", "legacy torch.save file: safeckpt.load <= 1.0x torch.load(weights_only=True)", "load.safeckpt_legacy",
           ("load.torch",), 1.0),
    # informative: the same comparisons on equal footing (all fsynced) or on equal content
    Target("large", "save <= faster of torch.save+fsync and save_file+fsync", "save.safeckpt",
           ("save.torch_fsync", "save.safetensors_fsync"), 1.0, informative=True),
    Target("large", "save <= 1.3x raw write + fsync", "save.safeckpt", ("limit.write_fsync",), 1.3, informative=True),
    Target("large", "tensors-only load + touch <= 1.05x load_file + touch", "load.safeckpt_tensors",
           ("load.safetensors",), 1.05, informative=True),
    Target("small", "save <= 1.0x torch.save + fsync", "save.safeckpt", ("save.torch_fsync",), 1.0, informative=True),
    Target("small", "tensors-only load + touch <= 1.2x load_file + touch", "load.safeckpt_tensors",
           ("load.safetensors",), 1.2, informative=True),
)
