"""GLISTER: the one-step evaluation gain, against finite differences and a case checked by hand."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from al_engine.data import Dataset, Pool
from al_engine.errors import ConfigError
from al_engine.models import FeatureClassifier
from al_engine.strategies import QueryState, get_strategy
from al_engine.strategies.glister import glister_gains, greedy_picks, head_inputs, pseudo_label_error
from al_engine.strategies.lookahead_round import split_pool


def evaluation_loss(weight, eval_inputs, eval_labels):
    return float(F.cross_entropy(eval_inputs @ weight.T, eval_labels))


def finite_difference_gain(weight, inputs, error, eval_inputs, eval_labels, epsilon=1e-6):
    """lim (L_V(W) - L_V(W - eps g_c)) / eps with g_c = (p_c - e_c) h_c^T, by central differences."""
    step = error[:, None] * inputs[None, :]
    return (evaluation_loss(weight + epsilon * step, eval_inputs, eval_labels)
            - evaluation_loss(weight - epsilon * step, eval_inputs, eval_labels)) / (2 * epsilon)


@pytest.fixture
def tiny_problem():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator, dtype=torch.float64)  # 3 classes, 4 features + bias
    candidates = head_inputs(torch.rand(7, 4, generator=generator, dtype=torch.float64) * 2)
    evaluation = head_inputs(torch.rand(9, 4, generator=generator, dtype=torch.float64) * 2)
    return weight, candidates, pseudo_label_error(candidates @ weight.T), evaluation, (evaluation @ weight.T).argmax(1)


def test_gain_equals_the_finite_difference_of_the_evaluation_loss(tiny_problem):
    weight, candidates, error, evaluation, labels = tiny_problem
    gains = glister_gains(weight, candidates, error, evaluation, labels)
    for c in range(len(candidates)):
        expected = finite_difference_gain(weight, candidates[c], error[c], evaluation, labels)
        assert float(gains[c]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert (gains > 0).any() and (gains < 0).any()  # some steps help the evaluation loss, some hurt


def test_greedy_rescores_against_the_updated_head(tiny_problem):
    weight, candidates, error, evaluation, labels = tiny_problem
    lr = 0.5
    picks, gains = greedy_picks(weight, candidates, error, evaluation, labels, 3, lr, greedy=True)
    first = glister_gains(weight, candidates, error, evaluation, labels)
    assert picks[0] == int(first.argmax()) and gains[0] == pytest.approx(float(first.max()))
    # The second pick is the best finite-difference gain at the head after the first step.
    stepped = weight - lr * error[picks[0]][:, None] * candidates[picks[0]][None, :]
    second = [finite_difference_gain(stepped, candidates[c], error[c], evaluation, labels) if c != picks[0]
              else -np.inf for c in range(len(candidates))]
    assert picks[1] == int(np.argmax(second)) and gains[1] == pytest.approx(max(second), rel=1e-6)
    plain, _ = greedy_picks(weight, candidates, error, evaluation, labels, 3, lr, greedy=False)
    assert plain.tolist() == np.argsort(-first.numpy(), kind="stable")[:3].tolist()


class Points(FeatureClassifier):
    """embed(x) = the pixels as a point; a fixed linear head."""

    def __init__(self, weight, bias):
        super().__init__(2, 2, 0.0)
        with torch.no_grad():
            self.fc_out.weight.copy_(torch.tensor(weight))
            self.fc_out.bias.copy_(torch.tensor(bias))
        self.eval()

    def embed(self, x):
        return x.flatten(1)


def test_glister_picks_what_moves_the_evaluation_items_towards_their_labels():
    """Evaluation items all sit at A = (1.21, 0.80): predicted class 0 with p0 = sigmoid(0.41) = 0.601.

    G = (p_A - e_A) h_A^T with p_A - e_A = (-0.399, 0.399), so gain_c = (p_c - e_c).(p_A - e_A) (h_c . h_A):
    a candidate at A gains 2 * 0.399^2 * 3.104 = 0.99; a confident class-0 one at (2.5, 0)
    (p - e = (-0.076, 0.076)) gains 2 * 0.076 * 0.399 * 4.025 = 0.24; one predicted class 1 at (0.80, 1.21)
    loses 2 * 0.399^2 * 2.936 = -0.93. Picks: A, the confident ones, then the other side, then the
    evaluation items (never before a candidate).
    """
    unlabeled = np.arange(10)
    candidates, evaluation = split_pool(unlabeled, 0.2, seed=0, round_index=0)
    pixels = np.zeros((10, 2))  # point = pixels * 0.01; head logits (x0, x1)
    pixels[evaluation] = [121, 80]
    a, other = candidates[:2]
    pixels[a] = [121, 80]
    pixels[other] = [80, 121]
    pixels[candidates[2:]] = [250, 0]
    images = torch.tensor(pixels, dtype=torch.uint8).reshape(10, 1, 1, 2)
    dataset = Dataset(name="points", classes=["c0", "c1"], train_images=images,
                      train_labels=torch.zeros(10, dtype=torch.long), mean=(0.0,), std=(1 / (255 * 0.01),))
    model = Points([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    state = QueryState(model=model, dataset=dataset, pool=Pool(10), device=torch.device("cpu"))
    picks, scores = get_strategy("glister", greedy="false").query(state, 10)
    assert picks[0] == a and picks[1:7].tolist() == candidates[2:].tolist() and picks[7] == other
    assert set(picks[-2:]) == set(evaluation) and np.all(np.isinf(scores[-2:]))
    error = 1 - torch.sigmoid(torch.tensor(0.41)).item()
    assert scores[0] == pytest.approx(2 * error**2 * (1.21**2 + 0.8**2 + 1), rel=1e-4)
    assert scores[7] == pytest.approx(-2 * error**2 * (2 * 1.21 * 0.8 + 1), rel=1e-4)


def test_bad_options_are_one_config_error():
    with pytest.raises(ConfigError, match="eval_fraction"):
        get_strategy("glister", eval_fraction="1")
    with pytest.raises(ConfigError, match="lr_scale"):
        get_strategy("glister", lr_scale="0")
