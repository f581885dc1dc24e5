"""Core-set selection (Sener and Savarese, 2018): k-center greedy, and the robust k-center refinement.

`kcenter-greedy` is farthest-first traversal from the labeled set over the embeddings. It keeps one
number per unlabeled point, its distance to the nearest labeled-or-picked point, and updates it with
one batched pass per pick: memory O(N), never the N x N matrix the reference builds.

`coreset` starts from the greedy solution (radius delta, a 2-approximation) and bisects the radius in
[delta / 2, delta] with the paper's mixed-integer feasibility problem: choose k new centres so that every
point lies within the radius of a labeled point or a new centre, except an outlier budget. The problem
is solved with scipy's HiGHS MILP, an open solver, on a reduced problem (a seeded sample of the points
that the labeled set leaves uncovered, plus the greedy picks, which keep the greedy radius feasible),
under a time limit. When no solve finishes, the greedy picks are kept and a warning is logged.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from . import register_strategy
from .base import QueryState, Strategy
from .geometry import farthest_first, nearest, squared_distances

log = logging.getLogger(__name__)


def distance_to_labeled(state: QueryState) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) unlabeled embeddings and (U,) squared distance of each to its nearest labeled embedding."""
    unlabeled = state.unlabeled_embeddings()
    labeled = state.labeled_embeddings()
    min_sq, _ = nearest(unlabeled, labeled)
    return unlabeled, min_sq


@register_strategy
class KCenterGreedy(Strategy):
    name = "kcenter-greedy"
    help = "farthest-first traversal from the labeled set over embeddings (core-set, greedy)"
    global_views = ("unlabeled_embeddings",)

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        features, min_sq = distance_to_labeled(state)
        return farthest_first(features, min_sq, k, state.rng)


@dataclass
class CoresetOptions:
    max_points: int = 1500  # points of the reduced MILP (a seeded sample of the uncovered pool), plus the greedy picks
    outlier_fraction: float = 1e-3  # share of the reduced problem's uncovered points allowed to stay uncovered
    bisection_steps: int = 6  # radius bisections between delta/2 and delta
    time_limit: float = 200.0  # seconds for all MILP solves together
    max_pairs: int = 3_000_000  # cover pairs (point, centre) of one MILP; a larger problem is skipped

    def validate(self) -> None:
        if self.max_points < 1 or self.bisection_steps < 0 or self.time_limit <= 0 or self.max_pairs < 1:
            raise ConfigError("coreset needs max_points >= 1, bisection_steps >= 0, time_limit > 0, max_pairs >= 1")
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ConfigError(f"coreset option outlier_fraction must lie in [0, 1), got {self.outlier_fraction}")


@dataclass
class CoverSolution:
    centers: np.ndarray  # positions (into the reduced problem) of the chosen centres
    status: str  # "optimal", "feasible" (time limit with a solution), "infeasible", "timeout"


def solve_cover(pair_sq: np.ndarray, covered: np.ndarray, radius_sq: float, centers: int, outliers: int,
                time_limit: float) -> CoverSolution:
    """The robust k-center feasibility problem on a reduced set of M points, with scipy's HiGHS MILP.

    pair_sq (M, M): squared distances between the reduced points; covered (M,): already within the radius
    of a labeled point. Variables: u_j (point j becomes a centre) and xi_i (point i is an outlier).
    Constraints: sum_j u_j = centers; for every uncovered i, sum_{j: d(i,j) <= r} u_j + xi_i >= 1;
    sum_i xi_i <= outliers.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, csr_matrix, hstack, identity, vstack

    size = pair_sq.shape[0]
    rows = np.flatnonzero(~covered)
    if len(rows) == 0:  # the labeled set already covers every point: any centres do
        return CoverSolution(np.arange(min(centers, size)), "optimal")
    within = pair_sq[rows] <= radius_sq  # (R, M)
    cover = coo_matrix(within.astype(np.float64))
    cover_rows = hstack([cover, identity(len(rows), format="coo")])  # [A | I] u, xi >= 1
    count_row = csr_matrix(np.r_[np.ones(size), np.zeros(len(rows))])
    outlier_row = csr_matrix(np.r_[np.zeros(size), np.ones(len(rows))])
    matrix = vstack([cover_rows, count_row, outlier_row]).tocsr()
    lower = np.r_[np.ones(len(rows)), centers, 0]
    upper = np.r_[np.full(len(rows), np.inf), centers, outliers]
    variables = size + len(rows)
    result = milp(c=np.zeros(variables), constraints=LinearConstraint(matrix, lower, upper),
                  integrality=np.ones(variables), bounds=Bounds(0, 1),
                  options={"time_limit": max(time_limit, 0.1), "disp": False})
    if result.x is not None and result.status in (0, 1):
        chosen = np.flatnonzero(result.x[:size] > 0.5)
        return CoverSolution(chosen, "optimal" if result.status == 0 else "feasible")
    return CoverSolution(np.empty(0, dtype=np.int64), "infeasible" if result.status == 2 else "timeout")


@register_strategy
class Coreset(Strategy):
    name = "coreset"
    help = "robust k-center (core-set): greedy start refined by a MILP with an outlier budget (HiGHS)"
    Options = CoresetOptions
    global_views = ("unlabeled_embeddings",)

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        features, min_sq = distance_to_labeled(state)
        greedy, _ = farthest_first(features, min_sq, k, state.rng)
        # The greedy radius: the largest distance left from any point to the labeled set and the picks.
        after_greedy = torch.minimum(min_sq, nearest(features, features[torch.as_tensor(greedy)])[0])
        high = math.sqrt(float(after_greedy.max()))
        low = high / 2  # the greedy radius is within a factor two of the optimum
        picks = self._refine(features, min_sq, greedy, low, high, k, state.rng, started)
        return order_by_distance(features, min_sq, picks)

    def _refine(self, features, min_sq, greedy, low, high, k, rng, started) -> np.ndarray:
        options = self.options
        # The reduced problem: points the labeled set leaves uncovered at the smallest radius tried.
        uncovered = np.flatnonzero(min_sq.cpu().numpy() > low * low)
        uncovered = np.setdiff1d(uncovered, greedy)
        if len(uncovered) > options.max_points:
            uncovered = np.sort(rng.choice(uncovered, size=options.max_points, replace=False))
        reduced = np.concatenate([greedy, uncovered])  # the greedy picks keep radius `high` feasible
        reduced_features = features[torch.as_tensor(reduced)].double()
        pair_sq = squared_distances(reduced_features, reduced_features).cpu().numpy()  # (M, M), M <= max_points + k
        np.fill_diagonal(pair_sq, 0.0)
        reduced_min_sq = min_sq[torch.as_tensor(reduced)].double().cpu().numpy()
        best = np.arange(len(greedy))  # the greedy solution, feasible at `high`
        solved_any = False
        self.diagnostics = {"greedy_radius": high, "radius": high, "reduced_points": len(reduced), "solves": []}
        for step in range(options.bisection_steps):
            remaining = options.time_limit - (time.perf_counter() - started)
            if remaining <= 0:
                break
            radius = (low + high) / 2
            covered = reduced_min_sq <= radius * radius
            outliers = int(options.outlier_fraction * (~covered).sum())
            if int((pair_sq[~covered] <= radius * radius).sum()) > options.max_pairs:
                log.warning("coreset: the reduced problem at radius %.4g has too many cover pairs; "
                            "keeping the best solution so far", radius)
                break
            solution = solve_cover(pair_sq, covered, radius * radius, k, outliers,
                                   remaining / (options.bisection_steps - step))
            self.diagnostics["solves"].append(f"{radius:.4g}:{solution.status}")
            if solution.status in ("optimal", "feasible") and len(solution.centers) == k:
                best, high, solved_any = solution.centers, radius, True
            elif solution.status == "infeasible":
                low, solved_any = radius, True
            else:  # the time limit ran out without an answer: stop and keep what is known
                break
        if not solved_any:
            log.warning("coreset: the MILP did not finish within %.0f s; using the greedy k-center picks",
                        options.time_limit)
        self.diagnostics["radius"] = high  # on the reduced problem; the greedy picks give `greedy_radius`
        return reduced[best]


def order_by_distance(features: torch.Tensor, min_sq: torch.Tensor, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order a chosen set farthest-first (each next pick is the farthest from the labeled set and earlier picks)."""
    chosen = features[torch.as_tensor(picks)]
    order, distances = farthest_first(chosen, min_sq[torch.as_tensor(picks)], len(picks), np.random.default_rng(0))
    return np.asarray(picks)[order], distances
