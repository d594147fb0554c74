"""numpy arrays pickled with protocol 5 (numpy's ``_frombuffer`` reducer) load as real, checked arrays."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import safeckpt
from safeckpt.errors import CheckpointFormatError, SafeCkptError

ARRAYS = {
    "c": np.arange(12, dtype="<i4").reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "strided": np.arange(20, dtype=">f8")[::3],
    "transposed": np.arange(6, dtype=np.int16).reshape(2, 3).T,
    "empty": np.zeros((0, 5), dtype="c16"),
    "bool": np.array([True, False]),
    "scalar0d": np.array(7, dtype=np.uint8),
}


def _check(out: dict, src: dict) -> None:
    for key, arr in src.items():
        got = out[key]
        assert type(got) is np.ndarray and got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr)


def test_torch_save_protocol_5_arrays(tmp_path: Path) -> None:
    path = tmp_path / "np5.pt"
    torch.save(ARRAYS, path, pickle_protocol=5)
    assert safeckpt.scan(path).verdict == "safe"
    _check(safeckpt.load(path), ARRAYS)


def test_bare_pickle_protocol_5(tmp_path: Path) -> None:
    path = tmp_path / "np5.pkl"
    data = pickle.dumps(ARRAYS, protocol=5)
    assert b"_frombuffer" in data
    path.write_bytes(data)
    _check(safeckpt.load(path), ARRAYS)


def test_out_of_band_buffers_are_refused(tmp_path: Path) -> None:
    buffers: list = []
    data = pickle.dumps(np.arange(4), protocol=5, buffer_callback=buffers.append)
    assert buffers, "numpy did not emit an out-of-band buffer"
    path = tmp_path / "oob.pkl"
    path.write_bytes(data)
    with pytest.raises(SafeCkptError):
        safeckpt.load(path)


def _frombuffer_pickle(raw: bytes, code: str, shape: tuple, order: str) -> bytes:
    head = b"\x80\x05\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93"
    dtype = b"\x8c\x05numpy\x8c\x05dtype\x93" + pickle.dumps((code, False, True), protocol=5)[2:-1] + b"R"
    body = pickle.dumps(raw, protocol=5)[2:-1] + dtype + pickle.dumps(shape, protocol=5)[2:-1]
    return head + b"(" + body + pickle.dumps(order, protocol=5)[2:-1] + b"tR."


def test_size_at_the_boundary(tmp_path: Path) -> None:
    path = tmp_path / "ok.pkl"
    path.write_bytes(_frombuffer_pickle(bytes(24), "<i4", (2, 3), "C"))
    assert safeckpt.load(path).shape == (2, 3)


@pytest.mark.parametrize(
    ("raw", "code", "shape", "order"),
    [
        (bytes(23), "<i4", (2, 3), "C"),  # one byte short
        (bytes(28), "<i4", (2, 3), "C"),  # one element too many
        (bytes(24), "<i4", (2, 3), "K"),  # unknown order
        (bytes(0), "<i4", (2**40, 2**40, 1), "C"),  # claims more than it holds
        (bytes(8), "O", (1,), "C"),  # object arrays are never read
    ],
)
def test_malformed_frombuffer_is_refused(raw: bytes, code: str, shape: tuple, order: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(_frombuffer_pickle(raw, code, shape, order))
    with pytest.raises(SafeCkptError):
        safeckpt.load(path)


def test_error_class_is_format_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(_frombuffer_pickle(bytes(3), "<i4", (1,), "C"))
    with pytest.raises(CheckpointFormatError):
        safeckpt.load(path)
