"""Training and inference loops: explicit `for epoch` loops over tensors held in memory.

The default trains until saturation (Adam, stop when the training loss stops improving, with an
epoch cap), because active-learning comparisons made on an undertrained model mislead. The
deep-active-learning literature's settings stay available as the preset `dal`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset
from .errors import ConfigError


@dataclass
class TrainConfig:
    """How the classifier is trained each round."""

    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3  # step size
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 0.0  # L2 penalty per step
    batch_size: int = 32  # images per step
    max_epochs: int = 200  # cap on passes over the labeled set
    min_epochs: int = 10  # never stop before this many passes
    patience: int = 8  # epochs without a relative improvement of `min_delta` before stopping
    min_delta: float = 0.01  # relative improvement of the epoch's mean training loss that counts
    fixed_epochs: bool = False  # True: always run max_epochs (the literature's protocol)
    augment: bool = False  # random shifts (and flips for natural images); off = normalisation only
    warm_start: bool = False  # continue from last round's weights instead of training from scratch
    eval_batch_size: int = 1024  # images per inference batch

    def validate(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from: adam, sgd")
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1:
            raise ConfigError("lr must be positive, batch size and epochs at least 1")


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Train until the training loss saturates: reaches ~81% on Fashion-MNIST at 1000 labels.
    "saturate": TrainConfig(),
    # The deep-active-learning repository's defaults, to reproduce published set-ups.
    "dal": TrainConfig(optimizer="sgd", lr=0.01, momentum=0.5, batch_size=64, max_epochs=10,
                       fixed_epochs=True),
    # The seed's CIFAR-10 / ResNet-18 set-up: SGD with momentum, augmentation on.
    "resnet-cifar": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128,
                                max_epochs=100, patience=8, augment=True),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; choose from: {', '.join(sorted(TRAIN_PRESETS))}")
    config = replace(TRAIN_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' = CUDA when present, else CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return device


@dataclass
class TrainResult:
    epochs: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def augment_batch(images: torch.Tensor, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side (zero padding), and horizontal flips when `flip`."""
    batch, _, height, width = images.shape
    pad = max(1, height // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).tolist()
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + height, dx[i]:dx[i] + width] for i in range(batch)])
    if flip:
        mask = torch.rand(batch, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


def _epoch_batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # a batch of one breaks batch norm
        batches[-2] = torch.cat([batches[-2], batches[-1]])
        batches.pop()
    return batches


class Saturation:
    """The stopping rule shared by classifier and student training: stop once the epoch's mean loss
    has not improved by `min_delta` (relative) for `patience` epochs, after at least `min_epochs`;
    never when `fixed_epochs`. Reads those four fields from any config that has them."""

    def __init__(self, config):
        self.config = config
        self.best = math.inf
        self.stale = 0

    def reached(self, epoch: int, loss: float) -> bool:
        if self.config.fixed_epochs:
            return False
        if loss < self.best * (1 - self.config.min_delta):
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return epoch + 1 >= self.config.min_epochs and self.stale >= self.config.patience


def run_epochs(batch_loss: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               count: int, config, generator: torch.Generator, device: torch.device,
               on_epoch_end: Callable[[int, float], None] | None = None) -> list[float]:
    """The epoch loop shared by classifier and student training: shuffled mini-batches of `count`
    items, one optimizer step each, until the config's `Saturation` rule or its epoch cap.
    `batch_loss(batch_indices)` returns the mean loss of one batch. Returns each epoch's mean loss."""
    losses: list[float] = []
    saturation = Saturation(config)
    for epoch in range(config.max_epochs):
        total, seen = 0.0, 0
        for batch in _epoch_batches(count, config.batch_size, generator):
            batch = batch.to(device)
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        epoch_loss = total / seen
        losses.append(epoch_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_loss)
        if saturation.reached(epoch, epoch_loss):
            break
    return losses


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    seed: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model` in place on pool items `indices` with answers `labels` (cross-entropy)."""
    start = time.perf_counter()
    model.to(device).train()
    # The labeled items stay in their stored type (uint8 pixels: a quarter of float32, which matters
    # at 224 px) and each batch is normalised as it is used; normalisation is elementwise, so this
    # gives the same numbers as normalising them all up front.
    images = dataset.train_images[torch.as_tensor(indices, dtype=torch.long)].to(device)
    targets = torch.as_tensor(labels, dtype=torch.long, device=device)
    if len(targets) == 0:
        return TrainResult(0, math.nan, 0.0)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model.parameters(), config)
    # Shifts and flips are for pictures: on backbone features (N, F, 1, 1) they would zero them out.
    augment = config.augment and not dataset.is_features

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = dataset.normalize(images[batch])
        if augment:
            inputs = augment_batch(inputs.cpu(), dataset.flip_augment, generator).to(device)
        return F.cross_entropy(model(inputs), targets[batch])

    losses = run_epochs(batch_loss, optimizer, len(targets), config, generator, device, on_epoch_end)
    model.eval()
    return TrainResult(len(losses), losses[-1], time.perf_counter() - start, losses)


# --------------------------------------------------------------------------------------------
# Inference over the pool, in batches, under inference mode


def image_batches(dataset: Dataset, indices: np.ndarray | None, batch_size: int, device: torch.device,
                  split: str = "train") -> Iterator[torch.Tensor]:
    """Normalised image batches for pool `indices` (all items when None) of the given split."""
    images = dataset.train_images if split == "train" else dataset.test_images
    if indices is None:
        indices = np.arange(images.shape[0])
    indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    for chunk in indices.split(batch_size):
        yield dataset.normalize(images[chunk].to(device))


@torch.inference_mode()
def predict_logits(model: nn.Module, dataset: Dataset, indices: np.ndarray | None, device: torch.device,
                   batch_size: int = 1024, split: str = "train") -> torch.Tensor:
    """(N, C) logits for pool `indices`, model in eval mode (dropout off)."""
    model.to(device).eval()
    out = [model(batch) for batch in image_batches(dataset, indices, batch_size, device, split)]
    return torch.cat(out) if out else torch.empty(0, getattr(model, "num_classes", 0), device=device)


def predict_proba(model, dataset, indices, device, batch_size=1024, split="train") -> torch.Tensor:
    """(N, C) class probabilities."""
    return predict_logits(model, dataset, indices, device, batch_size, split).softmax(dim=1)


@torch.inference_mode()
def embed_pool(model: nn.Module, dataset: Dataset, indices: np.ndarray | None, device: torch.device,
               batch_size: int = 1024, split: str = "train") -> torch.Tensor:
    """(N, embed_dim) penultimate features."""
    model.to(device).eval()
    out = [model.embed(batch) for batch in image_batches(dataset, indices, batch_size, device, split)]
    return torch.cat(out) if out else torch.empty(0, model.embed_dim, device=device)


def evaluate_accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024) -> float | None:
    """Accuracy on the held-out test split; None when the dataset has none."""
    if dataset.test_images is None or dataset.test_labels is None or len(dataset.test_labels) == 0:
        return None
    predictions = predict_logits(model, dataset, None, device, batch_size, split="test").argmax(dim=1).cpu()
    return float((predictions == dataset.test_labels).float().mean())


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)


# --------------------------------------------------------------------------------------------
# Student distillation (the seed's lookahead strategy, and RND's predictor)


@dataclass
class DistillConfig:
    """How a student learns to reproduce a frozen teacher's penultimate features."""

    loss: str = "l2"  # "l2": per-example squared distance; "mean": squared distance of the batch means
    lr: float = 1e-3  # Adam step size
    batch_size: int = 64  # images per step
    max_epochs: int = 40  # cap on passes over the distillation set
    min_epochs: int = 5  # never stop before this many passes
    patience: int = 4  # epochs without a relative improvement of `min_delta` before stopping
    min_delta: float = 0.01  # relative improvement of the epoch's mean loss that counts
    fixed_epochs: bool = False  # True: always run max_epochs; False: stop when the loss saturates

    def validate(self) -> None:
        if self.loss not in ("l2", "mean"):
            raise ConfigError(f"unknown distillation loss {self.loss!r}; choose from: l2, mean")
        if self.lr <= 0 or self.batch_size < 2 or self.max_epochs < 1:
            raise ConfigError("distillation lr must be positive, batch size at least 2 and epochs at least 1")


def distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, D), (B, D) -> scalar: mean over the batch of ||s - t||^2, or ||mean(s) - mean(t)||^2."""
    if kind == "mean":
        return (student_features.mean(0) - teacher_features.mean(0)).pow(2).sum()
    return (student_features - teacher_features).pow(2).sum(1).mean()


def distill_student(student: nn.Module, teacher: nn.Module, dataset: Dataset, indices: np.ndarray,
                    config: DistillConfig, device: torch.device, seed: int = 0,
                    teacher_features: torch.Tensor | None = None,
                    on_epoch_end: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `student.embed` in place so that it matches the frozen `teacher.embed` on pool `indices`.

    The student trains in train mode, as any network does: batch norm normalises each mini-batch
    by its own statistics (in eval mode right after `fresh_copy` it would divide by the reset
    running variance of 1, and the student would in effect train without batch norm). Afterwards
    the running statistics are measured again over the whole distillation set with the final
    weights (`remeasure_batch_norm`), and the student is returned in eval mode: the function the
    lookahead scores and perturbs. Without batch norm the two modes compute the same `embed`
    (dropout sits only in the head). `teacher_features` (N, D) may be given to skip recomputing them.
    """
    config.validate()
    start = time.perf_counter()
    student.to(device).train()
    images = dataset.train_images[torch.as_tensor(indices, dtype=torch.long)].to(device)  # normalised per batch
    if teacher_features is None:
        teacher_features = embed_pool(teacher, dataset, indices, device)
    targets = teacher_features.detach().to(device).clone()  # (N, D) what the student must reproduce
    if len(targets) == 0:
        return TrainResult(0, math.nan, 0.0)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student.embed(dataset.normalize(images[batch])), targets[batch], config.loss)

    losses = run_epochs(batch_loss, optimizer, len(targets), config, generator, device, on_epoch_end)
    remeasure_batch_norm(student, dataset, images, config.batch_size)
    student.eval()
    return TrainResult(len(losses), losses[-1], time.perf_counter() - start, losses)


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def remeasure_batch_norm(model: nn.Module, dataset: Dataset, images: torch.Tensor, batch_size: int) -> None:
    """Reset every batch-norm layer's running statistics and measure them again as the equal-weight
    average over mini-batches of `images` (stored pixels, normalised here) of `model.embed`'s
    batch statistics, with the weights as they are now (what torch.optim.swa_utils.update_bn does).
    A network without batch norm is left untouched."""
    layers = batch_norm_layers(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
    model.train()
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if len(chunk) < 2 and start > 0:  # a batch of one has no batch statistics
            break
        model.embed(dataset.normalize(chunk))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()


@torch.inference_mode()
def feature_distance(student: nn.Module, teacher: nn.Module, dataset: Dataset, indices: np.ndarray,
                     device: torch.device, batch_size: int = 1024) -> float:
    """Mean over pool `indices` of ||student.embed(x) - teacher.embed(x)||^2 (how well a student distils)."""
    total, count = 0.0, 0
    student.to(device).eval()
    teacher.to(device).eval()
    for batch in image_batches(dataset, indices, batch_size, device):
        total += float((student.embed(batch) - teacher.embed(batch)).pow(2).sum())
        count += len(batch)
    return total / max(count, 1)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A network of the same architecture as `model`, re-initialised from `seed` (eval mode)."""
    import copy

    clone = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    torch.random.set_rng_state(generator_state)
    for parameter in clone.parameters():
        parameter.requires_grad_(True)
    return clone.eval()
