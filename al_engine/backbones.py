"""torchvision classification networks as backbones: frozen (features computed once, cached, and a
head trained each round) or fine-tuned end to end.

- `build_backbone(name, weights)`: any `torchvision.models.list_models(module=torchvision.models)`
  name, its classifier layer replaced by identity (found generically: the last nn.Linear, or 1x1
  convolution, of the model's last child), every dropout removed (the project's head carries the one
  dropout, so MC dropout's head-only sampling stays exact), auxiliary classifiers dropped.
  `weights` is a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...; downloading needs internet)
  or a local state-dict file (.pt/.pth).
- Frozen: `build_feature_dataset(dataset, backbone)` is an `al_engine.data.Dataset` of kind
  "features" whose items are the backbone's features (N, F, 1, 1), cached on disk beside the pixel
  cache; the model trained each round is `models.FeatureHead` ("head"), so every strategy works
  unchanged, on the head.
- Fine-tune: `BackboneClassifier` wraps the whole backbone under the same head, trained on pixels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, feature_stats
from .errors import ConfigError
from .models import MODELS, FeatureClassifier, FeatureHead
from .pixels import (PROGRESS_MIN_FILES, fsync_dir, new_data_name, open_rows, read_json, remove_stale,
                     resolve_cache_dir, store_lock, write_json_atomic)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation, [0, 1] scale
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FEATURE_CACHE_FORMAT = 1
FEATURE_BATCH = 64  # images per forward pass when features are computed


def backbone_names() -> list[str]:
    """Every torchvision classification model name (resnet18, efficientnet_b0, convnext_tiny, vit_b_16, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_project_model(model: str) -> bool:
    """A network of models.MODELS (or "auto", which picks one by the image shape)."""
    return model == "auto" or model in MODELS


def project_weights_file(model: str, weights: str | None) -> bool:
    """Whether `--weights` for `model` is a state dict of a project network (what `app.py pretrain`
    writes for one): any weights file for a project-only name, and for `resnet18`, the name both
    share, a file holding the project network's `fc_embed` layer (torchvision's has none)."""
    if not weights or weights.lower() == "none" or not is_project_model(model) or model == "head":
        return False
    if model not in backbone_names():
        return True
    if not _looks_like_path(weights) or not Path(weights).expanduser().is_file():
        return False
    return "fc_embed.weight" in _load_state_file(Path(weights).expanduser())


def model_mode(model: str, weights: str | None, finetune: bool) -> str:
    """How `--model/--weights/--finetune` are served: "project" (a network of models.MODELS trained from
    scratch, or from a project weights file with --finetune), "frozen" (a backbone's cached features +
    a head: a torchvision backbone, or a project network's embed() from a weights file) or "finetune"
    (the whole torchvision network trained). `resnet18` without --weights or --finetune stays the
    project's CIFAR-style ResNet-18, as before; with a weights file that holds the project network
    (see `project_weights_file`) it is the project's, otherwise torchvision's."""
    torchvision_name = model in backbone_names()
    has_weights = bool(weights) and weights.lower() != "none"
    if has_weights and is_project_model(model) and model != "head" and not torchvision_name:
        if not _looks_like_path(weights):
            raise ConfigError(f"--weights for the project network {model!r} must be a state-dict file "
                              f"(e.g. one written by `app.py pretrain`), got {weights!r}")
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"weights file {weights!r} not found")
    if project_weights_file(model, weights):
        return "project" if finetune else "frozen"
    if (weights or finetune) and not torchvision_name:
        flag = "--weights" if weights else "--finetune"
        hint = (" or a project network with --weights FILE" if flag == "--finetune" and is_project_model(model)
                else "")
        raise ConfigError(f"{flag} needs a torchvision model for --model (e.g. resnet18, efficientnet_b0, "
                          f"convnext_tiny, vit_b_16){hint}, got {model!r}")
    if not weights and not finetune and (model == "auto" or model in MODELS):
        return "project"
    if not torchvision_name:
        raise ConfigError(f"unknown model {model!r}; choose from: auto, {', '.join(sorted(MODELS))}, "
                          f"or a torchvision model: {', '.join(backbone_names())}")
    return "frozen" if weights and not finetune else "finetune"


def project_weights_width(path: str | Path) -> int:
    """The feature width (`fc_embed`'s output) of a project network's weights file."""
    state = _load_state_file(Path(path).expanduser())
    if "fc_embed.weight" not in state:
        raise ConfigError(f"weights file {str(path)!r} holds no project network (no fc_embed layer)")
    return int(state["fc_embed.weight"].shape[0])


def model_defaults(model: str, weights: str | None, finetune: bool) -> dict:
    """`--image-size` and `--embed-dim` when the command line leaves them unsaid: the project's
    networks take 32 px and a 50-d feature (from a weights file fine-tuned: the file's width); a
    frozen backbone (torchvision, or a project network's weights file) the head's 256-d feature, and
    a torchvision model the size its weights were trained at (224 without weights)."""
    mode = model_mode(model, weights, finetune)
    if project_weights_file(model, weights):
        if mode == "project":
            return {"image_size": 32, "embed_dim": project_weights_width(weights)}
        return {"image_size": 32, "embed_dim": FeatureHead.default_embed_dim}
    if mode == "project":
        return {"image_size": 32, "embed_dim": 50}
    return {"image_size": resolve_weights(model, weights).image_size, "embed_dim": FeatureHead.default_embed_dim}


# --------------------------------------------------------------------------------------------
# Weights


@dataclass
class WeightsSpec:
    """What `--weights` names, resolved without downloading anything."""

    kind: str  # "none", "name" (a torchvision weights enum member) or "file" (a local state dict)
    text: str | None  # as the user gave it
    enum: object | None = None  # the torchvision WeightsEnum member, kind "name"
    path: Path | None = None  # the state-dict file, kind "file"
    mean: tuple[float, ...] = IMAGENET_MEAN  # input normalisation the weights expect, [0, 1] scale
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int = 224  # side the weights were trained at (their transforms' crop size)


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in text or os.sep in text or Path(text).is_file()


def resolve_weights(model: str, weights: str | None) -> WeightsSpec:
    """Resolve `--weights NAME|PATH` for `model`; unknown names and missing files are one ConfigError line."""
    from torchvision.models import get_model_weights, get_weight

    if not weights or weights.lower() == "none":
        return WeightsSpec("none", None)
    if _looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {weights!r} not found")
        return WeightsSpec("file", weights, path=path)
    try:
        options = get_model_weights(model)
    except (ValueError, KeyError):
        raise ConfigError(f"unknown model {model!r} for --weights; choose a torchvision model") from None
    valid = ["DEFAULT"] + [member.name for member in options]
    try:
        member = get_weight(weights) if "." in weights else options.__members__[weights.upper()]
    except (KeyError, ValueError, AttributeError):
        member = None
    if member is None or type(member) is not options:
        raise ConfigError(f"unknown weights {weights!r} for {model}; choose from: {', '.join(valid)}, "
                          "or give a local state-dict file (.pt/.pth)")
    transforms = member.transforms()
    crop = getattr(transforms, "crop_size", None) or [224]
    return WeightsSpec("name", weights, enum=member,
                       mean=tuple(getattr(transforms, "mean", IMAGENET_MEAN)),
                       std=tuple(getattr(transforms, "std", IMAGENET_STD)), image_size=int(crop[0]))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, a pickle that needs code, a damaged zip: all one message
        reason = " ".join(str(error).split())[:160]
        raise ConfigError(f"cannot read weights file {str(path)!r} ({type(error).__name__}: {reason}); "
                          "it must be a state dict saved with torch.save") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} does not hold a state dict (names -> tensors)")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _load_matching(model: nn.Module, state: dict, removed: list[str], path: Path, name: str) -> None:
    """Load `state` into `model`, ignoring the removed classifier's keys; a mismatch is one clear line."""
    state = {k: v for k, v in state.items() if not any(k == r or k.startswith(r + ".") for r in removed)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(found)} {what} (e.g. {_examples(found)})" for found, what in (
            (missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if found]
        raise ConfigError(f"weights file {str(path)!r} does not fit {name}: {'; '.join(parts)}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Backbones


@dataclass
class Backbone:
    """A torchvision network with its classifier replaced by identity: normalised (B, 3, S, S) -> (B, F)."""

    name: str  # torchvision model name
    module: nn.Module  # the network without its classifier (and without dropout or auxiliary heads)
    feature_dim: int  # F, width of the module's output
    mean: tuple[float, ...]  # per-channel input normalisation (the weights', else ImageNet's), [0, 1] scale
    std: tuple[float, ...]
    image_size: int  # side the module was checked to accept, in pixels
    recommended_size: int  # side the weights were trained at (224 when unknown)
    weights: str | None  # as given (`--weights`), None for random initialisation
    weights_key: str  # what identifies the weights in cache keys: "none", the enum and URL, or the file's sha256
    removed: list[str] = field(default_factory=list)  # names of the modules taken out (classifier, aux heads)
    accepted_sizes: set = field(default_factory=set)  # sides, in pixels, a forward pass was checked at
    channels: int = 3  # channels the module takes (torchvision: 3, grey images repeated; a project network its own)

    def check_size(self, side: int) -> None:
        """ConfigError unless the module takes (side x side) images (checked once per side)."""
        if side not in self.accepted_sizes:
            check_input_size(self.module, self.name, side, self.recommended_size, self.channels)
            self.accepted_sizes.add(side)


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def strip_classifier(model: nn.Module, name: str) -> list[str]:
    """Replace the classifier layer by identity, drop auxiliary heads and dropouts; returns removed names.

    The classifier layer is the last nn.Linear (or, for SqueezeNet, 1x1 convolution) inside the
    model's last child: torchvision puts the classification head last (fc, classifier, heads, head).
    """
    head_name, head = list(model.named_children())[-1]
    inside = [(f"{head_name}.{n}" if n else head_name, m) for n, m in head.named_modules()]
    layers = [n for n, m in inside if isinstance(m, nn.Linear)]
    if not layers:
        layers = [n for n, m in inside if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if not layers:
        raise ConfigError(f"model {name!r} has no linear classifier layer to replace; choose another --model")
    removed = [layers[-1]]
    _set_submodule(model, layers[-1], nn.Identity())
    for aux in ("AuxLogits", "aux1", "aux2"):  # Inception v3 and GoogLeNet's auxiliary classifiers
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
            removed.append(aux)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    for dotted, module in list(model.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            _set_submodule(model, dotted, nn.Identity())
    return removed


def _get_model(name: str, **kwargs) -> nn.Module:
    from torchvision.models import get_model

    with warnings.catch_warnings():  # GoogLeNet/Inception warn about a future change of their init
        warnings.simplefilter("ignore", FutureWarning)
        return get_model(name, **kwargs)


def check_input_size(module: nn.Module, name: str, side: int, recommended: int, channels: int = 3) -> int:
    """One forward pass of a (1, channels, side, side) zero image: the feature width, or a ConfigError if it fails."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            device = next(module.parameters()).device
            out = module(torch.zeros(1, channels, side, side, device=device))
    except Exception as error:
        reason = " ".join(str(error).split())[:160]
        raise ConfigError(f"{name} cannot take {side}x{side} images ({type(error).__name__}: {reason}); "
                          f"try --image-size {recommended}") from None
    finally:
        module.train(was_training)
    return int(out.flatten(1).shape[1])


def build_backbone(name: str, weights: str | None = None, image_size: int | None = None,
                   progress: bool = True) -> Backbone:
    """A torchvision network without its classifier, from `weights` (a torchvision name or a file).

    `image_size` is the side it will be fed (default: the weights' crop size, else 224); a size it
    cannot take is a ConfigError. Downloading needs internet: offline it is one ConfigError line.
    """
    if name not in backbone_names():
        raise ConfigError(f"unknown torchvision model {name!r}; choose from: {', '.join(backbone_names())}")
    spec = resolve_weights(name, weights)
    if spec.kind == "name":
        try:
            spec.enum.get_state_dict(progress=progress, check_hash=True)  # downloads into torch's hub cache
        except Exception as error:  # no network, a proxy, a firewall, a full disk: the same advice
            reason = " ".join(str(error).split())[:160]
            raise ConfigError(
                f"cannot download the {spec.enum} weights of {name} ({type(error).__name__}: {reason}); this "
                f"needs internet: fetch {spec.enum.url} on another machine and give the file with "
                f"--weights PATH.pth") from None
        model = _get_model(name, weights=spec.enum)  # found in the hub cache now
        removed = strip_classifier(model, name)
        key = f"name:{spec.enum}:{spec.enum.url}"
    else:
        model = _get_model(name, weights=None)
        removed = strip_classifier(model, name)
        if spec.kind == "file":
            _load_matching(model, _load_state_file(spec.path), removed, spec.path, name)
            key = f"file:sha256:{_file_digest(spec.path)}"
        else:
            key = "none"
    recommended = spec.image_size if spec.kind == "name" else int(getattr(model, "image_size", 224))
    side = image_size or recommended
    feature_dim = check_input_size(model, name, side, recommended)
    model.eval()
    return Backbone(name=name, module=model, feature_dim=feature_dim, mean=spec.mean, std=spec.std,
                    image_size=side, recommended_size=recommended, weights=weights, weights_key=key,
                    removed=removed, accepted_sizes={side})


class ProjectTrunk(nn.Module):
    """A project network's trunk as a backbone module: normalised images -> `embed(x)` (B, embed_dim)."""

    def __init__(self, network: FeatureClassifier):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.embed(x)


def load_project_network(model: str, weights: str | Path, image_shape: tuple[int, int, int],
                         num_classes: int) -> FeatureClassifier:
    """A project network (`model`, "auto" picked by the image shape) with a weights file's trunk
    loaded (the file's width decides embed_dim; its classifier layer, if any, is left fresh)."""
    from .models import build_model, default_model_name

    path = Path(weights).expanduser()
    name = default_model_name(image_shape) if model == "auto" else model
    state = _load_state_file(path)
    width = project_weights_width(path)
    try:
        network = build_model(name, image_shape, num_classes, width)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    own = {k: v for k, v in network.state_dict().items() if not k.startswith("fc_out.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc_out.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(found)} {what} (e.g. {_examples(found)})" for found, what in (
            (missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if found]
        raise ConfigError(f"weights file {str(path)!r} does not fit {name} on {image_shape[1]}x{image_shape[2]} "
                          f"images with {image_shape[0]} channel(s): {'; '.join(parts)}")
    network.load_state_dict(state, strict=False)
    return network


def build_project_backbone(model: str, weights: str | Path, dataset: Dataset) -> Backbone:
    """A project network's trunk from a weights file (e.g. `app.py pretrain`'s) as a frozen backbone:
    its features are `embed(x)` of the images normalised with the pool's channel statistics (as the
    network was trained, and as `app.py pretrain` normalises them)."""
    from .models import default_model_name

    path = Path(weights).expanduser()
    network = load_project_network(model, path, dataset.image_shape, max(dataset.num_classes, 1))
    network.eval()
    name = default_model_name(dataset.image_shape) if model == "auto" else model
    side = dataset.image_shape[-1]
    return Backbone(name=name, module=ProjectTrunk(network), feature_dim=network.embed_dim,
                    mean=tuple(dataset.mean), std=tuple(dataset.std), image_size=side, recommended_size=side,
                    weights=str(weights), weights_key=f"file:sha256:{_file_digest(path)}", removed=["fc_out"],
                    accepted_sizes={side}, channels=dataset.image_shape[0])


def _prepared(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float32 normalised (B, channels, S, S); grey images are repeated to three
    channels for a module that takes three."""
    values = images.float() / 255.0
    if values.shape[1] == 1 and channels == 3:
        values = values.expand(-1, 3, -1, -1)
    return (values - mean) / std


def iter_features(backbone: Backbone, images: torch.Tensor, rows: Sequence[int], device: torch.device,
                  batch_size: int = FEATURE_BATCH) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows of the batch, (B, F) float32 CPU features) for `images[rows]`, in batches, under inference mode.

    The module runs in eval mode (batch norm uses its running statistics and is not updated) and is
    returned to its previous mode afterwards, so extracting features never changes it. Convolutions
    run channels-last (measured 1.5x faster for resnet18 at 224 px on a CPU); the weights' memory
    layout is put back afterwards (their values never change).
    """
    module = backbone.module
    was_training = module.training
    convolutional = [p for p in module.parameters() if p.dim() == 4]
    was_channels_last = bool(convolutional) and convolutional[0].is_contiguous(memory_format=torch.channels_last)
    module.to(device).eval()
    if convolutional:
        module.to(memory_format=torch.channels_last)
    mean = torch.tensor(backbone.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(backbone.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    rows = np.asarray(rows, dtype=np.int64)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            # Inference mode per batch, not around the yield: the caller's code must not run in it.
            with torch.inference_mode():
                batch = _prepared(images[torch.as_tensor(chunk)].to(device), mean, std, backbone.channels)
                if convolutional:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                features = module(batch).flatten(1).float().cpu()
            yield chunk, features.clone()  # a normal tensor: inference tensors refuse autograd later
    finally:
        module.train(was_training)
        if convolutional and not was_channels_last:
            module.to(memory_format=torch.contiguous_format)


def extract_features(backbone: Backbone, images: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(N, F) float32 features of uint8 `images` (N, C, S, S), computed in memory (no cache)."""
    out = torch.empty(images.shape[0], backbone.feature_dim, dtype=torch.float32)
    for rows, features in iter_features(backbone, images, range(images.shape[0]), torch.device(device), batch_size):
        out[torch.as_tensor(rows)] = features
    return out


# --------------------------------------------------------------------------------------------
# The feature cache


@dataclass
class CachedFeatures:
    """A split's backbone features, memory-mapped from the cache, and what the load did."""

    features: torch.Tensor  # (N, F) float32 view of `mapped`
    mapped: np.ndarray  # (N, F) float32 copy-on-write memory map of the cache file
    computed: int = 0  # rows whose features this load computed (forward passes over their images)
    reused: int = 0  # rows taken from the cache
    seconds: float = 0.0  # wall time of the load


def feature_store_name(backbone: Backbone, source_id: str, side: int) -> str:
    """The store of one split's features: model, weights' hash, image size and the pixel store it reads."""
    text = f"{backbone.name}\n{backbone.weights_key}\n{side}\n{source_id}"
    return f"{backbone.name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def load_features(backbone: Backbone, images: torch.Tensor, row_keys: Sequence[str], source_id: str,
                  cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                  batch_size: int = FEATURE_BATCH, progress: bool = True) -> CachedFeatures:
    """Features of `images` (N, C, S, S) uint8 whose rows are identified by `row_keys`, computing only
    the rows the cache lacks; rows of files that are gone are dropped (written anew, crash-safe)."""
    from tqdm import tqdm

    start = time.perf_counter()
    if len(row_keys) != images.shape[0]:
        raise ValueError("one row key per image is needed")
    device = torch.device(device)
    width = backbone.feature_dim
    side = int(images.shape[-1])
    folder = resolve_cache_dir(cache_dir) / "features" / feature_store_name(backbone, source_id, side)
    folder.mkdir(parents=True, exist_ok=True)
    with store_lock(folder):
        index = read_json(folder / "index.json")
        old_keys: list[str] = []
        old_data = None
        if (index and index.get("format") == FEATURE_CACHE_FORMAT and index.get("feature_dim") == width
                and index.get("rows")):
            candidate = folder / str(index.get("data_file"))
            if candidate.is_file() and candidate.stat().st_size == len(index["rows"]) * width * 4:
                old_keys, old_data = index["rows"], candidate
        old_rows = {key: row for row, key in enumerate(old_keys)}
        reuse = [old_rows.get(key) for key in row_keys]  # per row: cached row or None
        missing = [i for i, row in enumerate(reuse) if row is None]
        if not row_keys:
            data_name = None
        elif list(row_keys) == old_keys:  # every row cached, in this order: nothing to write
            data_name = index["data_file"]
        else:
            data_name = new_data_name("features", ".f32")
            tmp = folder / f"{data_name}.tmp"
            out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(len(row_keys), width))
            old_view = open_rows(old_data, np.float32, (width,), len(old_keys))
            present = np.asarray([i for i, row in enumerate(reuse) if row is not None], dtype=np.int64)
            for first in range(0, len(present), 4096):  # cached rows, copied in chunks
                part = present[first:first + 4096]
                out[part] = old_view[np.asarray([reuse[i] for i in part], dtype=np.int64)]
            quiet = not progress or len(missing) < PROGRESS_MIN_FILES
            with tqdm(total=len(missing), desc=f"{backbone.name} features", unit="img", disable=quiet) as bar:
                for rows, features in iter_features(backbone, images, missing, device, batch_size):
                    out[rows] = features.numpy()
                    bar.update(len(rows))
            out.flush()
            del out, old_view
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, folder / data_name)
            fsync_dir(folder)
            write_json_atomic(folder / "index.json", {
                "format": FEATURE_CACHE_FORMAT, "model": backbone.name, "weights": backbone.weights_key,
                "image_size": side, "source": source_id, "feature_dim": width,
                "data_file": data_name, "rows": list(row_keys)})
        remove_stale(folder, {data_name} if data_name else set())
        mapped = open_rows(folder / data_name if data_name else None, np.float32, (width,), len(row_keys))
    return CachedFeatures(features=torch.from_numpy(mapped), mapped=mapped, computed=len(missing),
                          reused=len(row_keys) - len(missing), seconds=time.perf_counter() - start)


def _content_keys(images: torch.Tensor, chunk: int = 4096) -> list[str]:
    """Per-row content hashes, for datasets that did not come from the pixel cache (CIFAR, MNIST, ...)."""
    keys = []
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].contiguous().numpy()
        keys += [hashlib.sha1(row.tobytes()).hexdigest() for row in block]
    return keys


def build_feature_dataset(dataset: Dataset, backbone: Backbone, cache_dir: str | Path | None = None,
                          device: torch.device | str = "cpu", batch_size: int = FEATURE_BATCH,
                          progress: bool = True) -> Dataset:
    """The frozen-backbone view of `dataset`: the same items, labels and names, with each image
    replaced by its backbone features (N, F, 1, 1) float32, standardised per feature by `normalize`.

    Features are computed once and cached on disk; a second call computes nothing.
    """
    if dataset.is_features:
        raise ConfigError("the dataset holds features already")
    side = dataset.image_shape[-1]
    backbone.check_size(side)
    splits = {"train": dataset.train_images}
    if dataset.test_images is not None:
        splits["test"] = dataset.test_images
    features = {}
    for split, images in splits.items():
        source = dataset.sources.get(split)
        if source is not None:
            keys, source_id = list(source.row_keys), f"pixels:{source.store_id}"
        else:
            keys, source_id = _content_keys(images), f"content:{dataset.name}:{split}:{side}"
        cached = load_features(backbone, images, keys, source_id, cache_dir, device, batch_size, progress)
        features[split] = cached.features.view(-1, backbone.feature_dim, 1, 1)  # (N, F, 1, 1)
    mean, std = feature_stats(features["train"])
    return Dataset(
        name=dataset.name, classes=dataset.classes,
        train_images=features["train"], train_labels=dataset.train_labels,
        test_images=features.get("test"), test_labels=dataset.test_labels,
        file_names=dataset.file_names, flip_augment=False, mean=mean, std=std, kind="features",
        skipped=dataset.skipped, data_root=dataset.data_root, sources=dataset.sources,
        backbone=f"{backbone.name} ({backbone.weights or 'random init'})",
    )


def build_head(features: Dataset, embed_dim: int | None = None, dropout: float = 0.5) -> FeatureHead:
    """The head trained each round in frozen mode (the registry's "head" model), sized for `features`."""
    from .models import build_model

    return build_model("head", features.image_shape, features.num_classes, embed_dim, dropout)


# --------------------------------------------------------------------------------------------
# Fine-tuning


class BackboneClassifier(FeatureClassifier):
    """A whole torchvision backbone under the project's head, trained end to end on pixels:
    backbone -> fc_embed (F -> embed_dim) -> relu = embed; then dropout and fc_out."""

    def __init__(self, backbone: Backbone, num_classes: int, embed_dim: int = FeatureHead.default_embed_dim,
                 dropout: float = 0.5):
        super().__init__(embed_dim, num_classes, dropout)
        self.backbone = backbone.module
        self.fc_embed = nn.Linear(backbone.feature_dim, embed_dim)

    def features_before_feature_layer(self, x):  # (B, C, S, S) normalised -> (B, F)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(x).flatten(1)

    def embed(self, x):
        return F.relu(self.fc_embed(self.features_before_feature_layer(x)))


def build_finetune_model(backbone: Backbone, num_classes: int, embed_dim: int | None = None,
                         dropout: float = 0.5) -> BackboneClassifier:
    """The fine-tune mode's classifier. The backbone module is used, not copied: build a fresh
    `Backbone` for each round that should start again from the pretrained weights."""
    return BackboneClassifier(backbone, num_classes, embed_dim or FeatureHead.default_embed_dim, dropout)


def finetune_dataset(dataset: Dataset, backbone: Backbone) -> Dataset:
    """`dataset` normalised the way the backbone's weights expect (their mean and std, not the pool's)."""
    if dataset.is_features:
        raise ConfigError("fine-tuning needs pixels, not a feature dataset")
    channels = dataset.image_shape[0]
    mean, std = backbone.mean, backbone.std
    if channels == 1:  # grey images are repeated to three channels by the model
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return dataclasses.replace(dataset, mean=tuple(mean), std=tuple(std))
