"""Networks: shapes, the embed/classify split, and dropout only before the last layer."""
import pytest
import torch

from al_engine.models import MODELS, build_model, default_model_name


@pytest.mark.parametrize("name,shape", [("small-cnn", (1, 28, 28)), ("colour-cnn", (3, 32, 32)),
                                        ("resnet18", (3, 32, 32)), ("small-cnn", (3, 32, 32))])
def test_embed_and_forward_shapes(name, shape):
    model = build_model(name, shape, num_classes=7, embed_dim=24).eval()
    x = torch.randn(3, *shape)
    features = model.embed(x)
    assert features.shape == (3, 24)
    assert (features >= 0).all()  # post-ReLU feature
    assert model(x).shape == (3, 7)
    assert torch.allclose(model(x), model.classify(features))
    inner = model.features_before_feature_layer(x)
    assert torch.allclose(torch.relu(model.feature_layer(inner)), features)


def test_default_embedding_is_50d_and_auto_picks_by_channels():
    assert build_model("auto", (1, 28, 28), 10).embed_dim == 50
    assert default_model_name((1, 28, 28)) == "small-cnn"
    assert default_model_name((3, 32, 32)) == "colour-cnn"


def test_dropout_sits_only_before_the_last_layer():
    for name, cls in MODELS.items():
        model = build_model(name, (3, 32, 32) if name != "small-cnn" else (1, 28, 28), 10)
        dropouts = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
        assert dropouts == [model.dropout], name
    model = build_model("small-cnn", (1, 28, 28), 10).train()
    x = torch.randn(4, 1, 28, 28)
    # In train mode the trunk is deterministic (no dropout there); the head is stochastic.
    assert torch.equal(model.embed(x), model.embed(x))
    assert not torch.equal(model(x), model(x))


def test_bad_model_requests_are_value_errors():
    with pytest.raises(ValueError, match="choose from"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="at least"):
        build_model("small-cnn", (1, 8, 8), 10)


def test_feature_head_takes_backbone_features():
    model = build_model("auto", (512, 1, 1), num_classes=3).eval()
    assert type(model).__name__ == "FeatureHead"
    assert model.embed_dim == 256  # its own default width, not the CNNs' 50
    assert build_model("head", (512, 1, 1), 3, embed_dim=32).embed_dim == 32
    x = torch.randn(5, 512, 1, 1)
    assert torch.equal(model.features_before_feature_layer(x), x.flatten(1))
    features = model.embed(x)
    assert features.shape == (5, 256) and (features >= 0).all()
    assert torch.allclose(torch.relu(model.feature_layer(x.flatten(1))), features)
    assert model(x).shape == (5, 3)
