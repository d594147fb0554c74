"""Review, class 5: a sharded checkpoint's index that is a symbolic link.

``load_sharded`` opened ``safeckpt-sharded.msgpack`` through a link: a directory whose
index links to another checkpoint's index loaded that index's non-tensor state (the
shard directory itself as a link was already refused). Rule: files inside a checkpoint
directory are opened through ``LocalStorage.open`` (``O_NOFOLLOW``, regular files only).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from safeckpt.distributed.sharded import META_NAME, load_sharded, save_sharded
from safeckpt.errors import CheckpointFormatError


def test_sharded_index_symlink_is_refused(tmp_path: Path) -> None:
    save_sharded(None, {"w": torch.arange(6.0).reshape(2, 3), "secret": "outside-value"}, tmp_path / "other")
    save_sharded(None, {"w": torch.zeros(2, 3), "secret": "mine"}, tmp_path / "victim")
    assert load_sharded(tmp_path / "victim")["secret"] == "mine"  # the plain directory loads
    index = tmp_path / "victim" / META_NAME
    before = (tmp_path / "other" / META_NAME).read_bytes()
    index.unlink()
    os.symlink(tmp_path / "other" / META_NAME, index)
    with pytest.raises(CheckpointFormatError, match="symbolic link"):
        load_sharded(tmp_path / "victim")
    assert (tmp_path / "other" / META_NAME).read_bytes() == before


def test_sharded_index_fifo_never_blocks(tmp_path: Path) -> None:
    save_sharded(None, {"w": torch.zeros(2, 3)}, tmp_path / "c")
    index = tmp_path / "c" / META_NAME
    index.unlink()
    os.mkfifo(index)
    with pytest.raises((CheckpointFormatError, FileNotFoundError)):
        load_sharded(tmp_path / "c")
