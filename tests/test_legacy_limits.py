"""The legacy reader under hostile sizes: deep nesting, huge declared lengths, memo floods."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

import safeckpt
from safeckpt.limits import Limits

DEEP = 300_000  # deep enough that hashing it in C overflows an 8 MiB stack (checked: a segfault before the fix)

DEEP_PICKLES = {
    "dict_key": b"\x80\x02}" + b"K\x01" + b"\x85" * DEEP + b"K\x02s.",
    "set_element": b"\x80\x02cbuiltins\nset\n]K\x01" + b"\x85" * DEEP + b"a\x85R.",
    "frozenset_element": b"\x80\x02(K\x01" + b"\x85" * DEEP + b"\x91.",
    "additems_element": b"\x80\x04\x8f(K\x01" + b"\x85" * DEEP + b"\x90.",
}


def test_deeply_nested_keys_are_refused_without_crashing(tmp_path: Path) -> None:
    for name, data in DEEP_PICKLES.items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
    code = (
        "import sys, safeckpt\n"
        f"for name in {sorted(DEEP_PICKLES)!r}:\n"
        "    try:\n"
        f"        safeckpt.load({str(tmp_path)!r} + '/' + name + '.pkl')\n"
        "    except safeckpt.LimitExceededError as e:\n"
        "        print(name, 'refused', e.limit)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # a stack overflow would be -11
    assert done.stdout.split("\n")[:-1] == [f"{name} refused max_depth" for name in sorted(DEEP_PICKLES)]


def test_keys_within_the_depth_limit_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.pkl"
    path.write_bytes(b"\x80\x02}" + b"K\x01" + b"\x85" * 10 + b"K\x02s.")
    value = safeckpt.load(path)
    (key,) = value
    assert value[key] == 2


def test_a_declared_length_over_the_string_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.pkl"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"xy.")  # BINBYTES8 claiming 1 EiB
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path)
    assert (info.value.limit, info.value.actual) == ("max_str_len", 1 << 60)
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1000) + b"xy.")  # under the limit, past the end
    with pytest.raises(safeckpt.CheckpointFormatError, match="only 3 remain"):
        safeckpt.load(path)


N = 100


STRINGS = {  # opcode: (pickle holding one value whose length counts N, the value)
    "BINBYTES": (b"\x80\x03B" + struct.pack("<I", N) + b"b" * N + b".", b"b" * N),
    "BINBYTES8": (b"\x80\x04\x8e" + struct.pack("<Q", N) + b"b" * N + b".", b"b" * N),
    "BINUNICODE": (b"\x80\x02X" + struct.pack("<I", N) + b"u" * N + b".", "u" * N),
    "BYTEARRAY8": (b"\x80\x05\x96" + struct.pack("<Q", N) + b"a" * N + b".", bytearray(b"a" * N)),
    "LONG4": (b"\x80\x02\x8b" + struct.pack("<i", N) + b"\x01" * N + b".", int.from_bytes(b"\x01" * N, "little")),
    "STRING": (b"S'" + b"s" * (N - 2) + b"'\n.", "s" * (N - 2)),  # protocol 0: the quotes count
    "UNICODE": (b"V" + b"v" * N + b"\n.", "v" * N),  # protocol 0
}


@pytest.mark.parametrize("opcode", sorted(STRINGS))
def test_string_lengths_at_and_past_the_limit(tmp_path: Path, opcode: str) -> None:
    data, value = STRINGS[opcode]
    path = tmp_path / "s.pkl"
    path.write_bytes(data)
    assert safeckpt.load(path, limits=Limits(max_str_len=N)) == value
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_str_len=N - 1))
    assert (info.value.limit, info.value.maximum) == ("max_str_len", N - 1)


def test_container_length_limit(tmp_path: Path) -> None:
    path = tmp_path / "long.pkl"
    path.write_bytes(b"\x80\x02](" + b"K\x01" * 100 + b"e.")
    assert len(safeckpt.load(path, limits=Limits(max_container_len=100))) == 100
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_container_len=99))
    assert info.value.limit == "max_container_len"


def test_memo_flood_limit(tmp_path: Path) -> None:
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04N" + b"\x94" * 50 + b".")  # MEMOIZE 50 times
    assert safeckpt.load(path, limits=Limits(max_pickle_memo=50)) is None
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(path, limits=Limits(max_pickle_memo=49))
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_pickle_memo", 49, 50)
