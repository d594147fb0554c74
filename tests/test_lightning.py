"""SafeCheckpointIO: every checkpoint Lightning writes is a safeckpt file; resuming is bit-identical."""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import safeckpt
from safeckpt.detect import Kind, detect
from safeckpt.integrations.lightning import SafeCheckpointIO, load_from_checkpoint

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]




@pytest.fixture(autouse=True)
def _restore_torch_global_state() -> Any:
    """Trainer(deterministic=True) turns torch's deterministic algorithms on process-wide: turn them back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])

def lightning_api(package: str) -> Any:
    return importlib.import_module(package)


def make_module(L: Any) -> type:
    class TinyRegressor(L.LightningModule):
        def __init__(self, hidden: int = 8, act: type = nn.Tanh, lr: float = 0.05, extra: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(3, hidden), act(), nn.Linear(hidden, 1))

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            loss = ((self.net(x) - y) ** 2).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]

    TinyRegressor.__qualname__ = TinyRegressor.__name__ = f"TinyRegressor_{L.__name__.replace('.', '_')}"
    globals()[TinyRegressor.__name__] = TinyRegressor  # importable by name, as a real module's class is
    return TinyRegressor


MODULES: dict[str, type] = {}


def module_class(package: str) -> type:
    if package not in MODULES:
        MODULES[package] = make_module(lightning_api(package))
    return MODULES[package]


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(40, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(L: Any, root: Path, epochs: int, **kwargs: Any) -> Any:
    kwargs.setdefault("plugins", [SafeCheckpointIO()])
    return L.Trainer(max_epochs=epochs, default_root_dir=root, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, deterministic=True, accelerator="cpu", devices=1, **kwargs)


def fresh_model(package: str, seed: int = 1, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    return module_class(package)(**kwargs)


def never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("package", PACKAGES)
def test_resume_is_bit_identical_to_an_uninterrupted_run(
    package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    L = lightning_api(package)
    straight = fresh_model(package)
    trainer(L, tmp_path / "straight", 6).fit(straight, data())

    first = fresh_model(package)
    ckpt_dir = tmp_path / "interrupted" / "ckpts"
    callback = L.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=2, monitor="train_loss", save_last=True)
    trainer(L, tmp_path / "interrupted", 3, callbacks=[callback]).fit(first, data())
    written = sorted(ckpt_dir.iterdir())
    assert written and all(detect(p) is Kind.SAFETENSORS for p in written), written
    resumed = fresh_model(package, seed=2)  # other initial weights: only the checkpoint can make them equal
    with monkeypatch.context() as m:
        never_unpickles(m)
        callback2 = L.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=2, monitor="train_loss", save_last=True)
        t = trainer(L, tmp_path / "interrupted", 6, callbacks=[callback2])
        t.fit(resumed, data(), ckpt_path=ckpt_dir / "last.ckpt")
    assert t.global_step == 30
    assert callback2.best_model_path  # the callback's state came back under its state key
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    s1 = straight.trainer.optimizers[0].state_dict()
    s2 = t.optimizers[0].state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert all(detect(p) is Kind.SAFETENSORS for p in ckpt_dir.iterdir())


@pytest.mark.parametrize("package", PACKAGES)
def test_checkpoint_contents_round_trip_with_types(package: str, tmp_path: Path) -> None:
    L = lightning_api(package)
    attribute_dict = (importlib.import_module("pytorch_lightning.utilities.parsing").AttributeDict
                      if package == "pytorch_lightning" else importlib.import_module(
                          "lightning.fabric.utilities.data").AttributeDict)
    model = fresh_model(package, act=nn.ReLU, extra=attribute_dict(depth=2, name="x"))
    captured: dict[str, Any] = {}

    class Capture(SafeCheckpointIO):  # type: ignore[misc, valid-type]
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            captured["checkpoint"] = checkpoint
            super().save_checkpoint(checkpoint, path, storage_options)

    t = trainer(L, tmp_path, 2, plugins=[Capture()])
    t.fit(model, data())
    t.save_checkpoint(tmp_path / "manual.ckpt")
    assert detect(tmp_path / "manual.ckpt") is Kind.SAFETENSORS
    want = captured["checkpoint"]
    got = SafeCheckpointIO(allowed_globals=[nn.ReLU]).load_checkpoint(tmp_path / "manual.ckpt")
    assert got["pytorch-lightning_version"] == want["pytorch-lightning_version"]
    assert list(got["callbacks"]) == list(want["callbacks"]) and list(got["callbacks"])[0].startswith("ModelCheckpoint{")
    assert got["loops"] == want["loops"]
    assert got["lr_schedulers"] == want["lr_schedulers"]
    assert got["hyper_parameters"]["act"] is nn.ReLU
    extra = got["hyper_parameters"]["extra"]
    assert type(extra) is attribute_dict and extra == {"depth": 2, "name": "x"} and extra.depth == 2
    state = got["optimizer_states"][0]["state"]
    assert list(state) == list(want["optimizer_states"][0]["state"]) and all(type(k) is int for k in state)
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor)
    inert = SafeCheckpointIO().load_checkpoint(tmp_path / "manual.ckpt")["hyper_parameters"]["act"]
    assert isinstance(inert, safeckpt.GlobalRef) and inert.qualname == "ReLU"  # not allowed: not imported
    loaded = load_from_checkpoint(type(model), tmp_path / "manual.ckpt", allowed_globals=[nn.ReLU])
    assert isinstance(loaded.net[1], nn.ReLU)
    assert torch.equal(loaded.net[0].weight, model.net[0].weight)


@pytest.mark.parametrize("package", PACKAGES)
def test_legacy_ckpt_resumes_without_unpickling(package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    L = lightning_api(package)
    straight = fresh_model(package)
    trainer(L, tmp_path / "straight", 4, plugins=[]).fit(straight, data())
    old = fresh_model(package)
    legacy = trainer(L, tmp_path / "old", 2, plugins=[])  # Lightning's own torch.save checkpoints
    legacy.fit(old, data())
    legacy.save_checkpoint(tmp_path / "old.ckpt")
    assert detect(tmp_path / "old.ckpt") is Kind.TORCH_ZIP
    resumed = fresh_model(package, seed=2)
    with monkeypatch.context() as m:
        never_unpickles(m)
        t = trainer(L, tmp_path / "new", 4)
        t.fit(resumed, data(), ckpt_path=tmp_path / "old.ckpt")
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_malicious_legacy_ckpt_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {sentinel}",))

    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(safeckpt.UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not sentinel.exists()


def test_remove_and_missing(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, tmp_path / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt", map_location="cpu")["state_dict"]["w"], torch.ones(2))
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "b.ckpt", storage_options={"x": 1})


def test_both_trainers_accept_the_plugin() -> None:
    from lightning.fabric.plugins import CheckpointIO as UnifiedIO
    from lightning_fabric.plugins import CheckpointIO as StandaloneIO

    assert isinstance(SafeCheckpointIO(), UnifiedIO) and isinstance(SafeCheckpointIO(), StandaloneIO)
