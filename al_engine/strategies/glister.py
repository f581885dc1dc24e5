"""GLISTER (Killamsetty et al., AAAI 2021) for active learning: query the candidates whose one
gradient step most lowers the loss on a held-out evaluation split.

The closest published relative of the seed's lookahead: both ask "how much would learning this
item help elsewhere?", but GLISTER asks it of the classifier itself (no student), on its
cross-entropy (no feature matching), to first order (no step is taken).

Each round, with the classifier C frozen:

1. Split the unlabeled pool as the lookahead does (`split_pool`: the same seeded split, so the two
   strategies are judged on the same evaluation items). Evaluation items score -inf and are never
   picked before a candidate.
2. Pseudo-labels: every item's label is C's predicted class (candidates and evaluation items alike;
   GLISTER's "hypothesised labels" of the active-learning variant).
3. Last layer only (as GLISTER's implementation does): logits = W~ h~ with h~ = [embed(x), 1].
   A candidate's gradient is g_c = (p_c - e_c) h~_c^T; the evaluation loss's is
   G = 1/Ne sum_u (p_u - e_u) h~_u^T. The gain of one SGD step of size lr on c is, to first order,

       gain_c = L_V(W~) - L_V(W~ - lr g_c) ~= lr <G, g_c> = lr (p_c - e_c)^T G h~_c.

4. `greedy=true` (GLISTER's greedy, Taylor-approximated selection): after each pick the head takes
   that step, W~ <- W~ - lr g_c, the evaluation items' probabilities and G are recomputed, and the
   remaining candidates are re-scored against the new G (their own gradients stay those at the
   round's W~, as in GLISTER). `greedy=false` takes the top-k of the first scores.

The step only matters for the greedy updates; `lr=0` chooses lr_scale / mean_c ||h~_c||^2, so one
step moves a typical candidate's own logits by lr_scale of its error p - e. Not included: GLISTER's
optional regulariser towards the training loss and its random-greedy variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..train import embed_pool
from . import register_strategy
from .base import QueryState, Strategy
from .lookahead_round import held_out_split


@dataclass
class GlisterOptions:
    """Options of `glister` (`--strategy-option key=value`)."""

    eval_fraction: float = 0.2  # share of the unlabeled pool held out for evaluation (the lookahead's split)
    eval_size: int = 0  # evaluate on a seeded subsample of this many evaluation items (0 = all)
    lr: float = 0.0  # the head's SGD step in the greedy updates; 0 = auto (lr_scale / mean ||h~||^2)
    lr_scale: float = 0.05  # auto step: one step moves a typical candidate's logits by this share of its error
    greedy: bool = True  # re-score after each pick against the evaluation gradient at the updated head

    def validate(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must lie strictly between 0 and 1, got {self.eval_fraction}")
        if self.eval_size < 0 or self.lr < 0 or self.lr_scale <= 0:
            raise ConfigError("eval_size must be >= 0, lr >= 0 (0 = auto) and lr_scale positive")


def head_inputs(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D + 1) float64, with the bias column."""
    features = features.double()
    return torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype, device=features.device)], 1)


def pseudo_label_error(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N, C) p - onehot(argmax p): the cross-entropy's gradient in the logits
    at the predicted class."""
    probs = logits.softmax(1)
    return probs - torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(probs.dtype)


def evaluation_gradient(weight: torch.Tensor, eval_inputs: torch.Tensor, eval_labels: torch.Tensor) -> torch.Tensor:
    """(C, D + 1) gradient of mean_u CE(W~ h~_u, y_u) in W~ (pseudo-labels `eval_labels` fixed); zero
    when there is no evaluation item (a pool of one unlabeled item: nothing to judge a lesson on)."""
    if len(eval_inputs) == 0:
        return torch.zeros_like(weight)
    probs = (eval_inputs @ weight.T).softmax(1)
    error = probs - torch.nn.functional.one_hot(eval_labels, weight.shape[0]).to(probs.dtype)
    return error.T @ eval_inputs / len(eval_inputs)


def glister_gains(weight: torch.Tensor, candidate_inputs: torch.Tensor, candidate_error: torch.Tensor,
                  eval_inputs: torch.Tensor, eval_labels: torch.Tensor) -> torch.Tensor:
    """(Nc,) <G, g_c> = (p_c - e_c)^T G h~_c: the evaluation loss's decrease per unit step on c."""
    gradient = evaluation_gradient(weight, eval_inputs, eval_labels)
    return ((candidate_inputs @ gradient.T) * candidate_error).sum(1)


def greedy_picks(weight: torch.Tensor, candidate_inputs: torch.Tensor, candidate_error: torch.Tensor,
                 eval_inputs: torch.Tensor, eval_labels: torch.Tensor, k: int, lr: float,
                 greedy: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positions into the candidates, gains when picked), k of them in pick order."""
    gains = glister_gains(weight, candidate_inputs, candidate_error, eval_inputs, eval_labels)
    if not greedy:
        order = np.lexsort((np.arange(len(gains)), -gains.cpu().numpy()))[:k]
        return order, gains.cpu().numpy()[order]
    available = torch.ones(len(gains), dtype=torch.bool, device=gains.device)
    picks, picked_gains = [], []
    for _ in range(min(k, len(gains))):
        masked = torch.where(available, gains, torch.tensor(-torch.inf, dtype=gains.dtype, device=gains.device))
        best = int(torch.argmax(masked))  # first maximum: ties to the lower position
        picks.append(best)
        picked_gains.append(float(gains[best]))
        available[best] = False
        weight = weight - lr * candidate_error[best][:, None] * candidate_inputs[best][None, :]
        gains = glister_gains(weight, candidate_inputs, candidate_error, eval_inputs, eval_labels)
    return np.asarray(picks, dtype=np.int64), np.asarray(picked_gains)


@register_strategy
class Glister(Strategy):
    name = "glister"
    help = "GLISTER: the one-step gain of the evaluation split's loss (pseudo-labels, last layer)"
    Options = GlisterOptions
    main_only = True  # one split and, with greedy, one sequence of head updates over the whole pool

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        unlabeled = state.unlabeled_indices
        candidate_positions, evaluation = held_out_split(state, self.options.eval_fraction, self.options.eval_size)
        batch = state.train_config.eval_batch_size
        head = state.model.fc_out
        weight = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], 1).double()
        candidate_inputs = head_inputs(state.unlabeled_embeddings()[torch.as_tensor(candidate_positions)])
        candidate_error = pseudo_label_error(candidate_inputs @ weight.T)
        eval_inputs = head_inputs(embed_pool(state.model, state.dataset, evaluation, state.device, batch))
        eval_labels = (eval_inputs @ weight.T).argmax(1)
        lr = self.options.lr
        if lr == 0 and len(candidate_inputs):
            lr = self.options.lr_scale / float(candidate_inputs.pow(2).sum(1).mean())
        picks, gains = greedy_picks(weight, candidate_inputs, candidate_error, eval_inputs, eval_labels,
                                    k, lr, self.options.greedy)
        positions = candidate_positions[picks]
        scores = gains
        if len(positions) < k:  # fewer candidates than the query: evaluation items fill it, in pool order
            rest = np.setdiff1d(np.arange(len(unlabeled)), candidate_positions)[:k - len(positions)]
            positions = np.r_[positions, rest]
            scores = np.r_[scores, np.full(len(rest), -np.inf)]
        self.diagnostics = {"lr": lr, "candidates": len(candidate_positions), "evaluation": len(evaluation),
                            "first_gain": float(gains[0]) if len(gains) else None}
        return positions, scores
