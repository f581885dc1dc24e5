"""Uncertainty sampling: pure scoring functions of the class probabilities, and their strategies.

Each function maps an (N, C) array of probabilities to (N,) scores, larger = query first.
"""
from __future__ import annotations

import numpy as np
import torch

from . import register_strategy
from .base import QueryState, Strategy


def _as_array(probs) -> np.ndarray:
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected (N, C) probabilities, got shape {probs.shape}")
    return probs


def least_confidence(probs) -> np.ndarray:
    """1 - max_c p(c): how far the top class is from certainty."""
    return 1.0 - _as_array(probs).max(axis=1)


def margin(probs) -> np.ndarray:
    """-(p(top1) - p(top2)): a small gap between the two likeliest classes scores high."""
    probs = _as_array(probs)
    if probs.shape[1] < 2:
        return np.zeros(probs.shape[0])
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return -(top2[:, 1] - top2[:, 0])


def entropy(probs) -> np.ndarray:
    """-sum_c p log p, with 0 log 0 = 0 (no NaN at p = 0)."""
    probs = _as_array(probs)
    safe = np.where(probs > 0, probs, 1.0)
    return -(probs * np.log(safe)).sum(axis=1)


class UncertaintyStrategy(Strategy):
    """Scores the model's probabilities (dropout off) with a pure function."""

    score_function = staticmethod(entropy)

    def score(self, state: QueryState) -> np.ndarray:
        return self.score_function(state.unlabeled_probs())


@register_strategy
class LeastConfidence(UncertaintyStrategy):
    name = "least-confidence"
    help = "lowest probability of the predicted class"
    score_function = staticmethod(least_confidence)


@register_strategy
class MarginSampling(UncertaintyStrategy):
    name = "margin"
    help = "smallest gap between the two likeliest classes"
    score_function = staticmethod(margin)


@register_strategy
class EntropySampling(UncertaintyStrategy):
    name = "entropy"
    help = "highest entropy of the predicted class distribution"
    score_function = staticmethod(entropy)
