"""What every mode of the student-teacher lookahead shares in one round: options, the splits, the
distilled student, the step size, and the feature layer's closed-form inputs.

`prepare_round` does the round's fixed cost once (distil the student, draw the candidates /
evaluation split, choose the step); the modes (lookahead.py's dispatch, lookahead_exact.py,
lookahead_fast.py, lookahead_full.py, lookahead_batch.py) score candidates from the
`LookaheadRound` it returns. This module imports none of them, so the modes import it at the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import seeding
from ..errors import ConfigError
from ..seeding import Stream, torch_seed
from ..train import DistillConfig, TrainResult, distill_student, embed_pool, fresh_copy
from .base import QueryState
from .lookahead_exact import StepRule
from .lookahead_fast import layer_matrix, with_bias_column

MODES = ("exact", "batched", "last-layer", "full-fast", "ridge")
DISTANCES = ("squared", "l2")
STRATA = ("none", "class", "cluster")
# saturate=true: distil until the loss stops improving by 0.1 % for 10 epochs, within 200 epochs
# (the audit of issue 16 saw students improve until 120-200 epochs; the default stops at 40).
SATURATED_DISTILL = dict(max_epochs=200, patience=10, min_delta=0.001)


@dataclass
class LookaheadOptions:
    """Options of the lookahead strategy (`--strategy-option key=value`)."""

    mode: str = "last-layer"  # exact | batched | last-layer | full-fast | ridge (converged, no step)
    last_layer: bool = False  # exact/batched: update only the student's feature layer
    steps: int = 2  # SGD steps on each candidate alone
    lr: float = 0.0  # student SGD step size; 0 = auto: lr_scale / (typical squared input norm, below)
    lr_scale: float = 0.05  # auto step: one step removes 2 * lr_scale of a typical candidate's feature error
    momentum: float = 0.0  # SGD momentum of the student's steps
    eval_fraction: float = 0.2  # share of the unlabeled pool held out for evaluation, redrawn each round
    eval_size: int = 0  # evaluate on a random subsample of this many evaluation items (0 = all)
    candidate_size: int = 0  # score a random subsample of this many candidates (0 = all; the rest are never picked)
    shortlist: int = 1000  # last-layer: candidates re-scored exactly (grown until the picks are certain)
    batch_aware: bool = False  # after each pick, teach it to the student and re-score the rest
    batch_aware_pool: int = 2000  # batch-aware: the best candidates the greedy picks are drawn from
    distill_loss: str = "l2"  # student distillation: l2 (per example) or mean (batch-mean features)
    distill_epochs: int = 40  # cap on distillation epochs
    distill_fixed_epochs: bool = False  # True: always distil distill_epochs; False: until saturation
    distill_patience: int = 4  # stop after this many epochs without a relative gain of distill_min_delta
    distill_min_delta: float = 0.01  # relative improvement of the epoch loss that counts
    saturate: bool = False  # distil to saturation: cap 200, patience 10, min_delta 0.001 (overrides the three above)
    students: int = 1  # an ensemble: distil this many students (own seeds) and average their distances
    distance: str = "squared"  # squared: mean_u ||S'(u) - C(u)||^2 (the default); l2: mean_u ||S'(u) - C(u)||
    stratify: str = "none"  # none | class (classifier's predicted class) | cluster (k-means on its features)
    stratify_clusters: int = 0  # stratify=cluster: clusters (0 = number of classes)
    ridge_lambda: float = 0.01  # ridge: penalty, times the labeled items' mean squared trunk output
    chunk_size: int = 16  # batched/full-fast: candidates per vectorised chunk
    trunk_rank: int = 16  # full-fast: principal directions of the trunk's change kept (0 = trunk moves ignored)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown lookahead mode {self.mode!r}; choose from: {', '.join(MODES)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must lie strictly between 0 and 1, got {self.eval_fraction}")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.lr < 0 or self.lr_scale <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr must be >= 0 (0 = auto), lr_scale positive and momentum in [0, 1)")
        if min(self.eval_size, self.candidate_size) < 0 or self.shortlist < 1 or self.batch_aware_pool < 1:
            raise ConfigError("eval_size and candidate_size must be >= 0, shortlist and batch_aware_pool >= 1")
        if self.chunk_size < 1 or self.distill_epochs < 1 or self.trunk_rank < 0:
            raise ConfigError("chunk_size and distill_epochs must be at least 1, trunk_rank at least 0")
        if self.batch_aware and self.mode not in ("last-layer", "full-fast"):
            raise ConfigError("batch_aware works with mode=last-layer or mode=full-fast")
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown lookahead distance {self.distance!r}; choose from: {', '.join(DISTANCES)}")
        if self.stratify not in STRATA:
            raise ConfigError(f"unknown stratify {self.stratify!r}; choose from: {', '.join(STRATA)}")
        if self.students < 1 or self.stratify_clusters < 0 or self.ridge_lambda <= 0:
            raise ConfigError("students must be at least 1, stratify_clusters >= 0 and ridge_lambda positive")
        if self.distill_patience < 1 or self.distill_min_delta < 0:
            raise ConfigError("distill_patience must be at least 1 and distill_min_delta >= 0")
        if self.distance == "l2" and self.mode == "full-fast":
            raise ConfigError("distance=l2 works with modes exact, batched, last-layer and ridge (full-fast's "
                              "closed form is a squared distance)")
        if self.batch_aware and (self.students > 1 or self.distance != "squared" or self.stratify != "none"):
            raise ConfigError("batch_aware works with one student, distance=squared and stratify=none")
        self.distill_config().validate()

    def distill_config(self) -> DistillConfig:
        """How each student is distilled."""
        if self.saturate:
            return DistillConfig(loss=self.distill_loss, **SATURATED_DISTILL)
        return DistillConfig(loss=self.distill_loss, max_epochs=self.distill_epochs, patience=self.distill_patience,
                             min_delta=self.distill_min_delta, fixed_epochs=self.distill_fixed_epochs)

    @property
    def updates_last_layer_only(self) -> bool:
        return self.mode == "last-layer" or (self.mode in ("exact", "batched") and self.last_layer)


def split_pool(unlabeled: np.ndarray, eval_fraction: float, seed: int, round_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, evaluation) pool indices, sorted: a seeded random split of the whole unlabeled pool.

    Drawn from the round's seed alone, so every shard of a sharded query sees the same split.
    """
    unlabeled = np.asarray(unlabeled, dtype=np.int64)
    rng = seeding.rng(seed, round_index, Stream.EVAL_SPLIT)
    order = rng.permutation(len(unlabeled))
    eval_count = int(round(eval_fraction * len(unlabeled)))
    if len(unlabeled) >= 2:
        eval_count = min(max(eval_count, 1), len(unlabeled) - 1)
    return np.sort(unlabeled[order[eval_count:]]), np.sort(unlabeled[order[:eval_count]])


def subsample(indices: np.ndarray, size: int, seed: int, round_index: int, stream: Stream) -> np.ndarray:
    """A seeded random `size` of `indices` (sorted), or all of them when size is 0 or too large."""
    if size <= 0 or size >= len(indices):
        return indices
    rng = seeding.rng(seed, round_index, stream)
    return np.sort(rng.choice(indices, size=size, replace=False))


def held_out_split(state: QueryState, eval_fraction: float, eval_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into state.unlabeled_indices of the candidates, evaluation pool indices): the
    lookahead's seeded split, its evaluation side subsampled to `eval_size` (0 = all). For the
    strategies that judge a candidate on the lookahead's own evaluation items (glister, ntk-lookahead)."""
    candidates, evaluation = split_pool(state.pool.unlabeled_indices, eval_fraction, state.seed, state.round_index)
    evaluation = subsample(evaluation, eval_size, state.seed, state.round_index, Stream.EVAL_SUBSAMPLE)
    return np.flatnonzero(np.isin(state.unlabeled_indices, candidates)), evaluation


@dataclass
class LookaheadRound:
    """What one round's scoring shares: the student, the splits, the teacher's targets, the step."""

    key: tuple
    student: nn.Module
    candidates: np.ndarray  # pool indices that may be picked this round (after any subsample)
    evaluation: np.ndarray  # pool indices the lessons are judged on (after any subsample)
    eval_targets: torch.Tensor  # (Ne, D) teacher features of the evaluation items
    rule: StepRule
    distill: TrainResult
    distill_distance: float  # mean student-teacher squared feature distance on the evaluation items
    baseline: float = math.nan  # the same distance before any lookahead step
    baseline_l2: float = math.nan  # mean_u ||S_feat(u) - C_feat(u)|| before any step (distance=l2)
    cache: dict = field(default_factory=dict)


def student_inputs(student: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return student.features_before_feature_layer(images)


@torch.no_grad()  # not inference mode: the exact loops take gradients through these images
def pool_images(state: QueryState, indices: np.ndarray) -> torch.Tensor:
    """Normalised images of pool `indices` on the state's device."""
    picked = state.dataset.train_images[torch.as_tensor(indices, dtype=torch.long)]
    return state.dataset.normalize(picked.to(state.device))


@torch.inference_mode()
def trunk_outputs(student: nn.Module, state: QueryState, indices: np.ndarray) -> torch.Tensor:
    """(N, d_in + 1) the frozen trunk's output with the bias column, for pool `indices`."""
    batch = state.train_config.eval_batch_size
    parts = [student_inputs(student, pool_images(state, indices[start:start + batch]))
             for start in range(0, len(indices), batch)]
    width = student.feature_layer.in_features
    inputs = torch.cat(parts) if parts else torch.empty(0, width, device=state.device)
    return with_bias_column(inputs)


def auto_step(student: nn.Module, state: QueryState, targets_of, options: LookaheadOptions) -> float:
    """The student's SGD step size when `lr=0`: lr_scale over the typical ratio ||grad_theta L||^2 / ||grad_z L||^2.

    On the feature layer alone the ratio is exactly ||h~||^2, so one step moves an active unit's
    error by the factor (1 - 2 lr_scale) on a typical candidate: a step that helps rather than
    overshoots (the input norms are large: lr 1e-3 would overshoot five-fold on Fashion-MNIST).
    For the full network the trunk's parameters add to the ratio, and it is measured on up to 64
    labeled items.
    """
    labeled = state.labeled_indices
    if len(labeled) == 0:
        labeled = state.pool.unlabeled_indices
    sample = subsample(labeled, 64, state.seed, state.round_index, Stream.STEP_SAMPLE)
    if options.updates_last_layer_only:
        norms = trunk_outputs(student, state, sample).pow(2).sum(1)
        return options.lr_scale / float(norms.mean())
    images, targets = pool_images(state, sample), targets_of(sample).clone()
    params = [p for name, p in student.named_parameters() if not name.startswith("fc_out.")]
    ratios = []
    for position in range(len(sample)):
        z = student.feature_layer(student_inputs(student, images[position:position + 1]))
        loss = (torch.relu(z) - targets[position:position + 1]).pow(2).sum()
        gradients = torch.autograd.grad(loss, [z] + params)
        output_norm = float(gradients[0].pow(2).sum())
        if output_norm > 0:
            ratios.append(sum(float(g.pow(2).sum()) for g in gradients[1:]) / output_norm)
    return options.lr_scale / float(np.mean(ratios)) if ratios else options.lr_scale


@dataclass
class SharedStudent:
    """A round's distilled student as rank 0 hands it to the other ranks of a sharded query."""

    key: tuple
    weights: dict  # the student's state_dict, on the CPU
    distill: TrainResult
    lr: float


def member_seed(seed: int, round_index: int, stream: Stream, member: int) -> int:
    """The torch seed of ensemble member `member` (member 0 is the single student of students=1)."""
    base = torch_seed(seed, round_index, stream)
    return base if member == 0 else (base + member * 2_654_435) % (2**31 - 1)


def prepare_round(state: QueryState, options: LookaheadOptions, shared: SharedStudent | None = None,
                  member: int = 0) -> LookaheadRound:
    """Distil the student, draw the splits and choose the step: everything scoring needs.

    With `shared` (another rank's distillation of this same round) the student's weights and step
    are taken from it instead of distilling again. `member` (0..students-1) picks an ensemble
    member's initialisation and batch order; the splits are the same for every member.
    """
    candidates, evaluation = split_pool(state.pool.unlabeled_indices, options.eval_fraction, state.seed,
                                        state.round_index)
    candidates = subsample(candidates, options.candidate_size, state.seed, state.round_index, Stream.CANDIDATE_SUBSAMPLE)
    evaluation = subsample(evaluation, options.eval_size, state.seed, state.round_index, Stream.EVAL_SUBSAMPLE)
    teacher = state.model.eval()
    batch = state.train_config.eval_batch_size
    student = fresh_copy(teacher, member_seed(state.seed, state.round_index, Stream.STUDENT_INIT, member))
    student = student.to(state.device)
    if shared is None:
        distilled = distill_student(student, teacher, state.dataset, state.labeled_indices, options.distill_config(),
                                    state.device,
                                    seed=member_seed(state.seed, state.round_index, Stream.STUDENT_ORDER, member))
    else:
        student.load_state_dict(shared.weights)
        distilled = shared.distill
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    eval_targets = embed_pool(teacher, state.dataset, evaluation, state.device, batch)
    with torch.inference_mode():
        eval_student = embed_pool(student, state.dataset, evaluation, state.device, batch)
        gaps = (eval_student - eval_targets).pow(2).sum(1)
        distance = float(gaps.mean()) if len(evaluation) else math.nan
        distance_l2 = float(gaps.sqrt().mean()) if len(evaluation) else math.nan

    def targets_of(indices):
        return embed_pool(teacher, state.dataset, indices, state.device, batch)

    if shared is not None:
        lr = shared.lr  # rank 0's auto step, measured on the same student
    elif options.mode == "ridge":
        lr = 0.0  # the converged lookahead takes no step
    elif options.lr > 0:
        lr = options.lr
    else:
        lr = auto_step(student, state, targets_of, options)
    key = round_key(state, options, member)
    return LookaheadRound(key=key, student=student, candidates=candidates, evaluation=evaluation,
                          eval_targets=eval_targets.clone(), rule=StepRule(lr, options.momentum, options.steps),
                          distill=distilled, distill_distance=distance, baseline=distance, baseline_l2=distance_l2)


def round_key(state: QueryState, options: LookaheadOptions, member: int = 0) -> tuple:
    labeled = state.labeled_indices
    return (state.seed, state.round_index, len(labeled), int(labeled.sum()), repr(options), member)


def last_layer_problem(state: QueryState, round_: LookaheadRound) -> dict:
    """The feature layer's closed form inputs for the evaluation items, computed once per round."""
    if "eval_inputs" not in round_.cache:
        layer = round_.student.feature_layer
        weight = layer_matrix(layer.weight.detach(), layer.bias.detach())  # (D, d + 1)
        eval_inputs = trunk_outputs(round_.student, state, round_.evaluation)
        round_.cache.update(weight=weight, eval_inputs=eval_inputs, eval_z=eval_inputs @ weight.T)
    return round_.cache


def candidate_problem(state: QueryState, round_: LookaheadRound, indices: np.ndarray):
    problem = last_layer_problem(state, round_)
    inputs = trunk_outputs(round_.student, state, indices)  # (Nc, d + 1)
    targets = embed_pool(state.model, state.dataset, indices, state.device, state.train_config.eval_batch_size)
    z = inputs @ problem["weight"].T
    return problem, inputs, targets, z


def candidate_positions(state: QueryState, round_: LookaheadRound) -> tuple[np.ndarray, np.ndarray]:
    """Positions into state.unlabeled_indices that are this round's candidates, and their pool indices."""
    unlabeled = state.unlabeled_indices
    mask = np.isin(unlabeled, round_.candidates)
    return np.flatnonzero(mask), unlabeled[mask]
