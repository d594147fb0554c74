"""``scan`` searches every bytes/str payload a pickle carries for hidden pickles (safeckpt/legacy/nested.py).

Not only the values that end up in the result: the VM records each payload as
its opcode makes it, so one popped, left only in the memo, given to a
persistent id, named as a computed global or carried by a pickle that breaks
later is found too. Each payload here would run its code under a later
``pickle.loads``; the sentinel file it would create must not exist after the scan.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

import safeckpt
from safeckpt.legacy.nested import _LOOKBACK, Budget, _candidates, search_payloads
from safeckpt.legacy.vm import Report


class _Touch:
    """Pickles to ``open(path, "w")``: creates the sentinel file, nothing else."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def _payload(sentinel: Path, protocol: int) -> bytes:
    """A pickle that the VM's own check (protocol 2-5, ending in STOP) does not see when given a tail."""
    return pickle.dumps({"w": [1, 2], "x": _Touch(sentinel)}, protocol=protocol)


def _binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


P2 = b"\x80\x02"

# where a payload sits in the carrying pickle: none of these keep it in the result
PLACES = {
    "popped": lambda b: P2 + _binbytes(b) + b"0N.",
    "memo only": lambda b: P2 + _binbytes(b) + b"q\x000N.",
    "popped under a mark": lambda b: P2 + b"(" + _binbytes(b) + b"1N.",
    "left on the stack": lambda b: P2 + _binbytes(b) + b"N.",
    "dropped by a call on a result": lambda b: P2 + b"cmod\nf\n)R(" + _binbytes(b) + b"tR.",
    "computed global name": lambda b: P2 + _binbytes(b) + b"\x8c\x01x\x93.",
    "bytearray popped": lambda b: b"\x80\x05\x96" + struct.pack("<Q", len(b)) + b + b"0N.",
    "protocol 0 string popped": lambda b: b"S" + repr(b.decode("latin-1")).encode("latin-1") + b"\n0N.",
    "before the pickle breaks": lambda b: P2 + _binbytes(b) + b"0\xff",
    "in an object's state": lambda b: P2 + b"cmod\nThing\n)\x81}X\x01\x00\x00\x00s" + _binbytes(b) + b"sb.",
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_payloads_dropped_from_the_result_are_searched(tmp_path: Path, place: str) -> None:
    sentinel = tmp_path / "ran"
    path = tmp_path / "carrier.pkl"
    path.write_bytes(PLACES[place](_payload(sentinel, 0) + b"!"))  # protocol 0, a byte after STOP
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous", report.findings
    assert any(f.kind == "nested-pickle" and f.severity == "dangerous" for f in report.findings)
    assert not sentinel.exists()


def test_persistent_id_fields_are_searched(tmp_path: Path) -> None:
    """A torch zip's storage reference may carry a payload torch never keeps: searched too."""
    sentinel = tmp_path / "ran"
    data = b"\x80\x02(X\x07\x00\x00\x00storage" + b"ctorch\nFloatStorage\n" + b"X\x01\x00\x00\x000" + b"X\x03\x00\x00\x00cpu"
    data += b"K\x00" + _binbytes(_payload(sentinel, 1) + b"!") + b"tQ."
    path = tmp_path / "carrier.pkl"
    path.write_bytes(data)
    report = safeckpt.scan(path)
    assert any(f.kind == "nested-pickle" and f.severity == "dangerous" for f in report.findings), report.findings
    assert not sentinel.exists()


def test_payload_of_a_nested_pickle_is_searched_in_turn(tmp_path: Path) -> None:
    """The second pickle is escaped inside the first (a protocol 0 string), so only the first
    pickle's own payloads show it; the first names an unknown global and pops the string."""
    sentinel = tmp_path / "ran"
    inner = _payload(sentinel, 0)
    first = b"S" + repr(inner.decode("latin-1")).encode("latin-1") + b"\n0cmod\nThing\n)R."
    assert b"cbuiltins\nopen" not in first and b"c__builtin__\nopen" not in first
    path = tmp_path / "carrier.pkl"
    path.write_bytes(P2 + _binbytes(first) + b"0N.")
    report = safeckpt.scan(path)
    assert report.verdict == "dangerous", report.findings
    assert not sentinel.exists()


def test_benign_dropped_payloads_stay_safe(tmp_path: Path) -> None:
    path = tmp_path / "benign.pkl"
    path.write_bytes(P2 + _binbytes(b"just some text, no pickle here\n" * 50) + b"0" + _binbytes(bytes(range(256))) + b"0N.")
    assert safeckpt.scan(path).verdict == "safe"


def test_search_is_bounded_and_ends_suspicious_not_safe(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    payloads: list[object] = [b"\x80\x02" * 50 + _payload(sentinel, 0)]
    full = Report()
    search_payloads(payloads, full, safeckpt.Limits(), Budget(len(payloads[0]) * 2))  # type: ignore[arg-type]
    assert full.dangerous
    starved = Report()
    search_payloads(payloads, starved, safeckpt.Limits(), Budget(0, slack=20))
    assert not starved.dangerous
    assert any(f.kind == "nested-search-incomplete" and f.severity == "suspicious" for f in starved.findings)


def test_each_payload_is_searched_once(tmp_path: Path) -> None:
    """A payload shared through the memo a million times costs one search."""
    sentinel = tmp_path / "ran"
    blob = b"\x80\x02" * 200 + _payload(sentinel, 0)
    once, shared = Budget(0, slack=1 << 30), Budget(0, slack=1 << 30)
    search_payloads([blob], Report(), safeckpt.Limits(), once)
    search_payloads([blob] * 1000, Report(), safeckpt.Limits(), shared)
    assert once.left == shared.left < 1 << 30


def test_stack_global_lookback_boundary() -> None:
    """String opcodes at most ``_LOOKBACK`` bytes before a STACK_GLOBAL start candidates; one byte further do not."""
    near = b"\x8c" + b"\x00" * (_LOOKBACK - 1) + b"\x93"
    far = b"\x8c" + b"\x00" * _LOOKBACK + b"\x93"
    assert 0 in _candidates(near) and _candidates(near) == [0]
    assert _candidates(far) == [0]  # offset 0 is always a candidate; the opcode itself is not
    shifted = b"x" + far
    assert 1 not in _candidates(shifted)
    shifted_near = b"x" + near
    assert 1 in _candidates(shifted_near)


def test_text_that_cannot_name_a_global_has_no_candidates() -> None:
    assert _candidates(b"layer1.weight.running_mean") == []
    assert _candidates(b"\x80\x04plain bytes with a proto header") == []
    assert _candidates(b"cos\nsystem\n") == [0]
    assert 0 in _candidates(b"\x8c\x02os\x8c\x06system\x93")
