"""The seed's student-teacher lookahead: query the candidates whose lesson a student generalises best.

Each round: distil a student S (same architecture as the classifier C) on the labeled set so that
S_feat ~ C_feat; split the unlabeled pool 80/20 into candidates and an evaluation split (redrawn
each round from the round's seed, never from the candidates a shard was given); for each candidate,
take `steps` SGD steps on it alone and measure the mean ||S'_feat(u) - C_feat(u)||^2 over the
evaluation split. The lowest distance is queried first (the score is minus the distance, and
evaluation items score -inf so they are never picked).

Modes (docs/lookahead.md has the maths and the measurements):
- `exact`      the faithful loop; `last_layer=true` updates only the feature layer (the references);
- `batched`    the same maths with torch.func (vmap over candidates), for GPUs;
- `last-layer` the rank-one closed form for every candidate, then an exact re-scoring of a shortlist;
- `full-fast`  the whole network learns: the exact two steps per candidate are summarised by a
               rank-one feature-layer update, evaluated in closed form (see lookahead_full.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..train import embed_pool
from . import register_strategy
from .base import QueryState, Strategy, top_k
from .lookahead_batch import batch_aware_select
from .lookahead_exact import batched_distances, exact_distances, exact_last_layer_distances
from .lookahead_fast import FixedPatternScorer, exact_distances_closed_form, is_certified, rank_one_coefficients, shortlist_positions
from .lookahead_full import full_fast_distances
from .lookahead_round import (LookaheadOptions, LookaheadRound, SharedStudent, candidate_positions, candidate_problem,
                              pool_images, prepare_round, round_key)

# --------------------------------------------------------------------------------------------
# Distances by mode, for given candidate pool indices


def last_layer_distances(state: QueryState, round_: LookaheadRound, indices: np.ndarray,
                         shortlist: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Closed-form distances for pool `indices`: (approximate, exact-or-nan, info).

    All candidates get the fixed-pattern distance; the `shortlist` best are re-scored exactly.
    """
    problem, inputs, targets, z = candidate_problem(state, round_, indices)
    coefficients = rank_one_coefficients(z, targets, inputs.pow(2).sum(1), round_.rule)
    scorer = FixedPatternScorer(problem["eval_inputs"], problem["eval_z"], round_.eval_targets)
    approximate = scorer.distances(inputs, coefficients).numpy()
    exact = np.full(len(indices), np.nan)
    chosen = shortlist_positions(approximate, min(shortlist, len(indices)))
    exact[chosen] = exact_distances_closed_form(inputs[chosen], coefficients[chosen], problem["eval_inputs"],
                                                problem["eval_z"], round_.eval_targets).numpy()
    info = {"inputs": inputs, "coefficients": coefficients, "targets": targets, "z": z}
    return approximate, exact, info


def reference_distances(state: QueryState, round_: LookaheadRound, indices: np.ndarray,
                        options: LookaheadOptions) -> np.ndarray:
    """Distances by the `exact` or `batched` loop (full network, or the feature layer alone)."""
    if options.updates_last_layer_only and options.mode == "exact":
        problem, inputs, targets, _ = candidate_problem(state, round_, indices)
        weight = problem["weight"]
        # Clones: tensors made under inference mode cannot enter autograd.
        return exact_last_layer_distances(weight[:, :-1].clone(), weight[:, -1].clone(), inputs[:, :-1].clone(),
                                          targets.clone(), problem["eval_inputs"][:, :-1].clone(),
                                          round_.eval_targets.clone(), round_.rule).numpy()
    if "eval_images" not in round_.cache:
        round_.cache["eval_images"] = pool_images(state, round_.evaluation)
    eval_images = round_.cache["eval_images"]
    out = []
    batch = state.train_config.eval_batch_size
    for start in range(0, len(indices), batch):
        part = indices[start:start + batch]
        images = pool_images(state, part).clone()
        targets = embed_pool(state.model, state.dataset, part, state.device, batch).clone()
        if options.mode == "batched":
            out.append(batched_distances(round_.student, images, targets, eval_images, round_.eval_targets,
                                         round_.rule, options.updates_last_layer_only, options.chunk_size))
        else:
            out.append(exact_distances(round_.student, images, targets, eval_images, round_.eval_targets,
                                       round_.rule, options.updates_last_layer_only))
    return torch.cat(out).numpy() if out else np.empty(0)


def candidate_distances(state: QueryState, round_: LookaheadRound, indices: np.ndarray,
                        options: LookaheadOptions, shortlist: int | None = None) -> np.ndarray:
    """(len(indices),) lookahead distances, lower = better, by the options' mode.

    In `last-layer` mode the shortlist carries exact distances and every other candidate is ranked
    after it (its approximate distance, raised above the shortlist's worst when needed).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.empty(0)
    if options.mode == "last-layer":
        approximate, exact, _ = last_layer_distances(state, round_, indices, shortlist or options.shortlist)
        return merge_shortlist(approximate, exact)
    if options.mode == "full-fast":
        return full_fast_distances(state, round_, indices, options)
    return reference_distances(state, round_, indices, options)


def merge_shortlist(approximate: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Exact distances where known; every other item ranks after the worst exact one."""
    known = ~np.isnan(exact)
    if not known.any():
        return approximate
    merged = approximate.copy()
    merged[known] = exact[known]
    floor = np.nextafter(exact[known].max(), np.inf)
    merged[~known] = np.maximum(approximate[~known], floor)
    return merged


# --------------------------------------------------------------------------------------------
# The strategy


@register_strategy
class Lookahead(Strategy):
    name = "lookahead"
    help = "the seed's student-teacher lookahead: query what a student generalises best from"
    Options = LookaheadOptions

    def __init__(self, **options):
        super().__init__(**options)
        self._round: LookaheadRound | None = None

    def sharding_plan(self) -> tuple[str, tuple[str, ...]]:
        # last-layer (and batch-aware) re-score a shortlist they certify over all candidates: cheap, and
        # global, so rank 0 answers alone; the other modes score item by item.
        if self.options.mode == "last-layer" or self.options.batch_aware:
            return "main", ()
        return "shard", ()

    def round_state(self, state: QueryState) -> LookaheadRound:
        """This round's student and splits, distilled once and shared by every call in the round."""
        key = round_key(state, self.options)
        if self._round is None or self._round.key != key:
            self._start_round(prepare_round(state, self.options))
        return self._round

    def _start_round(self, round_: LookaheadRound) -> None:
        self._round = round_
        self.diagnostics = {"lr": round_.rule.lr, "distill_epochs": round_.distill.epochs,
                            "distill_distance": round_.distill_distance, "candidates": len(round_.candidates),
                            "evaluation": len(round_.evaluation)}

    def shared_round_state(self, state: QueryState) -> SharedStudent:
        round_ = self.round_state(state)
        weights = {name: tensor.detach().cpu() for name, tensor in round_.student.state_dict().items()}
        return SharedStudent(key=round_.key, weights=weights, distill=round_.distill, lr=round_.rule.lr)

    def adopt_round_state(self, state: QueryState, shared: SharedStudent) -> None:
        key = round_key(state, self.options)
        if shared.key != key:
            raise RuntimeError(f"lookahead: rank 0 distilled round {shared.key[:3]}, this rank is at {key[:3]}")
        if self._round is None or self._round.key != key:
            self._start_round(prepare_round(state, self.options, shared))

    def score_candidates(self, state: QueryState, pool_indices: np.ndarray) -> np.ndarray:
        """Scores (minus the distance) for candidate pool indices; for sharded scoring."""
        round_ = self.round_state(state)
        distances = candidate_distances(state, round_, np.asarray(pool_indices, dtype=np.int64), self.options)
        self.diagnostics["helped_fraction"] = float(np.mean(distances < round_.baseline)) if len(distances) else math.nan
        return -distances

    def score(self, state: QueryState) -> np.ndarray:
        if len(state.unlabeled_indices) < 2:  # see select: nothing is left to measure a lesson on
            return np.zeros(len(state.unlabeled_indices))
        scores = np.full(len(state.unlabeled_indices), -np.inf)
        positions, indices = candidate_positions(state, self.round_state(state))
        scores[positions] = self.score_candidates(state, indices)
        return scores

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(state.unlabeled_indices) < 2:
            # One unlabeled item: no evaluation split can be held out to score it on, and it is the only
            # pick anyway (a tiny pool, e.g. --initial 1 on two images).
            self.diagnostics = {"candidates": len(state.unlabeled_indices), "evaluation": 0}
            return np.arange(k), np.zeros(k)
        round_ = self.round_state(state)
        positions, indices = candidate_positions(state, round_)
        if self.options.batch_aware:
            first = candidate_distances(state, round_, indices, self.options)
            picks, distances, diagnostics = batch_aware_select(state, round_, indices, first, k,
                                                               self.options.batch_aware_pool)
            self.diagnostics.update(diagnostics)
            return positions[picks], -distances
        if self.options.mode != "last-layer":
            return super().select(state, k)
        # Grow the exactly re-scored shortlist until the picks cannot change (see is_certified).
        size = max(self.options.shortlist, k)
        while True:
            approximate, exact, _ = last_layer_distances(state, round_, indices, size)
            known = ~np.isnan(exact)
            if is_certified(exact[known], approximate, np.flatnonzero(known), k) or size >= len(indices):
                break
            size *= 2
        distances = merge_shortlist(approximate, exact)
        self.diagnostics.update(shortlist=int(known.sum()), helped_fraction=float(np.mean(approximate < round_.baseline)),
                                max_approximation_error=float(np.max(np.abs(exact[known] - approximate[known]))))
        scores = np.full(len(state.unlabeled_indices), -np.inf)
        scores[positions] = -distances
        picks = top_k(scores, k)
        return picks, scores[picks]
