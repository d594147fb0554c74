"""The benchmark's training states, built deterministically.

Two cases:

* ``large``: a GPT-like model (token embedding, 24 blocks of attention + MLP +
  LayerNorms, final LayerNorm, untied head: 292 float32 tensors) plus its full
  Adam state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), about 1,170
  tensors in all. ``--size-mib`` is the whole checkpoint's tensor bytes (model
  about a third, Adam state two thirds), so that ``--size-mib 1536`` gives a
  1.5 GiB file; ``--model-mib`` sizes the model instead.
* ``small``: ``n`` tensors in all, a quarter of them model parameters of 8 to
  1,024 float32 elements, the rest their Adam state.

Both carry the NNHandler metadata of ``NNHANDLER_STATE.md`` (class and function
references, an ``nn.Module`` loss, a ``torch.Generator``, ``TorchVersion``,
nan/inf floats, histories, the model source text...).

Tensor data is generated once by :func:`generate` into a ``torch.save`` file of
plain tensors (the *source*); workers read it back with :func:`load_source`
(untimed) and :func:`assemble` the three views of the same tensors that the
competitors take:

* ``full``: the whole NNHandler state (safeckpt, ``torch.save``);
* ``tensors``: only ``model_state_dict`` + ``optimizer_state_dict``, the part
  ``torch.load(weights_only=True)`` can read back;
* ``flat``: ``{"<component>/<path>": tensor}``, what ``safetensors`` takes.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BLOCKS",
    "BenchModel",
    "Layout",
    "assemble",
    "generate",
    "iter_tensors",
    "large_layout",
    "load_source",
    "small_layout",
]

BLOCKS = 24
_BLOCK_PARTS = (  # (name, shape as a function of the width d)
    ("ln1.weight", lambda d: (d,)),
    ("ln1.bias", lambda d: (d,)),
    ("attn.qkv.weight", lambda d: (3 * d, d)),
    ("attn.qkv.bias", lambda d: (3 * d,)),
    ("attn.proj.weight", lambda d: (d, d)),
    ("attn.proj.bias", lambda d: (d,)),
    ("ln2.weight", lambda d: (d,)),
    ("ln2.bias", lambda d: (d,)),
    ("mlp.fc1.weight", lambda d: (4 * d, d)),
    ("mlp.fc1.bias", lambda d: (4 * d,)),
    ("mlp.fc2.weight", lambda d: (d, 4 * d)),
    ("mlp.fc2.bias", lambda d: (d,)),
)
_BLOCK_MODULES = ("ln1", "attn", "attn.qkv", "attn.proj", "ln2", "mlp", "mlp.fc1", "mlp.fc2")
_SMALL_SHAPES = ((8, 8), (8,), (16, 8), (16,), (32, 32), (32,), (24, 16), (24,), (1024,), (64, 16))


# --------------------------------------------------------------------------- classes the metadata references


class BenchModel(nn.Module):
    """Stands for the user's model class (only referenced in the state, never built)."""


class VPSDE:
    """Stand-in for a score-based SDE class."""


class EulerMaruyamaSampler:
    """Stand-in for a sampler class."""


class EarlyStopping:
    """Stand-in for a callback class."""


class ModelCheckpoint:
    """Stand-in for another callback class."""


def lr_lambda(epoch: int) -> float:
    """A module-level learning-rate schedule."""
    return 0.95**epoch


def collate_fn(batch: list[Any]) -> Any:
    """A module-level collate function."""
    return batch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy metric."""
    return (logits.argmax(-1) == targets).float().mean().item()


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """The model parameters of a case: ``(name, shape)`` in ``state_dict`` order, and the module names."""

    case: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    modules: tuple[str, ...]

    @property
    def model_bytes(self) -> int:
        return sum(4 * math.prod(shape) for _, shape in self.params)

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor of the checkpoint: the model, 2 Adam moments, one 4-byte ``step`` per parameter."""
        return 3 * self.model_bytes + 4 * len(self.params)

    @property
    def tensor_count(self) -> int:
        return 4 * len(self.params)


def large_layout(total_mib: float | None = None, model_mib: float | None = None) -> Layout:
    """The GPT-like model sized so the checkpoint holds about ``total_mib`` (or the model ``model_mib``)."""
    model_bytes = model_mib * 2**20 if model_mib is not None else (total_mib or 256) * 2**20 / 3
    # 12 d^2 per block, plus an embedding and a head of 16 d x d each
    width = max(8, 8 * round(math.sqrt(model_bytes / 4 / (12 * BLOCKS + 32)) / 8))
    vocab = 16 * width
    params: list[tuple[str, tuple[int, ...]]] = [("tok_emb.weight", (vocab, width))]
    modules = ["", "tok_emb"]
    for block in range(BLOCKS):
        for part, shape in _BLOCK_PARTS:
            params.append((f"blocks.{block}.{part}", shape(width)))
        modules.append(f"blocks.{block}")
        modules += [f"blocks.{block}.{m}" for m in _BLOCK_MODULES]
    params += [("ln_f.weight", (width,)), ("ln_f.bias", (width,)), ("head.weight", (vocab, width))]
    modules += ["ln_f", "head"]
    return Layout("large", tuple(params), tuple(modules))


def small_layout(tensors: int) -> Layout:
    """``tensors`` tensors in all: ``tensors // 4`` small parameters and their Adam state."""
    count = max(1, tensors // 4)
    params = []
    modules = [""]
    for i in range(count):
        layer, part = divmod(i, 2)
        shape = _SMALL_SHAPES[i % len(_SMALL_SHAPES)]
        params.append((f"layers.{layer}.{'weight' if part == 0 else 'bias'}", shape))
        if part == 0:
            modules.append(f"layers.{layer}")
    return Layout("small", tuple(params), tuple(modules))


# --------------------------------------------------------------------------- data


def generate(layout: Layout, path: str, seed: int = 0) -> None:
    """Write the source file: the model's tensors and both Adam moments, as plain tensors (``torch.save``)."""
    g = torch.Generator().manual_seed(seed)
    model: OrderedDict[str, torch.Tensor] = OrderedDict()
    exp_avg, exp_avg_sq = [], []
    for name, shape in layout.params:
        model[name] = torch.randn(shape, generator=g) * 0.02
        exp_avg.append(torch.randn(shape, generator=g) * 1e-3)
        exp_avg_sq.append(torch.rand(shape, generator=g) * 1e-6)
    torch.save({"model": model, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, path)


def load_source(path: str) -> dict[str, Any]:
    """Read the source file into fresh process memory (no mmap: like a state that lives in RAM during training)."""
    return torch.load(path, weights_only=True, mmap=False)


def _model_state_dict(layout: Layout, tensors: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    state = OrderedDict(tensors)
    state._metadata = OrderedDict((m, {"version": 1}) for m in layout.modules)  # type: ignore[attr-defined]
    return state


def _optimizer_state_dict(layout: Layout, source: dict[str, Any], steps: int) -> dict[str, Any]:
    state = {
        i: {"step": torch.tensor(float(steps)), "exp_avg": m, "exp_avg_sq": v}
        for i, (m, v) in enumerate(zip(source["exp_avg"], source["exp_avg_sq"]))
    }
    group = {
        "lr": 3e-4,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.1,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
        "params": list(range(len(layout.params))),
    }
    return {"state": state, "param_groups": [group]}


def _metadata(layout: Layout, epochs: int) -> dict[str, Any]:
    """Everything of the NNHandler state but the two state dicts."""
    losses = [2.0 / (1 + e) for e in range(epochs)]
    return {
        "scheduler_state_dict": {
            "step_size": 10, "gamma": 0.5, "base_lrs": [3e-4], "last_epoch": epochs,
            "verbose": False, "_step_count": epochs + 1, "_get_lr_called_within_step": False, "_last_lr": [3e-4],
        },
        "grad_scaler_state_dict": {
            "scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 0,
        },
        "model_class": BenchModel,
        "model_kwargs": {"case": layout.case, "parameters": len(layout.params), "dropout": 0.1, "activation": "gelu"},
        "model_type": "generative",
        "optimizer_class": torch.optim.AdamW,
        "optimizer_kwargs": {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
        "scheduler_class": torch.optim.lr_scheduler.StepLR,
        "scheduler_kwargs": {"step_size": 10, "gamma": 0.5, "lr_lambda": lr_lambda},
        "loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1),
        "loss_fn_kwargs": {"label_smoothing": 0.1},
        "pass_epoch_to_loss": False,
        "metrics": {"accuracy": accuracy},
        "seed": 1234,
        "complimentary_kwargs": {"compile_model": False, "use_amp": True, "grad_clip_norm": 1.0},
        "ddp_kwargs": {"find_unused_parameters": False, "broadcast_buffers": True},
        "train_loader_kwargs": {
            "batch_size": 32, "shuffle": True, "num_workers": 2, "pin_memory": False, "drop_last": True,
            "collate_fn": collate_fn, "generator": torch.Generator().manual_seed(1234),
        },
        "val_loader_kwargs": {"batch_size": 64, "shuffle": False, "collate_fn": None},
        "train_losses": losses,
        "val_losses": [math.nan if e % 2 else loss for e, loss in enumerate(losses)],
        "train_metrics_history": {"accuracy": [0.5 + e / (4 * epochs) for e in range(epochs)]},
        "val_metrics_history": {"accuracy": [math.nan] * epochs},
        "auto_saver_state": {
            "save_interval": 1, "save_path": "runs/bench/checkpoints", "start_epoch": 0, "overwrite": True,
            "last_saved_model": f"runs/bench/checkpoints/epoch_{epochs - 1}.pth", "save_model_code": True,
            "_model_code": inspect.getsource(_metadata),
        },
        "ema_state_dict": None,
        "ema_decay": None,
        "sde_class": VPSDE,
        "sde_kwargs": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000},
        "sampler_class": EulerMaruyamaSampler,
        "sampler_kwargs": {"steps": 100, "snr": 0.16},
        "sampler_state_dict": None,
        "callback_classes": {"early_stopping": EarlyStopping, "checkpoint": ModelCheckpoint},
        "callback_states": {
            "early_stopping": {"best": math.inf, "wait": 0, "patience": 5, "mode": "min", "stopped": False},
            "checkpoint": {"best_score": -math.inf, "monitor": "val_loss", "last_path": None},
        },
        "nn_handler_version": "0.9.3",
        "pytorch_version": torch.__version__,
    }


def assemble(
    layout: Layout, source: dict[str, Any], epochs: int = 50
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The three views of one set of tensors: ``(full, tensors, flat)`` (see the module docstring).

    All three share the same tensor objects; nothing is copied.
    """
    model = _model_state_dict(layout, source["model"])
    optimizer = _optimizer_state_dict(layout, source, steps=epochs * 100)
    tensors = {"model_state_dict": model, "optimizer_state_dict": optimizer}
    full = {"model_state_dict": model, "optimizer_state_dict": optimizer, **_metadata(layout, epochs)}
    flat = {f"model_state_dict/{name}": t for name, t in model.items()}
    for i, slots in optimizer["state"].items():
        for slot, t in slots.items():
            flat[f"optimizer_state_dict/state/{i}/{slot}"] = t
    return full, tensors, flat


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every distinct tensor inside dicts, lists and tuples of ``value`` (each once)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
