"""Monte-Carlo dropout: least-confidence, margin and entropy of the mean of T dropout samples, and BALD.

The project's models put dropout only before the last linear layer (`classify = fc_out(dropout(h))`),
so T samples need the trunk's features `h` once and the cheap head T times; this is exactly the
distribution of T full stochastic forward passes, not an approximation. A model with dropout anywhere
in its trunk (or `full_passes=true`) gets T full forward passes with only the dropout layers switched on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..train import image_batches
from . import register_strategy
from .base import QueryState, Strategy
from .uncertainty import bald, entropy, least_confidence, margin


@dataclass
class DropoutOptions:
    samples: int = 10  # T, stochastic forward passes per image
    full_passes: bool = False  # True: run the whole network T times (the reference's way; slow)

    def validate(self) -> None:
        from ..errors import ConfigError

        if self.samples < 1:
            raise ConfigError(f"option samples must be at least 1, got {self.samples}")


def trunk_has_dropout(model: nn.Module) -> bool:
    """True when a dropout layer other than the head's sits in the model (head-only sampling would be wrong)."""
    head = getattr(model, "dropout", None)
    return any(isinstance(module, nn.modules.dropout._DropoutNd) and module is not head
               for module in model.modules())


def _head_samples(model: nn.Module, features: torch.Tensor, samples: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(T, B, C) probabilities of the head `fc_out(dropout(features))` under T seeded dropout masks."""
    rate = float(model.dropout.p)
    keep = 1.0 - rate
    expanded = features.unsqueeze(0).expand(samples, *features.shape)  # (T, B, D)
    if rate > 0:
        mask = torch.empty(expanded.shape, device=features.device).bernoulli_(keep, generator=generator)
        expanded = expanded * mask / keep  # inverted dropout, as nn.Dropout does in training mode
    return model.fc_out(expanded).softmax(dim=-1)


def _full_samples(model: nn.Module, images: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """(T, B, C) probabilities from T full forward passes with the dropout layers (only) in training mode."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            for module in dropouts:
                module.train()
            return torch.stack([model(images).softmax(dim=-1) for _ in range(samples)])
        finally:
            for module in dropouts:
                module.eval()


@torch.inference_mode()
def mc_dropout_scores(state: QueryState, samples: int, reduce: Callable[[torch.Tensor], np.ndarray],
                      full_passes: bool = False) -> np.ndarray:
    """(U,) scores `reduce((T, B, C) samples)` over the unlabeled pool, batch by batch (memory O(U))."""
    model = state.model
    seed = int(state.rng.integers(2**31 - 1))
    batch_size = state.train_config.eval_batch_size
    scores = []
    if full_passes or trunk_has_dropout(model) or not hasattr(model, "fc_out"):
        for number, images in enumerate(image_batches(state.dataset, state.unlabeled_indices, batch_size,
                                                      state.device)):
            scores.append(reduce(_full_samples(model, images, samples, seed + number)))
    else:
        generator = torch.Generator(device=state.device).manual_seed(seed)
        features = state.unlabeled_embeddings()  # (U, D), the trunk run once
        for block in features.split(batch_size):
            scores.append(reduce(_head_samples(model, block, samples, generator)))
    return np.concatenate(scores) if scores else np.empty(0)


class DropoutStrategy(Strategy):
    """Scores T dropout samples; uncertainty variants score the mean of the samples."""
    # MC dropout samples only the head (dropout sits before the last layer), from one seeded stream
    # over the pool: gathering the trunk's features keeps the picks those of one process.
    global_views = ("unlabeled_embeddings",)

    Options = DropoutOptions
    score_function = staticmethod(entropy)

    def reduce(self, samples: torch.Tensor) -> np.ndarray:
        return self.score_function(samples.mean(dim=0))

    def score(self, state: QueryState) -> np.ndarray:
        return mc_dropout_scores(state, self.options.samples, self.reduce, self.options.full_passes)


@register_strategy
class LeastConfidenceDropout(DropoutStrategy):
    name = "least-confidence-dropout"
    help = "least confidence of the mean of T MC-dropout samples"
    score_function = staticmethod(least_confidence)


@register_strategy
class MarginDropout(DropoutStrategy):
    name = "margin-dropout"
    help = "smallest top-two gap of the mean of T MC-dropout samples"
    score_function = staticmethod(margin)


@register_strategy
class EntropyDropout(DropoutStrategy):
    name = "entropy-dropout"
    help = "highest entropy of the mean of T MC-dropout samples"
    score_function = staticmethod(entropy)


@register_strategy
class BALD(DropoutStrategy):
    name = "bald"
    help = "mutual information between label and dropout mask (BALD), T MC-dropout samples"

    def reduce(self, samples: torch.Tensor) -> np.ndarray:
        return bald(samples)
