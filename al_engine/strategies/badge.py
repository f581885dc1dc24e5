"""BADGE (Ash et al., 2020): k-means++ seeding over the gradient embeddings of the last layer.

The gradient of the cross-entropy with respect to the last layer's weights, taking the predicted class
as the label, is the outer product g = (p - onehot(argmax p)) h^T, with p (C,) the probabilities and
h (D,) the penultimate feature. Its length grows with uncertainty, its direction carries diversity.
The (U, C*D) matrix is never built: ||g_i - g_j||^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i.a_j)(h_i.h_j),
so each k-means++ step costs O(U (C + D)).
"""
from __future__ import annotations

import numpy as np
import torch

from . import register_strategy
from .base import QueryState, Strategy
from .geometry import kmeans_plus_plus


@torch.inference_mode()
def gradient_factors(model, features: torch.Tensor) -> torch.Tensor:
    """(U, C) factor a = p - onehot(argmax p) of the gradient embedding a h^T (model in eval mode)."""
    probs = model.classify(features).softmax(dim=1)  # (U, C); dropout is off in eval mode
    factors = probs.clone()
    factors[torch.arange(len(probs), device=probs.device), probs.argmax(dim=1)] -= 1.0
    return factors


class GradientEmbeddings:
    """The implicit (U, C*D) gradient embeddings a_i h_i^T, held as their two factors."""

    def __init__(self, factors: torch.Tensor, features: torch.Tensor):
        self.factors = factors.double()  # (U, C)
        self.features = features.double()  # (U, D)
        self.sq_norms = (self.factors ** 2).sum(1) * (self.features ** 2).sum(1)  # (U,)

    def sq_distance_to(self, position: int) -> torch.Tensor:
        """(U,) squared distances of every embedding to embedding `position`."""
        inner = (self.factors @ self.factors[position]) * (self.features @ self.features[position])
        return (self.sq_norms + self.sq_norms[position] - 2 * inner).clamp_min(0)


@register_strategy
class Badge(Strategy):
    name = "badge"
    help = "k-means++ seeding over last-layer gradient embeddings (BADGE)"
    global_views = ("unlabeled_embeddings",)

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        features = state.unlabeled_embeddings()  # (U, D)
        embeddings = GradientEmbeddings(gradient_factors(state.model, features), features)
        first = int(torch.argmax(embeddings.sq_norms))  # as in the paper: start from the largest gradient
        picks = kmeans_plus_plus(len(features), k, state.rng, embeddings.sq_distance_to, first=first)
        # Score: each pick's distance to the nearest earlier pick (the first: its gradient's length).
        scores = [float(embeddings.sq_norms[picks[0]].sqrt())]
        for number in range(1, len(picks)):
            distances = embeddings.sq_distance_to(int(picks[number]))[torch.as_tensor(picks[:number])]
            scores.append(float(distances.min().sqrt()))
        return picks, np.asarray(scores)
