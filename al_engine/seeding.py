"""The one place that seeds every random number generator the engine uses."""
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def round_seed(seed: int, round_index: int, salt: int = 0) -> int:
    """A seed for one round of one run, so a resumed run replays exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + round_index * 7919 + salt) % (2**31 - 1)
