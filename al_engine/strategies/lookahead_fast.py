"""The lookahead when only the student's feature layer learns: every candidate in a few matrix products.

Notation (all per round): the frozen trunk gives each image an input h (d_in,), extended with a
bias column to h~ = [h, 1]; the feature layer is W~ = [W, b] (D, d_in + 1); the student's feature
is relu(z) with z = W~ h~; the teacher's is t.

One SGD step on candidate c moves W~ by -lr * delta h~_c^T with delta = 2 (relu(z_c) - t_c) * [z_c > 0],
so after any number of steps (with or without momentum) W~' = W~ - a_c h~_c^T: the update is rank
one, and `rank_one_coefficients` computes a_c (D,) exactly, because z_c itself moves by
-lr ||h~_c||^2 * buffer at each step. On an evaluation item u the pre-activation becomes
z_u - k_cu a_c with k_cu = h~_c . h~_u.

- `exact_distances_closed_form`: mean_u ||relu(z_u - k_cu a_c) - t_u||^2, exactly (ReLU applied);
  equal to the per-candidate loop up to float error, but (Nc x Ne x D) work.
- `fixed_pattern_distances`: hold each evaluation item's ReLU pattern m_u = [z_u > 0] fixed; then,
  with r_u = relu(z_u) - t_u,
      ||m_u * (z_u - k a) - t_u||^2 = ||r_u||^2 - 2 k (m_u * r_u) . a + k^2 m_u . a^2,
  and the mean over u is const - 2/Ne h~_c^T A a_c + 1/Ne ((K*K) m)_c . a_c^2, with A = H~_e^T (m * r)
  ((d_in+1) x D, once per round) and K = H~_c H~_e^T taken in chunks: two matrix products per chunk.
"""
from __future__ import annotations

import numpy as np
import torch

from .lookahead_exact import StepRule


def with_bias_column(inputs: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, d + 1), a column of ones appended (the bias as one more weight)."""
    return torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype, device=inputs.device)], dim=1)


def layer_matrix(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(D, d), (D,) -> W~ (D, d + 1)."""
    return torch.cat([weight, bias[:, None]], dim=1)


def rank_one_coefficients(z: torch.Tensor, targets: torch.Tensor, squared_norms: torch.Tensor,
                          rule: StepRule) -> torch.Tensor:
    """(N, D) a such that `rule`'s SGD steps on each candidate alone give W~' = W~ - a h~^T.

    z: (N, D) the candidates' pre-activations; targets: (N, D) teacher features;
    squared_norms: (N,) ||h~||^2. Matches PyTorch's SGD (the ReLU's gradient is 0 at z = 0).
    """
    z = z.clone()
    coefficients = torch.zeros_like(z)
    buffer = None
    for _ in range(rule.steps):
        delta = 2.0 * (torch.relu(z) - targets) * (z > 0)  # (N, D) gradient of the loss in z
        buffer = delta if buffer is None else rule.momentum * buffer + delta
        coefficients = coefficients + rule.lr * buffer
        z = z - rule.lr * squared_norms[:, None] * buffer
    return coefficients


def exact_distances_closed_form(candidate_inputs: torch.Tensor, coefficients: torch.Tensor,
                                eval_inputs: torch.Tensor, eval_z: torch.Tensor, eval_targets: torch.Tensor,
                                chunk_size: int = 32, squared: bool = True) -> torch.Tensor:
    """(Nc,) mean_u ||relu(z_u - k_cu a_c) - t_u||^2, exact; inputs carry the bias column.
    `squared=False`: mean_u ||relu(z_u - k_cu a_c) - t_u|| (distance=l2)."""
    distances = torch.empty(len(candidate_inputs), dtype=torch.float64)
    for start in range(0, len(candidate_inputs), chunk_size):
        stop = start + chunk_size
        kernel = candidate_inputs[start:stop] @ eval_inputs.T  # (c, Ne)
        moved = eval_z[None] - kernel[:, :, None] * coefficients[start:stop, None, :]  # (c, Ne, D)
        gaps = (torch.relu(moved) - eval_targets[None]).pow(2).sum(2)
        distances[start:stop] = (gaps if squared else gaps.sqrt()).mean(1).double().cpu()
    return distances


class FixedPatternScorer:
    """The closed form with the evaluation items' ReLU pattern held fixed (see the module docstring)."""

    def __init__(self, eval_inputs: torch.Tensor, eval_z: torch.Tensor, eval_targets: torch.Tensor):
        self.eval_inputs = eval_inputs  # (Ne, d + 1)
        self.update(eval_z, eval_targets)

    def update(self, eval_z: torch.Tensor, eval_targets: torch.Tensor) -> None:
        """Recompute what depends on the evaluation items' pre-activations (after the student moved)."""
        self.pattern = (eval_z > 0).to(eval_z.dtype)  # (Ne, D) m_u
        residual = torch.relu(eval_z) - eval_targets  # (Ne, D) r_u
        self.baseline = float(residual.double().pow(2).sum(1).mean())
        self.weighted = self.pattern * residual  # (Ne, D) m_u * r_u
        self.projected = self.eval_inputs.T @ self.weighted  # (d + 1, D) A

    def distances(self, candidate_inputs: torch.Tensor, coefficients: torch.Tensor,
                  chunk_size: int = 2048, kernel: torch.Tensor | None = None) -> torch.Tensor:
        """(Nc,) approximate distances; `kernel` (Nc, Ne) may be given when it is kept (batch-aware)."""
        count = len(self.eval_inputs)
        linear = ((candidate_inputs @ self.projected) * coefficients).sum(1)  # (Nc,) h~_c^T A a_c
        quadratic = torch.empty(len(candidate_inputs), dtype=coefficients.dtype, device=coefficients.device)
        for start in range(0, len(candidate_inputs), chunk_size):
            stop = start + chunk_size
            block = kernel[start:stop] if kernel is not None else candidate_inputs[start:stop] @ self.eval_inputs.T
            quadratic[start:stop] = ((block * block) @ self.pattern * coefficients[start:stop].pow(2)).sum(1)
        change = (-2.0 * linear.double() + quadratic.double()) / count
        return (self.baseline + change).cpu()


def shortlist_positions(approximate: np.ndarray, size: int) -> np.ndarray:
    """Positions of the `size` smallest approximate distances (ties to the lower position)."""
    order = np.lexsort((np.arange(len(approximate)), approximate))
    return order[:size]


def is_certified(exact_short: np.ndarray, approximate: np.ndarray, shortlist: np.ndarray, k: int,
                 safety: float = 2.0) -> bool:
    """Whether the exact top-k must lie inside the shortlist.

    Outside items are known only by their approximate distance; the largest error seen on the
    shortlist, times `safety`, bounds how far they can be off. The shortlist suffices when its
    k-th best exact distance beats every outside item's approximate distance by that margin.
    """
    if len(shortlist) >= len(approximate):
        return True
    if len(exact_short) == 0:  # nothing scored exactly yet: nothing is certain
        return False
    outside = np.ones(len(approximate), dtype=bool)
    outside[shortlist] = False
    error = float(np.max(np.abs(exact_short - approximate[shortlist]))) if len(shortlist) else np.inf
    kth = np.sort(exact_short)[min(k, len(exact_short)) - 1]
    return bool(kth <= approximate[outside].min() - safety * error)
