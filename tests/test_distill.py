"""Student distillation (al_engine.train): the student learns the teacher's features."""
import numpy as np
import pytest
import torch

from al_engine.data import Dataset
from al_engine.errors import ConfigError
from al_engine.models import SmallCNN
from al_engine.train import DistillConfig, distill_student, distillation_loss, feature_distance, fresh_copy


@pytest.fixture
def grey_images():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (48, 1, 28, 28), generator=generator, dtype=torch.uint8)
    return Dataset(name="grey", classes=["a", "b"], train_images=images, train_labels=torch.arange(48) % 2)


def test_losses_by_hand():
    student = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert float(distillation_loss(student, teacher, "l2")) == pytest.approx((1 + 4) / 2)
    # batch means (2, 1) and (0.5, 1): squared gap 1.5^2
    assert float(distillation_loss(student, teacher, "mean")) == pytest.approx(2.25)


@pytest.mark.parametrize("loss", ["l2", "mean"])
def test_distillation_reduces_the_feature_distance(grey_images, loss):
    torch.manual_seed(0)
    teacher = SmallCNN(embed_dim=8).eval()
    student = fresh_copy(teacher, seed=5)
    indices = np.arange(32)
    before = feature_distance(student, teacher, grey_images, indices, torch.device("cpu"))
    mean_gap_before = _mean_gap(student, teacher, grey_images, indices)
    config = DistillConfig(loss=loss, max_epochs=12, fixed_epochs=True, batch_size=16, lr=3e-3)
    result = distill_student(student, teacher, grey_images, indices, config, torch.device("cpu"), seed=1)
    assert result.epochs == 12
    if loss == "l2":
        assert feature_distance(student, teacher, grey_images, indices, torch.device("cpu")) < 0.5 * before
    else:  # the mean-feature loss only promises the batch means
        assert _mean_gap(student, teacher, grey_images, indices) < 0.5 * mean_gap_before
    for parameter in teacher.parameters():  # the teacher is never touched
        assert parameter.grad is None


def _mean_gap(student, teacher, dataset, indices):
    with torch.no_grad():
        images = dataset.normalize(dataset.train_images[indices])
        return float((student.embed(images).mean(0) - teacher.embed(images).mean(0)).pow(2).sum())


def test_saturation_stops_early(grey_images):
    teacher = SmallCNN(embed_dim=4).eval()
    student = fresh_copy(teacher, seed=2)
    config = DistillConfig(max_epochs=200, min_epochs=2, patience=2, min_delta=0.5)
    result = distill_student(student, teacher, grey_images, np.arange(32), config, torch.device("cpu"))
    assert result.epochs < 200


def test_fresh_copy_is_seeded_and_independent():
    model = SmallCNN(embed_dim=4)
    first, again, other = fresh_copy(model, 7), fresh_copy(model, 7), fresh_copy(model, 8)
    assert torch.equal(first.fc_embed.weight, again.fc_embed.weight)
    assert not torch.equal(first.fc_embed.weight, other.fc_embed.weight)
    assert not torch.equal(first.fc_embed.weight, model.fc_embed.weight)


def test_bad_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="l2, mean"):
        DistillConfig(loss="cosine").validate()


# --------------------------------------------------------------------------------------------
# Batch norm: the student trains in train mode, its running statistics measured afterwards


class TinyBatchNormNet(SmallCNN):
    """SmallCNN with a batch-norm layer after the first convolution (a stand-in for ResNet-18)."""

    def __init__(self, embed_dim: int = 6):
        super().__init__(embed_dim=embed_dim, num_classes=2)
        self.bn = torch.nn.BatchNorm2d(10)

    def features_before_feature_layer(self, x):
        x = torch.relu(torch.nn.functional.max_pool2d(self.bn(self.conv1(x)), 2))
        x = torch.relu(torch.nn.functional.max_pool2d(self.conv2(x), 2))
        return x.flatten(1)


def test_batch_norm_student_trains_with_batch_statistics_and_remeasures_them(grey_images):
    torch.manual_seed(0)
    teacher = TinyBatchNormNet().eval()
    student = fresh_copy(teacher, seed=4)
    indices = np.arange(32)
    seen_modes = []
    student.bn.register_forward_hook(lambda module, inputs, output: seen_modes.append(module.training))
    config = DistillConfig(max_epochs=3, fixed_epochs=True, batch_size=16)
    distill_student(student, teacher, grey_images, indices, config, torch.device("cpu"), seed=1)
    assert not student.training
    # Every distillation step normalised by its batch's statistics (train mode), not by the reset
    # running ones (mean 0, variance 1) that eval mode would have used.
    assert seen_modes[:6] == [True] * 6
    # The running statistics are those of the distillation set under the final weights.
    with torch.no_grad():
        conv = student.conv1(grey_images.normalize(grey_images.train_images[indices]))
    halves = conv.split(16)
    assert torch.allclose(student.bn.running_mean, conv.mean((0, 2, 3)), atol=1e-4)
    expected_var = torch.stack([h.var((0, 2, 3), unbiased=True) for h in halves]).mean(0)
    assert torch.allclose(student.bn.running_var, expected_var, rtol=1e-3)
    assert student.bn.momentum == 0.1  # the layer's own momentum is put back


def test_networks_without_batch_norm_distil_exactly_as_in_eval_mode(grey_images):
    """No batch norm, no change: the default networks' students (and so their picks) stay the same."""
    teacher = SmallCNN(embed_dim=4).eval()
    indices = np.arange(32)
    config = DistillConfig(max_epochs=3, fixed_epochs=True, batch_size=16)
    trained = fresh_copy(teacher, seed=2)
    distill_student(trained, teacher, grey_images, indices, config, torch.device("cpu"), seed=1)
    by_hand = fresh_copy(teacher, seed=2)  # the old loop: eval mode throughout
    images = grey_images.normalize(grey_images.train_images[indices])
    targets = teacher.embed(images).detach()
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for batch in torch.randperm(32, generator=generator).split(16):
            loss = (by_hand.embed(images[batch]) - targets[batch]).pow(2).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(trained.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)
