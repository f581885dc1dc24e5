"""Batch-aware lookahead: after each pick, the student learns it, and the rest are scored again.

Without this, the k best candidates are often k near-copies of one lesson: once the student has
learned one of them, the others teach it little. In the feature layer's closed form the lesson of
a pick is the rank-one change W~ <- W~ - a* h~*^T, so teaching it costs one outer product: every
pre-activation moves by z_x <- z_x - (h~_x . h~*) a*. The candidates are re-scored with the
fixed-pattern closed form, on a working pool of the best `batch_aware_pool` candidates, whose
kernel with the evaluation items is kept (pool x Ne).
"""
from __future__ import annotations

import numpy as np
import torch

from .lookahead_fast import FixedPatternScorer, rank_one_coefficients, shortlist_positions
from .lookahead_round import LookaheadRound, candidate_problem


@torch.inference_mode()
def greedy_lessons(inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, eval_inputs: torch.Tensor,
                   eval_targets: torch.Tensor, rule, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `inputs`) of k greedy picks and their distances at the time each was picked.

    inputs: (Nc, d + 1) h~ of the working pool; targets: (Nc, D); weight: (D, d + 1) the student's W~;
    eval_inputs: (Ne, d + 1); eval_targets: (Ne, D).
    """
    weight = weight.clone()
    z = inputs @ weight.T  # (Nc, D) candidates' pre-activations
    eval_z = eval_inputs @ weight.T  # (Ne, D)
    norms = inputs.pow(2).sum(1)
    kernel = inputs @ eval_inputs.T  # (Nc, Ne) kept for every pick
    scorer = FixedPatternScorer(eval_inputs, eval_z, eval_targets)
    remaining = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
    picks, distances = [], []
    for _ in range(min(k, len(inputs))):
        coefficients = rank_one_coefficients(z, targets, norms, rule)
        current = scorer.distances(inputs, coefficients, kernel=kernel).numpy()
        current[~remaining.cpu().numpy()] = np.inf
        best = int(np.argmin(current))  # the lowest position wins ties
        picks.append(best)
        distances.append(float(current[best]))
        lesson = coefficients[best]  # (D,) the pick's a*: the student learns it
        eval_z = eval_z - kernel[best][:, None] * lesson[None]
        z = z - (inputs @ inputs[best])[:, None] * lesson[None]
        scorer.update(eval_z, eval_targets)
        remaining[best] = False
    return np.asarray(picks, dtype=np.int64), np.asarray(distances)


def batch_aware_select(state, round_: LookaheadRound, indices: np.ndarray, first: np.ndarray, k: int,
                       pool_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Greedy picks among candidate pool `indices`, whose plain lookahead distances are `first`.

    Returns positions into `indices` in pick order, each pick's distance when it was picked, and
    diagnostics. The working pool is the `pool_size` best by `first` (at least k).
    """
    working = np.sort(shortlist_positions(first, min(max(pool_size, k), len(indices))))
    problem, inputs, targets, _ = candidate_problem(state, round_, indices[working])
    picks, distances = greedy_lessons(inputs, targets, problem["weight"], problem["eval_inputs"],
                                      round_.eval_targets, round_.rule, k)
    diagnostics = {"batch_aware_pool": len(working),
                   "helped_fraction": float(np.mean(first < round_.baseline)) if len(first) else float("nan")}
    return working[picks], distances, diagnostics
