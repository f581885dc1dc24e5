"""Cold start and standing without a test set: typiclust on backbone features, the typiclust initial
batch, the audit sample (uniform, excluded from picks, an interval that covers), and the stopping
signal (Cohen's kappa of successive models' predictions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from al_engine.config import RunConfig
from al_engine.data import Dataset, Pool
from al_engine.engine import Engine
from al_engine.errors import ConfigError
from al_engine.estimate import (audit_count, audit_estimate, cohen_kappa, draw_audit, stopping_signal,
                                wilson_interval)
from al_engine.models import FeatureHead
from al_engine.strategies import QueryState, get_strategy
from al_engine.strategies.typiclust import typicality

CPU = torch.device("cpu")


def feature_dataset() -> tuple[Dataset, np.ndarray, np.ndarray]:
    """60 items of 4-d backbone features. In the backbone's (L2-normalised) geometry there are two
    groups by direction: A (40 items, dims 0) and B (20 items, dim 1). Dim 2 carries another split,
    C (+1) / D (-1), that the model's embedding sees alone; every B item is in C."""
    rng = np.random.default_rng(0)
    count_a, count_b = 40, 20
    group_a = np.r_[np.ones(count_a, bool), np.zeros(count_b, bool)]
    split_c = np.r_[np.arange(count_a) % 2 == 0, np.ones(count_b, bool)]
    features = np.zeros((60, 4), np.float32)
    features[group_a, 0] = 10
    features[~group_a, 1] = 10
    features[:, 2] = np.where(split_c, 1.0, -1.0)
    features += rng.normal(0, 0.05, features.shape).astype(np.float32)
    tensor = torch.from_numpy(features).view(60, 4, 1, 1)
    dataset = Dataset(name="constructed", classes=["x", "y"], train_images=tensor,
                      train_labels=torch.from_numpy(group_a.astype(np.int64)), kind="features")
    return dataset, group_a, split_c


def model_seeing_dim2(dataset: Dataset) -> FeatureHead:
    """A head whose embedding is (relu(5 + 3 * standardised dim 2), 5): it sees only the C/D split."""
    model = FeatureHead(in_channels=4, num_classes=2, image_size=1, embed_dim=2)
    with torch.no_grad():
        model.fc_embed.weight.zero_()
        model.fc_embed.weight[0, 2] = 3.0
        model.fc_embed.bias.fill_(5.0)
    return model.eval()


def test_typicality_follows_its_definition_on_a_hand_checked_case():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # K = 2: 1 / mean distance to the two nearest others.
    expected = [1 / 1.5, 1 / 1.0, 1 / 1.5, 1 / 8.5]
    assert typicality(points, 2).tolist() == pytest.approx(expected, rel=1e-5)


def test_typiclust_clusters_backbone_features_when_the_run_has_them():
    dataset, group_a, split_c = feature_dataset()
    pool = Pool(60)
    labeled = int(np.flatnonzero(group_a & split_c)[0])  # one labeled item, in A and in C
    pool.add_labels([labeled], [1], -1)
    model = model_seeing_dim2(dataset)

    def picks(features: str) -> np.ndarray:
        state = QueryState(model=model, dataset=dataset, pool=pool, device=CPU, seed=0)
        return get_strategy("typiclust", features=features, min_cluster_size=1).query(state, 1)[0]

    backbone_pick, model_pick = picks("backbone"), picks("model")
    # Backbone geometry: clusters A and B; A holds the labeled item, so the pick is B's most typical.
    assert not group_a[backbone_pick].any()
    # The model's embedding: clusters C and D; C holds the labeled item, so the pick is from D, which no
    # B item is in: the two picks must differ.
    assert not split_c[model_pick].any()
    assert set(backbone_pick.tolist()).isdisjoint(model_pick.tolist())
    assert picks("auto").tolist() == backbone_pick.tolist()  # the default uses the backbone's features

    # The pick is B's most typical item, by the definition, in the L2-normalised feature space.
    flat = torch.nn.functional.normalize(dataset.train_images.flatten(1), dim=1)
    members = np.flatnonzero(~group_a)
    distances = torch.cdist(flat[members], flat[members]).numpy()
    np.fill_diagonal(distances, np.inf)
    neighbours = min(20, len(members) - 1)  # K = 20, or every other member of a smaller cluster
    values = 1 / np.sort(distances, axis=1)[:, :neighbours].mean(axis=1)
    assert backbone_pick[0] == members[int(np.argmax(values))]


def test_typiclust_backbone_features_need_a_backbone(digits):
    pool = Pool(len(digits.train_labels))
    pool.add_labels([0, 1], [0, 1], -1)
    from al_engine.models import build_model

    model = build_model("small-cnn", digits.image_shape, 10).eval()
    state = QueryState(model=model, dataset=digits, pool=pool, device=CPU, seed=0)
    with pytest.raises(ConfigError, match="needs a run with --weights"):
        get_strategy("typiclust", features="backbone").query(state, 2)
    with pytest.raises(ConfigError, match="choose from: auto, backbone, model"):
        get_strategy("typiclust", features="pixels")


def test_initial_typiclust_batch_is_one_typical_item_per_cluster():
    dataset, group_a, _ = feature_dataset()
    engine = Engine(RunConfig(initial=2, initial_strategy="typiclust", device="cpu"), dataset=dataset)
    picks = engine.initial_indices()
    assert len(picks) == 2 and group_a[picks].sum() == 1  # one from A, one from B
    random_engine = Engine(RunConfig(initial=2, device="cpu"), dataset=dataset)
    assert random_engine.initial_indices().tolist() == Pool(60).initial_indices(2, 0).tolist()  # default unchanged
    with pytest.raises(ConfigError, match="--initial-strategy"):
        Engine(RunConfig(initial_strategy="kmeans", device="cpu"), dataset=dataset)


def test_initial_typiclust_without_a_backbone_clusters_pixels(digits):
    engine = Engine(RunConfig(initial=10, initial_strategy="typiclust", device="cpu"), dataset=digits)
    picks = engine.initial_indices()
    assert len(np.unique(picks)) == 10
    # Ten typical digits of ten pixel clusters cover more classes than chance makes likely to miss.
    assert len(np.unique(digits.train_labels[picks].numpy())) >= 7
    assert engine.initial_indices().tolist() == picks.tolist()  # seeded


# --------------------------------------------------------------------------------------------
# The audit sample


def test_audit_count_rounds_half_up():
    assert [audit_count(0.05, q) for q in (10, 20, 100, 9)] == [1, 1, 5, 0]
    assert audit_count(0.0, 100) == 0 and audit_count(0.5, 3) == 2


def test_audit_is_uniform_over_the_unlabeled_pool():
    unlabeled = np.flatnonzero(np.arange(200) % 4 != 0)  # 150 unlabeled of 200
    counts = np.zeros(200)
    for round_index in range(2000):
        audit = draw_audit(unlabeled, 6, seed=3, round_index=round_index)
        assert len(np.unique(audit)) == 6
        counts[audit] += 1
    assert counts[np.arange(200) % 4 == 0].sum() == 0  # never a labeled item
    observed = counts[unlabeled]
    assert stats.chisquare(observed).pvalue > 0.01  # 150 cells, 80 expected each


def test_audit_items_are_excluded_from_the_strategys_picks(digits):
    config = RunConfig(dataset="digits", strategy="margin", initial=30, query_size=40, audit_fraction=0.25,
                       epochs=5, device="cpu", seed=1)
    engine = Engine(config, dataset=digits)
    engine.add_answers(engine.initial_indices(), digits.train_labels[engine.initial_indices()].numpy(), -1)
    engine.train(0)
    indices, scores, _ = engine.query(0)
    audit = engine.last_audit
    assert len(indices) == 40 and len(audit) == 10 and indices[-10:].tolist() == audit.tolist()
    picks = indices[:30]
    assert np.intersect1d(picks, audit).size == 0
    # The picks are margin's top 30 over the unlabeled items other than the audit's.
    from al_engine.train import predict_proba

    rest = np.setdiff1d(engine.pool.unlabeled_indices, audit)
    top2 = predict_proba(engine.model, digits, rest, CPU).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    expected = rest[np.lexsort((np.arange(len(rest)), margin))[:30]]
    assert sorted(picks.tolist()) == sorted(expected.tolist())


def test_simulated_run_records_audit_and_stability(tmp_path, digits):
    from al_engine.loop import run_simulation
    from al_engine.runfiles import read_jsonl
    from oracle.simulated import SimulatedOracle

    config = RunConfig(dataset="digits", strategy="entropy", initial=20, query_sizes=[20, 40], audit_fraction=0.25,
                       epochs=5, device="cpu", out=str(tmp_path / "run"))
    metrics = run_simulation(config, SimulatedOracle.for_run, progress=False, dataset=digits)
    assert [m["labeled"] for m in metrics] == [20, 40, 80]
    assert [m["audit"]["n"] for m in metrics[:2]] == [5, 10] and metrics[2]["audit"] is None
    assert metrics[0]["kappa"] is None and metrics[1]["kappa"] is not None
    queries = read_jsonl(tmp_path / "run" / "queries.jsonl")
    assert [len(q["audit"]) for q in queries] == [5, 10]
    assert all(set(q["audit"]) <= set(q["indices"]) for q in queries)


def test_wilson_interval_matches_a_hand_computed_case():
    low, high = wilson_interval(8, 10)  # p = 0.8, n = 10, z = 1.96: the textbook (0.490, 0.943)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("total", [10, 25, 50, 100])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.85])
def test_wilson_interval_covers_exactly_at_least_90_percent(total, p):
    # Exact coverage: the binomial probability of the outcomes whose interval contains p.
    coverage = sum(stats.binom.pmf(k, total, p) for k in range(total + 1)
                   if wilson_interval(k, total)[0] <= p <= wilson_interval(k, total)[1])
    assert coverage >= 0.90


def test_audit_interval_covers_the_true_accuracy_in_repeats(digits):
    """A trained model, its true accuracy on the unlabeled pool, and 100 seeded audit samples of 40."""
    config = RunConfig(dataset="digits", initial=40, epochs=8, device="cpu")
    engine = Engine(config, dataset=digits)
    initial = engine.initial_indices()
    engine.add_answers(initial, digits.train_labels[initial].numpy(), -1)
    engine.train(0)
    unlabeled = engine.pool.unlabeled_indices
    predictions = engine.predict(unlabeled)
    truth = digits.train_labels[unlabeled].numpy()
    true_accuracy = float((predictions == truth).mean())
    assert 0.3 < true_accuracy < 0.97  # a case where the interval has work to do
    covered, estimates = 0, []
    for seed in range(100):
        audit = draw_audit(unlabeled, 40, seed=seed, round_index=0)
        estimate = engine.audit_estimate(audit, digits.train_labels[audit].numpy())
        covered += estimate["low"] <= true_accuracy <= estimate["high"]
        estimates.append(estimate["accuracy"])
    assert covered >= 90
    assert abs(np.mean(estimates) - true_accuracy) < 0.03  # unbiased: the mean of 100 estimates is close


def test_audit_estimate_leaves_out_skips():
    assert audit_estimate(np.array([1, 2, 3]), np.array([1, -1, 0])) == {
        "n": 2, "correct": 1, "accuracy": 0.5, **dict(zip(("low", "high"),
                                                          (round(v, 6) for v in wilson_interval(1, 2))))}
    assert audit_estimate(np.array([1]), np.array([-1])) is None


# --------------------------------------------------------------------------------------------
# The stopping signal


def test_cohen_kappa_on_hand_made_predictions():
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)  # observed 0.75, chance 0.5
    assert cohen_kappa([0, 1, 2, 0], [0, 1, 2, 0]) == 1.0
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert cohen_kappa([2, 2, 2], [2, 2, 2]) == 1.0  # constant and equal: agreement, not 0/0


def test_stopping_signal_on_a_hand_made_sequence_of_predictions():
    # Five rounds of predictions on a 10-item stop set, settling down.
    rounds = [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
              [0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]
    kappas, signals = [None], []
    for previous, current in zip(rounds, rounds[1:]):
        kappas.append(cohen_kappa(previous, current, 3))
        signals.append(stopping_signal(kappas))
    assert kappas[3:] == [1.0, 1.0, 1.0]
    assert [s["stop"] for s in signals] == [False, False, False, False, True]
    assert signals[3]["kappa_mean"] == pytest.approx((kappas[2] + 2) / 3)
    assert not stopping_signal([None, 0.98, 0.99, 0.995])["stop"]  # mean 0.9883 < 0.99
    assert stopping_signal([None, 0.5, 0.995, 0.99, 0.995])["stop"]


def test_stability_survives_a_resume(digits):
    config = RunConfig(dataset="digits", initial=30, epochs=3, device="cpu")
    engine = Engine(config, dataset=digits)
    initial = engine.initial_indices()
    engine.add_answers(initial, digits.train_labels[initial].numpy(), -1)
    engine.train(0)
    assert engine.stability()["kappa"] is None
    state = engine.state_dict()
    engine.train(1)
    expected = engine.stability()
    again = Engine(config, dataset=digits)
    again.load_state_dict(state)
    again.train(1)
    assert again.stability() == expected and not math.isnan(expected["kappa"])


def test_bad_audit_fraction_and_schedule_are_refused(digits):
    for settings, message in ((dict(audit_fraction=1.0), "--audit-fraction"), (dict(query_sizes=[10, 0]),
                                                                               "--query-sizes")):
        with pytest.raises(ConfigError, match=message):
            Engine(RunConfig(device="cpu", **settings), dataset=digits)
