"""Training and inference loops on the embedded digits data."""
import numpy as np
import pytest
import torch

from al_engine.errors import ConfigError
from al_engine.models import build_model
from al_engine.train import (TRAIN_PRESETS, augment_batch, embed_pool, evaluate_accuracy, predict_proba,
                             resolve_device, train_classifier, train_preset)


def test_default_training_learns_digits(digits):
    torch.manual_seed(0)
    indices = np.arange(300)
    model = build_model("auto", digits.image_shape, 10)
    epochs_seen = []
    result = train_classifier(model, digits, indices, digits.train_labels[indices].numpy(),
                              train_preset("saturate", max_epochs=40), torch.device("cpu"),
                              on_epoch_end=lambda epoch, loss: epochs_seen.append(epoch))
    assert result.losses[-1] < result.losses[0] / 3
    assert epochs_seen == list(range(result.epochs))
    assert evaluate_accuracy(model, digits, torch.device("cpu")) > 0.85


def test_saturation_stops_before_the_cap_and_fixed_epochs_do_not(tiny_dataset):
    indices = np.arange(40)
    labels = tiny_dataset.train_labels.numpy()
    model = build_model("auto", tiny_dataset.image_shape, 4)
    saturating = train_classifier(model, tiny_dataset, indices, labels,
                                  train_preset("saturate", max_epochs=500), torch.device("cpu"))
    assert saturating.epochs < 500
    fixed = train_classifier(build_model("auto", tiny_dataset.image_shape, 4), tiny_dataset, indices, labels,
                             train_preset("dal", max_epochs=3), torch.device("cpu"))
    assert fixed.epochs == 3


def test_inference_helpers(digits):
    model = build_model("auto", digits.image_shape, 10)
    probs = predict_proba(model, digits, np.arange(10), torch.device("cpu"), batch_size=3)
    assert probs.shape == (10, 10)
    assert torch.allclose(probs.sum(1), torch.ones(10), atol=1e-5)
    # dropout is off in inference: two passes agree
    assert torch.allclose(probs, predict_proba(model, digits, np.arange(10), torch.device("cpu")), atol=1e-6)
    assert embed_pool(model, digits, np.arange(7), torch.device("cpu"), batch_size=2).shape == (7, 50)


def test_augmentation_keeps_shape_and_shifts():
    images = torch.zeros(8, 1, 16, 16)
    images[:, :, 8, 8] = 1.0
    out = augment_batch(images, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert (out.sum(dim=(1, 2, 3)) <= 1).all()
    assert not torch.equal(out, images)


def test_presets_and_devices():
    assert TRAIN_PRESETS["dal"].optimizer == "sgd" and TRAIN_PRESETS["dal"].lr == 0.01
    assert TRAIN_PRESETS["dal"].momentum == 0.5 and TRAIN_PRESETS["dal"].max_epochs == 10
    with pytest.raises(ConfigError, match="choose from"):
        train_preset("fast-and-loose")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError):
        resolve_device("toaster")
