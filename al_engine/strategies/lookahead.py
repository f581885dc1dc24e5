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
               rank-one feature-layer update, evaluated in closed form (see lookahead_full.py);
- `ridge`      no step at all: the exact effect of adding the candidate to a ridge refit of the
               student's feature layer (Sherman-Morrison; see lookahead_ridge.py).

Options that apply to every mode: `students=K` averages the distances of K students distilled
from their own seeds; `saturate=true` distils each to saturation; `distance=l2` scores the mean
unsquared distance; `stratify=class|cluster` takes the top-k in turns from each predicted class or
k-means cluster of the classifier's features.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..train import embed_pool
from . import register_strategy
from .base import QueryState, Strategy, top_k
from .geometry import kmeans
from .lookahead_batch import batch_aware_select
from .lookahead_exact import batched_distances, exact_distances, exact_last_layer_distances
from .lookahead_fast import FixedPatternScorer, exact_distances_closed_form, is_certified, rank_one_coefficients, shortlist_positions
from .lookahead_full import full_fast_distances
from .lookahead_ridge import ridge_distances, ridge_problem
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
    squared = options.distance == "squared"
    if options.updates_last_layer_only and options.mode == "exact":
        problem, inputs, targets, _ = candidate_problem(state, round_, indices)
        weight = problem["weight"]
        # Clones: tensors made under inference mode cannot enter autograd.
        return exact_last_layer_distances(weight[:, :-1].clone(), weight[:, -1].clone(), inputs[:, :-1].clone(),
                                          targets.clone(), problem["eval_inputs"][:, :-1].clone(),
                                          round_.eval_targets.clone(), round_.rule, squared).numpy()
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
                                         round_.rule, options.updates_last_layer_only, options.chunk_size,
                                         squared=squared))
        else:
            out.append(exact_distances(round_.student, images, targets, eval_images, round_.eval_targets,
                                       round_.rule, options.updates_last_layer_only, squared=squared))
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
    if options.mode == "ridge":
        return ridge_distances(state, round_, indices, options)
    if options.mode == "last-layer" and options.distance == "l2":
        # The fixed-pattern form is a squared distance: every candidate is scored exactly instead.
        problem, inputs, targets, z = candidate_problem(state, round_, indices)
        coefficients = rank_one_coefficients(z, targets, inputs.pow(2).sum(1), round_.rule)
        return exact_distances_closed_form(inputs, coefficients, problem["eval_inputs"], problem["eval_z"],
                                           round_.eval_targets, squared=False).numpy()
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


def baseline_distance(state: QueryState, round_: LookaheadRound, options: LookaheadOptions) -> float:
    """The evaluation distance before any lesson, in the options' mode and distance."""
    if options.mode == "ridge":
        problem = ridge_problem(state, round_, options)
        if options.distance == "squared":
            return problem["baseline"]
        return float(problem["residual"].pow(2).sum(1).sqrt().mean())
    return round_.baseline if options.distance == "squared" else round_.baseline_l2


def strata_of(state: QueryState, positions: np.ndarray, options: LookaheadOptions) -> np.ndarray:
    """(len(positions),) stratum of each candidate (positions into state.unlabeled_indices)."""
    if options.stratify == "class":
        return state.unlabeled_probs()[torch.as_tensor(positions)].argmax(1).cpu().numpy()
    features = state.unlabeled_embeddings()[torch.as_tensor(positions)]
    clusters = min(options.stratify_clusters or state.num_classes, len(positions))
    return kmeans(features, clusters, state.rng).assignment.cpu().numpy()


def stratified_order(rank: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """Positions in pick order: the strata take turns, each giving its best remaining item, and within
    a turn the better item (lower global `rank`) comes first. So the first k picks hold every
    stratum (that has items left) equally often, to within one."""
    order = np.argsort(rank, kind="stable")
    within = np.empty(len(rank), dtype=np.int64)
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        within[members] = np.arange(len(members))
    return np.lexsort((rank, within))


@register_strategy
class Lookahead(Strategy):
    name = "lookahead"
    help = "the seed's student-teacher lookahead: query what a student generalises best from"
    Options = LookaheadOptions

    def __init__(self, **options):
        super().__init__(**options)
        self._rounds: list[LookaheadRound] = []

    @property
    def _round(self) -> LookaheadRound | None:
        """The first (with students=1 the only) student's round."""
        return self._rounds[0] if self._rounds else None

    @_round.setter
    def _round(self, round_: LookaheadRound) -> None:
        self._rounds = [round_]

    def sharding_plan(self) -> tuple[str, tuple[str, ...]]:
        # last-layer (and batch-aware) re-score a shortlist they certify over all candidates: cheap, and
        # global, so rank 0 answers alone; the other modes score item by item. Stratified picks are global.
        if self.options.mode in ("last-layer", "ridge") or self.options.batch_aware or self.options.stratify != "none":
            return "main", ()
        return "shard", ()

    def member_rounds(self, state: QueryState) -> list[LookaheadRound]:
        """This round's students (one per ensemble member) and splits, distilled once per round."""
        keys = [round_key(state, self.options, member) for member in range(self.options.students)]
        if [round_.key for round_ in self._rounds] != keys:
            self._start_rounds([prepare_round(state, self.options, member=member)
                                for member in range(self.options.students)])
        return self._rounds

    def round_state(self, state: QueryState) -> LookaheadRound:
        """The first student's round (the only one with students=1)."""
        return self.member_rounds(state)[0]

    def _start_rounds(self, rounds: list[LookaheadRound]) -> None:
        self._rounds = rounds
        first = rounds[0]
        self.diagnostics = {"lr": first.rule.lr, "distill_epochs": first.distill.epochs,
                            "distill_distance": first.distill_distance, "candidates": len(first.candidates),
                            "evaluation": len(first.evaluation)}
        if len(rounds) > 1:
            self.diagnostics.update(students=len(rounds), member_lr=[r.rule.lr for r in rounds],
                                    member_distill_epochs=[r.distill.epochs for r in rounds],
                                    member_distill_distance=[r.distill_distance for r in rounds])

    def shared_round_state(self, state: QueryState) -> SharedStudent | list[SharedStudent]:
        shared = [SharedStudent(key=round_.key, distill=round_.distill, lr=round_.rule.lr,
                                weights={name: tensor.detach().cpu() for name, tensor in round_.student.state_dict().items()})
                  for round_ in self.member_rounds(state)]
        return shared[0] if len(shared) == 1 else shared

    def adopt_round_state(self, state: QueryState, shared: SharedStudent | list[SharedStudent]) -> None:
        shared = [shared] if isinstance(shared, SharedStudent) else list(shared)
        keys = [round_key(state, self.options, member) for member in range(self.options.students)]
        if [item.key for item in shared] != keys:
            raise RuntimeError(f"lookahead: rank 0 distilled round {shared[0].key[:3]}, this rank is at {keys[0][:3]}")
        if [round_.key for round_ in self._rounds] != keys:
            self._start_rounds([prepare_round(state, self.options, item, member)
                                for member, item in enumerate(shared)])

    def member_distances(self, state: QueryState, pool_indices: np.ndarray) -> np.ndarray:
        """(students, N) each student's distance for candidate pool indices."""
        indices = np.asarray(pool_indices, dtype=np.int64)
        return np.stack([candidate_distances(state, round_, indices, self.options)
                         for round_ in self.member_rounds(state)])

    def score_candidates(self, state: QueryState, pool_indices: np.ndarray) -> np.ndarray:
        """Scores (minus the distance, averaged over the students) for candidate pool indices."""
        distances = self.member_distances(state, pool_indices).mean(0)
        baseline = float(np.mean([baseline_distance(state, round_, self.options) for round_ in self._rounds]))
        self.diagnostics["helped_fraction"] = float(np.mean(distances < baseline)) if len(distances) else math.nan
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
        if self.options.stratify != "none":
            return self._stratified_select(state, positions, indices, k)
        if self.options.mode != "last-layer" or self.options.students > 1 or self.options.distance != "squared":
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

    def _stratified_select(self, state: QueryState, positions: np.ndarray, indices: np.ndarray,
                           k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k taken in turns from each stratum (predicted class or k-means cluster of the candidates)."""
        if self.options.mode == "last-layer" and self.options.students == 1 and self.options.distance == "squared":
            # Exact distances on the shortlist, the fixed-pattern ones elsewhere: within a stratum the
            # shortlist ranks first (as merge_shortlist does), the rest by their approximate distance.
            approximate, exact, _ = last_layer_distances(state, self.round_state(state), indices, self.options.shortlist)
            known = ~np.isnan(exact)
            distances = np.where(known, exact, approximate)
            rank = np.empty(len(indices), dtype=np.int64)
            rank[np.lexsort((np.arange(len(indices)), distances, ~known))] = np.arange(len(indices))
            distances = merge_shortlist(approximate, exact)
        else:
            distances = -self.score_candidates(state, indices)
            rank = np.empty(len(indices), dtype=np.int64)
            rank[np.lexsort((np.arange(len(indices)), distances))] = np.arange(len(indices))
        strata = strata_of(state, positions, self.options)
        order = stratified_order(rank, strata)[:k]
        self.diagnostics["strata"] = int(len(np.unique(strata)))
        return positions[order], -distances[order]
