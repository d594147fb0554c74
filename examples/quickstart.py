"""safeckpt quickstart: train a tiny model, save it without pickle, look inside, load it back, resume, convert a legacy file.

Run: python examples/quickstart.py [--out DIR]
Everything it writes goes to DIR (a fresh temporary directory by default).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import safeckpt


class TinyNet(nn.Module):
    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the files (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="safeckpt-quickstart-"))

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = train(model, optimizer, x, y, steps=5)
    print(f"trained TinyNet for 5 steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    state = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "model_class": TinyNet,
        "model_kwargs": {"features": 8, "classes": 3},
        "optimizer_class": torch.optim.Adam,
        "loss_fn": nn.CrossEntropyLoss(),
        "train_losses": losses,
        "val_losses": [float("nan")] * len(losses),
        "seed": 0,
        "pytorch_version": torch.__version__,
    }
    path = safeckpt.save_single_file(None, state, out / "tiny.safeckpt")
    print(f"saved the training state without pickle: {path} ({path.stat().st_size} bytes)")

    with safeckpt.open(path) as ckpt:
        print(f"  components: {ckpt.components()}")
        for key, info in ckpt.info().items():
            if info.tensors:
                print(f"  {key}: {info.tensors} tensors, {info.bytes} bytes, {', '.join(info.dtypes)}")
        print(f"  written by safeckpt {ckpt.metadata['library_version']} with torch {ckpt.metadata['torch_version']}")

    inert = safeckpt.load(path)
    print(f"loaded with nothing allowed: model_class = {inert['model_class']!r} (inert, nothing imported)")

    loaded = safeckpt.load(path, allowed_globals=[TinyNet, torch.optim.Adam], verify=True)
    print(f"loaded with TinyNet and Adam allowed and digests verified: model_class = {loaded['model_class'].__name__}")
    restored = loaded["model_class"](**loaded["model_kwargs"])
    restored.load_state_dict(loaded["model_state_dict"], strict=True)
    restored_opt = loaded["optimizer_class"](restored.parameters(), lr=1e-2)
    restored_opt.load_state_dict(loaded["optimizer_state_dict"])

    next_original = train(model, optimizer, x, y, steps=1)[0]
    next_restored = train(restored, restored_opt, x, y, steps=1)[0]
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    print(f"resumed: next-step loss {next_restored:.6f} vs original {next_original:.6f}; weights bit-identical: {same}")
    if not same or next_original != next_restored:
        raise SystemExit("resume mismatch")

    legacy = out / "tiny_legacy.pth"
    torch.save(state, legacy)  # what most checkpoints in the wild are: a pickle
    report = safeckpt.scan(legacy)
    print(f"scanned the legacy torch.save file {legacy.name}: {report.verdict}, "
          f"{len(report.globals)} globals referenced, none executed")
    converted = safeckpt.convert(legacy, out / "tiny_converted.safetensors")
    back = safeckpt.load(converted)
    same_weights = all(torch.equal(back["model_state_dict"][k], v) for k, v in state["model_state_dict"].items())
    print(f"converted it without running its pickle: {converted.name}; weights identical: {same_weights}; "
          f"model_class = {back['model_class']!r}")
    if not same_weights:
        raise SystemExit("conversion mismatch")
    print(f"done; files are in {out}")


if __name__ == "__main__":
    main()
