"""Every classic query strategy on cases small enough to know the answer by hand, plus the properties all share."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from al_engine.data import Dataset, Pool
from al_engine.errors import ConfigError
from al_engine.models import FeatureClassifier, SmallCNN
from al_engine.strategies import QueryState, get_strategy, strategy_names
from al_engine.strategies import kcenter as kcenter_module
from al_engine.strategies.adversarial import UNFLIPPED_SCORE, bim_attack, deepfool_attack
from al_engine.strategies.badge import GradientEmbeddings, gradient_factors
from al_engine.strategies.dropout import trunk_has_dropout
from al_engine.strategies.geometry import kmeans, nearest
from al_engine.strategies.uncertainty import bald, entropy, least_confidence, margin

CLASSIC = ["least-confidence", "margin", "entropy", "least-confidence-dropout", "margin-dropout",
           "entropy-dropout", "bald", "kmeans", "kcenter-greedy", "coreset", "adversarial-bim",
           "adversarial-deepfool", "badge", "typiclust", "glister", "ntk-lookahead"]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Hand-built problems: a linear model over raw pixel values, so embeddings are the points we write down


class PixelLinear(FeatureClassifier):
    """embed(x) = the flattened (normalised) pixels; classify = dropout + a linear layer with given weights."""

    def __init__(self, weight, bias=None, dropout: float = 0.0):
        weight = torch.as_tensor(weight, dtype=torch.float32)
        super().__init__(weight.shape[1], weight.shape[0], dropout)
        with torch.no_grad():
            self.fc_out.weight.copy_(weight)
            self.fc_out.bias.copy_(torch.zeros(weight.shape[0]) if bias is None
                                   else torch.as_tensor(bias, dtype=torch.float32))
        self.eval()

    def embed(self, x):
        return x.flatten(1)


def points_dataset(values, scale: float = 1.0, classes: int = 2) -> Dataset:
    """A pool whose normalised pixels are `values * scale`: uint8 `values` of shape (N, P), one image row each."""
    images = torch.as_tensor(np.asarray(values), dtype=torch.uint8).reshape(len(values), 1, 1, -1)
    return Dataset(name="points", classes=[f"c{i}" for i in range(classes)], train_images=images,
                   train_labels=torch.zeros(len(values), dtype=torch.long),
                   mean=(0.0,), std=(1 / (255 * scale),))  # normalize(v) = v * scale


def make_state(dataset: Dataset, model, labeled=(), seed: int = 0, round_index: int = 0) -> QueryState:
    pool = Pool(len(dataset.train_labels))
    labeled = np.asarray(labeled, dtype=np.int64)
    if len(labeled):
        pool.add_labels(labeled, np.zeros(len(labeled), dtype=np.int64), 0)
    return QueryState(model=model, dataset=dataset, pool=pool, device=CPU, seed=seed, round_index=round_index)


def query(name, state, k, **options):
    indices, scores = get_strategy(name, **options).query(state, k)
    return indices.tolist(), scores


# --------------------------------------------------------------------------------------------
# Pure uncertainty functions


PROBS = np.array([
    [0.90, 0.05, 0.05],  # confident
    [0.48, 0.47, 0.05],  # near-tie between two classes
    [0.40, 0.30, 0.30],  # low confidence, clear top
    [0.36, 0.32, 0.32],  # near-uniform (top-two gap 0.04)
    [0.05, 0.46, 0.49],  # near-tie between two classes
    [1.00, 0.00, 0.00],  # certain, with zeros
])


def test_margin_picks_the_two_near_ties():
    assert sorted(np.argsort(-margin(PROBS))[:2].tolist()) == [1, 4]


def test_least_confidence_and_entropy_pick_the_near_uniform_row():
    assert int(np.argmax(least_confidence(PROBS))) == 3
    assert int(np.argmax(entropy(PROBS))) == 3
    assert least_confidence(PROBS)[0] == pytest.approx(0.10)


def test_entropy_has_no_nan_at_zero_probability():
    scores = entropy(PROBS)
    assert np.isfinite(scores).all()
    assert scores[5] == 0.0
    assert entropy(np.full((1, 4), 0.25))[0] == pytest.approx(np.log(4))


def test_bald_prefers_disagreement_over_uniform_confidence():
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, N=1, C=2): each sample sure, of a different class
    uniform = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])  # both samples equally unsure
    samples = np.concatenate([uniform, disagree], axis=1)  # (2, 2, 2)
    scores = bald(samples)
    assert scores[1] == pytest.approx(np.log(2))
    assert scores[0] == pytest.approx(0.0)
    assert entropy(samples.mean(axis=0))[0] == pytest.approx(entropy(samples.mean(axis=0))[1])  # entropy cannot tell


def test_pure_functions_accept_tensors_and_reject_bad_shapes():
    assert np.allclose(entropy(torch.tensor(PROBS)), entropy(PROBS))
    with pytest.raises(ValueError):
        entropy(np.ones(3))
    with pytest.raises(ValueError):
        bald(np.ones((2, 3)))


def test_equal_scores_are_broken_by_pool_position():
    dataset = points_dataset([[0, 0]] * 6)
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]]), labeled=[1])
    indices, _ = query("entropy", state, 3)  # every image has the same probabilities
    assert indices == [0, 2, 3]


# --------------------------------------------------------------------------------------------
# Registry and options


def test_every_classic_name_is_registered():
    assert set(CLASSIC) <= set(strategy_names())


def test_options_parse_from_strings_and_unknown_options_are_clear_errors():
    assert get_strategy("bald", samples="3").options.samples == 3
    assert get_strategy("coreset", outlier_fraction="0.01").options.outlier_fraction == 0.01
    with pytest.raises(ConfigError, match="unknown option bogus"):
        get_strategy("kcenter-greedy", bogus=1)
    with pytest.raises(ConfigError, match="samples"):
        get_strategy("entropy-dropout", samples="0")
    with pytest.raises(ConfigError):
        get_strategy("adversarial-bim", max_iter="many")


# --------------------------------------------------------------------------------------------
# MC dropout and BALD


def test_bald_strategy_picks_the_item_whose_dropout_samples_disagree():
    # Class 0 reads pixel 0, class 1 reads pixel 1. Item 0 = (0, 0): every mask gives 50/50, no disagreement.
    # Item 1 = (6, 6): dropping either pixel makes the other class certain; the samples disagree.
    dataset = points_dataset([[0, 0], [6, 6], [0, 0]])
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]], dropout=0.5))
    indices, scores = query("bald", state, 1, samples=50)
    assert indices == [1]
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]], dropout=0.5))
    all_scores = get_strategy("bald", samples=50).score(state)
    assert all_scores[0] == pytest.approx(0.0) and all_scores[1] > 0.3


def test_head_sampling_matches_full_stochastic_passes_in_distribution():
    dataset = points_dataset([[3, 1], [1, 2], [4, 4]])
    model = PixelLinear([[1.0, -1.0], [-0.5, 1.0]], dropout=0.3)
    head = get_strategy("entropy-dropout", samples=600).score(make_state(dataset, model))
    full = get_strategy("entropy-dropout", samples=600, full_passes=True).score(make_state(dataset, model))
    assert np.allclose(head, full, atol=0.05)


def test_without_dropout_the_dropout_variants_equal_the_plain_strategies():
    generator = torch.Generator().manual_seed(1)
    dataset = points_dataset(torch.randint(0, 255, (30, 4), generator=generator).numpy(), scale=0.02, classes=3)
    model = PixelLinear(torch.randn(3, 4, generator=generator), dropout=0.0)
    for plain in ("least-confidence", "margin", "entropy"):
        assert query(plain, make_state(dataset, model), 5)[0] == query(f"{plain}-dropout", make_state(dataset, model), 5)[0]


def test_dropout_in_the_trunk_is_detected():
    assert not trunk_has_dropout(SmallCNN())

    class TrunkDropout(PixelLinear):
        def __init__(self):
            super().__init__([[1.0, 0.0], [0.0, 1.0]], dropout=0.5)
            self.trunk_dropout = torch.nn.Dropout(0.2)

    assert trunk_has_dropout(TrunkDropout())


# --------------------------------------------------------------------------------------------
# k-center greedy and core-set


def test_kcenter_greedy_picks_the_point_farthest_from_the_labeled_set():
    # 1-D points: labeled at 0; unlabeled at 1, 2, 5, 10. Farthest from {0} is 10, then from {0, 10} is 5.
    dataset = points_dataset([[0], [1], [2], [5], [10]])
    state = make_state(dataset, PixelLinear([[1.0], [-1.0]]), labeled=[0])
    indices, scores = query("kcenter-greedy", state, 2)
    assert indices == [4, 3]
    assert np.allclose(scores, [10.0, 5.0])


def test_kcenter_greedy_without_labels_starts_at_a_seeded_random_point():
    dataset = points_dataset([[0], [4], [9], [20]])
    first = query("kcenter-greedy", make_state(dataset, PixelLinear([[1.0], [-1.0]]), seed=3), 2)[0]
    again = query("kcenter-greedy", make_state(dataset, PixelLinear([[1.0], [-1.0]]), seed=3), 2)[0]
    assert first == again and len(set(first)) == 2


def test_coreset_beats_the_greedy_radius_where_greedy_is_suboptimal():
    # Labeled at 0; a group at 8, 9, 10. With one pick, greedy takes 10 (radius 2); the optimum is 9 (radius 1).
    dataset = points_dataset([[0], [8], [9], [10]])
    model = PixelLinear([[1.0], [-1.0]])
    assert query("kcenter-greedy", make_state(dataset, model, labeled=[0]), 1)[0] == [3]
    assert query("coreset", make_state(dataset, model, labeled=[0]), 1, outlier_fraction=0.0)[0] == [2]


def test_coreset_falls_back_to_greedy_with_a_warning_when_the_solver_cannot_finish(monkeypatch, caplog):
    monkeypatch.setattr(kcenter_module, "solve_cover",
                        lambda *args, **kwargs: kcenter_module.CoverSolution(np.empty(0, dtype=np.int64), "timeout"))
    dataset = points_dataset([[0], [8], [9], [10]])
    with caplog.at_level(logging.WARNING):
        indices, _ = query("coreset", make_state(dataset, PixelLinear([[1.0], [-1.0]]), labeled=[0]), 1)
    assert indices == [3]  # the greedy pick
    assert "greedy" in caplog.text


def test_nearest_works_in_blocks_and_matches_a_direct_computation(monkeypatch):
    from al_engine.strategies import geometry

    monkeypatch.setattr(geometry, "DISTANCE_BLOCK_ELEMENTS", 7)  # force many small blocks
    generator = torch.Generator().manual_seed(0)
    points, centers = torch.randn(23, 3, generator=generator), torch.randn(5, 3, generator=generator)
    distances, which = nearest(points, centers)
    direct = torch.cdist(points, centers) ** 2
    assert torch.allclose(distances, direct.min(dim=1).values, atol=1e-5)
    assert torch.equal(which, direct.argmin(dim=1))


# --------------------------------------------------------------------------------------------
# k-means, BADGE, TypiClust


def test_kmeans_takes_the_point_nearest_each_centre():
    # Two groups on a line, {0, 1, 2} and {100, 101, 102}: the centres are 1 and 101.
    dataset = points_dataset([[0], [1], [2], [100], [101], [102], [50]])
    state = make_state(dataset, PixelLinear([[1.0], [-1.0]]), labeled=[6])
    indices, _ = query("kmeans", state, 2)
    assert sorted(indices) == [1, 4]


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres.repeat_interleave(20, dim=0) + 0.1 * torch.randn(60, 2, generator=generator))
    result = kmeans(points, 3, np.random.default_rng(0))
    groups = result.assignment.reshape(3, 20)
    assert all(len(set(row.tolist())) == 1 for row in groups) and len(set(groups[:, 0].tolist())) == 3


def test_badge_gradient_distances_equal_the_explicit_outer_products():
    generator = torch.Generator().manual_seed(0)
    model = PixelLinear(torch.randn(4, 3, generator=generator))
    features = torch.randn(6, 3, generator=generator)
    factors = gradient_factors(model, features)
    explicit = (factors.unsqueeze(2) * features.unsqueeze(1)).flatten(1).double()  # (6, 4*3)
    implicit = GradientEmbeddings(factors, features)
    for position in range(6):
        expected = ((explicit - explicit[position]) ** 2).sum(1)
        assert torch.allclose(implicit.sq_distance_to(position), expected, atol=1e-9)


def test_badge_starts_from_the_largest_gradient():
    # Class 0 reads pixel 0, class 1 reads pixel 1. Items 1 and 3 are near-ties; 3 has the longer feature vector,
    # so its gradient (p - onehot) h^T is the longest: p = (sigmoid(0.1), sigmoid(-0.1)), h = (2.0, 1.9).
    dataset = points_dataset([[250, 0], [20, 21], [0, 250], [40, 38]], scale=0.05)
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]]))
    indices, scores = query("badge", state, 1)
    p_top = 1 / (1 + np.exp(-0.1))
    assert indices == [3]
    assert scores[0] == pytest.approx(np.sqrt(2) * (1 - p_top) * np.hypot(2.0, 1.9), rel=1e-4)


def test_badge_never_picks_a_point_twice_when_gradients_coincide():
    dataset = points_dataset([[250, 0]] * 5 + [[20, 21]], scale=0.05)  # five identical confident items
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]]))
    indices, _ = query("badge", state, 4)
    assert len(set(indices)) == 4 and indices[0] == 5


def test_typiclust_takes_the_most_typical_point_of_the_cluster_without_labels():
    # Cluster A around 1 holds the labeled point; cluster B around 20 has none. In B, 20.1 has the nearest two
    # neighbours (20 and 20.2, mean distance 0.1; every other point: at least 0.15).
    values = [[0], [5], [10], [15], [20],  # cluster A (x0.1: 0 .. 2.0)
              [200], [201], [202], [230], [195]]  # cluster B (x0.1: 20, 20.1, 20.2, 23, 19.5)
    dataset = points_dataset(values, scale=0.1)
    state = make_state(dataset, PixelLinear([[1.0], [-1.0]]), labeled=[0])
    indices, _ = query("typiclust", state, 1, neighbours=2)
    assert indices == [6]


# --------------------------------------------------------------------------------------------
# Adversarial attacks on linear classifiers, where the distance to the boundary is known in closed form


def test_deepfool_on_a_linear_classifier_finds_the_closed_form_distance():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator)
    model = PixelLinear(weight, bias)
    images = torch.randn(5, 1, 1, 6, generator=generator)
    logits = model(images)
    label = logits.argmax(1)
    gaps = (logits - logits.gather(1, label[:, None])).abs()  # |f_k - f_y|
    norms = (weight.unsqueeze(0) - weight[label].unsqueeze(1)).norm(dim=2)  # |w_k - w_y|
    closed_form = (gaps / norms).masked_fill(gaps == 0, float("inf")).min(dim=1).values
    for overshoot in (0.0, 0.02):
        result = deepfool_attack(model, images, overshoot=overshoot, max_iter=50)
        assert torch.equal(result.steps, torch.ones(5, dtype=torch.long))  # linear: one step reaches the boundary
        assert torch.allclose(result.distance, (1 + overshoot) * closed_form, rtol=1e-3, atol=1e-3)


def test_bim_steps_until_the_label_flips():
    # Logits (x0, x1). From (1.00, 0.83) each sign step of 0.05 moves the gap x0 - x1 by -0.1: it flips after 2 steps,
    # at perturbation (-0.1, +0.1), of length 0.1 * sqrt(2).
    model = PixelLinear([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[[[1.00, 0.83]]]])
    result = bim_attack(model, images, step_size=0.05, max_iter=10)
    assert result.steps.tolist() == [2]
    assert result.distance.item() == pytest.approx(0.1 * np.sqrt(2), rel=1e-5)


class DeadBelowOne(PixelLinear):
    """embed = relu(pixels - 1): below 1 every gradient is zero, so no attack can move the image."""

    def embed(self, x):
        return torch.relu(x.flatten(1) - 1.0)


@pytest.mark.parametrize("name", ["adversarial-bim", "adversarial-deepfool"])
def test_an_image_the_attack_never_flips_ranks_last_with_a_defined_score(name):
    # Item 0 = (0.2, 0.1): zero gradient, logits = bias, never flips (the reference's BIM loops forever here).
    # Items 1 and 2 sit 0.12 and 0.20 from the boundary in logit gap: 1 is nearer.
    dataset = points_dataset([[20, 10], [152, 150], [160, 150]], scale=0.01)
    state = make_state(dataset, DeadBelowOne([[1.0, 0.0], [0.0, 1.0]], bias=[0.1, 0.0]))
    indices, scores = query(name, state, 3, max_iter=5)
    assert indices == [1, 2, 0]
    assert scores[2] == UNFLIPPED_SCORE and np.isfinite(scores).all()


def test_attacks_leave_the_trained_model_as_it_was():
    # The attacks run on a frozen channels-last copy: the model the loop trains next round keeps
    # its training mode, its trainable weights and their memory layout.
    model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.rand(4, 1, 28, 28)
    dataset = Dataset(name="t", train_images=(images * 255).to(torch.uint8), train_labels=torch.arange(4) % 10,
                      test_images=(images * 255).to(torch.uint8), test_labels=torch.arange(4) % 10,
                      classes=[str(i) for i in range(10)], mean=(0.5,), std=(0.5,))
    get_strategy("adversarial-bim", max_iter=3).score(make_state(dataset, model))
    assert model.training
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert model.conv1.weight.is_contiguous()  # not switched to channels-last
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# Properties every strategy shares, on a tiny real problem with the small CNN


@pytest.fixture(scope="module")
def cnn_problem():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 16, 16), generator=generator, dtype=torch.uint8)
    labels = torch.arange(40) % 4
    dataset = Dataset(name="tiny", classes=["a", "b", "c", "d"], train_images=images, train_labels=labels)
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, image_size=16).eval()
    return dataset, model


FAST_OPTIONS = {"coreset": {"time_limit": 5.0}, "adversarial-bim": {"max_iter": 5},
                "adversarial-deepfool": {"max_iter": 5}}


@pytest.mark.parametrize("name", CLASSIC)
def test_no_labeled_index_no_duplicate_and_deterministic_for_a_seed(name, cnn_problem):
    dataset, model = cnn_problem
    labeled = [0, 1, 4, 5, 8, 9]  # answers only of classes 0 and 1: the class count must come from the class list

    def run(seed):
        pool = Pool(40)
        pool.add_labels(labeled, dataset.train_labels[labeled].numpy(), 0)
        state = QueryState(model=model, dataset=dataset, pool=pool, device=CPU, seed=seed)
        return get_strategy(name, **FAST_OPTIONS.get(name, {})).query(state, 7)

    indices, scores = run(seed=0)
    again, scores_again = run(seed=0)
    assert len(indices) == 7 and len(set(indices.tolist())) == 7
    assert not set(indices.tolist()) & set(labeled)
    assert np.isfinite(scores).all()
    assert indices.tolist() == again.tolist() and np.allclose(scores, scores_again)


@pytest.mark.parametrize("name", CLASSIC)
def test_a_query_larger_than_the_unlabeled_pool_returns_every_unlabeled_item(name):
    dataset = points_dataset([[0, 1], [3, 7], [9, 2], [5, 5]], scale=0.1)
    state = make_state(dataset, PixelLinear([[1.0, 0.0], [0.0, 1.0]], dropout=0.5), labeled=[0])
    indices, _ = get_strategy(name, **FAST_OPTIONS.get(name, {})).query(state, 10)
    assert sorted(indices.tolist()) == [1, 2, 3]


def test_deepfool_with_a_shortlist_of_classes_steps_towards_the_likeliest_other_class():
    # At x = (2.0, 1.9) the logits are (2.0, 0.9, -0.5): class 1 is the likeliest other class, but class 2's
    # boundary is nearer in input space, 2.5 / |(-11, 10)| = 0.168 against class 1's 1.1 / |(-1, 1)| = 0.778.
    model = PixelLinear([[1.0, 0.0], [0.0, 1.0], [-10.0, 10.0]], bias=[0.0, -1.0, 0.5])
    image = torch.tensor([[[[2.0, 1.9]]]])
    everything = deepfool_attack(model, image, overshoot=0.0, max_iter=5)
    shortlist = deepfool_attack(model, image, overshoot=0.0, max_iter=5, candidate_classes=1)
    assert everything.distance.item() == pytest.approx(2.5 / np.hypot(11, 10), rel=1e-3)
    assert shortlist.distance.item() == pytest.approx(1.1 / np.sqrt(2), rel=1e-3)


# --------------------------------------------------------------------------------------------
# Tiny pools: every registered strategy, on pools of 1, 2 and 3 items


@pytest.fixture(scope="module")
def tiny_pools(digits):
    """For n = 1, 2, 3: a pool of the first n digits with item 0 labeled, and a model trained on it."""
    from al_engine.config import RunConfig
    from al_engine.engine import Engine

    pools = {}
    for size in (1, 2, 3):
        dataset = Dataset(name=f"tiny-{size}", classes=digits.classes, train_images=digits.train_images[:size],
                          train_labels=digits.train_labels[:size], test_images=digits.test_images[:5],
                          test_labels=digits.test_labels[:5])
        engine = Engine(RunConfig(dataset="digits", initial=1, query_size=1, rounds=1, epochs=1, device="cpu"),
                        dataset=dataset)
        engine.add_answers([0], [int(dataset.train_labels[0])], 0)
        engine.train(0)
        pools[size] = engine
    return pools


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_handles_pools_of_one_two_and_three_items(name, tiny_pools):
    """`--initial 1` on 1 to 3 images: 0 to 2 items are unlabeled. Each strategy returns every unlabeled item
    when asked for as many or more (the last batch shrinks), one when asked for one, never a labeled one,
    and never raises (lookahead raised IndexError with one unlabeled item, and the engine retried forever)."""
    for size, engine in tiny_pools.items():
        unlabeled = list(range(1, size))
        for query_size in (1, 2, 3):
            state = engine.query_state(1)
            indices, scores = get_strategy(name).query(state, query_size)
            assert sorted(indices.tolist()) == unlabeled[:query_size] or (
                query_size < len(unlabeled) and len(indices) == query_size and set(indices.tolist()) <= set(unlabeled)
            ), (size, query_size, indices)
            assert len(scores) == len(indices) and not np.isnan(scores).any()
