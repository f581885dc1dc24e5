"""Random network distillation: query what a predictor has not yet learned to imitate.

A target network of the classifier's architecture is drawn at random once per run (seeded) and
never trained. A predictor of the same architecture learns, on the labeled set, to reproduce the
target's penultimate features; it is fine-tuned across rounds rather than reset. Items far from
anything labeled keep a large prediction error, so the largest error is queried first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..seeding import Stream, torch_seed
from ..tensor_text import decode_tensors, encode_tensors
from ..train import DistillConfig, distill_student, embed_pool, fresh_copy
from . import register_strategy
from .base import QueryState, Strategy


@dataclass
class RNDOptions:
    """Options of the RND strategy (`--strategy-option key=value`)."""

    epochs: int = 10  # predictor epochs per round (the cap when saturate=true)
    saturate: bool = False  # train until the distillation loss stops improving, up to `epochs`
    lr: float = 1e-3  # predictor's Adam step size
    batch_size: int = 64  # images per predictor step
    reset: bool = False  # True: a fresh predictor every round (the default fine-tunes across rounds)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError("rnd needs epochs >= 1, batch_size >= 2 and a positive lr")


@register_strategy
class RandomNetworkDistillation(Strategy):
    name = "rnd"
    help = "random network distillation: largest error of a predictor of a fixed random network"
    Options = RNDOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.target: nn.Module | None = None
        self.predictor: nn.Module | None = None
        self.run_seed: int | None = None
        self.rounds_trained = 0
        self._saved_predictor: str | None = None  # from a resume, loaded once the architecture is known
        self._trained_key: tuple | None = None

    def _networks(self, state: QueryState) -> None:
        """Build the target (from the run's seed) and the predictor on first use or after a resume."""
        if self.target is None:
            self.run_seed = state.seed if self.run_seed is None else self.run_seed
            self.target = fresh_copy(state.model, torch_seed(self.run_seed, 0, Stream.RND_TARGET)).to(state.device)
            for parameter in self.target.parameters():
                parameter.requires_grad_(False)
        if self.predictor is None:
            self.predictor = fresh_copy(state.model, torch_seed(self.run_seed, 0, Stream.RND_PREDICTOR)).to(state.device)
            if self._saved_predictor is not None:
                self.predictor.load_state_dict(decode_tensors(self._saved_predictor))
                self.predictor.to(state.device)
                self._saved_predictor = None

    def train_predictor(self, state: QueryState) -> None:
        """Fine-tune the predictor on the labeled set (once per round)."""
        self._networks(state)
        labeled = state.labeled_indices
        key = (state.round_index, len(labeled), int(labeled.sum()))
        if self._trained_key == key:
            return
        if self.options.reset:
            self.predictor = fresh_copy(state.model, torch_seed(self.run_seed, state.round_index, Stream.RND_PREDICTOR)).to(state.device)
        targets = embed_pool(self.target, state.dataset, labeled, state.device, state.train_config.eval_batch_size)
        config = DistillConfig(lr=self.options.lr, batch_size=self.options.batch_size, max_epochs=self.options.epochs,
                               min_epochs=min(3, self.options.epochs), fixed_epochs=not self.options.saturate)
        result = distill_student(self.predictor, self.target, state.dataset, labeled, config, state.device,
                                 seed=torch_seed(self.run_seed, state.round_index, Stream.RND_ORDER), teacher_features=targets.clone())
        self.rounds_trained += 1
        self.diagnostics = {"predictor_epochs": result.epochs, "predictor_loss": result.final_loss,
                            "rounds_trained": self.rounds_trained}
        self._trained_key = key

    def score(self, state: QueryState) -> np.ndarray:
        self.train_predictor(state)
        batch = state.train_config.eval_batch_size
        unlabeled = state.unlabeled_indices
        with torch.inference_mode():
            predicted = embed_pool(self.predictor, state.dataset, unlabeled, state.device, batch)
            target = embed_pool(self.target, state.dataset, unlabeled, state.device, batch)
            return (predicted - target).pow(2).sum(1).double().cpu().numpy()

    # The target is redrawn from the run's seed on resume; the predictor's weights are saved.
    def state_dict(self) -> dict:
        if self.predictor is None:
            return {} if self._saved_predictor is None else {
                "run_seed": self.run_seed, "rounds_trained": self.rounds_trained, "predictor": self._saved_predictor}
        return {"run_seed": self.run_seed, "rounds_trained": self.rounds_trained,
                "predictor": encode_tensors(self.predictor.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.run_seed = int(state["run_seed"])
        self.rounds_trained = int(state.get("rounds_trained", 0))
        self._saved_predictor = state["predictor"]
        self.predictor = None
        self.target = None
