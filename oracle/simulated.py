"""An oracle that answers from the ground truth, optionally wrong with probability `noise`."""
from __future__ import annotations

import numpy as np

from al_engine import seeding
from al_engine.config import RunConfig
from al_engine.data import Dataset
from al_engine.errors import ConfigError
from al_engine.seeding import Stream


def noisy_answers(labels: np.ndarray, indices: np.ndarray, noise: float, num_classes: int,
                  seed: int, round_index: int) -> np.ndarray:
    """Ground-truth labels, each replaced with probability `noise` by a different class (seeded per round)."""
    answers = labels[np.asarray(indices, dtype=np.int64)].copy()
    if noise > 0 and len(answers):
        rng = seeding.rng(seed, round_index + 1, Stream.ORACLE_NOISE)  # +1: the initial set is round -1
        flip = rng.random(len(answers)) < noise
        shift = rng.integers(1, num_classes, size=len(answers))  # any class but the true one
        answers[flip] = (answers[flip] + shift[flip]) % num_classes
    return answers


class SimulatedOracle:
    """Answers with the dataset's true labels; each answer is replaced by another class with
    probability `noise` (seeded per round, so a resumed run gets the same answers)."""

    def __init__(self, labels: np.ndarray, num_classes: int, noise: float = 0.0, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"oracle noise must lie in [0, 1], got {noise}")
        if (np.asarray(labels) < 0).any():
            raise ConfigError("the simulated oracle needs ground-truth labels for every pool item")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.noise = noise
        self.seed = seed

    @classmethod
    def for_run(cls, dataset: Dataset, config: RunConfig) -> "SimulatedOracle":
        """The factory `run_simulation` calls: ground truth of `dataset`, noise and seed of `config`."""
        return cls(dataset.train_labels.numpy(), dataset.num_classes, config.oracle_noise, config.seed)

    def answer(self, indices: np.ndarray, round_index: int) -> np.ndarray:
        return noisy_answers(self.labels, indices, self.noise, self.num_classes, self.seed, round_index)
