"""Batched geometry over embeddings, shared by the diversity strategies (k-means, k-center, BADGE, TypiClust).

Every function works block by block on the tensors' own device: memory is O(N * block), never an
N x N matrix of the pool. Random choices come from a numpy Generator, so a seed fixes the result.
This module registers no strategy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

DISTANCE_BLOCK_ELEMENTS = 1 << 22  # entries of one distance block (4M floats = 16 MB)


def squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(A, B) squared Euclidean distances between the rows of (A, D) and (B, D), never negative."""
    cross = points @ centers.T
    result = (points * points).sum(1, keepdim=True) - 2 * cross + (centers * centers).sum(1).unsqueeze(0)
    return result.clamp_min_(0)


def nearest(points: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, the squared distance to its nearest centre and that centre's index: (N,), (N,).

    With no centres, every distance is +inf and every index -1.
    """
    count = points.shape[0]
    best = torch.full((count,), float("inf"), device=points.device, dtype=points.dtype)
    which = torch.full((count,), -1, device=points.device, dtype=torch.long)
    if centers.shape[0] == 0 or count == 0:
        return best, which
    center_block = min(centers.shape[0], 8192)
    row_block = max(1, DISTANCE_BLOCK_ELEMENTS // center_block)
    for c_start in range(0, centers.shape[0], center_block):
        block_centers = centers[c_start:c_start + center_block]
        for r_start in range(0, count, row_block):
            distances = squared_distances(points[r_start:r_start + row_block], block_centers)
            values, positions = distances.min(dim=1)
            rows = slice(r_start, r_start + row_block)
            closer = values < best[rows]  # strict: on a tie the earlier centre keeps the point
            best[rows] = torch.where(closer, values, best[rows])
            which[rows] = torch.where(closer, positions + c_start, which[rows])
    return best, which


def farthest_first(points: torch.Tensor, min_sq_dist: torch.Tensor, count: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center: repeatedly take the point farthest from everything taken so far.

    `min_sq_dist` (N,) is each point's squared distance to the already-covered set (+inf when empty).
    Returns the positions in pick order and the distance (not squared) each had when picked.
    One O(N * D) update per pick.
    """
    min_sq_dist = min_sq_dist.clone()
    taken = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    picks, distances = [], []
    for _ in range(count):
        if torch.isinf(min_sq_dist[~taken]).all():  # nothing covered yet: a seeded random start
            free = torch.nonzero(~taken).flatten().cpu().numpy()
            position = int(free[rng.integers(len(free))])
            distance = float("nan")
        else:
            masked = min_sq_dist.masked_fill(taken, -1.0)
            position = int(torch.argmax(masked))  # the first maximum on ties
            distance = float(masked[position].sqrt())
        picks.append(position)
        distances.append(distance)
        taken[position] = True
        min_sq_dist = torch.minimum(min_sq_dist, squared_distances(points, points[position:position + 1])[:, 0])
    distances = np.asarray(distances, dtype=np.float64)
    if np.isnan(distances).any():  # the random start scores as the farthest pick of the batch
        finite = distances[~np.isnan(distances)]
        distances[np.isnan(distances)] = finite.max() if finite.size else 0.0
    return np.asarray(picks, dtype=np.int64), distances


def kmeans_plus_plus(count: int, centers: int, rng: np.random.Generator,
                     sq_distance_to: Callable[[int], torch.Tensor], first: int | None = None) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) over `count` points, given `sq_distance_to(i)` -> (count,) squared
    distances of every point to point i. Never returns a position twice."""
    centers = min(centers, count)
    chosen = [int(rng.integers(count)) if first is None else int(first)]
    min_sq = sq_distance_to(chosen[0]).double()
    min_sq[chosen[0]] = 0.0
    for _ in range(1, centers):
        weights = min_sq.clamp_min(0).cpu().numpy()
        weights[chosen] = 0.0
        total = weights.sum()
        if total > 0 and np.isfinite(total):
            cumulative = np.cumsum(weights)
            position = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            position = min(position, count - 1)
            while weights[position] == 0:  # guards against rounding at the edge of the cumulative sum
                position = (position + 1) % count
        else:  # every remaining point coincides with a centre: take any free one
            free = np.setdiff1d(np.arange(count), chosen)
            position = int(free[rng.integers(len(free))])
        chosen.append(position)
        min_sq = torch.minimum(min_sq, sq_distance_to(position).double())
        min_sq[position] = 0.0
    return np.asarray(chosen, dtype=np.int64)


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (K, D)
    assignment: torch.Tensor  # (N,) cluster of each point
    sq_distance: torch.Tensor  # (N,) squared distance of each point to its centre
    iterations: int


def kmeans(points: torch.Tensor, clusters: int, rng: np.random.Generator, max_iter: int = 50,
           tol: float = 1e-4) -> KMeansResult:
    """Lloyd's k-means from a k-means++ start; stops when the centres' total squared shift falls below
    `tol` x the mean per-dimension variance of the data (scikit-learn's criterion)."""
    clusters = min(clusters, points.shape[0])
    start = kmeans_plus_plus(points.shape[0], clusters, rng,
                             lambda i: squared_distances(points, points[i:i + 1])[:, 0])
    centers = points[torch.as_tensor(start, device=points.device)].clone()
    threshold = tol * float(points.var(dim=0).mean()) if points.shape[0] > 1 else 0.0
    iterations = 0
    for iterations in range(1, max_iter + 1):
        _, assignment = nearest(points, centers)
        sums = torch.zeros_like(centers).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=clusters).to(points.dtype).unsqueeze(1)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centers)  # an empty cluster keeps its centre
        shift = float(((updated - centers) ** 2).sum())
        centers = updated
        if shift <= threshold:
            break
    sq_distance, assignment = nearest(points, centers)
    return KMeansResult(centers, assignment, sq_distance, iterations)
