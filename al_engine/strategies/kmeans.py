"""k-means sampling: cluster the unlabeled pool's embeddings into k clusters, query the point nearest each centre."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from . import register_strategy
from .base import QueryState, Strategy
from .geometry import kmeans


@dataclass
class KMeansOptions:
    max_iter: int = 50  # Lloyd iterations at most
    tol: float = 1e-4  # stop when centres move less than this fraction of the data's variance

    def validate(self) -> None:
        if self.max_iter < 1 or self.tol < 0:
            raise ConfigError("kmeans needs max_iter >= 1 and tol >= 0")


@register_strategy
class KMeansSampling(Strategy):
    name = "kmeans"
    help = "k-means over the pool's embeddings; the point nearest each centre"
    Options = KMeansOptions
    global_views = ("unlabeled_embeddings",)

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        features = state.unlabeled_embeddings()  # (U, D)
        result = kmeans(features, k, state.rng, self.options.max_iter, self.options.tol)
        return nearest_to_centers(result.assignment, result.sq_distance, k)


def nearest_to_centers(assignment: torch.Tensor, sq_distance: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One pick per cluster, the member nearest its centre, largest clusters first; the score is the cluster's size.

    Clusters can end up empty (k-means keeps their centre), so fewer than k clusters may have members;
    the remaining picks are the next-nearest members of the largest clusters, never a point twice.
    """
    assignment = assignment.cpu().numpy()
    sq_distance = sq_distance.double().cpu().numpy()
    sizes = np.bincount(assignment)
    # Every point ranked by (rank within its cluster by distance, cluster size desc, cluster id, position).
    order = np.lexsort((np.arange(len(assignment)), sq_distance, assignment))  # by cluster, then distance
    rank_in_cluster = np.empty(len(assignment), dtype=np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    sorted_clusters = assignment[order]
    rank_in_cluster[order] = np.arange(len(order)) - starts[sorted_clusters]
    ranking = np.lexsort((np.arange(len(assignment)), assignment, -sizes[assignment], rank_in_cluster))
    picks = ranking[:k]
    return picks, sizes[assignment[picks]].astype(np.float64)
