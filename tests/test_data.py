"""Dataset loaders on fixtures written in each dataset's real on-disk format, and Pool invariants."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from al_engine.data import (DEBIAN_FASHION_MNIST, DatasetError, LoadOptions, Pool, dataset_names, load_dataset,
                            read_idx)
from al_engine.errors import ConfigError


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_mnist_fixture(folder, train=50, test=20, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(test) % 10,
    }
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}{suffix}", array, compress)
    return arrays


def test_registry_names():
    assert {"digits", "fashion-mnist", "mnist", "cifar10", "svhn", "imagefolder"} <= set(dataset_names())
    with pytest.raises(DatasetError, match="choose from"):
        load_dataset("imagenet")


def test_digits_is_embedded_with_held_out_split(digits):
    assert digits.image_shape == (1, 28, 28)
    assert digits.train_images.dtype == torch.uint8
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert set(digits.train_labels.tolist()) == set(range(10))
    assert digits.has_ground_truth
    batch = digits.normalize(digits.train_images[:500])
    assert abs(float(batch.mean())) < 0.2 and 0.7 < float(batch.std()) < 1.3


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_idx_files(tmp_path, compress):
    arrays = write_mnist_fixture(tmp_path, compress=compress)
    dataset = load_dataset("mnist", LoadOptions(data_dir=str(tmp_path)))
    assert dataset.train_images.shape == (50, 1, 28, 28)
    assert torch.equal(dataset.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert dataset.test_labels.tolist() == (np.arange(20) % 10).tolist()


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_mnist_fixture(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(data[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", LoadOptions(data_dir=str(tmp_path)))


def test_fashion_mnist_from_data_dir_keeps_every_image(tmp_path):
    write_mnist_fixture(tmp_path, train=73)
    dataset = load_dataset("fashion-mnist", LoadOptions(data_dir=str(tmp_path)))
    assert len(dataset.train_labels) == 73  # never silently truncated
    assert dataset.classes[0] == "T-shirt/top" and dataset.num_classes == 10


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_found_where_debian_installs_it():
    dataset = load_dataset("fashion-mnist")
    assert dataset.train_images.shape == (60000, 1, 28, 28)
    assert dataset.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10


def test_missing_folder_and_files_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", LoadOptions(data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("mnist", LoadOptions(data_dir=str(tmp_path)))


def write_cifar_fixture(root, per_batch=6, test=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        batches.append((data, labels))
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"training batch"}, handle)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": rng.integers(0, 256, (test, 3072)).astype(np.uint8),
                     b"labels": [i % 10 for i in range(test)]}, handle)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, handle)
    return batches


def test_cifar10_reads_python_pickle_batches(tmp_path):
    batches = write_cifar_fixture(tmp_path)
    dataset = load_dataset("cifar10", LoadOptions(data_dir=str(tmp_path)))
    assert dataset.train_images.shape == (30, 3, 32, 32)
    assert dataset.test_images.shape == (8, 3, 32, 32)
    assert dataset.classes[1] == "automobile"
    first = batches[0][0][0].reshape(3, 32, 32)  # CIFAR rows are channel-major: R plane, G plane, B plane
    assert torch.equal(dataset.train_images[0], torch.from_numpy(first))
    assert dataset.train_labels[:6].tolist() == batches[0][1]
    assert dataset.flip_augment


def test_cifar10_missing_batch_is_named(tmp_path):
    write_cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", LoadOptions(data_dir=str(tmp_path)))


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split, count in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, (32, 32, 3, count)).astype(np.uint8)
        labels = (np.arange(count) % 10 + 1).reshape(-1, 1)  # SVHN: digits 1..10, 10 meaning 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": images, "y": labels})
        if split == "train":
            train_images = images
    dataset = load_dataset("svhn", LoadOptions(data_dir=str(tmp_path)))
    assert dataset.train_images.shape == (12, 3, 32, 32)
    assert dataset.train_labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert torch.equal(dataset.train_images[3, :, 5, 7], torch.from_numpy(train_images[5, 7, :, 3]))


def write_png(path, colour, size=(20, 16)):
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_class_tree(tmp_path):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(3):
            write_png(tmp_path / name / f"{i}.png", colour)
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), image_size=16))
    assert dataset.classes == ["cat", "dog"]
    assert dataset.train_images.shape == (6, 3, 16, 16)
    assert dataset.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.file_names[3] == "dog/0.png"
    assert int(dataset.train_images[0, 0].float().mean()) == 255  # red
    assert dataset.test_images is None


def test_imagefolder_train_test_tree(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            write_png(tmp_path / split / name / "x.png", (10, 20, 30))
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), image_size=16))
    assert len(dataset.train_labels) == 2 and len(dataset.test_labels) == 2


def test_imagefolder_flat_unlabeled_with_classes(tmp_path):
    for i in range(4):
        write_png(tmp_path / f"img{i}.jpg", (i * 40, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="--classes"):
        load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path)))
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), classes=["cat", "dog"], image_size=16))
    assert dataset.train_labels.tolist() == [-1] * 4
    assert not dataset.has_ground_truth
    assert dataset.file_names == [f"img{i}.jpg" for i in range(4)]


def test_imagefolder_corrupt_image_is_skipped_and_named(tmp_path):
    # Changed on purpose: a damaged file used to abort the load; now it is left out and reported,
    # and only --strict refuses the folder.
    write_png(tmp_path / "good.png", (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), classes=["a", "b"], progress=False))
    assert dataset.file_names == ["good.png"]
    assert [name for name, _ in dataset.skipped] == ["broken.png"]
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), classes=["a", "b"], strict=True))


def test_imagefolder_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 20x16 image then counts as a bomb
    write_png(tmp_path / "big.png", (0, 0, 0))
    write_png(tmp_path / "small.png", (0, 0, 0), size=(8, 8))
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), classes=["a", "b"], progress=False))
    assert dataset.file_names == ["small.png"]
    assert dataset.skipped[0][0] == "big.png" and "decompression-bomb" in dataset.skipped[0][1]
    (tmp_path / "small.png").unlink()  # nothing readable left: a clear error, naming the reason
    with pytest.raises(DatasetError, match="no readable images.*decompression-bomb"):
        load_dataset("imagefolder", LoadOptions(data_dir=str(tmp_path), classes=["a", "b"], progress=False))


def test_subset_is_seeded_and_keeps_test_split(digits):
    a = load_dataset("digits", LoadOptions(subset=100, seed=3))
    b = load_dataset("digits", LoadOptions(subset=100, seed=3))
    c = load_dataset("digits", LoadOptions(subset=100, seed=4))
    assert len(a.train_labels) == 100
    assert torch.equal(a.train_images, b.train_images)
    assert not torch.equal(a.train_images, c.train_images)
    assert len(a.test_labels) == len(digits.test_labels)
    with pytest.raises(ConfigError):
        load_dataset("digits", LoadOptions(subset=0))


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match="unsigned-byte"):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# Pool


def test_pool_bookkeeping_invariants():
    pool = Pool(10)
    initial = pool.initial_indices(4, seed=0)
    assert len(set(initial.tolist())) == 4
    pool.add_labels(initial, [1, 2, 3, 0], round_index=-1)
    assert set(pool.labeled_indices) == set(initial)
    assert set(pool.labeled_indices).isdisjoint(pool.unlabeled_indices)
    assert len(pool.labeled_indices) + len(pool.unlabeled_indices) == 10
    pool.add_labels([pool.unlabeled_indices[0]], [5], round_index=0)
    assert pool.num_labeled == 5
    assert (pool.label_round[initial] == -1).all()


@pytest.mark.parametrize("indices,labels,message", [
    ([1, 1], [0, 0], "duplicate"),
    ([10], [0], "out of range"),
    ([0], [-1], "non-negative"),
    ([0, 1], [0], "differ"),
])
def test_pool_refuses_bad_answers(indices, labels, message):
    pool = Pool(10)
    with pytest.raises(ValueError, match=message):
        pool.add_labels(indices, labels, 0)


def test_pool_refuses_relabeling_and_survives_a_round_trip():
    pool = Pool(8)
    pool.add_labels([2, 5], [1, 0], 0)
    with pytest.raises(ValueError, match="already labeled"):
        pool.add_labels([5], [1], 1)
    restored = Pool.from_dict(pool.to_dict())
    assert restored.labels.tolist() == pool.labels.tolist()
    assert restored.label_round.tolist() == pool.label_round.tolist()


def test_initial_set_is_seeded_and_bounded():
    pool = Pool(50)
    assert pool.initial_indices(10, 1).tolist() == pool.initial_indices(10, 1).tolist()
    assert pool.initial_indices(10, 1).tolist() != pool.initial_indices(10, 2).tolist()
    with pytest.raises(ConfigError, match="larger than the pool"):
        pool.initial_indices(51, 0)
