"""The VM-budget fuzz target: any opcodes into the legacy VM cost memory and work in proportion to their size.

:func:`vm_budget` runs :class:`safeckpt.legacy.vm.SymbolicUnpickler` on the input
with small :data:`LIMITS` and fails (an ``AssertionError``, a crash) when

- the VM's own work counter (``spent``) ends over what the input's size allows
  (``max_pickle_work + max_pickle_work_per_byte * len(data)``), or
- the memory allocated while it ran (``tracemalloc``'s peak, an independent
  count of every allocation) is over 8 bytes per unit of that allowance, plus
  16 bytes per input byte (the stack and the strings read) and a fixed slack.

Only ``SafeCkptError`` is an expected refusal, as in every harness.
"""

from __future__ import annotations

import pickle
import tracemalloc
from collections import OrderedDict
from typing import Any

from safeckpt import Limits, SafeCkptError
from safeckpt.legacy.rebuild import Rebuilder
from safeckpt.legacy.vm import Report, SymbolicUnpickler
from safeckpt.refs import GlobalRef

__all__ = ["LIMITS", "SEEDS", "vm_budget"]

KiB = 1 << 10

LIMITS = Limits(
    max_depth=64,
    max_container_len=1 << 14,
    max_str_len=64 * KiB,
    max_pickle_stack=1 << 14,
    max_pickle_marks=256,
    max_pickle_memo=1 << 14,
    max_pickle_work=1 << 15,
    max_pickle_work_per_byte=16,
)
SLACK = 512 * KiB  # the VM's own tables, Report, a failed allocation's traceback


def _storage(pid: Any) -> Any:
    return GlobalRef("torch", "UntypedStorage") if type(pid) is tuple else None


def vm_budget(data: bytes) -> None:
    """Interpret ``data`` under :data:`LIMITS`, with and without persistent ids; check the bounds."""
    allowed = LIMITS.max_pickle_work + LIMITS.max_pickle_work_per_byte * len(data)
    rebuild = Rebuilder(LIMITS)
    for persistent in (None, _storage):
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        vm = SymbolicUnpickler(data, Report(), LIMITS, rebuild.calls, persistent, rebuild.values, rebuild.build)
        try:
            vm.load()
        except SafeCkptError:
            pass
        peak = tracemalloc.get_traced_memory()[1] - base
        assert vm.spent <= allowed, f"the VM spent {vm.spent} units, {len(data)} bytes allow {allowed}"
        bound = 8 * allowed + 16 * len(data) + SLACK
        assert peak <= bound, f"{peak} bytes allocated for a {len(data)}-byte pickle (bound {bound})"


def _seeds() -> list[tuple[str, bytes]]:
    value = {"a": [1, 2.5, None, True, (1, 2, 3, 4)], "b": {3: "x" * 40, 4: b"y"}, "c": frozenset({1, 2}),
             "d": OrderedDict(w=[set(), {}]), "big": 2**200}
    out = [(f"plain_p{p}", pickle.dumps(value, p)) for p in range(6)]
    out += [
        ("set_flood", b"\x80\x04" + b"\x8f" * 4096 + b"N."),
        ("shared_key", b"\x80\x04}\x94(" + b"K\x01" * 512 + b"t\x94" + b"0" + b"h\x01K\x00s" * 64 + b"."),
        ("opaque_appends", b"\x80\x04\x8c\x01m\x8c\x01C\x93)\x81" + b"K\x01a" * 256 + b"."),
        ("dag", b"\x80\x04}K\x01" + b"".join(b"\x94h%c\x86" % i for i in range(40)) + b"K\x00s."),
        ("set_calls", b"\x80\x04(" + b"K\x01" * 256 + b"l\x94\x8c\x08builtins\x8c\x03set\x93\x94"
         + b"h\x01h\x00\x85R0" * 64 + b"."),
        ("persid", b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ."),
        ("nested", b"\x80\x04C\x0a\x80\x04\x8f\x8f\x8f\x8f00N.0N."),
    ]
    return out


SEEDS = _seeds()
