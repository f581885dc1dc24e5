"""TypiClust (Hacohen, Dekel and Weinshall, 2022): the most typical point of the largest uncovered clusters.

The whole pool (labeled and unlabeled) is clustered into (labeled + k) clusters; each pick comes from the
cluster with the fewest labeled-or-picked points, the largest first, and is that cluster's most typical
unlabeled point: typicality = 1 / mean distance to its K nearest neighbours inside the cluster.

Which features are clustered (option `features`):
- "auto" (default): the frozen backbone's features when the run has them (`--weights`: the dataset
  the model reads holds features, e.g. the self-supervised ones of `app.py pretrain`, as the paper
  does with SimCLR), L2-normalised; otherwise the classifier's penultimate features (`embed(x)`),
  which every model of the project has.
- "backbone": the backbone's features, refused when the run has none.
- "model": the classifier's penultimate features, always.

`typiclust_picks` is the selection on given points; the engine's cold start (`--initial-strategy
typiclust`, no model yet) calls it with the backbone's features, or the pool's standardised pixels
when the run has no backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from . import register_strategy
from .base import QueryState, Strategy
from .geometry import kmeans, squared_distances


@dataclass
class TypiclustOptions:
    neighbours: int = 20  # K of the typicality's K nearest neighbours
    min_cluster_size: int = 5  # smaller clusters are skipped while larger ones remain
    max_clusters: int = 5000  # cap on labeled + k clusters
    max_iter: int = 30  # Lloyd iterations at most
    features: str = "auto"  # auto (backbone's when the run has them), backbone, model

    def validate(self) -> None:
        if self.neighbours < 1 or self.min_cluster_size < 1 or self.max_clusters < 1 or self.max_iter < 1:
            raise ConfigError("typiclust options must all be at least 1")
        if self.features not in FEATURE_SOURCES:
            raise ConfigError(f"typiclust features={self.features!r}; choose from: {', '.join(FEATURE_SOURCES)}")


FEATURE_SOURCES = ("auto", "backbone", "model")


def backbone_points(dataset, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, F) L2-normalised backbone features of pool `indices` (a feature dataset's items)."""
    rows = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    features = dataset.train_images[rows].flatten(1).float().to(device)
    return torch.nn.functional.normalize(features, dim=1)


def pixel_points(dataset, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, C*H*W) standardised pixels of pool `indices`: the cold start's points when there is no backbone."""
    rows = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return dataset.normalize(dataset.train_images[rows].to(device)).flatten(1)


def typicality(points: torch.Tensor, neighbours: int, block: int = 2048) -> torch.Tensor:
    """(M,) 1 / mean distance to each point's `neighbours` nearest others in `points` (M, D), in row blocks."""
    count = points.shape[0]
    if count == 1:
        return torch.ones(1, dtype=points.dtype, device=points.device)
    neighbours = min(neighbours, count - 1)
    values = []
    for start in range(0, count, block):
        distances = squared_distances(points[start:start + block], points)  # (B, M)
        rows = torch.arange(start, min(start + block, count), device=points.device)
        distances[rows - start, rows] = float("inf")  # a point is not its own neighbour
        nearest_sq = distances.topk(neighbours, dim=1, largest=False).values
        values.append(1.0 / (nearest_sq.sqrt().mean(dim=1) + 1e-12))
    return torch.cat(values)


@register_strategy
class Typiclust(Strategy):
    name = "typiclust"
    help = "most typical point of the largest clusters without a labeled point (TypiClust)"
    Options = TypiclustOptions
    global_views = ("unlabeled_embeddings",)

    def points(self, state: QueryState) -> tuple[torch.Tensor, torch.Tensor]:
        """(unlabeled (U, D), labeled (L, D)) points to cluster, as the `features` option says."""
        source = self.options.features
        if source == "backbone" and not state.dataset.is_features:
            raise ConfigError("typiclust features=backbone needs a run with --weights (frozen backbone features)")
        if source == "backbone" or (source == "auto" and state.dataset.is_features):
            self.diagnostics = {"features": "backbone"}
            return (state._cached("typiclust_unlabeled", lambda: backbone_points(
                        state.dataset, state.unlabeled_indices, state.device)),
                    backbone_points(state.dataset, state.labeled_indices, state.device))
        self.diagnostics = {}
        return state.unlabeled_embeddings(), state.labeled_embeddings()

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        unlabeled, labeled = self.points(state)
        return typiclust_picks(unlabeled, labeled, k, state.rng, self.options)


def typiclust_picks(unlabeled: torch.Tensor, labeled: torch.Tensor, k: int, rng: np.random.Generator,
                    options: TypiclustOptions) -> tuple[np.ndarray, np.ndarray]:
    """Positions into `unlabeled` (U, D) of k picks, in pick order, and their typicality; `labeled` (L, D)
    (possibly empty) takes part in the clustering and covers its clusters."""
    points = torch.cat([unlabeled, labeled.to(unlabeled.device, unlabeled.dtype)])  # position < U is unlabeled
    clusters = min(len(labeled) + k, options.max_clusters, len(points))
    result = kmeans(points, clusters, rng, options.max_iter)
    assignment = result.assignment.cpu().numpy()
    is_unlabeled = np.arange(len(points)) < len(unlabeled)
    sizes = np.bincount(assignment, minlength=clusters)
    taken = np.bincount(assignment[~is_unlabeled], minlength=clusters)  # labeled, then also picked
    unlabeled_left = np.bincount(assignment[is_unlabeled], minlength=clusters)
    typical: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cluster -> (positions by typicality, values)
    picks, scores = [], []
    for _ in range(k):
        free = unlabeled_left > 0
        eligible = free & (sizes >= options.min_cluster_size)
        if not eligible.any():
            eligible = free
        candidates = np.flatnonzero(eligible)
        # Fewest labeled-or-picked points first, then the largest cluster, then the lower id.
        cluster = int(candidates[np.lexsort((candidates, -sizes[candidates], taken[candidates]))[0]])
        if cluster not in typical:
            everyone = np.flatnonzero(assignment == cluster)  # typicality within the whole cluster
            values = typicality(points[torch.as_tensor(everyone, device=points.device)],
                                options.neighbours).double().cpu().numpy()
            keep = is_unlabeled[everyone]
            order = np.lexsort((everyone[keep], -values[keep]))
            typical[cluster] = (everyone[keep][order], values[keep][order])
        positions, values = typical[cluster]
        used = np.isin(positions, picks)
        position, value = positions[~used][0], values[~used][0]
        picks.append(int(position))
        scores.append(float(value))
        taken[cluster] += 1
        unlabeled_left[cluster] -= 1
    return np.asarray(picks, dtype=np.int64), np.asarray(scores)
