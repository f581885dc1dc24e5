"""Empirical-NTK lookahead (Mohamadi, Bae and Sutherland, NeurIPS 2022): query the candidates whose
most likely label would change the classifier's outputs on held-out items the most, with the
retrained classifier approximated by kernel regression in its neural tangent kernel.

The seed's lookahead asks "how would a student change after two SGD steps on this item?"; this
strategy asks it of the classifier itself and replaces the steps by the retrained model of the
linearised network, which needs no step size and no student (their "most likely model output
change", MLMOC).

Each round, with the classifier C frozen:

1. The lookahead's seeded split of the unlabeled pool (`split_pool`) into candidates and
   evaluation items U (`eval_size` of them, subsampled); evaluation items score -inf.
2. The kernel: the pseudo-NTK of Mohamadi and Sutherland (the NTK of the summed logits, divided by
   the class count, times the identity over classes) restricted to the last two layers, the feature
   layer (a -> z = W_e a + b_e, h = relu(z)) and the output layer (f = W_o h + b_o). Their
   per-example gradients are outer products, so the kernel needs no per-example gradient:

       k(x, x') = (h . h' + 1) + (d . d') (a . a' + 1) / C,   d = (sum_c W_o[c]) * 1[z > 0]

   (a of 320 dims on Fashion-MNIST, h and d of 50: cheap for every candidate and evaluation item.)
   A network without a feature layer gets the output layer's term alone.
3. Retraining on the labeled set L plus (x, y) is the kernel regression of the residuals: the
   linearised network's outputs move by k(u, S) (K_SS + lambda I)^-1 R_S, S = L + {x}. The
   classifier was trained on L, so L's residuals are taken as zero, and x's residual is the
   cross-entropy's r_x = e_y - p(x). By the block inverse (a Schur complement) the change at u is
   one scalar times r_x:

       delta f(u) = alpha_u(x) r_x,  alpha_u(x) = (k(u, x) - k_uL K^-1 k_Lx) / (k(x, x) + lambda - k_xL K^-1 k_Lx)

   with K = K_LL + lambda I, lambda = ridge * mean diag K_LL.
4. The score: mean_u ||delta f(u)|| = ||r_x|| mean_u |alpha_u(x)| with y the most likely label
   (`label=likely`, MLMOC), or its expectation over y ~ p(x) (`label=expected`). Largest first.

Not included: the paper's sequential (streaming) variant and the full-network kernel (the conv
layers' contribution is left out: it needs per-example gradients of every parameter).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import ConfigError
from . import register_strategy
from .base import QueryState, Strategy, top_k
from .lookahead_round import held_out_split, pool_images


@dataclass
class NTKLookaheadOptions:
    """Options of `ntk-lookahead` (`--strategy-option key=value`)."""

    eval_fraction: float = 0.2  # share of the unlabeled pool held out for evaluation (the lookahead's split)
    eval_size: int = 2000  # evaluate on a seeded subsample of this many evaluation items (0 = all)
    ridge: float = 1e-3  # kernel regression's lambda as a share of the mean kernel diagonal on L
    label: str = "likely"  # likely: the predicted class (MLMOC); expected: the mean over p(y | x)
    chunk: int = 1024  # candidates scored at once

    def validate(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must lie strictly between 0 and 1, got {self.eval_fraction}")
        if self.eval_size < 0 or self.ridge <= 0 or self.chunk < 1:
            raise ConfigError("eval_size must be >= 0, ridge positive and chunk >= 1")
        if self.label not in ("likely", "expected"):
            raise ConfigError(f"label must be likely or expected, got {self.label!r}")


@dataclass
class KernelInputs:
    """What the last-two-layer kernel needs of a set of items (float64)."""

    inputs: torch.Tensor  # (N, A) a: the feature layer's input
    features: torch.Tensor  # (N, D) h = relu(z)
    signals: torch.Tensor  # (N, D) d = (sum_c W_o[c]) * 1[z > 0]
    logits: torch.Tensor  # (N, C)

    def rows(self, index) -> "KernelInputs":
        """The items at `index` (a slice or positions)."""
        return KernelInputs(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(parts: list["KernelInputs"]) -> "KernelInputs":
        return KernelInputs(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(KernelInputs)))


def has_feature_layer(model: torch.nn.Module) -> bool:
    """True when the network's embedding is relu(feature_layer(a)) (every project network); a model
    without one gets the output layer's kernel alone."""
    return isinstance(getattr(model, "fc_embed", None), torch.nn.Linear)


@torch.inference_mode()
def kernel_inputs(model: torch.nn.Module, images: torch.Tensor) -> KernelInputs:
    """a, h, d and the logits of normalised `images` under `model` (eval mode)."""
    if has_feature_layer(model):
        inputs = model.features_before_feature_layer(images)
        pre = model.feature_layer(inputs)
        features = torch.relu(pre)
        signals = (pre > 0) * model.fc_out.weight.sum(0)
    else:
        features = model.embed(images)
        inputs = signals = torch.zeros(len(features), 1, dtype=features.dtype, device=features.device)
    return KernelInputs(inputs.double(), features.double(), signals.double(), model.fc_out(features).double())


def pool_kernel_inputs(model: torch.nn.Module, state: QueryState, indices: np.ndarray) -> KernelInputs:
    batch = state.train_config.eval_batch_size
    parts = [kernel_inputs(model, pool_images(state, indices[start:start + batch]))
             for start in range(0, len(indices), batch)]
    if not parts:
        empty = torch.empty(0, 0, dtype=torch.float64, device=state.device)
        return KernelInputs(empty, empty, empty, empty)
    return KernelInputs.concat(parts)


def kernel(left: KernelInputs, right: KernelInputs, classes: int) -> torch.Tensor:
    """(N, M) the pseudo-NTK of the feature and output layers between two sets of items."""
    output_layer = left.features @ right.features.T + 1.0
    feature_layer = (left.signals @ right.signals.T) * (left.inputs @ right.inputs.T + 1.0)
    return output_layer + feature_layer / classes


def kernel_diagonal(items: KernelInputs, classes: int) -> torch.Tensor:
    """(N,) k(x, x) without forming the matrix."""
    return (items.features.pow(2).sum(1) + 1.0
            + items.signals.pow(2).sum(1) * (items.inputs.pow(2).sum(1) + 1.0) / classes)


def residual_norms(logits: torch.Tensor, label: str) -> torch.Tensor:
    """(N,) ||e_y - p(x)|| for the predicted y (likely), or its mean over y ~ p(x) (expected)."""
    probs = logits.softmax(1)
    if label == "likely":
        onehot = torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        return (onehot - probs).norm(dim=1)
    # ||e_y - p||^2 = 1 - 2 p_y + ||p||^2 for every y at once
    squared = (1.0 - 2.0 * probs + probs.pow(2).sum(1, keepdim=True)).clamp_min(0.0)
    return (probs * squared.sqrt()).sum(1)


def output_change_coefficients(labeled: KernelInputs, evaluation: KernelInputs, candidates: KernelInputs,
                               classes: int, ridge: float, chunk: int = 1024) -> torch.Tensor:
    """(Nc, Ne) alpha_u(x): an evaluation item's output change per unit residual of candidate x."""
    gram = kernel(labeled, labeled, classes)
    penalty = ridge * float(gram.diagonal().mean()) if len(gram) else ridge
    gram = gram + penalty * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor = torch.linalg.cholesky(gram)
    to_eval = torch.cholesky_solve(kernel(labeled, evaluation, classes), factor)  # K^-1 k_LU (L, Ne)
    out = []
    for start in range(0, len(candidates.inputs), chunk):
        part = candidates.rows(slice(start, start + chunk))
        cross = kernel(labeled, part, classes)  # (L, B) k_Lx
        schur = kernel_diagonal(part, classes) + penalty - (cross * torch.cholesky_solve(cross, factor)).sum(0)
        numerator = kernel(part, evaluation, classes) - cross.T @ to_eval  # (B, Ne)
        out.append(numerator / schur.clamp_min(penalty * 1e-6)[:, None])
    if not out:
        return torch.empty(0, len(evaluation.inputs), dtype=torch.float64)
    return torch.cat(out)


@register_strategy
class NTKLookahead(Strategy):
    name = "ntk-lookahead"
    help = "empirical-NTK lookahead (Mohamadi et al. 2022): most likely change of the outputs on held-out items"
    Options = NTKLookaheadOptions
    main_only = True  # one split and one kernel solve over the labeled set

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        model = state.model
        model.eval()
        unlabeled = state.unlabeled_indices
        positions, evaluation = held_out_split(state, self.options.eval_fraction, self.options.eval_size)
        candidates = unlabeled[positions]
        classes = state.num_classes
        labeled_items = pool_kernel_inputs(model, state, state.labeled_indices)
        eval_items = pool_kernel_inputs(model, state, evaluation)
        candidate_items = pool_kernel_inputs(model, state, candidates)
        scores = np.full(len(unlabeled), -np.inf)  # evaluation items: never before a candidate
        if len(candidates) and len(evaluation):
            alpha = output_change_coefficients(labeled_items, eval_items, candidate_items, classes,
                                               self.options.ridge, self.options.chunk)
            change = residual_norms(candidate_items.logits, self.options.label) * alpha.abs().mean(1)
            scores[positions] = change.cpu().numpy()
        elif len(candidates):  # nothing to judge on: no lesson is worth more than another
            scores[positions] = 0.0
        order = top_k(scores, k)
        self.diagnostics = {"candidates": int(len(candidates)), "evaluation": int(len(evaluation)),
                            "top_score": float(scores[order[0]]) if len(order) else None}
        return order, scores[order]
