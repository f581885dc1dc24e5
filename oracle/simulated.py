"""An oracle that answers from the ground truth, optionally wrong with probability `noise`."""
from __future__ import annotations

import numpy as np

from al_engine.data import Dataset
from al_engine.errors import ConfigError
from al_engine.loop import RunConfig, noisy_answers


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
