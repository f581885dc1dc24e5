"""The lookahead strategy: every fast mode against its exact reference, on tiny networks."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from al_engine.data import Dataset, Pool
from al_engine.errors import ConfigError
from al_engine.models import SmallCNN
from al_engine.strategies import QueryState, get_strategy
from al_engine.strategies.lookahead import candidate_distances
from al_engine.strategies.lookahead_round import LookaheadOptions, prepare_round, split_pool
from al_engine.strategies.lookahead_batch import greedy_lessons
from al_engine.strategies.lookahead_exact import StepRule
from al_engine.strategies.lookahead_fast import (FixedPatternScorer, exact_distances_closed_form,
                                                 rank_one_coefficients)
from al_engine.train import TrainConfig

TINY = dict(distill_epochs=3, distill_fixed_epochs=True)


def tiny_state(images: torch.Tensor, labeled: int = 10, embed_dim: int = 6, seed: int = 0) -> QueryState:
    count = len(images)
    dataset = Dataset(name="tiny", classes=["a", "b"], train_images=images, train_labels=torch.arange(count) % 2)
    pool = Pool(count)
    pool.add_labels(np.arange(labeled), np.arange(labeled) % 2, -1)
    torch.manual_seed(seed)
    model = SmallCNN(embed_dim=embed_dim, num_classes=2).eval()
    return QueryState(model=model, dataset=dataset, pool=pool, device=torch.device("cpu"), seed=seed,
                      train_config=TrainConfig(eval_batch_size=64))


@pytest.fixture(scope="module")
def state():
    generator = torch.Generator().manual_seed(1)
    return tiny_state(torch.randint(0, 256, (40, 1, 28, 28), generator=generator, dtype=torch.uint8))


@pytest.fixture(scope="module")
def round_(state):
    return prepare_round(state, LookaheadOptions(**TINY))


def test_split_is_disjoint_seeded_and_the_same_for_every_shard(state):
    unlabeled = state.pool.unlabeled_indices
    candidates, evaluation = split_pool(unlabeled, 0.2, seed=0, round_index=3)
    assert len(evaluation) == 6 and len(candidates) == 24
    assert not set(candidates) & set(evaluation)
    assert sorted(set(candidates) | set(evaluation)) == sorted(unlabeled)
    again, _ = split_pool(unlabeled, 0.2, seed=0, round_index=3)
    other, _ = split_pool(unlabeled, 0.2, seed=0, round_index=4)
    assert np.array_equal(candidates, again) and not np.array_equal(candidates, other)
    # A shard given part of the pool sees the same evaluation split: its evaluation items score -inf.
    strategy = get_strategy("lookahead", **TINY)
    shard = QueryState(model=state.model, dataset=state.dataset, pool=state.pool, device=state.device,
                       seed=state.seed, train_config=state.train_config, candidates=unlabeled[::2])
    scores = strategy.score(shard)
    assert len(scores) == len(unlabeled[::2])
    evaluation = strategy.round_state(shard).evaluation
    assert np.array_equal(np.isinf(scores), np.isin(unlabeled[::2], evaluation))
    whole = strategy.score(dataclasses.replace(shard, candidates=None))
    assert np.allclose(whole[::2][np.isfinite(scores)], scores[np.isfinite(scores)])


def test_rank_one_coefficients_by_hand():
    # h~ = [1, 1] (||h~||^2 = 2), W~ = [1, 0]: z = 1, target 0, lr 0.25.
    # step 1: delta = 2, a = 0.5, z = 1 - 0.25 * 2 * 2 = 0; step 2: delta = 0 (ReLU off at 0).
    z, target, norms = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([2.0])
    assert rank_one_coefficients(z, target, norms, StepRule(0.25)).item() == pytest.approx(0.5)
    # z = 2, target 1, lr 0.1: delta 2, a 0.2, z 1.6; delta 1.2 -> a 0.32; momentum 0.5: buffer 2.2 -> a 0.42
    z, target = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert rank_one_coefficients(z, target, norms, StepRule(0.1)).item() == pytest.approx(0.32)
    assert rank_one_coefficients(z, target, norms, StepRule(0.1, momentum=0.5)).item() == pytest.approx(0.42)
    # An evaluation item h~ = [2, 1], target 0: z = 2 moves by k a = 3 * 0.5 to 0.5, distance 0.25.
    candidate, evaluation = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0]])
    distance = exact_distances_closed_form(candidate, torch.tensor([[0.5]]), evaluation, torch.tensor([[2.0]]),
                                           torch.tensor([[0.0]]))
    assert distance.item() == pytest.approx(0.25)


def test_fixed_pattern_is_exact_when_no_unit_changes_sign():
    generator = torch.Generator().manual_seed(0)
    eval_inputs = torch.rand(30, 5, generator=generator)
    eval_z = torch.randn(30, 4, generator=generator).sign() * (2.0 + torch.rand(30, 4, generator=generator))
    targets = torch.rand(30, 4, generator=generator)
    inputs, coefficients = torch.rand(7, 5, generator=generator), 0.05 * torch.randn(7, 4, generator=generator)
    exact = exact_distances_closed_form(inputs, coefficients, eval_inputs, eval_z, targets)
    approximate = FixedPatternScorer(eval_inputs, eval_z, targets).distances(inputs, coefficients, chunk_size=3)
    assert torch.allclose(exact, approximate, rtol=1e-5, atol=1e-5)


def test_last_layer_closed_form_equals_the_exact_loop(state, round_):
    candidates = round_.candidates
    loop = candidate_distances(state, round_, candidates, LookaheadOptions(mode="exact", last_layer=True, **TINY))
    closed = candidate_distances(state, round_, candidates, LookaheadOptions(shortlist=len(candidates), **TINY))
    assert np.allclose(closed, loop, rtol=1e-5, atol=1e-6)
    # The strategy's picks (shortlist of 4, grown until certain) equal the loop's top 5.
    strategy = get_strategy("lookahead", shortlist=4, **TINY)
    strategy._round = round_
    picked, _ = strategy.query(state, 5)
    assert list(picked) == list(candidates[np.argsort(loop, kind="stable")[:5]])


@pytest.mark.parametrize("last_layer", [False, True])
def test_batched_equals_exact(state, round_, last_layer):
    candidates = round_.candidates[:10]
    exact = candidate_distances(state, round_, candidates, LookaheadOptions(mode="exact", last_layer=last_layer, **TINY))
    batched = candidate_distances(state, round_, candidates,
                                  LookaheadOptions(mode="batched", last_layer=last_layer, chunk_size=4, **TINY))
    assert np.allclose(batched, exact, rtol=1e-4, atol=1e-6)
    assert list(np.argsort(batched, kind="stable")) == list(np.argsort(exact, kind="stable"))
    assert len(set(np.round(exact, 6))) > 1  # the candidates really differ


def test_full_fast_matches_the_exact_loop_at_small_steps(state, round_):
    """At a small step every approximation of full-fast is second order: its changes match exact's."""
    small = dataclasses.replace(round_, cache={}, rule=StepRule(lr=round_.rule.lr / 200, steps=2))
    candidates = round_.candidates
    exact = candidate_distances(state, small, candidates, LookaheadOptions(mode="exact", **TINY))
    fast = candidate_distances(state, small, candidates, LookaheadOptions(mode="full-fast", trunk_rank=24, **TINY))
    exact_change, fast_change = exact - small.baseline, fast - small.baseline
    assert np.max(np.abs(fast_change - exact_change)) < 0.01 * np.max(np.abs(exact_change))
    assert spearmanr(fast, exact)[0] > 0.95
    # Leaving out the trunk's move on the evaluation items does worse.
    no_trunk = candidate_distances(state, dataclasses.replace(small, cache={}), candidates,
                                   LookaheadOptions(mode="full-fast", trunk_rank=0, **TINY))
    assert np.max(np.abs(no_trunk - exact)) > np.max(np.abs(fast - exact))


def test_batch_aware_does_not_pick_a_lesson_twice():
    """Two copies of the best candidate: the plain ranking takes both, batch-aware only one."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.rand(6, 4, generator=generator)
    inputs[1] = inputs[0]
    weight = torch.randn(3, 4, generator=generator)
    eval_inputs = inputs[0] + 0.01 * torch.rand(20, 4, generator=generator)  # evaluation items like candidate 0
    eval_targets = torch.relu(eval_inputs @ weight.T) + 1.0  # the student is 1 short on every unit
    targets = torch.relu(inputs @ weight.T) + 1.0
    rule = StepRule(lr=0.2 / float(inputs[0].pow(2).sum()))
    picks, _ = greedy_lessons(inputs, targets, weight, eval_inputs, eval_targets, rule, k=1)
    plain = FixedPatternScorer(eval_inputs, eval_inputs @ weight.T, eval_targets).distances(
        inputs, rank_one_coefficients(inputs @ weight.T, targets, inputs.pow(2).sum(1), rule))
    assert set(np.argsort(plain.numpy(), kind="stable")[:2]) == {0, 1}
    picks, _ = greedy_lessons(inputs, targets, weight, eval_inputs, eval_targets, rule, k=2)
    assert picks[0] == 0 and picks[1] != 1


def test_batch_aware_strategy_returns_distinct_candidates(state, round_):
    strategy = get_strategy("lookahead", batch_aware=True, batch_aware_pool=12, **TINY)
    strategy._round = round_
    picked, scores = strategy.query(state, 5)
    assert len(set(picked)) == 5 and set(picked) <= set(round_.candidates)
    assert np.all(np.isfinite(scores))


def test_one_example_steps_help_at_the_default_step(state, round_):
    """The auto step moves a typical candidate's active units 2 * lr_scale of the way to the teacher."""
    distances = candidate_distances(state, round_, round_.candidates, LookaheadOptions(**TINY))
    assert np.all(np.isfinite(distances)) and distances.min() < round_.baseline


@pytest.mark.parametrize("options, message", [
    (dict(mode="magic"), "exact, batched, last-layer, full-fast"),
    (dict(eval_fraction="1.5"), "eval_fraction"),
    (dict(mode="exact", batch_aware="true"), "batch_aware"),
    (dict(distill_loss="cosine"), "l2, mean"),
])
def test_bad_options_are_one_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy("lookahead", **options)


# --------------------------------------------------------------------------------------------
# Issue 16: ensembles, saturation, the unsquared distance, stratified picks, the ridge refit


def test_ensemble_score_is_the_mean_of_its_members(state):
    strategy = get_strategy("lookahead", students=3, **TINY)
    candidates = prepare_round(state, LookaheadOptions(**TINY)).candidates
    ensemble = -strategy.score_candidates(state, candidates)
    options = LookaheadOptions(students=3, **TINY)
    members = [candidate_distances(state, prepare_round(state, options, member=m), candidates, options)
               for m in range(3)]
    assert np.allclose(ensemble, np.mean(members, axis=0), rtol=1e-12, atol=0)
    # Member 0 is the one student of students=1; the others are distilled from their own seeds.
    single = candidate_distances(state, prepare_round(state, LookaheadOptions(**TINY)), candidates,
                                 LookaheadOptions(**TINY))
    assert np.array_equal(members[0], single)
    assert not np.allclose(members[0], members[1]) and not np.allclose(members[1], members[2])
    assert strategy.diagnostics["students"] == 3


def test_saturate_distils_longer_and_the_default_distillation_is_unchanged():
    from al_engine.train import DistillConfig

    assert LookaheadOptions().distill_config() == DistillConfig(max_epochs=40)
    saturated = LookaheadOptions(saturate=True).distill_config()
    assert (saturated.max_epochs, saturated.patience, saturated.min_delta) == (200, 10, 0.001)


def test_unsquared_distance_equals_the_exact_loop(state, round_):
    options = LookaheadOptions(distance="l2", **TINY)
    closed = candidate_distances(state, round_, round_.candidates, options)
    loop = candidate_distances(state, round_, round_.candidates,
                               LookaheadOptions(mode="exact", last_layer=True, distance="l2", **TINY))
    squared = candidate_distances(state, round_, round_.candidates, LookaheadOptions(**TINY))
    assert np.allclose(closed, loop, rtol=1e-4)
    assert np.all(closed < np.sqrt(squared) + 1e-6)  # mean of norms <= root of the mean squared norm


def test_ridge_score_equals_a_brute_force_refit(state, round_):
    from al_engine.strategies.lookahead_ridge import ridge_distances, ridge_fit, ridge_problem
    from al_engine.strategies.lookahead_round import trunk_outputs
    from al_engine.train import embed_pool

    options = LookaheadOptions(mode="ridge", **TINY)
    candidates = round_.candidates[:6]
    fast = ridge_distances(state, round_, candidates, options)
    fast_l2 = ridge_distances(state, round_, candidates, dataclasses.replace(options, distance="l2"))
    penalty = ridge_problem(state, round_, options)["penalty"]
    labeled = state.labeled_indices
    evaluation = trunk_outputs(round_.student, state, round_.evaluation).double()
    eval_targets = round_.eval_targets.double()
    for position, item in enumerate(candidates):
        indices = np.r_[labeled, item]
        weight_t, _ = ridge_fit(trunk_outputs(round_.student, state, indices),
                                embed_pool(state.model, state.dataset, indices, state.device), penalty)
        gaps = (evaluation @ weight_t - eval_targets).pow(2).sum(1)
        assert fast[position] == pytest.approx(float(gaps.mean()), rel=1e-6)
        assert fast_l2[position] == pytest.approx(float(gaps.sqrt().mean()), rel=1e-6)
    # The strategy scores with it: minus the distance, evaluation items never picked.
    strategy = get_strategy("lookahead", mode="ridge", **TINY)
    picked, _ = strategy.query(state, 4)
    assert set(picked) <= set(round_.candidates)


def test_stratified_order_takes_turns_by_stratum():
    from al_engine.strategies.lookahead import stratified_order

    rank = np.array([0, 1, 2, 3, 4, 5, 6])  # item 0 best
    strata = np.array([0, 0, 0, 0, 1, 1, 2])
    # Turn 1: best of each stratum (0, 4, 6) in rank order; turn 2: (1, 5); then stratum 0 alone.
    assert stratified_order(rank, strata).tolist() == [0, 4, 6, 1, 5, 2, 3]


@pytest.mark.parametrize("stratify", ["class", "cluster"])
def test_stratified_picks_alternate_between_strata_in_score_order(state, round_, stratify):
    from al_engine.strategies.lookahead import strata_of

    state = QueryState(model=state.model, dataset=state.dataset, pool=state.pool, device=state.device,
                       seed=state.seed, train_config=state.train_config)
    if stratify == "class":  # the untrained classifier predicts one class: give it two, by hand
        count = len(state.unlabeled_indices)
        state.cache["unlabeled_probs"] = torch.tensor([[0.9, 0.1] if i % 3 else [0.2, 0.8] for i in range(count)])
    strategy = get_strategy("lookahead", stratify=stratify, stratify_clusters=2, **TINY)
    picked, _ = strategy.query(state, 6)
    # By hand: the plain scores, each stratum's candidates best first, the strata taking turns.
    scores = get_strategy("lookahead", **TINY).score(state)
    positions = np.flatnonzero(np.isfinite(scores))
    strata = strata_of(state, positions, strategy.options)
    queues = {s: sorted(positions[strata == s], key=lambda p: (-scores[p], p)) for s in np.unique(strata)}
    expected = []
    while len(expected) < 6:
        turn = [queue.pop(0) for queue in queues.values() if queue]
        expected += sorted(turn, key=lambda p: (-scores[p], p))
    assert picked.tolist() == state.unlabeled_indices[expected[:6]].tolist()
    assert len(queues) == 2 and strategy.diagnostics["strata"] == 2


@pytest.mark.parametrize("options, message", [
    (dict(distance="cube"), "squared, l2"),
    (dict(stratify="rows"), "none, class, cluster"),
    (dict(mode="full-fast", distance="l2"), "full-fast"),
    (dict(students="0"), "students"),
    (dict(batch_aware="true", students="2"), "batch_aware"),
])
def test_bad_issue16_options_are_one_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy("lookahead", **options)


def test_an_ensemble_is_handed_to_other_ranks_whole(state):
    """A sharded query: rank 0 distils all K students, another rank adopts them and scores the same."""
    rank0 = get_strategy("lookahead", mode="exact", last_layer=True, students=2, **TINY)
    shared = rank0.shared_round_state(state)
    assert isinstance(shared, list) and len(shared) == 2
    other = get_strategy("lookahead", mode="exact", last_layer=True, students=2, **TINY)
    other.adopt_round_state(state, shared)
    candidates = rank0.round_state(state).candidates[:5]
    assert np.allclose(other.score_candidates(state, candidates), rank0.score_candidates(state, candidates))
    with pytest.raises(RuntimeError, match="rank 0 distilled"):
        get_strategy("lookahead", mode="exact", last_layer=True, students=3, **TINY).adopt_round_state(state, shared)
