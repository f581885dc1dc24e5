"""Self-supervised pretraining on the pool's own images, no labels: SimCLR (Chen et al., 2020).

`python app.py pretrain --dataset D --model M --out weights.pt` trains the encoder of model M (a
project network's trunk, `embed(x)`, or a torchvision network without its classifier) so that two
random views of one image land close together and views of different images apart (the NT-Xent
loss over a batch of 2B views, temperature tau), through a small projection MLP that is thrown away
afterwards. The output is a state dict of the encoder alone, which `--weights weights.pt` loads for
the same `--model` (frozen features and a head each round) or `--finetune` starts from.

Why SimCLR: it is the method TypiClust's paper clusters, it needs one network (no momentum encoder
or predictor whose collapse must be watched, as BYOL and SimSiam do) and with the batch sizes a CPU
affords (128-512) its loss still trains the small networks here. Other methods were not measured.

Augmentations (two views per image, every parameter drawn per image): a random resized crop
(scale 0.35-1, aspect 3/4-4/3), a horizontal flip where flips keep the class (`flip`, default the
dataset's `flip_augment`; never for digits), a small rotation (+-10 degrees), brightness and
contrast jitter (+-40%) and Gaussian noise (sigma 0.05 on the [0, 1] scale). Crop, flip and rotation
are composed into one affine map per image and applied to the whole batch with one `grid_sample`;
torchvision.transforms.v2 applying the same chain image by image measured 370 us per image on one
CPU thread (44 s of every Fashion-MNIST epoch), the batched version about 100 times less.

Checkpoints: `OUT.ckpt` holds the encoder, projector, optimiser, the step reached and the loss
history, written every `checkpoint_s` seconds and at the end; a rerun with the same settings
continues from it (a larger `--epochs` extends a finished run). `--time-budget S` stops after S
seconds of this invocation (a rerun continues). OUT is written at every checkpoint, so a stopped
run still leaves usable weights.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, LoadOptions, load_dataset
from .errors import ConfigError
from .models import MODELS, build_model, default_model_name

CHECKPOINT_FORMAT = 1
METHOD = "simclr"


@dataclass
class PretrainConfig:
    """Every setting of one pretraining run; recorded in the checkpoint (a rerun must match)."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None
    image_size: int | None = None  # image folders; default 32 for a project network, 224 for torchvision
    cache_dir: str | None = None
    strict: bool = False
    model: str = "auto"
    embed_dim: int | None = None  # project networks: width of embed(x) (default 50)
    out: str = "weights.pt"
    epochs: int = 100
    time_budget: float | None = None  # seconds of this invocation; None = until `epochs`
    batch_size: int = 256  # images per step (2x views)
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-6
    temperature: float = 0.5  # NT-Xent's tau (SimCLR's choice for small batches)
    projection_dim: int = 64
    flip: bool | None = None  # horizontal flips in the views; None = the dataset's flip_augment
    seed: int = 0
    device: str = "auto"
    checkpoint_s: float = 60.0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"--time-budget must be a positive number of seconds, got {self.time_budget}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (contrastive pairs need negatives), got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.projection_dim < 1:
            raise ConfigError("--projection-dim must be at least 1")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError("--embed-dim must be at least 1")
        if self.model == "head":
            raise ConfigError("--model head reads features, not images: pretrain a network (small-cnn, resnet18, ...)")
        if not self.out:
            raise ConfigError("pretrain needs --out FILE for the weights")
        if Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out!r} is a folder; give a file name such as weights.pt")
        parent = Path(self.out).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"folder {str(parent)!r} of --out does not exist")

    def signature(self) -> dict:
        """What must match for a rerun to continue a checkpoint (not epochs, budget or device)."""
        keep = ("dataset", "subset", "image_size", "model", "embed_dim", "batch_size", "lr", "weight_decay",
                "temperature", "projection_dim", "flip", "seed")
        return {key: value for key, value in asdict(self).items() if key in keep}


# --------------------------------------------------------------------------------------------
# Views


def random_views(images: torch.Tensor, generator: torch.Generator, flip: bool,
                 scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 degrees: float = 10.0, jitter: float = 0.4, noise: float = 0.05) -> torch.Tensor:
    """One random view per image of `images` (B, C, S, S) float in [0, 1], parameters drawn per image."""
    batch = images.shape[0]
    device = images.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator).to(device)

    area = uniform(*scale)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # crop sides as fractions of the image side
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (uniform(-1, 1) * (1 - width))  # in grid coordinates [-1, 1], the crop inside the image
    centre_y = (uniform(-1, 1) * (1 - height))
    angle = uniform(-degrees, degrees) * math.pi / 180
    sign = torch.ones(batch, device=device)
    if flip:
        sign = torch.where(torch.rand(batch, generator=generator).to(device) < 0.5, -sign, sign)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(batch, 2, 3, device=device)  # output grid -> input grid
    theta[:, 0, 0] = width * cos * sign
    theta[:, 0, 1] = -height * sin
    theta[:, 1, 0] = width * sin * sign
    theta[:, 1, 1] = height * cos
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = uniform(1 - jitter, 1 + jitter).view(-1, 1, 1, 1)
    contrast = uniform(1 - jitter, 1 + jitter).view(-1, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = ((views - mean) * contrast + mean) * brightness
    views = views + noise * torch.randn(views.shape, generator=generator).to(device)
    return views.clamp(0, 1)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each of the 2B projections must pick its partner view among the other 2B - 1."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    batch = first.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(z.device)
    return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------------------------
# Encoders


class Encoder(nn.Module):
    """Pixels in [0, 1] (B, C, S, S) -> representation (B, F): the network's part that `--weights` loads."""

    def __init__(self, kind: str, network: nn.Module, feature_dim: int, mean, std, channels: int):
        super().__init__()
        self.kind = kind  # "project" or "torchvision"
        self.network = network
        self.feature_dim = feature_dim
        self.channels = channels  # what the network takes (torchvision: 3, grey images repeated)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[1] == 1 and self.channels == 3:
            views = views.expand(-1, 3, -1, -1)
        values = (views - self.mean) / self.std
        if self.kind == "project":
            return self.network.embed(values)
        return self.network(values).flatten(1)

    def weights(self) -> dict:
        """The state dict that `--weights` loads: the project network less its classifier layer, or the
        torchvision network with its classifier replaced by identity (as `build_backbone` strips it)."""
        state = self.network.state_dict()
        if self.kind == "project":
            state = {key: value for key, value in state.items() if not key.startswith("fc_out.")}
        return {key: value.detach().cpu().clone() for key, value in state.items()}


def resolve_project_name(model: str, image_shape: tuple[int, int, int]) -> str:
    return default_model_name(image_shape) if model == "auto" else model


def build_encoder(config: PretrainConfig, dataset: Dataset) -> Encoder:
    """The network being pretrained, freshly initialised (seeded by the caller)."""
    from . import backbones

    if config.model == "auto" or config.model in MODELS:
        name = resolve_project_name(config.model, dataset.image_shape)
        try:
            network = build_model(name, dataset.image_shape, max(dataset.num_classes, 1), config.embed_dim)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return Encoder("project", network, network.embed_dim, dataset.mean, dataset.std, dataset.image_shape[0])
    if config.model not in backbones.backbone_names():
        raise ConfigError(f"unknown model {config.model!r}; choose from: auto, {', '.join(sorted(MODELS))}, "
                          "or a torchvision model")
    if config.embed_dim is not None:
        raise ConfigError("--embed-dim applies to the project's networks; a torchvision model's feature width is its own")
    backbone = backbones.build_backbone(config.model, None, dataset.image_shape[-1])
    return Encoder("torchvision", backbone.module, backbone.feature_dim, backbone.mean, backbone.std, 3)


def projector(feature_dim: int, projection_dim: int) -> nn.Module:
    """SimCLR's projection head g: Linear - ReLU - Linear (discarded after pretraining)."""
    hidden = max(feature_dim, projection_dim)
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, projection_dim))


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class PretrainResult:
    out: str
    method: str
    epochs_done: float  # epochs completed (fractional while an epoch is under way)
    steps: int
    seconds: float  # wall time over every invocation
    finished: bool  # reached --epochs (False: stopped by --time-budget; a rerun continues)
    resumed: bool  # this invocation continued a checkpoint
    losses: list  # mean loss of each completed epoch
    feature_dim: int


def checkpoint_path(out: str | Path) -> Path:
    return Path(str(out) + ".ckpt")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


def pretrain(config: PretrainConfig, dataset: Dataset | None = None, progress: bool = True) -> PretrainResult:
    """Run (or continue) SimCLR pretraining; writes `config.out` (state dict) and `config.out`.ckpt."""
    from tqdm.auto import tqdm

    from .train import resolve_device

    config.validate()
    if dataset is None:
        # Image folders: the side a later run with --weights takes by default (32 for a project network,
        # 224 for a torchvision one), so that features are computed at the size the network learned.
        side = config.image_size or (32 if config.model == "auto" or config.model in MODELS else 224)
        options = LoadOptions(data_dir=config.data_dir, download=config.download, subset=config.subset,
                              image_size=side, seed=config.seed, cache_dir=config.cache_dir, strict=config.strict)
        dataset = load_dataset(config.dataset, options)
    if dataset.is_features:
        raise ConfigError("pretraining needs images, not features")
    images = dataset.train_images
    count = images.shape[0]
    if count < 2:
        raise ConfigError(f"the pool has {count} image(s); contrastive pretraining needs at least 2")
    device = resolve_device(config.device)
    flip = dataset.flip_augment if config.flip is None else config.flip
    batch_size = min(config.batch_size, count)
    steps_per_epoch = max(1, count // batch_size)  # the incomplete last batch is dropped (NT-Xent wants full ones)

    torch.manual_seed(config.seed)
    encoder = build_encoder(config, dataset).to(device)
    head = projector(encoder.feature_dim, config.projection_dim).to(device)
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)

    ckpt_file = checkpoint_path(config.out)
    step, seconds, losses, epoch_losses, resumed = 0, 0.0, [], [], False
    if ckpt_file.is_file():
        try:
            saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ConfigError(f"cannot read checkpoint {str(ckpt_file)!r} ({type(error).__name__}); "
                              "delete it to start again") from None
        theirs, ours = saved.get("signature") or {}, config.signature()
        if saved.get("format") != CHECKPOINT_FORMAT or theirs != ours:
            differ = ", ".join(f"{key} {theirs.get(key)!r} there, {ours[key]!r} now" for key in ours
                               if theirs.get(key) != ours[key]) or "another format"
            raise ConfigError(f"checkpoint {str(ckpt_file)!r} was made with other settings ({differ}); "
                              "rerun with those, or use another --out, or delete the checkpoint")
        encoder.network.load_state_dict(saved["network"])
        head.load_state_dict(saved["projector"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, seconds, losses = saved["step"], saved["seconds"], saved["losses"]
        epoch_losses = saved["epoch_losses"]
        resumed = True

    def save(finished: bool) -> None:
        nonlocal seconds
        now = time.perf_counter()
        seconds, clock[0] = seconds + now - clock[0], now
        _atomic_save(encoder.weights(), Path(config.out))
        _atomic_save({"format": CHECKPOINT_FORMAT, "method": METHOD, "signature": config.signature(),
                      "network": encoder.network.state_dict(), "projector": head.state_dict(),
                      "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                      "seconds": seconds, "losses": losses, "epoch_losses": epoch_losses,
                      "finished": finished, "feature_dim": encoder.feature_dim}, ckpt_file)

    total_steps = config.epochs * steps_per_epoch
    start = time.perf_counter()
    clock = [start]  # when `seconds` was last brought up to date
    last_save = start
    stopped = False
    encoder.train()
    head.train()
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc=f"pretrain {METHOD}", unit="step",
               disable=not progress, leave=False)
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0:
            epoch_losses = []
        rows = _epoch_order(count, config.seed, epoch)[within * batch_size:(within + 1) * batch_size]
        batch = images[rows].to(device).float() / 255.0
        first = random_views(batch, generator, flip)
        second = random_views(batch, generator, flip)
        loss = nt_xent(head(encoder(first)), head(encoder(second)), config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"pretraining diverged (loss {value}) at step {step}; try a smaller --lr")
        epoch_losses.append(value)
        step += 1
        if step % steps_per_epoch == 0:
            losses.append(float(np.mean(epoch_losses)))
        bar.update(1)
        bar.set_postfix(epoch=f"{step / steps_per_epoch:.2f}", loss=f"{value:.3f}")
        now = time.perf_counter()
        if config.time_budget is not None and now - start >= config.time_budget and step < total_steps:
            stopped = True
            break
        if now - last_save >= config.checkpoint_s:
            save(False)
            last_save = time.perf_counter()
    bar.close()
    finished = not stopped
    save(finished)
    return PretrainResult(out=str(config.out), method=METHOD, epochs_done=round(step / steps_per_epoch, 3),
                          steps=step, seconds=round(seconds, 2), finished=finished, resumed=resumed,
                          losses=[round(x, 5) for x in losses], feature_dim=encoder.feature_dim)
