"""Shared fixtures: small real data built in memory, and fast training settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from al_engine.data import Dataset, LoadOptions, load_dataset


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Image-folder caches of every test go to a temporary folder, never the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("xdg-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's embedded digits (1442 pool items, 355 test items, 28x28 grey)."""
    return load_dataset("digits", LoadOptions())


@pytest.fixture
def tiny_dataset():
    """40 random 28x28 grey images in 4 classes, with a 20-image test split."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(60) % 4
    return Dataset(name="tiny", classes=["a", "b", "c", "d"], train_images=images[:40], train_labels=labels[:40],
                   test_images=images[40:], test_labels=labels[40:])


def fast_run_config(tmp_path, **overrides):
    """A RunConfig for digits that trains in about a second a round."""
    from al_engine.config import RunConfig

    settings = dict(dataset="digits", strategy="entropy", initial=30, query_size=20, rounds=2, seed=0,
                    epochs=15, device="cpu", out=str(tmp_path / "run"))
    settings.update(overrides)
    return RunConfig(**settings)


@pytest.fixture
def make_run_config(tmp_path):
    return lambda **overrides: fast_run_config(tmp_path, **overrides)


@pytest.fixture
def make_annotator_app(tmp_path, digits):
    """make(token): an annotator app on digits (6 initial labels, batches of 4) whose owner token is `token`."""
    from al_engine.config import RunConfig
    from annotator import create_app

    def make(token: str):
        config = RunConfig(dataset="digits", initial=6, query_size=4, rounds=1, epochs=2, seed=0, device="cpu")
        return create_app({"DATABASE": str(tmp_path / "a.db"), "RUN_CONFIG": config, "DATASET": digits,
                           "ADMIN_TOKEN": token})

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
