"""Empirical-NTK lookahead: the kernel against autograd, the closed form against a brute-force kernel
regression refit, and the strategy's picks against that brute force."""
import numpy as np
import pytest
import torch

from al_engine.data import Dataset, Pool
from al_engine.errors import ConfigError
from al_engine.models import FeatureHead, SmallCNN
from al_engine.strategies import QueryState, get_strategy
from al_engine.strategies.lookahead_round import split_pool
from al_engine.strategies.ntk_lookahead import (kernel, kernel_diagonal, kernel_inputs, output_change_coefficients,
                                                residual_norms)


def last_two_layer_gradient(model, image):
    """The gradient of sum_c f_c(x) in the feature and output layers' parameters, flattened."""
    parameters = [model.fc_embed.weight, model.fc_embed.bias, model.fc_out.weight, model.fc_out.bias]
    total = model(image[None]).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(total, parameters)]).double()


def test_kernel_is_the_pseudo_ntk_of_the_last_two_layers():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=4, image_size=28, embed_dim=6).double().eval()
    images = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    gradients = torch.stack([last_two_layer_gradient(model, image) for image in images])
    expected = gradients @ gradients.T / 4  # pNTK: the summed logits' kernel over the class count
    items = kernel_inputs(model, images)
    assert torch.allclose(kernel(items, items, 4), expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(kernel_diagonal(items, 4), expected.diagonal(), rtol=1e-10)
    assert (items.signals == 0).any()  # some units are off: the ReLU's gate is in the kernel


def brute_force_change(labeled, evaluation, candidate, residual, classes, ridge):
    """Kernel regression on S = L + {x} with zero residuals on L: K_US (K_SS + lambda I)^-1 R_S."""
    together = type(labeled).concat([labeled, candidate])
    penalty = ridge * float(kernel(labeled, labeled, classes).diagonal().mean())
    gram = kernel(together, together, classes) + penalty * torch.eye(len(together.inputs), dtype=torch.float64)
    targets = torch.zeros(len(together.inputs), classes, dtype=torch.float64)
    targets[-1] = residual
    return kernel(evaluation, together, classes) @ torch.linalg.solve(gram, targets)  # (Ne, C)


def test_output_change_equals_a_brute_force_kernel_regression_refit():
    torch.manual_seed(1)
    model = FeatureHead(in_channels=8, num_classes=3, embed_dim=5).double().eval()
    labeled, evaluation, candidates = (kernel_inputs(model, torch.randn(n, 8, 1, 1, dtype=torch.float64))
                                       for n in (6, 7, 4))
    alpha = output_change_coefficients(labeled, evaluation, candidates, 3, ridge=0.05, chunk=3)
    probs = candidates.logits.softmax(1)
    for c in range(4):
        residual = torch.nn.functional.one_hot(probs[c].argmax(), 3).double() - probs[c]
        single = candidates.rows(slice(c, c + 1))
        expected = brute_force_change(labeled, evaluation, single, residual, 3, ridge=0.05)
        assert torch.allclose(alpha[c][:, None] * residual[None, :], expected, rtol=1e-8, atol=1e-10)
    norms = residual_norms(candidates.logits, "likely")
    assert torch.allclose(norms, (torch.nn.functional.one_hot(probs.argmax(1), 3) - probs).norm(dim=1))


def test_expected_residual_is_the_mean_over_the_predicted_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    probs = logits.softmax(1)
    expected = torch.stack([sum(probs[i, y] * (torch.eye(3, dtype=torch.float64)[y] - probs[i]).norm()
                                for y in range(3)) for i in range(2)])
    assert torch.allclose(residual_norms(logits, "expected"), expected)


def test_strategy_picks_the_largest_brute_force_output_change_and_never_an_evaluation_item():
    torch.manual_seed(2)
    count = 40
    model = FeatureHead(in_channels=6, num_classes=3, embed_dim=4, dropout=0.0).eval()
    features = torch.randn(count, 6, 1, 1)
    dataset = Dataset(name="features", classes=["a", "b", "c"], train_images=features,
                      train_labels=torch.zeros(count, dtype=torch.long), mean=(0.0,) * 6, std=(1.0,) * 6,
                      kind="features")
    pool = Pool(count)
    pool.add_labels(np.arange(8), np.arange(8) % 3, round_index=0)
    state = QueryState(model=model, dataset=dataset, pool=pool, device=torch.device("cpu"), seed=3)
    picks, scores = get_strategy("ntk-lookahead", ridge="0.01").query(state, count - 8)
    candidates, evaluation = split_pool(pool.unlabeled_indices, 0.2, seed=3, round_index=0)

    double = model.double()
    labeled = kernel_inputs(double, features[:8].double())
    held_out = kernel_inputs(double, features[evaluation].double())
    brute = {}
    for c in candidates:
        single = kernel_inputs(double, features[c:c + 1].double())
        probs = single.logits.softmax(1)[0]
        residual = torch.nn.functional.one_hot(probs.argmax(), 3).double() - probs
        brute[int(c)] = float(brute_force_change(labeled, held_out, single, residual, 3, 0.01).norm(dim=1).mean())
    order = sorted(brute, key=lambda c: (-brute[c], c))
    assert picks[:len(candidates)].tolist() == order
    assert scores[:len(candidates)] == pytest.approx([brute[c] for c in order], rel=1e-5)
    assert set(picks[len(candidates):].tolist()) == set(evaluation.tolist())
    assert np.all(np.isinf(scores[len(candidates):]))


def test_bad_options_are_one_config_error():
    with pytest.raises(ConfigError, match="label"):
        get_strategy("ntk-lookahead", label="mode")
    with pytest.raises(ConfigError, match="ridge"):
        get_strategy("ntk-lookahead", ridge="0")
