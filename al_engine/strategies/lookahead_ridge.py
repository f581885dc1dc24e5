"""The converged lookahead (`mode=ridge`): no step size, the exact effect of one more labeled item
on a ridge refit of the student's feature layer.

The student's trunk (distilled as in every mode) is frozen; its feature layer is replaced by the
ridge regression of the teacher's features t on the trunk's outputs h~ = [h, 1] over the labeled
set L:

    W~^T = P H~_L^T T_L,   P = (H~_L^T H~_L + lambda I)^-1,   S_feat(x) = W~ h~_x   (linear: no ReLU)

with lambda = ridge_lambda * mean_L ||h~||^2 (scale-free). Teaching the student candidate c means
adding (h~_c, t_c) to that regression and refitting it to convergence. By Sherman-Morrison the
refit is a rank-one change (recursive least squares; the influence function of Koh and Liang,
exact for a linear head):

    W~'^T = W~^T + g_c a_c^T,   g_c = P h~_c,   a_c = (t_c - W~ h~_c) / (1 + h~_c^T g_c)

so an evaluation item's feature moves by k_cu a_c with k_cu = g_c . h~_u, and with r_u = W~ h~_u - t_u

    distance_c = mean_u ||r_u + k_cu a_c||^2
               = mean_u ||r_u||^2 + (2/Ne) g_c^T (H~_e^T R) a_c + (1/Ne) (g_c^T H~_e^T H~_e g_c) ||a_c||^2,

exact, at O(d^2) per candidate (no pass over the evaluation items). `distance=l2`
(mean_u ||r_u + k_cu a_c||) has no such form and is computed in chunks over (c, u).
"""
from __future__ import annotations

import numpy as np
import torch

from ..train import embed_pool
from .base import QueryState
from .lookahead_round import LookaheadOptions, LookaheadRound, trunk_outputs


def ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W~^T (d+1, D), P (d+1, d+1)) of the ridge regression of `targets` (N, D) on `inputs` (N, d+1)."""
    inputs, targets = inputs.double(), targets.double()
    gram = inputs.T @ inputs + penalty * torch.eye(inputs.shape[1], dtype=torch.float64, device=inputs.device)
    inverse = torch.linalg.inv(gram)
    inverse = (inverse + inverse.T) / 2  # symmetric to rounding
    return inverse @ (inputs.T @ targets), inverse


def ridge_problem(state: QueryState, round_: LookaheadRound, options: LookaheadOptions) -> dict:
    """The round's ridge refit on the labeled set and its evaluation-side products (cached)."""
    if "ridge" not in round_.cache:
        labeled = state.labeled_indices
        batch = state.train_config.eval_batch_size
        inputs = trunk_outputs(round_.student, state, labeled).double()
        targets = embed_pool(state.model, state.dataset, labeled, state.device, batch)
        penalty = options.ridge_lambda * float(inputs.pow(2).sum(1).mean())
        weight_t, inverse = ridge_fit(inputs, targets, penalty)
        eval_inputs = trunk_outputs(round_.student, state, round_.evaluation).double()
        residual = eval_inputs @ weight_t - round_.eval_targets.double()  # (Ne, D) r_u
        round_.cache["ridge"] = dict(
            weight_t=weight_t, inverse=inverse, penalty=penalty, eval_inputs=eval_inputs, residual=residual,
            gram_eval=eval_inputs.T @ eval_inputs, projected=eval_inputs.T @ residual,
            baseline=float(residual.pow(2).sum(1).mean()))
    return round_.cache["ridge"]


def ridge_update(problem: dict, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g (Nc, d+1), a (Nc, D)): refitting with candidate c added gives W~'^T = W~^T + g_c a_c^T."""
    inputs, targets = inputs.double(), targets.double()
    directions = inputs @ problem["inverse"]  # P symmetric: rows are g_c = P h~_c
    leverage = (directions * inputs).sum(1)  # h~_c^T P h~_c
    residual = targets - inputs @ problem["weight_t"]  # t_c - W~ h~_c
    return directions, residual / (1.0 + leverage)[:, None]


def ridge_distances(state: QueryState, round_: LookaheadRound, indices: np.ndarray, options: LookaheadOptions,
                    chunk_size: int = 32) -> np.ndarray:
    """(len(indices),) the evaluation distance after refitting the ridge layer with each candidate added."""
    problem = ridge_problem(state, round_, options)
    inputs = trunk_outputs(round_.student, state, indices)
    targets = embed_pool(state.model, state.dataset, indices, state.device, state.train_config.eval_batch_size)
    directions, coefficients = ridge_update(problem, inputs, targets)
    count = len(problem["eval_inputs"])
    if options.distance == "squared":
        linear = ((directions @ problem["projected"]) * coefficients).sum(1)
        spread = ((directions @ problem["gram_eval"]) * directions).sum(1)
        change = (2.0 * linear + spread * coefficients.pow(2).sum(1)) / count
        return (problem["baseline"] + change).cpu().numpy()
    out = torch.empty(len(indices), dtype=torch.float64)
    for start in range(0, len(indices), chunk_size):
        stop = start + chunk_size
        kernel = directions[start:stop] @ problem["eval_inputs"].T  # (c, Ne)
        moved = problem["residual"][None] + kernel[:, :, None] * coefficients[start:stop, None, :]
        out[start:stop] = moved.pow(2).sum(2).sqrt().mean(1).cpu()
    return out.numpy()
