"""TorchScript archives: weights read as data, code never run.

Every model is built here with ``torch.jit.script`` or ``torch.jit.trace``; what
safeckpt reads must equal ``torch.jit.load(...).state_dict()`` bit for bit, in
the same order, with tied weights still shared. ``torch.jit.load`` and
``torch.load`` are replaced by tripwires while safeckpt reads (the sentinel that
proves nothing of torch's loader, hence no code, ran).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import safeckpt
from safeckpt.legacy.torchscript import parse_code


class Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.extra = torch.zeros(3)  # a tensor attribute that is neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) + self.extra.sum() + self.scratch


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = Sub()
        self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.head = nn.Linear(2, 2)
        self.tail = nn.Linear(2, 2, bias=False)
        self.tail.weight = self.head.weight  # tied
        self.scale = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sub(x)
        for layer in self.layers:
            x = layer(x)
        return self.tail(self.head(x)) * self.scale.float()


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        self.table = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Embedding(5, 2)})
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean() + self.table["a"].weight.sum() + self.table["b"].weight.sum() + self.steps


def _scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


def _traced(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), torch.randn(4, 1, 6, 6))


MODELS: dict[str, Callable[[], torch.jit.ScriptModule]] = {
    "scripted_nested": lambda: _scripted(Net()),
    "scripted_conv_moduledict": lambda: _scripted(Conv()),
    "traced_conv": lambda: _traced(Conv()),
    "scripted_plain_linear": lambda: _scripted(nn.Linear(4, 3)),
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fired: list[str] = []

    def trip(name: str) -> Callable[..., None]:
        def fire(*args: object, **kwargs: object) -> None:
            fired.append(name)
            raise AssertionError(f"{name} called")

        return fire

    monkeypatch.setattr(torch.jit, "load", trip("torch.jit.load"))
    monkeypatch.setattr(torch, "load", trip("torch.load"))
    monkeypatch.setattr(torch._C, "import_ir_module", trip("import_ir_module"))
    return fired


@pytest.fixture(params=sorted(MODELS))
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = MODELS[request.param]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / f"{request.param}.jit"
    model.save(str(path))
    expected = torch.jit.load(str(path)).state_dict()
    return path, dict(expected)


def test_load_gives_the_state_dict_bit_for_bit(archive: tuple[Path, dict[str, torch.Tensor]], tripwires: list[str]) -> None:
    path, expected = archive
    loaded = safeckpt.load(path)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert _same_bits(loaded[name], tensor), name
    assert not tripwires


def test_tied_weights_stay_tied_and_non_state_tensors_are_left_out(tmp_path: Path, tripwires: list[str]) -> None:
    path = tmp_path / "net.jit"
    _scripted(Net()).save(str(path))
    loaded = safeckpt.load(path)
    assert loaded["head.weight"].data_ptr() == loaded["tail.weight"].data_ptr()
    assert "sub.extra" not in loaded  # a plain tensor attribute is not state
    assert "sub.scratch" in loaded  # TorchScript keeps non-persistent buffers in state_dict()
    assert "sub.bn.running_mean" in loaded and "sub.bn.num_batches_tracked" in loaded
    assert not tripwires


def test_convert_writes_the_weights_under_state_dict_names(
    archive: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, tripwires: list[str]
) -> None:
    path, expected = archive
    out = safeckpt.convert(path, tmp_path / "out.safeckpt")
    back = safeckpt.load(out)
    assert list(back) == list(expected)
    for name, tensor in expected.items():
        assert _same_bits(back[name], tensor), name
    assert not tripwires


def test_scan_says_suspicious_with_what_the_code_holds(archive: tuple[Path, dict[str, torch.Tensor]], tripwires: list[str]) -> None:
    path, _ = archive
    report = safeckpt.scan(path)
    assert report.format == "torchscript"
    assert report.verdict == "suspicious"
    [finding] = [f for f in report.findings if f.kind == "torchscript"]
    assert "TorchScript: code present, not executed" in finding.message
    assert "__torch__" in finding.message and "code files" in finding.message
    assert not report.dangerous_globals
    assert not tripwires


def test_code_is_read_as_text_only() -> None:
    text = (
        "class M(Module):\n"
        '  __parameters__ = ["weight", "we\\"ird", ]\n'
        '  __buffers__ = ["running_mean", ]\n'
        "  def forward(self):\n"
        '    __parameters__ = ["not", "this"]\n'
        "    return __import__('os').system('x')\n"
        "class Helper(object):\n"
        "  x : int\n"
    )
    classes = parse_code({"code/__torch__/pkg.py": text})
    m = classes["__torch__.pkg:M"]
    assert m.is_module and m.parameters == ("weight", 'we"ird') and m.buffers == ("running_mean",)
    assert not classes["__torch__.pkg:Helper"].is_module


def test_unreadable_declaration_is_a_format_error() -> None:
    with pytest.raises(safeckpt.CheckpointFormatError):
        parse_code({"code/__torch__.py": "class M(Module):\n  __parameters__ = [weight]\n"})
