"""The legacy VM costs O(N) time and memory for a pickle of N bytes (safeckpt/legacy/budget.py).

Each count is tested at its limit (passes) and one past (refused, with the error's
limit, maximum and actual); the hostile shapes run in a child process whose peak
RSS must stay under a bound proportional to the input's size.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import safeckpt
from safeckpt.legacy.budget import COSTS
from safeckpt.legacy.rebuild import Rebuilder
from safeckpt.legacy.source import PickleSource
from safeckpt.legacy.vm import Report, SymbolicUnpickler
from safeckpt.limits import Limits

P4 = b"\x80\x04"


def _load(data: bytes, limits: Limits) -> object:
    rebuild = Rebuilder(limits)
    vm = SymbolicUnpickler(data, Report(), limits, rebuild.calls, values=rebuild.values, build=rebuild.build)
    return vm.load()


def _refused(data: bytes, limits: Limits) -> safeckpt.LimitExceededError:
    with pytest.raises(safeckpt.LimitExceededError) as info:
        _load(data, limits)
    return info.value


# --------------------------------------------------------------------------- each limit at its boundary


def test_stack_limit() -> None:
    data = P4 + b"N" * 10 + b"."
    assert _load(data, Limits(max_pickle_stack=10)) is None
    error = _refused(data, Limits(max_pickle_stack=9))
    assert (error.limit, error.maximum, error.actual) == ("max_pickle_stack", 9, 10)


def test_stack_limit_counts_values_under_marks() -> None:
    data = P4 + b"NN(NN(NN" + b"t" + b"t" + b"."  # 6 values at the deepest point
    assert _load(data, Limits(max_pickle_stack=6)) == (None, None, (None, None))
    assert _refused(data, Limits(max_pickle_stack=5)).limit == "max_pickle_stack"


def test_marks_limit() -> None:
    data = P4 + b"(" * 7 + b"N" + b"t" * 7 + b"."
    expected: object = None
    for _ in range(7):
        expected = (expected,)
    assert _load(data, Limits(max_pickle_marks=7)) == expected
    error = _refused(data, Limits(max_pickle_marks=6))
    assert (error.limit, error.maximum, error.actual) == ("max_pickle_marks", 6, 7)


def test_memo_limit() -> None:
    data = P4 + b"N" + b"\x94" * 20 + b"q\x00" + b"."  # 20 entries; rewriting slot 0 adds none
    assert _load(data, Limits(max_pickle_memo=20)) is None
    error = _refused(data, Limits(max_pickle_memo=19))
    assert (error.limit, error.maximum, error.actual) == ("max_pickle_memo", 19, 20)


def test_container_limit_holds_for_inert_objects() -> None:
    data = P4 + b"\x8c\x01m\x8c\x01C\x93)\x81" + b"K\x01a" * 30 + b"."
    value = _load(data, Limits(max_container_len=30))
    assert value.list_items == [1] * 30
    assert _refused(data, Limits(max_container_len=29)).limit == "max_container_len"


def test_work_limit_at_the_boundary() -> None:
    sets = 40
    data = P4 + b"\x8f0" * sets + b"N."  # every set costs COSTS["set"] units; nothing else is charged
    cost = sets * COSTS["set"]
    assert _load(data, Limits(max_pickle_work=cost, max_pickle_work_per_byte=0)) is None
    error = _refused(data, Limits(max_pickle_work=cost - 1, max_pickle_work_per_byte=0))
    assert (error.limit, error.maximum, error.actual) == ("max_pickle_work", cost - 1, cost)


def test_work_allowed_grows_with_the_bytes_read() -> None:
    data = P4 + b"\x8f."  # the set is made after 3 bytes: it may cost 3 * per_byte
    per_byte = -(-COSTS["set"] // 3)
    assert _load(data, Limits(max_pickle_work=0, max_pickle_work_per_byte=per_byte)) == set()
    error = _refused(data, Limits(max_pickle_work=0, max_pickle_work_per_byte=per_byte - 1))
    assert (error.limit, error.maximum, error.actual) == ("max_pickle_work", 3 * (per_byte - 1), COSTS["set"])


def test_hashing_a_shared_key_is_charged_every_time() -> None:
    items = 1000
    key = b"(" + b"K\x01" * items + b"t\x94" + b"0"  # a tuple, memoized, popped
    once = P4 + b"}" + key + b"h\x00K\x00s."
    many = P4 + b"}" + key + b"h\x00K\x00s" * 50 + b"."
    limits = Limits(max_pickle_work=20 * items, max_pickle_work_per_byte=0)
    assert len(_load(once, limits)) == 1
    assert _refused(many, limits).limit == "max_pickle_work"


def test_a_key_nested_too_deep_is_refused_at_any_sharing() -> None:
    deep = P4 + b"}" + b"K\x01" + b"\x85" * 12 + b"K\x02s."
    assert len(_load(deep, Limits(max_depth=12))) == 1
    error = _refused(deep, Limits(max_depth=11))
    assert (error.limit, error.maximum) == ("max_depth", 11)


def test_an_exponential_tuple_dag_is_refused_before_it_is_hashed() -> None:
    level = b"\x94h%c\x86"  # memoize the top, read it back, pair them: the tree doubles, the bytes do not
    body = b"K\x01" + b"".join(level % i for i in range(80))
    data = P4 + b"}" + body + b"K\x00s."
    error = _refused(data, Limits())
    assert error.limit == "max_pickle_work"


def test_appends_to_an_inert_object_keep_one_list() -> None:
    data = P4 + b"\x8c\x01m\x8c\x01C\x93)\x81" + b"K\x01a" * 5 + b"(K\x02K\x03e."
    value = _load(data, Limits())
    assert value.list_items == [1, 1, 1, 1, 1, 2, 3]


def test_a_constructor_copying_a_shared_value_is_charged_per_call() -> None:
    items = 2000
    shared = b"(" + b"K\x01" * items + b"l\x94"  # a list in memo 0
    call = b"\x8c\x08builtins\x8c\tfrozenset\x93h\x00\x85R0"
    limits = Limits(max_pickle_work=60 * items, max_pickle_work_per_byte=0)
    assert _load(P4 + shared + call + b".", limits) == [1] * items
    assert _refused(P4 + shared + call * 20 + b".", limits).limit == "max_pickle_work"


def test_a_nested_pickle_spends_from_its_outer_budget() -> None:
    inner = P4 + b"\x8f0" * 30 + b"N."
    data = P4 + b"C" + bytes([len(inner)]) + inner + b"."
    cost = 30 * COSTS["set"] + 6 + len(inner) // 8
    assert _load(data, Limits(max_pickle_work=cost, max_pickle_work_per_byte=0)) == inner
    assert _refused(data, Limits(max_pickle_work=cost - 1, max_pickle_work_per_byte=0)).limit == "max_pickle_work"


def test_values_match_pickle_for_every_protocol() -> None:
    value = {"a": [1, 2.5, None, True, (1, 2, 3, 4)], "b": {3: "x" * 300, 4: b"y"}, "c": frozenset({1, 2}), "d": set(),
             "big": 2**200, "neg": -(2**70), "s": "\u00e9\U0001f600"}
    for protocol in range(6):
        assert _load(pickle.dumps(value, protocol), Limits()) == value


def test_a_file_is_left_right_after_stop() -> None:
    for protocol in range(6):
        first = pickle.dumps({"k": [1, 2, "x" * 70000]}, protocol)
        stream = io.BytesIO(first + b"tail")
        assert _load(stream.getvalue(), Limits()) == {"k": [1, 2, "x" * 70000]}
        rebuild = Rebuilder(Limits())
        SymbolicUnpickler(stream, Report(), Limits(), rebuild.calls).load()
        assert stream.read() == b"tail"
        stream.seek(0)
        count = PickleSource(stream, Limits()).skip()
        assert stream.read() == b"tail"
        assert count == len(list(pickletools.genops(first)))


# --------------------------------------------------------------------------- hostile shapes, memory in a child

MiB = 1 << 20


def _flood(unit: bytes, size: int, head: bytes = P4, tail: bytes = b"N.") -> bytes:
    return head + unit * (size // len(unit)) + tail


def shapes(size: int) -> dict[str, bytes]:
    """The worst inputs of about ``size`` bytes: floods of every container opcode, shared keys, long appends."""
    shared_key = b"}\x94(" + b"K\x01" * (size // 4) + b"t\x94" + b"0"
    opaque = b"\x8c\x01m\x8c\x01C\x93)\x81"
    return {
        "empty_set": _flood(b"\x8f", size),
        "empty_dict": _flood(b"}", size),
        "empty_list": _flood(b"]", size),
        "mark": _flood(b"(", size),
        "memoize": _flood(b"N\x94", size),
        "dup": P4 + b"]" + b"2" * size + b".",
        "tuple_pairs": _flood(b"))\x86", size),
        "frozenset": _flood(b"(\x91", size),
        "deep_tuples": P4 + b"N" + b"\x85" * size + b".",
        "deep_lists": P4 + b"]" + b"]\x94a" * (size // 4) + b".",
        "shared_key": P4 + shared_key + b"h\x01K\x00s" * (size // 10) + b".",
        "opaque_appends": P4 + opaque + b"N" + b"a2" * (size // 2) + b".",
        "opaque_setitems": P4 + opaque + b"(" + b"K\x01N" * (size // 3) + b"u.",
        "shared_set_calls": P4 + b"(" + b"K\x01" * (size // 4) + b"l\x94"
        + b"\x8c\x08builtins\x8c\x03set\x93\x94" + b"h\x01h\x00\x85R0" * (size // 14) + b".",
        "memo_gets": P4 + b"]\x94" + b"h\x00" * (size // 2) + b".",
    }


CHILD = r"""
import json, resource, sys, zipfile
import safeckpt
from safeckpt.legacy.budget import COSTS
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    safeckpt.load(path)
    outcome = "loaded"
except safeckpt.SafeCkptError as e:
    outcome = type(e).__name__ + ":" + str(getattr(e, "limit", ""))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "rss_mib": (after - before) / 1024}))
"""


def _child(path: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _bound_mib(nbytes: int) -> float:
    """What the defaults allow: the budget (8 bytes a unit), the stack (8 bytes a byte), interpreter noise."""
    limits = Limits()
    units = limits.max_pickle_work + limits.max_pickle_work_per_byte * nbytes
    return (8 * units + 8 * nbytes) / MiB + 24


@pytest.mark.parametrize("shape", sorted(shapes(1024)))
def test_hostile_shapes_stay_in_memory_proportional_to_their_size(tmp_path: Path, shape: str) -> None:
    data = shapes(MiB // 4)[shape]
    path = tmp_path / f"{shape}.pkl"
    path.write_bytes(data)
    result = _child(path)
    assert result["rss_mib"] <= _bound_mib(len(data)), result
    assert result["outcome"] in ("loaded", "LimitExceededError:max_pickle_work", "LimitExceededError:max_depth",
                                 "LimitExceededError:max_pickle_marks"), result


def test_the_issues_zip_of_four_mebibytes_of_empty_sets(tmp_path: Path) -> None:
    body = _flood(b"\x8f", 4 * MiB)
    path = tmp_path / "set_flood.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/byteorder", "little")
    assert path.stat().st_size < 8192
    result = _child(path)
    assert result["outcome"] == "LimitExceededError:max_pickle_work"
    assert result["rss_mib"] <= 3 * 8 * Limits().max_pickle_work / MiB + 24, result  # failed early, not at 4 MiB
