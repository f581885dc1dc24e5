"""Networks. Each splits into a trunk, `embed(x)` -> (B, embed_dim) penultimate feature, and a
head, `classify(features)`, that is dropout followed by one linear layer.

Dropout sits only before the last layer, on purpose: MC-dropout strategies can compute the
trunk's features once and sample only the head T times, which is exact for these models.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class FeatureClassifier(nn.Module):
    """Base: `forward(x) = classify(embed(x))`; `feature_layer` is the last layer of the trunk."""

    embed_dim: int
    num_classes: int

    def __init__(self, embed_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc_out = nn.Linear(embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, embed_dim)
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:  # (B, embed_dim) -> (B, classes) logits
        return self.fc_out(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    @property
    def feature_layer(self) -> nn.Linear:
        """The linear layer whose output (after ReLU) is the embedding."""
        return self.fc_embed

    def features_before_feature_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The input of `feature_layer`, so that embed(x) == relu(feature_layer(this))."""
        raise NotImplementedError


class SmallCNN(FeatureClassifier):
    """The two-conv CNN the deep-active-learning literature uses for 28x28 grey images (MNIST-like).

    conv(5x5, 10) -> pool -> relu -> conv(5x5, 20) -> pool -> relu -> fc(embed_dim) -> relu.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 embed_dim: int = 50, dropout: float = 0.5):
        super().__init__(embed_dim, num_classes, dropout)
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc_embed = nn.Linear(20 * side * side, embed_dim)

    def features_before_feature_layer(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return x.flatten(1)

    def embed(self, x):
        return F.relu(self.fc_embed(self.features_before_feature_layer(x)))


class ColourCNN(FeatureClassifier):
    """The three-conv CNN the deep-active-learning literature uses for 32x32 colour images (CIFAR, SVHN)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 embed_dim: int = 50, dropout: float = 0.5):
        super().__init__(embed_dim, num_classes, dropout)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3)
        side = ((image_size - 4) // 2 - 2) // 2
        self.fc_embed = nn.Linear(64 * side * side, embed_dim)

    def features_before_feature_layer(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(F.max_pool2d(self.conv3(x), 2))
        return x.flatten(1)

    def embed(self, x):
        return F.relu(self.fc_embed(self.features_before_feature_layer(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(FeatureClassifier):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), with a 512 -> embed_dim feature layer."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 embed_dim: int = 50, dropout: float = 0.5):
        super().__init__(embed_dim, num_classes, dropout)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.blocks = nn.Sequential(*layers)
        self.fc_embed = nn.Linear(512, embed_dim)

    def features_before_feature_layer(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def embed(self, x):
        return F.relu(self.fc_embed(self.features_before_feature_layer(x)))


class FeatureHead(FeatureClassifier):
    """A head over features computed once by a frozen backbone: fc(F -> embed_dim) - relu, then the
    base class's dropout and last layer.

    Input (B, F, 1, 1) (any (B, C, H, W) works: it is flattened). The hidden width defaults to 256,
    not the CNNs' 50: a 512-2048-d pretrained feature squeezed through 50 units loses much of what a
    linear probe of it can tell apart, while 256 still trains in about a second on a CPU and keeps
    BADGE's (C x 256) gradient embeddings and the k-center distances cheap.
    """

    default_embed_dim = 256

    def __init__(self, in_channels: int = 512, num_classes: int = 10, image_size: int = 1,
                 embed_dim: int = 256, dropout: float = 0.5):
        super().__init__(embed_dim, num_classes, dropout)
        self.fc_embed = nn.Linear(in_channels * image_size * image_size, embed_dim)

    def features_before_feature_layer(self, x):
        return x.flatten(1)

    def embed(self, x):
        return F.relu(self.fc_embed(x.flatten(1)))


MODELS: dict[str, Callable[..., FeatureClassifier]] = {
    "small-cnn": SmallCNN,
    "colour-cnn": ColourCNN,
    "resnet18": ResNet18,
    "head": FeatureHead,
}

# Smallest side each model can take (the CNNs' convolutions and poolings need this much).
MIN_IMAGE_SIDE = {"small-cnn": 16, "colour-cnn": 14, "resnet18": 8, "head": 1}


def model_names() -> list[str]:
    return ["auto"] + sorted(MODELS)


def default_model_name(image_shape: tuple[int, int, int]) -> str:
    """The literature's choice: the small CNN for grey images, the three-conv CNN for colour; a head
    for backbone features, whose shape is (F, 1, 1)."""
    if image_shape[1:] == (1, 1):
        return "head"
    return "small-cnn" if image_shape[0] == 1 else "colour-cnn"


def build_model(name: str, image_shape: tuple[int, int, int], num_classes: int,
                embed_dim: int | None = None, dropout: float = 0.5) -> FeatureClassifier:
    """Build a fresh network by registry name ('auto' picks by the image shape).

    `embed_dim` None = the model's own default (50 for the CNNs, 256 for the feature head).
    """
    if name == "auto":
        name = default_model_name(image_shape)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(model_names())}")
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"models expect square images, got {height}x{width}")
    minimum = MIN_IMAGE_SIDE.get(name, 1)
    if height < minimum:
        raise ValueError(f"model {name!r} needs images of at least {minimum}x{minimum}, got {height}x{width}")
    if embed_dim is None:
        embed_dim = getattr(MODELS[name], "default_embed_dim", 50)
    return MODELS[name](in_channels=channels, num_classes=num_classes, image_size=height,
                        embed_dim=embed_dim, dropout=dropout)
