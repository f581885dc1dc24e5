"""torchvision backbones: classifier stripping, weights (names, local files, offline), the feature
cache, frozen and fine-tune training, and every strategy on a frozen-backbone feature dataset.

No test needs internet: the "local weights" are a randomly initialised resnet18 saved to a file.
"""
from __future__ import annotations

import copy
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from al_engine import backbones
from al_engine.backbones import (IMAGENET_MEAN, BackboneClassifier, build_backbone, build_feature_dataset,
                                 build_finetune_model, build_head, extract_features, finetune_dataset,
                                 model_mode, resolve_weights, strip_classifier)
from al_engine.data import LoadOptions, Pool, load_dataset
from al_engine.errors import ConfigError
from al_engine.strategies import QueryState, get_strategy, strategy_names
from al_engine.train import TrainConfig, train_classifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A local state-dict file: torchvision's resnet18, randomly initialised (seeded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(backbones._get_model("resnet18", weights=None).state_dict(), path)
    return path


def write_class_tree(root, per_class=8, test_per_class=2, size=(40, 32)):
    """Three classes of noisy colour pictures, with a test split: a head can learn them."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, count in (("train", per_class), ("test", test_per_class)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-40, 40, (size[1], size[0], 3))
                array = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(array).save(folder / f"{name}{i:02d}.png")


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_class_tree(root)
    cache = tmp_path_factory.mktemp("cache")
    options = LoadOptions(data_dir=str(root), image_size=32, progress=False, cache_dir=str(cache), workers=0)
    return root, cache, load_dataset("imagefolder", options)


@pytest.fixture(scope="module")
def backbone(resnet18_file):
    return build_backbone("resnet18", weights=str(resnet18_file), image_size=32, progress=False)


class ForwardCounter:
    """Counts the images a module's forward passes see."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]


# --------------------------------------------------------------------------------------------
# Building backbones


@pytest.mark.parametrize("name,side,width", [("resnet18", 64, 512), ("efficientnet_b0", 64, 1280),
                                             ("convnext_tiny", 64, 768), ("vit_b_16", 224, 768)])
def test_the_classifier_layer_is_found_and_replaced_by_identity(name, side, width):
    torch.manual_seed(0)
    model = backbones._get_model(name, weights=None).eval()
    original = copy.deepcopy(model)
    removed = strip_classifier(model, name)
    classifier = original.get_submodule(removed[0])
    assert isinstance(classifier, torch.nn.Linear) and classifier.in_features == width
    x = torch.randn(2, 3, side, side)
    with torch.inference_mode():
        features = model(x)
        assert features.shape == (2, width)
        # What was taken out is exactly the last layer: applying it gives the original logits.
        assert torch.allclose(classifier(features), original(x), atol=1e-4)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_a_size_the_network_cannot_take_is_one_clear_error():
    with pytest.raises(ConfigError, match="vit_b_16 cannot take 64x64.*--image-size 224") as error:
        build_backbone("vit_b_16", image_size=64, progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown torchvision model"):
        build_backbone("resnet19")


def test_local_weights_file_is_loaded_and_keyed_by_its_bytes(resnet18_file, backbone):
    saved = torch.load(resnet18_file, weights_only=True)
    assert torch.equal(backbone.module.conv1.weight, saved["conv1.weight"])
    assert torch.equal(backbone.module.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert backbone.weights_key.startswith("file:sha256:") and backbone.feature_dim == 512
    assert backbone.mean == IMAGENET_MEAN  # a file carries no preprocessing: ImageNet's
    # A checkpoint whose classifier has another class count still fits: the classifier is dropped.
    saved["fc.weight"], saved["fc.bias"] = torch.zeros(5, 512), torch.zeros(5)
    torch.save({"state_dict": saved}, resnet18_file.parent / "five-classes.pt")
    other = build_backbone("resnet18", str(resnet18_file.parent / "five-classes.pt"), 32, progress=False)
    assert other.weights_key != backbone.weights_key


def test_mismatched_or_unreadable_weights_files_are_one_clear_line(resnet18_file, tmp_path):
    state = torch.load(resnet18_file, weights_only=True)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError) as error:
        build_backbone("resnet18", str(tmp_path / "partial.pth"), 32, progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert "1 missing (e.g. layer1.0.conv1.weight)" in message and "extra.weight" in message
    with pytest.raises(ConfigError, match="does not fit resnet34"):
        build_backbone("resnet34", str(resnet18_file), 32, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        build_backbone("resnet18", str(tmp_path / "junk.pt"), 32, progress=False)
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "nowhere.pth"), 32, progress=False)


def test_weights_names_resolve_without_downloading():
    spec = resolve_weights("resnet18", "DEFAULT")
    assert spec.kind == "name" and str(spec.enum) == "ResNet18_Weights.IMAGENET1K_V1"
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert resolve_weights("resnet18", "imagenet1k_v1").enum is spec.enum
    assert resolve_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1").enum is spec.enum
    assert resolve_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").image_size == 384  # its transforms' crop
    assert resolve_weights("resnet18", None).kind == "none"
    with pytest.raises(ConfigError, match="choose from: DEFAULT, IMAGENET1K_V1"):
        resolve_weights("resnet18", "IMAGENET9")
    with pytest.raises(ConfigError, match="choose from"):
        resolve_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V1")  # another model's weights


def test_offline_download_is_one_clear_line_suggesting_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no checkpoint cached there
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(ConfigError) as error:
        build_backbone("resnet18", "DEFAULT", progress=False)
    message = str(error.value)
    assert calls, "the download was attempted"
    assert "\n" not in message and "needs internet" in message and "--weights PATH" in message
    assert "resnet18-f37072fd.pth" in message  # the URL to fetch elsewhere


def test_model_mode_rules():
    assert model_mode("auto", None, False) == "project"
    assert model_mode("resnet18", None, False) == "project"  # the CIFAR-style ResNet-18, as before
    assert model_mode("resnet18", "DEFAULT", False) == "frozen"
    assert model_mode("resnet18", "DEFAULT", True) == "finetune"
    assert model_mode("convnext_tiny", None, False) == "finetune"  # no weights: trained from scratch
    with pytest.raises(ConfigError, match="weights file 'w.pth' not found"):  # a project network takes a file
        model_mode("colour-cnn", "w.pth", False)
    with pytest.raises(ConfigError, match="must be a state-dict file"):
        model_mode("colour-cnn", "DEFAULT", False)
    with pytest.raises(ConfigError, match="unknown model"):
        model_mode("resnet19", None, False)


# --------------------------------------------------------------------------------------------
# Frozen mode: features computed once and cached


def test_extracting_features_never_changes_the_module(backbone, folder_dataset):
    module = backbone.module
    module.train()  # even in train mode, batch norm statistics must not move
    before = copy.deepcopy(module.state_dict())
    features = extract_features(backbone, folder_dataset[2].train_images[:6])
    assert features.shape == (6, 512) and features.dtype == torch.float32
    assert module.training  # its mode is given back
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.conv1.weight.is_contiguous()  # channels-last while extracting, put back after
    module.eval()


def test_feature_dataset_is_cached_and_a_second_build_runs_no_forward_pass(backbone, folder_dataset, tmp_path):
    root, _, pixels = folder_dataset
    counter = ForwardCounter(backbone.module)
    try:
        features = build_feature_dataset(pixels, backbone, cache_dir=tmp_path, progress=False)
        assert counter.images == 24 + 6  # every train and test image once
        assert features.kind == "features" and features.train_images.shape == (24, 512, 1, 1)
        assert features.test_images.shape == (6, 512, 1, 1) and features.train_images.dtype == torch.float32
        assert features.file_names == pixels.file_names and features.classes == pixels.classes
        assert torch.equal(features.train_labels, pixels.train_labels)
        expected = extract_features(backbone, pixels.train_images)
        assert torch.allclose(features.train_images.view(24, 512), expected, atol=1e-5)
        counter.images = 0
        again = build_feature_dataset(pixels, backbone, cache_dir=tmp_path, progress=False)
        assert counter.images == 0
        assert torch.equal(again.train_images, features.train_images)
        # normalize standardises per feature with the pool's statistics.
        batch = again.normalize(again.train_images)
        live = batch.view(24, 512)[:, again.train_images.view(24, 512).std(0) > 1e-4]
        assert live.mean(0).abs().max() < 1e-4 and (live.std(0, unbiased=False) - 1).abs().max() < 1e-3
        # A new file costs one forward pass, not 24.
        Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "train" / "red" / "red99.png")
        grown = load_dataset("imagefolder", LoadOptions(data_dir=str(root), image_size=32, progress=False,
                                                        cache_dir=str(folder_dataset[1]), workers=0))
        counter.images = 0
        bigger = build_feature_dataset(grown, backbone, cache_dir=tmp_path, progress=False)
        assert counter.images == 1 and bigger.train_images.shape[0] == 25
        assert torch.allclose(bigger.train_images.view(25, 512)[:8], expected[:8], atol=1e-6)
    finally:
        counter.handle.remove()
        (root / "train" / "red" / "red99.png").unlink(missing_ok=True)


def test_datasets_without_a_pixel_cache_get_content_keyed_features(backbone, tiny_dataset, tmp_path):
    counter = ForwardCounter(backbone.module)
    try:
        features = build_feature_dataset(tiny_dataset, backbone, cache_dir=tmp_path, progress=False)  # grey 28 px
        assert features.train_images.shape == (40, 512, 1, 1)
        assert counter.images == 1 + 60  # a one-image check that 28 px fits, then every image once
        build_feature_dataset(tiny_dataset, backbone, cache_dir=tmp_path, progress=False)
        assert counter.images == 61
    finally:
        counter.handle.remove()


@pytest.fixture(scope="module")
def frozen_setup(backbone, folder_dataset, tmp_path_factory):
    """A feature dataset, 9 labeled items and a head trained on them."""
    features = build_feature_dataset(folder_dataset[2], backbone, cache_dir=tmp_path_factory.mktemp("f"),
                                     progress=False)
    pool = Pool(len(features.train_labels))
    labeled = np.array([0, 1, 2, 8, 9, 10, 16, 17, 18])
    pool.add_labels(labeled, features.train_labels[labeled].numpy(), round_index=-1)
    torch.manual_seed(0)
    head = build_head(features)
    config = TrainConfig(max_epochs=30, min_epochs=5, batch_size=8)
    train_classifier(head, features, labeled, pool.labels[labeled], config, CPU, seed=0)
    return features, pool, head, config


def test_a_frozen_round_trains_the_head_and_never_the_backbone(backbone, frozen_setup):
    features, pool, _, config = frozen_setup
    backbone_before = copy.deepcopy(backbone.module.state_dict())
    torch.manual_seed(1)
    head = build_head(features)
    head_before = copy.deepcopy(head.state_dict())
    labeled = pool.labeled_indices
    train_classifier(head, features, labeled, pool.labels[labeled], config, CPU, seed=0)
    assert not torch.equal(head.fc_embed.weight, head_before["fc_embed.weight"])
    assert all(torch.equal(v, backbone.module.state_dict()[k]) for k, v in backbone_before.items())
    assert not any(p.requires_grad and p.grad is not None for p in backbone.module.parameters())
    assert head.embed_dim == 256 and head.fc_embed.in_features == 512


# A few options keep the slow strategies quick on this tiny problem; every one still runs its real code.
FAST_OPTIONS = {
    "adversarial-bim": {"max_iter": 10},
    "adversarial-deepfool": {"max_iter": 10},
    "coreset": {"time_limit": 5.0},
    "lookahead": {"mode": "last-layer", "distill_epochs": 5},
    "rnd": {"epochs": 3},
}


def test_every_strategy_queries_a_frozen_backbone_feature_dataset(frozen_setup):
    features, pool, head, config = frozen_setup
    unlabeled = set(pool.unlabeled_indices.tolist())
    names = strategy_names()
    assert len(names) >= 17
    for name in names:
        state = QueryState(model=head, dataset=features, pool=pool, device=CPU, round_index=0, seed=0,
                           train_config=config)
        picks, scores = get_strategy(name, **FAST_OPTIONS.get(name, {})).query(state, 4)
        assert len(picks) == 4 and len(set(picks.tolist())) == 4, name
        assert set(picks.tolist()) <= unlabeled, name
        assert np.isfinite(scores).all(), name
    # The uncertainty strategies score the head's probabilities on the cached features.
    with torch.inference_mode():
        probs = head(features.normalize(features.train_images[torch.as_tensor(pool.unlabeled_indices)])).softmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).numpy()
    state = QueryState(model=head, dataset=features, pool=pool, device=CPU, train_config=config)
    picks, _ = get_strategy("entropy").query(state, 3)
    assert picks.tolist() == pool.unlabeled_indices[np.argsort(-entropy, kind="stable")[:3]].tolist()


# --------------------------------------------------------------------------------------------
# Fine-tune mode


def test_fine_tuning_trains_the_backbone_itself(resnet18_file, folder_dataset):
    backbone = build_backbone("resnet18", str(resnet18_file), 32, progress=False)
    torch.manual_seed(0)
    model = build_finetune_model(backbone, num_classes=3)
    assert isinstance(model, BackboneClassifier) and model.embed_dim == 256
    assert [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [model.dropout]
    dataset = finetune_dataset(folder_dataset[2], backbone)
    assert dataset.mean == IMAGENET_MEAN and dataset.kind == "images"
    before = copy.deepcopy(model.backbone.state_dict())
    x = dataset.normalize(dataset.train_images[:4])
    model.eval()
    with torch.inference_mode():
        assert torch.equal(torch.relu(model.feature_layer(model.features_before_feature_layer(x))), model.embed(x))
        assert model(x).shape == (4, 3)
    indices = np.arange(12)
    train_classifier(model, dataset, indices, dataset.train_labels[:12].numpy(),
                     TrainConfig(max_epochs=1, min_epochs=1, batch_size=6), CPU)
    after = model.backbone.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
