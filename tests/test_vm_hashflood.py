"""Keys chosen to collide cannot make a keyed container quadratic (safeckpt/keyhash.py).

Every way a file's keys reach a dict or set is tested at ``max_equal_hash_keys``
(loads, with the right value) and one past (refused before the insert, naming
the limit): the legacy VM's DICT, SETITEMS, FROZENSET, ADDITEMS, allowed
``set``/``frozenset``/``OrderedDict`` calls and text PUT memo keys; the
skeleton decoder's maps, sets, frozensets and OrderedDicts.
"""

from __future__ import annotations

import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import safeckpt
from safeckpt.codec.decode import Decoder
from safeckpt.codec.types import Ext, Tag
from safeckpt.keyhash import EqualHashes, count_equal_hashes
from safeckpt.legacy.rebuild import Rebuilder
from safeckpt.legacy.vm import Report, SymbolicUnpickler
from safeckpt.limits import DEFAULT_LIMITS, Limits
from safeckpt.refs import AllowList

P = sys.hash_info.modulus  # 2**61 - 1: k * P hashes to 0 for every k
P4 = b"\x80\x04"


def _long(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _colliding(n: int, offset: int = 0) -> list[int]:
    return [k * P + offset for k in range(1, n + 1)]


def _load(data: bytes, limits: Limits) -> Any:
    rebuild = Rebuilder(limits)
    vm = SymbolicUnpickler(data, Report(), limits, rebuild.calls, values=rebuild.values, build=rebuild.build)
    return vm.load()


def _keys(ints: list[int]) -> bytes:
    return b"".join(_long(k) for k in ints)


def _pairs(ints: list[int]) -> bytes:
    return b"".join(_long(k) + b"N" for k in ints)


SET = b"\x8c\x08builtins\x8c\x03set\x93"
ODICT = b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93"

SHAPES = {
    "SETITEMS": lambda ks: P4 + b"}(" + _pairs(ks) + b"u.",
    "SETITEM": lambda ks: P4 + b"}" + b"".join(_long(k) + b"Ns" for k in ks) + b".",
    "DICT": lambda ks: P4 + b"(" + _pairs(ks) + b"d.",
    "ADDITEMS": lambda ks: P4 + b"\x8f(" + _keys(ks) + b"\x90.",
    "FROZENSET": lambda ks: P4 + b"(" + _keys(ks) + b"\x91.",
    "tuple keys": lambda ks: P4 + b"}(" + b"".join(_long(k) + b"\x85N" for k in ks) + b"u.",
    "set() call": lambda ks: P4 + SET + b"(" + _keys(ks) + b"l\x85R.",
    "OrderedDict() call": lambda ks: P4 + ODICT + b"(" + b"".join(_long(k) + b"N\x86" for k in ks) + b"l\x85R.",
    "text PUT": lambda ks: b"(" + b"".join(b"N" + b"p%d\n0" % k for k in ks) + b"l.",
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_legacy_keys_of_one_hash_at_the_limit_load_and_one_more_is_refused(shape: str) -> None:
    build = SHAPES[shape]
    limits = Limits(max_equal_hash_keys=8)
    value = _load(build(_colliding(8)), limits)
    if shape != "text PUT":
        assert len(value) == 8
        assert {k[0] if type(k) is tuple else k for k in value} == set(_colliding(8))
    with pytest.raises(safeckpt.LimitExceededError) as info:
        _load(build(_colliding(9)), limits)
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_equal_hash_keys", 8, 9)


def test_default_limit_boundary_on_the_public_load(tmp_path: Path) -> None:
    limit = DEFAULT_LIMITS.max_equal_hash_keys
    good, bad = tmp_path / "good.pkl", tmp_path / "bad.pkl"
    good.write_bytes(SHAPES["SETITEMS"](_colliding(limit)))
    bad.write_bytes(SHAPES["SETITEMS"](_colliding(limit + 1)))
    assert set(safeckpt.load(good)) == set(_colliding(limit))
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(bad)
    assert info.value.limit == "max_equal_hash_keys"


def test_counts_persist_across_opcodes_on_one_container() -> None:
    limits = Limits(max_equal_hash_keys=8)
    ks = _colliding(9)
    split = P4 + b"}(" + _pairs(ks[:5]) + b"u(" + _pairs(ks[5:]) + b"u."
    then_dict = P4 + b"(" + _pairs(ks[:5]) + b"d(" + _pairs(ks[5:]) + b"u."
    then_set = P4 + SET + b"(" + _keys(ks[:5]) + b"l\x85R(" + _keys(ks[5:]) + b"\x90."
    then_odict = P4 + ODICT + b"(" + b"".join(_long(k) + b"N\x86" for k in ks[:5]) + b"l\x85R(" + _pairs(ks[5:]) + b"u."
    for data in (split, then_dict, then_set, then_odict):
        with pytest.raises(safeckpt.LimitExceededError):
            _load(data, limits)
        assert len(_load(data, Limits(max_equal_hash_keys=9))) == 9


def test_separate_containers_are_counted_separately() -> None:
    ks = _colliding(8)
    data = P4 + b"(" + (b"}(" + _pairs(ks) + b"u") * 3 + b"l."
    assert [len(d) for d in _load(data, Limits(max_equal_hash_keys=8))] == [8, 8, 8]


def test_groups_of_different_hashes_each_have_the_limit() -> None:
    ks = _colliding(8, 0) + _colliding(8, 1) + _colliding(8, 2)
    assert len(_load(SHAPES["SETITEMS"](ks), Limits(max_equal_hash_keys=8))) == 24


def test_real_keys_are_not_counted() -> None:
    """str, bytes and ints within +-(2**61 - 2) are never counted: a limit of 1 still reads them."""
    limits = Limits(max_equal_hash_keys=1)
    value = {i: i for i in range(-3000, 3000)}  # -1 and -2 share a hash: two keys
    value.update({f"k{i}": i for i in range(3000)})
    value.update({b"b%d" % i: i for i in range(100)})
    value[P - 1] = value[-(P - 1)] = 0
    for protocol in (0, 2, 4):
        assert _load(pickle.dumps(value, protocol), limits) == value


def test_real_float_and_tuple_keys_load_with_the_default() -> None:
    value = {(i, j, -1): i / 3 for i in range(200) for j in range(50)}
    value.update({i / 7: (i, -2) for i in range(10000)})
    value[frozenset({1, 2})] = {(-1, -1), (-2, -2), (-1, -2), (-2, -1)}  # tuples of -1/-2 collide: four
    assert _load(pickle.dumps(value, 4), DEFAULT_LIMITS) == value


def test_comparisons_are_charged_to_the_work_budget() -> None:
    counts: dict[int, int] = {}
    units = count_equal_hashes(counts, _colliding(4), 8)
    assert units == 1 + 2 + 3 + 4  # a hash each, and a comparison with each earlier key of the hash
    assert counts == {0: 4}


def test_unhashable_keys_are_a_format_error_not_type_error() -> None:
    data = P4 + b"}(]Nu."  # a list as a key
    with pytest.raises(safeckpt.CheckpointFormatError):
        _load(data, DEFAULT_LIMITS)
    with pytest.raises(TypeError):
        count_equal_hashes({}, [[1]], 8)


def test_equal_hashes_keeps_containers_alive_while_counted() -> None:
    hashes = EqualHashes(8)
    first: dict[Any, Any] = {}
    hashes.counts_of(first)[0] = 5
    assert hashes.counts_of(first) == {0: 5}
    assert hashes.counts_of(None) == {} and hashes.counts_of({}) == {}


# --------------------------------------------------------------------------- the skeleton decoder (msgpack)


def _big(v: int) -> msgpack.ExtType:
    return msgpack.ExtType(Ext.BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))


def _tag(tag: Tag) -> msgpack.ExtType:
    return msgpack.ExtType(Ext.TAG, bytes([int(tag)]))


def _decode(value: Any, limits: Limits) -> Any:
    return Decoder(lambda name: torch.zeros(0), AllowList(), limits).unpack(msgpack.packb(value))


MSGPACK_SHAPES = {
    "map": lambda ks: {k: 0 for k in ks},
    "DICT": lambda ks: [_tag(Tag.DICT), *(x for k in ks for x in (k, 0))],
    "SET": lambda ks: [_tag(Tag.SET), *ks],
    "FROZENSET": lambda ks: [_tag(Tag.FROZENSET), *ks],
    "ORDERED_DICT": lambda ks: [_tag(Tag.ORDERED_DICT), None, *(x for k in ks for x in (k, 0))],
    "TUPLE elements": lambda ks: [_tag(Tag.SET), *([_tag(Tag.TUPLE), k] for k in ks)],
}


@pytest.mark.parametrize("shape", sorted(MSGPACK_SHAPES))
def test_skeleton_keys_of_one_hash_at_the_limit_decode_and_one_more_is_refused(shape: str) -> None:
    limits = Limits(max_equal_hash_keys=8)
    build = MSGPACK_SHAPES[shape]
    value = _decode(build([_big(k) for k in _colliding(8)]), limits)
    assert len(value) == 8
    with pytest.raises(safeckpt.LimitExceededError) as info:
        _decode(build([_big(k) for k in _colliding(9)]), limits)
    assert (info.value.limit, info.value.maximum, info.value.actual) == ("max_equal_hash_keys", 8, 9)


def test_skeleton_uint64_keys_colliding() -> None:
    """msgpack's own 64-bit ints: k * P + c for k up to 8 share a hash without any extension type."""
    ks = [k * P + 5 for k in range(1, 9)]  # all under 2**64
    assert all(k < 1 << 64 for k in ks)
    assert len(_decode({k: 0 for k in ks}, Limits(max_equal_hash_keys=8))) == 8
    with pytest.raises(safeckpt.LimitExceededError):
        _decode({k: 0 for k in [5, *ks]}, Limits(max_equal_hash_keys=7))


def test_saved_checkpoint_with_colliding_keys_round_trips_at_the_limit(tmp_path: Path) -> None:
    limit = DEFAULT_LIMITS.max_equal_hash_keys
    state = {"w": torch.arange(4.0), "at": {k: k & 7 for k in _colliding(limit)}, "set": set(_colliding(limit))}
    path = tmp_path / "at.safeckpt"
    safeckpt.save_single_file(None, state, path)
    loaded = safeckpt.load(path)
    assert loaded["at"] == state["at"] and loaded["set"] == state["set"]
    over = dict(state, at=OrderedDict((k, 0) for k in _colliding(limit + 1)))
    safeckpt.save_single_file(None, over, tmp_path / "over.safeckpt")
    with pytest.raises(safeckpt.LimitExceededError) as info:
        safeckpt.load(tmp_path / "over.safeckpt")
    assert info.value.limit == "max_equal_hash_keys"
