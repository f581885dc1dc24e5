"""Uncertainty sampling: pure scoring functions of the class probabilities, and their strategies.

Each function maps an (N, C) array of probabilities to (N,) scores, larger = query first;
`bald` maps (T, N, C) Monte-Carlo dropout samples to (N,). Ties are left to `top_k`, which breaks
them by pool position, so equal scores never make a query depend on sort stability.
"""
from __future__ import annotations

import numpy as np
import torch

from . import register_strategy
from .base import QueryState, Strategy


def _as_float_array(values, ndim: int, shape_name: str) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array, checked to have `ndim` axes."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != ndim:
        raise ValueError(f"expected {shape_name}, got shape {values.shape}")
    return values


def _as_array(probs) -> np.ndarray:
    return _as_float_array(probs, 2, "(N, C) probabilities")


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


def _entropy_last_axis(probs: np.ndarray) -> np.ndarray:
    safe = np.where(probs > 0, probs, 1.0)  # 0 log 0 = 0: log(1) = 0 where p = 0
    return -(probs * np.log(safe)).sum(axis=-1)


def entropy(probs) -> np.ndarray:
    """-sum_c p log p, with 0 log 0 = 0 (no NaN at p = 0)."""
    return _entropy_last_axis(_as_array(probs))


def _as_samples(mc_probs) -> np.ndarray:
    return _as_float_array(mc_probs, 3, "(T, N, C) dropout samples")


def bald(mc_probs) -> np.ndarray:
    """Mutual information between the label and the dropout mask: H(mean_t p_t) - mean_t H(p_t).

    High when the samples disagree with each other (each confident, about different classes);
    zero when every sample says the same thing, however uncertain that thing is.
    """
    mc_probs = _as_samples(mc_probs)
    mean_probs = mc_probs.mean(axis=0)  # (N, C)
    information = _entropy_last_axis(mean_probs) - _entropy_last_axis(mc_probs).mean(axis=0)
    return np.maximum(information, 0.0)  # >= 0 exactly; float error may leave -1e-17


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
