"""CheckpointManager: metrics checked at save, hostile metrics read back, restore falls back."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from safeckpt import CheckpointManager


def _state(i: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(i))}


def test_save_checks_the_ranked_metric(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, metric="loss")
    with pytest.raises(ValueError, match="ranks steps by metric 'loss'"):
        mgr.save(1, _state(1))
    with pytest.raises(ValueError, match="metrics given: 'val_loss'"):
        mgr.save(1, _state(1), {"val_loss": 0.1})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            mgr.save(1, _state(1), {"loss": bad})
    with pytest.raises(TypeError, match="real number"):
        mgr.save(1, _state(1), {"loss": "low"})
    with pytest.raises(ValueError, match="outside the range of a float"):
        mgr.save(1, _state(1), {"loss": 10**400})
    assert mgr.all_steps() == []
    mgr.save(1, _state(1), {"loss": sys.float_info.max})  # at the boundary: accepted
    mgr.save(2, _state(2), {"loss": torch.tensor(0.5)})
    assert mgr.best() == 2


def test_marker_metric_beyond_float_range_is_unranked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, metric="loss")
    mgr.save(1, _state(1), {"loss": 1.0})
    mgr.save(2, _state(2), {"loss": 2.0})
    marker = tmp_path / "step_000000000001" / "COMMITTED"
    doc = json.loads(marker.read_text())
    doc["metrics"]["loss"] = 10**400
    marker.write_text(json.dumps(doc))
    fresh = CheckpointManager(tmp_path, metric="loss")
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        assert fresh.best() == 2
    assert "not ranked" in caplog.text
    assert fresh.all_steps() == [1, 2]


def test_restore_falls_back_to_the_newest_step_that_verifies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path)
    for i in (1, 2, 3):
        mgr.save(i, _state(i))
    for step in (2, 3):
        file = tmp_path / f"step_00000000000{step}" / "checkpoint.safeckpt"
        data = bytearray(file.read_bytes())
        data[-2] ^= 0xFF  # same size, a tensor byte flipped
        file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        state = mgr.restore(verify=True)
    assert torch.equal(state["w"], _state(1)["w"])
    assert "skipping step 3" in caplog.text and "skipping step 2" in caplog.text
    from safeckpt import IntegrityError

    with pytest.raises(IntegrityError):
        mgr.restore(3, verify=True)  # a step asked for is never replaced


def test_restore_raises_the_newest_error_when_no_step_loads(tmp_path: Path) -> None:
    from safeckpt import IntegrityError

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(1))
    file = tmp_path / "step_000000000001" / "checkpoint.safeckpt"
    data = bytearray(file.read_bytes())
    data[-2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        mgr.restore(verify=True)
