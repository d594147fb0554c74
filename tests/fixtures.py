"""A realistic NNHandler training checkpoint, built by really training a small model.

``make_training_state()`` returns ``(state, objects)``: ``state`` holds every key of
``NNHANDLER_STATE.md`` with a value of the kind NNHandler writes there, and
``objects`` holds the live model, optimizer, scheduler, loss and batch so that a
test can continue training after a save/load round trip.

Everything the state names (model, SDE, sampler and callback classes, metric
functions, ``collate_fn``, ``lr_lambda``) is defined at module level here, so it
is stored as a class/function reference and can be allowed back on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

VOCAB = 16
DIM = 8
BATCH = 6
SEED = 1234
NN_HANDLER_VERSION = "0.9.3"


class TinyModel(nn.Module):
    """Embedding -> BatchNorm1d -> Linear whose weight is the embedding's (tied)."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, hidden_act: str = "tanh") -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=True)
        self.out.weight = self.emb.weight  # tied: one Parameter under two state-dict names
        self.hidden_act = hidden_act

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens))
        h = torch.tanh(self.proj(h)) if self.hidden_act == "tanh" else torch.relu(self.proj(h))
        return self.out(h)


class VPSDE:
    """Stand-in for a score-based SDE class (only referenced, never instantiated in the state)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        self.beta_min, self.beta_max, self.N = beta_min, beta_max, N


class EulerMaruyamaSampler:
    """Stand-in for a sampler class."""

    def __init__(self, steps: int = 100, snr: float = 0.16) -> None:
        self.steps, self.snr = steps, snr


@dataclasses.dataclass
class SamplerState:
    """A plain-data object, as NNHandler's ``sampler_state_dict`` may be (ANY)."""

    step: int
    last_sigma: float
    history: list[float]


class EarlyStopping:
    """Stand-in for a callback class."""


class ModelCheckpoint:
    """Stand-in for another callback class."""


def lr_lambda(epoch: int) -> float:
    """A module-level learning-rate schedule function, as NNHandler keeps in ``scheduler_kwargs``."""
    return 0.95**epoch


def collate_fn(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A module-level collate function, as found in ``train_loader_kwargs``."""
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.stack(ys)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy metric."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


def top3_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-3 accuracy metric."""
    top = logits.topk(3, dim=-1).indices
    return (top == targets[:, None]).any(dim=-1).float().mean().item()


def make_batch(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of token ids and targets."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH,), generator=g)
    targets = torch.randint(0, VOCAB, (BATCH,), generator=g)
    return tokens, targets


def build_training(model_kwargs: dict[str, Any], optimizer_kwargs: dict[str, Any], seed: int) -> tuple[
    TinyModel, torch.optim.Adam, torch.optim.lr_scheduler.StepLR
]:
    """A fresh model, Adam optimizer and StepLR scheduler (the scheduler gets no lambda)."""
    torch.manual_seed(seed)
    model = TinyModel(**model_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), **optimizer_kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One optimisation step; returns the (detached) loss."""
    model.train()
    tokens, targets = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(tokens), targets)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def make_training_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """Train TinyModel for 3 steps and build the state NNHandler.save() would write.

    Returns:
        ``(state, objects)``; ``objects`` has ``model``, ``optimizer``, ``scheduler``,
        ``loss_fn``, ``batch``, ``model_kwargs``, ``optimizer_kwargs`` and ``seed``.
    """
    model_kwargs: dict[str, Any] = {"vocab": VOCAB, "dim": DIM, "hidden_act": "tanh"}
    optimizer_kwargs: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    model, optimizer, scheduler = build_training(model_kwargs, optimizer_kwargs, SEED)
    loss_fn = nn.CrossEntropyLoss()
    batch = make_batch()

    ema_decay = 0.99
    shadow = [p.detach().clone() for p in model.parameters()]
    train_losses: list[float] = []
    train_acc: list[float] = []
    for _ in range(3):
        loss = train_step(model, optimizer, scheduler, loss_fn, batch)
        train_losses.append(loss.item())
        with torch.no_grad():
            for s, p in zip(shadow, model.parameters()):
                s.mul_(ema_decay).add_(p.detach(), alpha=1 - ema_decay)
            train_acc.append(accuracy(model(batch[0]), batch[1]))

    state: dict[str, Any] = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "grad_scaler_state_dict": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "model_class": TinyModel,
        "model_kwargs": model_kwargs,
        "model_type": "classification",
        "optimizer_class": torch.optim.Adam,
        "optimizer_kwargs": optimizer_kwargs,
        "scheduler_class": torch.optim.lr_scheduler.StepLR,
        "scheduler_kwargs": {"step_size": 2, "gamma": 0.5, "lr_lambda": lr_lambda},
        "loss_fn": loss_fn,
        "loss_fn_kwargs": {"label_smoothing": 0.0},
        "pass_epoch_to_loss": False,
        "metrics": {"accuracy": accuracy, "top3_accuracy": top3_accuracy},
        "seed": SEED,
        "complimentary_kwargs": {"compile_model": False, "use_amp": False, "grad_clip_norm": None},
        "ddp_kwargs": {"find_unused_parameters": False, "broadcast_buffers": True},
        "train_loader_kwargs": {
            "batch_size": BATCH,
            "shuffle": True,
            "num_workers": 0,
            "pin_memory": False,
            "drop_last": True,
            "collate_fn": collate_fn,
            "generator": torch.Generator().manual_seed(SEED),
        },
        "val_loader_kwargs": {"batch_size": 2 * BATCH, "shuffle": False, "collate_fn": None},
        "train_losses": train_losses,
        "val_losses": [math.nan, 2.5, math.nan],
        "train_metrics_history": {"accuracy": train_acc, "top3_accuracy": [0.5, 0.5, 2 / 3]},
        "val_metrics_history": {"accuracy": [math.nan, 0.25, math.nan]},
        "auto_saver_state": {
            "save_interval": 1,
            "save_path": "runs/exp1/checkpoints",
            "start_epoch": 0,
            "overwrite": False,
            "last_saved_model": None,
            "save_model_code": True,
            "_model_code": inspect.getsource(TinyModel),
        },
        "ema_state_dict": {
            "decay": ema_decay,
            "num_updates": 3,
            "shadow_params": shadow,
            "collected_params": None,
        },
        "ema_decay": ema_decay,
        "sde_class": VPSDE,
        "sde_kwargs": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000},
        "sampler_class": EulerMaruyamaSampler,
        "sampler_kwargs": {"steps": 100, "snr": 0.16},
        "sampler_state_dict": SamplerState(step=3, last_sigma=0.25, history=[1.0, 0.5, 0.25]),
        "callback_classes": {"early_stopping": EarlyStopping, "checkpoint": ModelCheckpoint},
        "callback_states": {
            "early_stopping": {"best": math.inf, "wait": 0, "patience": 5, "mode": "min", "stopped": False},
            "checkpoint": {"best_score": -math.inf, "monitor": "val_accuracy", "last_path": None},
        },
        "nn_handler_version": NN_HANDLER_VERSION,
        "pytorch_version": torch.__version__,
    }
    objects: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "loss_fn": loss_fn,
        "batch": batch,
        "model_kwargs": model_kwargs,
        "optimizer_kwargs": optimizer_kwargs,
        "seed": SEED,
    }
    return state, objects


#: Every class and function the state references, for ``allowed_globals``.
STATE_GLOBALS: tuple[Any, ...] = (
    TinyModel,
    VPSDE,
    EulerMaruyamaSampler,
    SamplerState,
    EarlyStopping,
    ModelCheckpoint,
    lr_lambda,
    collate_fn,
    accuracy,
    top3_accuracy,
    torch.optim.Adam,
    torch.optim.lr_scheduler.StepLR,
    nn.CrossEntropyLoss,
    torch.Generator,
)


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, Any]]:
    """moto's S3 server on loopback with ``bucket`` made; yields the fsspec storage options."""
    import fsspec
    from moto.server import ThreadedMotoServer

    saved = dict(os.environ)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    os.environ.pop("AWS_PROFILE", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "skip_instance_cache": True}
        fsspec.filesystem("s3", **options).mkdir(bucket)
        yield options
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
