"""Datasets behind one registry, and the Pool that tracks which items are labeled.

Every dataset is uint8 tensors of shape (N, C, H, W); normalisation is applied per batch
(`Dataset.normalize`), which keeps CIFAR-10 at 150 MB instead of 600 MB. Image folders are not
held in memory at all: their tensors are views of a memory-mapped disk cache (al_engine/pixels.py).
A dataset of backbone features (al_engine/backbones.py) has `kind="features"`: float32 (N, F, 1, 1).
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import ConfigError, DatasetError
from .pixels import CachedPixels, PixelSource, load_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Where Debian's dataset-fashion-mnist package installs its IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class Dataset:
    """A train pool and an optional held-out test split: uint8 images, or float32 backbone features."""

    name: str
    classes: list[str]
    train_images: torch.Tensor  # (N, C, H, W) uint8 images; (N, F, 1, 1) float32 when kind == "features"
    train_labels: torch.Tensor  # (N,) int64 ground truth; -1 where unknown (real annotation work)
    test_images: torch.Tensor | None = None  # (M, C, H, W), same kind as train_images
    test_labels: torch.Tensor | None = None  # (M,) int64
    file_names: list[str] | None = None  # per pool item, path relative to the data folder (image folders)
    flip_augment: bool = False  # horizontal flips preserve the class (natural images, not digits)
    mean: tuple[float, ...] = field(default=())  # per channel (images, [0, 1] scale) or per feature
    std: tuple[float, ...] = field(default=())  # the same, for the standardisation
    kind: str = "images"  # "images": uint8 pixels; "features": float32 features of a frozen backbone
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason) of unreadable files left out
    data_root: str | None = None  # the resolved data folder that file_names are relative to
    sources: dict = field(default_factory=dict)  # split ("train", "test") -> pixels.PixelSource (image folders)
    backbone: str | None = None  # features only: the model and weights that computed them
    _stat_tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("images", "features"):
            raise ValueError(f"unknown dataset kind {self.kind!r}; choose from: images, features")
        if not self.mean:
            stats = channel_stats if self.kind == "images" else feature_stats
            self.mean, self.std = stats(self.train_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def has_ground_truth(self) -> bool:
        return bool((self.train_labels >= 0).all())

    @property
    def is_features(self) -> bool:
        return self.kind == "features"

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) mean and std on `device`, built once per device (a feature set has 512-2048)."""
        key = str(device)
        if key not in self._stat_tensors:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._stat_tensors[key] = (mean, std)
        return self._stat_tensors[key]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A batch -> float32 standardised per channel: uint8 images are first scaled to [0, 1];
        features (kind "features") are standardised per feature with the pool's statistics."""
        mean, std = self._stats_on(images.device)
        values = images.float()
        if self.kind == "images":
            values = values / 255.0
        return (values - mean) / std

    def describe(self) -> dict:
        summary = {
            "name": self.name,
            "kind": self.kind,
            "classes": self.classes,
            "pool_size": int(self.train_images.shape[0]),
            "test_size": 0 if self.test_images is None else int(self.test_images.shape[0]),
            "image_shape": list(self.image_shape),
            "skipped": len(self.skipped),
        }
        if self.skipped:  # which files, so a run's record says what it left out (the first 20)
            summary["skipped_files"] = [{"file": name, "reason": reason} for name, reason in self.skipped[:20]]
        if self.kind == "features":  # hundreds of per-feature statistics: not worth a config line each
            summary["backbone"] = self.backbone
            summary["normalisation"] = "per-feature standardisation with the pool's mean and std"
        else:
            summary["mean"] = [round(m, 5) for m in self.mean]
            summary["std"] = [round(s, 5) for s in self.std]
        return summary


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale."""
    channels = images.shape[1]
    flat = images.transpose(0, 1).reshape(channels, -1)
    mean, std = [], []
    for c in range(channels):  # one channel at a time keeps the float copy small
        values = flat[c].double() / 255.0
        mean.append(float(values.mean()))
        std.append(max(float(values.std()), 1e-3))
    return tuple(mean), tuple(std)


def feature_stats(features: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature mean and standard deviation of (N, F, 1, 1) float features, in float64 chunks."""
    flat = features.reshape(features.shape[0], -1)
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    squares = torch.zeros(flat.shape[1], dtype=torch.float64)
    for start in range(0, flat.shape[0], chunk):
        block = flat[start:start + chunk].double()
        total += block.sum(0)
        squares += block.pow(2).sum(0)
    count = max(flat.shape[0], 1)
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)  # a dead unit: 0 in, 0 out
    return tuple(mean.tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------
# Registry


@dataclass
class LoadOptions:
    """What the command line says about where and how to load a dataset."""

    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # keep a seeded random N of the pool
    classes: list[str] | None = None  # class names for a flat folder of unlabeled images
    image_size: int = 32  # side, in pixels, of image-folder images (shorter side resized, centre cropped)
    seed: int = 0
    cache_dir: str | None = None  # pixel (and feature) cache folder; None = $XDG_CACHE_HOME/al-annotator
    strict: bool = False  # image folders: refuse unreadable files (DatasetError) instead of skipping them
    progress: bool = True  # tqdm progress bars while files are decoded
    workers: int | None = None  # decoding processes; None = min(4, CPUs) for large folders, 0 = none
    file_order: list[str] | None = None  # image folders: names (relative to the folder) that keep their
    # positions first, in this order; files not named follow, sorted (a project that grows: the pool's
    # earlier items keep their indices and the pixel cache only appends)


DATASETS: dict[str, Callable[[LoadOptions], Dataset]] = {}


def register_dataset(name: str):
    def decorator(loader):
        DATASETS[name] = loader
        return loader
    return decorator


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, options: LoadOptions | None = None) -> Dataset:
    """Load a dataset by registry name; bad names and missing files raise a one-line UserError."""
    options = options or LoadOptions()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from: {', '.join(dataset_names())}")
    dataset = DATASETS[name](options)
    if options.subset is not None:
        dataset = take_subset(dataset, options.subset, options.seed)
    return dataset


def take_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """Keep a seeded random `size` items of the pool (in their original order); the test split stays."""
    pool_size = dataset.train_images.shape[0]
    if size < 1:
        raise ConfigError(f"--subset must be at least 1, got {size}")
    if size >= pool_size:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(pool_size, generator=generator)[:size].sort().values
    return Dataset(
        name=dataset.name,
        classes=dataset.classes,
        train_images=dataset.train_images[keep].clone(),
        train_labels=dataset.train_labels[keep].clone(),
        test_images=dataset.test_images,
        test_labels=dataset.test_labels,
        file_names=None if dataset.file_names is None else [dataset.file_names[i] for i in keep.tolist()],
        flip_augment=dataset.flip_augment,
        mean=dataset.mean,
        std=dataset.std,
        kind=dataset.kind,
        skipped=dataset.skipped,
        data_root=dataset.data_root,
        sources={split: source.subset(keep.tolist()) if split == "train" else source
                 for split, source in dataset.sources.items()},
        backbone=dataset.backbone,
    )


def _require_dir(options: LoadOptions, dataset: str) -> Path:
    if not options.data_dir:
        raise DatasetError(f"dataset {dataset!r} needs --data-dir PATH")
    path = Path(options.data_dir)
    if not path.is_dir() and not options.download:
        raise DatasetError(f"data folder {str(path)!r} does not exist")
    return path


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's embedded 8x8 digits, upsampled to 28x28 so the MNIST-size models fit


@register_dataset("digits")
def load_digits_dataset(options: LoadOptions) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed stratified held-out split of 20% (the same for every seed, like a published test set).
    rng = np.random.default_rng(12345)
    test_mask = np.zeros(len(labels), dtype=bool)
    for cls in range(10):
        members = np.flatnonzero(bunch.target == cls)
        test_mask[rng.choice(members, size=len(members) // 5, replace=False)] = True
    train, test = torch.from_numpy(~test_mask), torch.from_numpy(test_mask)
    return Dataset(
        name="digits",
        classes=[str(d) for d in range(10)],
        train_images=images[train], train_labels=labels[train],
        test_images=images[test], test_labels=labels[test],
    )


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path.name}: {error}") from None
    if len(data) < 4:
        raise DatasetError(f"{path.name} is not an IDX file (too short)")
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path.name} is not an unsigned-byte IDX file")
    header_end = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape))
    if len(data) - header_end != expected:
        raise DatasetError(f"{path.name} is truncated: expected {expected} bytes of data, found {len(data) - header_end}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate_dir in (folder, folder / "raw", folder / "MNIST" / "raw", folder / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
            path = candidate_dir / name
            if path.is_file():
                return path
    return None


def load_idx_dataset(name: str, folder: Path, classes: list[str]) -> Dataset:
    parts = {}
    for key, stem in (
        ("train_images", "train-images-idx3-ubyte"), ("train_labels", "train-labels-idx1-ubyte"),
        ("test_images", "t10k-images-idx3-ubyte"), ("test_labels", "t10k-labels-idx1-ubyte"),
    ):
        path = _find_idx(folder, stem)
        if path is None:
            raise DatasetError(f"{name}: {stem}[.gz] not found in {str(folder)!r}")
        parts[key] = read_idx(path)
    for split in ("train", "test"):
        if parts[f"{split}_images"].shape[0] != parts[f"{split}_labels"].shape[0]:
            raise DatasetError(f"{name}: {split} images and labels differ in count")
    return Dataset(
        name=name,
        classes=classes,
        train_images=torch.from_numpy(parts["train_images"].copy()).unsqueeze(1),
        train_labels=torch.from_numpy(parts["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(parts["test_images"].copy()).unsqueeze(1),
        test_labels=torch.from_numpy(parts["test_labels"].astype(np.int64)),
    )


@register_dataset("fashion-mnist")
def load_fashion_mnist(options: LoadOptions) -> Dataset:
    if options.data_dir:
        folder = Path(options.data_dir)
    elif DEBIAN_FASHION_MNIST.is_dir():
        folder = DEBIAN_FASHION_MNIST
    else:
        raise DatasetError(
            "fashion-mnist not found: install Debian's dataset-fashion-mnist (apt-get install "
            "dataset-fashion-mnist) or give --data-dir with the four IDX files"
        )
    if options.download:
        _torchvision_download("FashionMNIST", folder)
    return load_idx_dataset("fashion-mnist", folder, FASHION_MNIST_CLASSES)


@register_dataset("mnist")
def load_mnist(options: LoadOptions) -> Dataset:
    folder = _require_dir(options, "mnist")
    if options.download:
        _torchvision_download("MNIST", folder)
    return load_idx_dataset("mnist", folder, [str(d) for d in range(10)])


def _torchvision_download(class_name: str, root: Path, **kwargs) -> None:
    """Fetch a dataset with torchvision into `root` (needs internet; only with --download)."""
    import torchvision.datasets

    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        for split_kwargs in ({"train": True}, {"train": False}) if not kwargs else (kwargs,):
            dataset_class(str(root), download=True, **split_kwargs)
    except Exception as error:  # network errors come in many types; all mean the same to the user
        raise DatasetError(f"--download of {class_name} failed: {error}") from None


# --------------------------------------------------------------------------------------------
# CIFAR-10: the official python pickle batches (cifar-10-batches-py)


CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise DatasetError(f"cannot read CIFAR batch {path.name}: {error}") from None


def _cifar_arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise DatasetError(f"{path.name} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise DatasetError(f"{path.name} does not hold N x 3072 images with N labels")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


@register_dataset("cifar10")
def load_cifar10(options: LoadOptions) -> Dataset:
    root = _require_dir(options, "cifar10")
    if options.download and not (root / "cifar-10-batches-py").is_dir():
        import torchvision.datasets

        root.mkdir(parents=True, exist_ok=True)
        try:
            torchvision.datasets.CIFAR10(str(root), download=True)
        except Exception as error:
            raise DatasetError(f"--download of CIFAR-10 failed: {error}") from None
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in CIFAR10_TRAIN_BATCHES + ["test_batch"] if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"cifar10: {', '.join(missing)} not found in {str(folder)!r} (expected cifar-10-batches-py)")
    train = [_cifar_arrays(_unpickle(folder / n), folder / n) for n in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _cifar_arrays(_unpickle(folder / "test_batch"), folder / "test_batch")
    classes = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        names = meta.get(b"label_names")
        if names and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Dataset(
        name="cifar10",
        classes=classes,
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
        flip_augment=True,
    )


# --------------------------------------------------------------------------------------------
# SVHN: the official cropped-digit .mat files (train_32x32.mat, test_32x32.mat)


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as error:  # scipy raises several types for a damaged file
        raise DatasetError(f"cannot read SVHN file {path.name}: {error}") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path.name} lacks the 'X' or 'y' array of an SVHN file")
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))).astype(np.uint8)  # (N, 3, 32, 32)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path.name}: images and labels differ in count")
    return images, labels


@register_dataset("svhn")
def load_svhn(options: LoadOptions) -> Dataset:
    root = _require_dir(options, "svhn")
    if options.download:
        for split in ("train", "test"):
            if not (root / f"{split}_32x32.mat").is_file():
                _torchvision_download("SVHN", root, split=split)
    paths = {split: root / f"{split}_32x32.mat" for split in ("train", "test")}
    for split, path in paths.items():
        if not path.is_file():
            raise DatasetError(f"svhn: {path.name} not found in {str(root)!r}")
    train_images, train_labels = _read_svhn_mat(paths["train"])
    test_images, test_labels = _read_svhn_mat(paths["test"])
    return Dataset(
        name="svhn",
        classes=[str(d) for d in range(10)],
        train_images=torch.from_numpy(train_images), train_labels=torch.from_numpy(train_labels),
        test_images=torch.from_numpy(test_images), test_labels=torch.from_numpy(test_labels),
    )


# --------------------------------------------------------------------------------------------
# imagefolder: a class-per-folder tree (labeled), or a flat folder of unlabeled images + --classes
#
# Pixels come from al_engine/pixels.py: decoded once (EXIF-upright, shorter side resized, centre
# cropped) into a disk cache that later runs reuse; the tensors are views of its memory map.


def _image_files(folder: Path) -> list[str]:
    """Names of the image files directly in `folder`, sorted; hidden files (".DS_Store", "._x.jpg") are
    not images. os.scandir, not pathlib: a 100,000-file folder is listed in a fraction of a second."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries
                      if not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
                      and entry.is_file())


def in_known_order(files: list[str], known: list[str] | None) -> list[int]:
    """Positions of `files`: those named in `known` first, in its order, then the rest as given."""
    if not known:
        return list(range(len(files)))
    rank = {name: position for position, name in enumerate(known)}
    first = sorted((i for i, name in enumerate(files) if name in rank), key=lambda i: rank[files[i]])
    return first + [i for i, name in enumerate(files) if name not in rank]


def describe_skipped(skipped: list[tuple[str, str]], shown: int = 3) -> str | None:
    """One line about unreadable files left out of the pool: their count and the first names."""
    if not skipped:
        return None
    names = "; ".join(f"{name} ({reason})" for name, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} unreadable image file(s) skipped (--strict refuses them): {names}{more}"


def _class_tree_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Paths (relative to `folder`, "/"-separated) and labels of the images in each class folder."""
    files, labels = [], []
    for label, class_name in enumerate(classes):
        class_dir = folder / class_name
        if class_dir.is_dir():
            found = _image_files(class_dir)
            files += [f"{class_name}/{name}" for name in found]
            labels += [label] * len(found)
    return files, labels


@dataclass
class _Split:
    """One split of an image folder after its pixels are loaded."""

    images: torch.Tensor  # (R, 3, N, N) uint8 memory-mapped view
    labels: torch.Tensor  # (R,) int64, -1 where unlabeled
    names: list[str]  # (R,) paths relative to the data folder
    skipped: list[tuple[str, str]]  # (path relative to the data folder, reason)
    cached: CachedPixels


def _load_split(root: Path, folder: Path, files: list[str], labels: list[int], options: LoadOptions) -> _Split:
    """Pixels of `files` (relative to `folder`); names are given relative to the data folder `root`."""
    prefix = "" if folder == root else folder.relative_to(root).as_posix() + "/"
    base = str(folder)
    cached = load_pixels(folder, [os.path.join(base, f) for f in files], options.image_size, options.cache_dir,
                         options.workers, options.progress)
    kept = cached.kept.tolist()
    return _Split(
        images=cached.images,
        labels=torch.as_tensor([labels[i] for i in kept], dtype=torch.int64),
        names=[prefix + files[i] for i in kept],
        skipped=[(prefix + files[i], reason) for i, reason in cached.skipped],
        cached=cached,
    )


def _check_readable(root: Path, splits: list[_Split], strict: bool) -> list[tuple[str, str]]:
    """All splits' skipped files; --strict refuses them, and a folder with no readable image is refused."""
    skipped = [item for split in splits for item in split.skipped]
    if skipped and strict:
        shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise DatasetError(f"{len(skipped)} unreadable image file(s) in {str(root)!r} (--strict): {shown}{more}")
    if splits and len(splits[0].names) == 0:
        detail = f" ({len(skipped)} unreadable, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DatasetError(f"no readable images found under {str(root)!r}{detail}")
    return skipped


def _folder_dataset(root: Path, classes: list[str], train: _Split, test: _Split | None,
                    skipped: list[tuple[str, str]]) -> Dataset:
    sources = {"train": PixelSource.of(train.cached)}
    if test is not None:
        sources["test"] = PixelSource.of(test.cached)
    return Dataset(
        name="imagefolder", classes=classes,
        train_images=train.images, train_labels=train.labels,
        test_images=None if test is None else test.images, test_labels=None if test is None else test.labels,
        file_names=train.names, flip_augment=True,
        mean=train.cached.mean, std=train.cached.std,  # from the cache's per-row sums: no pass over the pixels
        skipped=skipped, data_root=str(root), sources=sources,
    )


@register_dataset("imagefolder")
def load_image_folder(options: LoadOptions) -> Dataset:
    """train/ + test/ trees, a class-per-folder tree, or a flat folder with --classes; unreadable
    files are skipped and listed in `Dataset.skipped` (or refused with `strict`)."""
    root = _require_dir(options, "imagefolder").resolve()
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if set(subdirs) >= {"train", "test"}:
        # A labeled tree with its own held-out split: train/<class>/*.png and test/<class>/*.png.
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
        train = _load_split(root, root / "train", *_class_tree_files(root / "train", classes), options)
        test = _load_split(root, root / "test", *_class_tree_files(root / "test", classes), options)
        skipped = _check_readable(root, [train, test], options.strict)
        return _folder_dataset(root, classes, train, test, skipped)
    if subdirs and not options.classes:
        # A labeled class-per-folder tree: the whole tree is the pool, with no held-out split.
        files, labels = _class_tree_files(root, subdirs)
        if not files:
            raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}")
        order = in_known_order(files, options.file_order)
        files, labels = [files[i] for i in order], [labels[i] for i in order]
        train = _load_split(root, root, files, labels, options)
        return _folder_dataset(root, subdirs, train, None, _check_readable(root, [train], options.strict))
    # A flat folder of unlabeled images: real annotation work, the classes come from --classes.
    if not options.classes:
        raise DatasetError("a flat folder of unlabeled images needs --classes a,b,c")
    if len(set(options.classes)) != len(options.classes) or len(options.classes) < 2:
        raise DatasetError("--classes needs at least two distinct names")
    files = _image_files(root)
    if not files:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(root)!r}")
    files = [files[i] for i in in_known_order(files, options.file_order)]
    train = _load_split(root, root, files, [-1] * len(files), options)
    return _folder_dataset(root, list(options.classes), train, None, _check_readable(root, [train], options.strict))


# --------------------------------------------------------------------------------------------
# Pool bookkeeping


class Pool:
    """Which pool items are labeled, with what answer, and in which round the answer came.

    Labels here are the oracle's answers (possibly noisy), not the ground truth.
    """

    def __init__(self, size: int):
        self.size = size
        self.labels = np.full(size, -1, dtype=np.int64)  # (N,) oracle answer, -1 = unlabeled
        self.label_round = np.full(size, -1, dtype=np.int64)  # (N,) round whose query gave the answer

    @property
    def labeled_mask(self) -> np.ndarray:
        return self.labels >= 0

    @property
    def labeled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    @property
    def unlabeled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels < 0)

    @property
    def num_labeled(self) -> int:
        return int((self.labels >= 0).sum())

    def add_labels(self, indices, labels, round_index: int) -> None:
        """Record answers; refuses duplicates, out-of-range indices and already-labeled items."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if indices.shape != labels.shape:
            raise ValueError("indices and labels differ in length")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("duplicate indices in one batch of answers")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.size):
            raise ValueError("pool index out of range")
        if (self.labels[indices] >= 0).any():
            raise ValueError("an item in the batch is already labeled")
        if (labels < 0).any():
            raise ValueError("labels must be non-negative class indices")
        self.labels[indices] = labels
        self.label_round[indices] = round_index

    def initial_indices(self, count: int, seed: int) -> np.ndarray:
        """A seeded random initial labeled set of `count` items."""
        if count > self.size:
            raise ConfigError(f"--initial {count} is larger than the pool ({self.size} items)")
        if count < 0:
            raise ConfigError("--initial cannot be negative")
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.size, size=count, replace=False))

    def hiding(self, indices) -> "Pool":
        """A view of this pool (shared arrays) whose `unlabeled_indices` leave out `indices`: what a
        strategy sees while the batch's audit items are set aside."""
        view = _HidingPool.__new__(_HidingPool)
        view.size, view.labels, view.label_round = self.size, self.labels, self.label_round
        view.hidden = np.asarray(indices, dtype=np.int64)
        return view

    def to_dict(self) -> dict:
        labeled = self.labeled_indices
        return {
            "size": self.size,
            "indices": labeled.tolist(),
            "labels": self.labels[labeled].tolist(),
            "rounds": self.label_round[labeled].tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "Pool":
        pool = cls(int(state["size"]))
        indices = np.asarray(state["indices"], dtype=np.int64)
        pool.labels[indices] = np.asarray(state["labels"], dtype=np.int64)
        pool.label_round[indices] = np.asarray(state["rounds"], dtype=np.int64)
        return pool


class _HidingPool(Pool):
    """`Pool.hiding`'s view: the same labels, fewer unlabeled candidates."""

    hidden: np.ndarray

    @property
    def unlabeled_indices(self) -> np.ndarray:
        return np.setdiff1d(np.flatnonzero(self.labels < 0), self.hidden, assume_unique=True)


def default_data_root() -> Path:
    """Where --download puts data when no --data-dir is given."""
    return Path(os.environ.get("AL_DATA_DIR", "data"))
