"""Every setting of one run (`RunConfig`), checked once, where the run is built.

The command line (app.py) builds a RunConfig from its arguments by field name, so a flag and the
setting it fills have the same name; config.json records `asdict(config)` as the run's `settings`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .data import LoadOptions
from .errors import ConfigError
from .train import TrainConfig, train_preset


INITIAL_STRATEGIES = ("random", "typiclust")


@dataclass
class RunConfig:
    """Every setting of one run; written to config.json."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # keep a seeded random N of the pool
    classes: list[str] | None = None  # for a flat folder of unlabeled images
    image_size: int = 32  # pixels per side of the model's input, image folders (shorter side resized, centre crop)
    cache_dir: str | None = None  # pixel and feature caches; None = $XDG_CACHE_HOME/al-annotator (~/.cache/...)
    strict: bool = False  # image folders: refuse unreadable files instead of skipping them
    model: str = "auto"  # a project network (models.MODELS) or any torchvision classification model
    weights: str | None = None  # torchvision model: a weights name (DEFAULT, IMAGENET1K_V1) or a state-dict file
    finetune: bool = False  # torchvision model: train the whole network (default with weights: frozen, head only)
    embed_dim: int = 50  # width of the penultimate feature
    strategy: str = "random"
    strategy_options: dict = field(default_factory=dict)
    initial: int = 100  # size of the initial labeled set
    initial_strategy: str = "random"  # how it is chosen: random (seeded) or typiclust (cold start, no model)
    query_size: int = 100  # items per queried batch
    query_sizes: list[int] | None = None  # per-round batch sizes (a schedule); sets `rounds` to its length
    rounds: int = 10  # number of queried batches
    audit_fraction: float = 0.0  # share of each batch drawn uniformly at random (the accuracy estimate)
    seed: int = 0
    train_preset: str = "saturate"
    epochs: int | None = None  # overrides the preset's epoch cap
    lr: float | None = None  # overrides the preset's step size
    augment: bool | None = None  # overrides the preset's augmentation
    warm_start: bool = False
    device: str = "auto"
    oracle_noise: float = 0.0  # probability that the simulated oracle answers a wrong class
    out: str | None = None

    def __post_init__(self) -> None:
        if self.query_sizes:
            self.query_sizes = [int(size) for size in self.query_sizes]
            self.rounds = len(self.query_sizes)

    def batch_size(self, round_index: int) -> int:
        """Items queried after round `round_index`: the schedule's entry, else --query-size."""
        if self.query_sizes:
            return self.query_sizes[min(round_index, len(self.query_sizes) - 1)]
        return self.query_size

    def validate(self) -> None:
        if self.query_sizes is not None and any(size < 1 for size in self.query_sizes):
            raise ConfigError(f"--query-sizes must all be at least 1, got {self.query_sizes}")
        if self.initial_strategy not in INITIAL_STRATEGIES:
            raise ConfigError(f"--initial-strategy {self.initial_strategy!r}; choose from: {', '.join(INITIAL_STRATEGIES)}")
        if not 0.0 <= self.audit_fraction < 1.0:
            raise ConfigError(f"--audit-fraction must lie in [0, 1), got {self.audit_fraction}")
        if self.query_size < 1:
            raise ConfigError(f"--query-size must be at least 1, got {self.query_size}")
        if self.rounds < 0:
            raise ConfigError(f"--rounds cannot be negative, got {self.rounds}")
        if self.initial < 0:
            raise ConfigError(f"--initial cannot be negative, got {self.initial}")
        if not 0.0 <= self.oracle_noise <= 1.0:
            raise ConfigError(f"--oracle-noise must lie in [0, 1], got {self.oracle_noise}")
        if self.embed_dim < 1:
            raise ConfigError("--embed-dim must be at least 1")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
        if not 0 <= self.seed < 2**32:  # NumPy's seeds are unsigned 32-bit
            raise ConfigError(f"--seed must lie in 0..{2**32 - 1}, got {self.seed}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")

    def planned_labels(self) -> int:
        """Items the plan asks for: the initial set and every round's batch."""
        if self.query_sizes:
            return self.initial + sum(self.query_sizes)
        return self.initial + self.rounds * self.query_size

    def check_plan(self, pool_size: int) -> None:
        """Refuse a plan the pool cannot fill (a simulated run), instead of a surprise short batch."""
        if self.initial > pool_size:
            raise ConfigError(f"--initial {self.initial} is larger than the pool ({pool_size} items)")
        planned = self.planned_labels()
        if planned > pool_size and self.query_sizes:
            raise ConfigError(f"the plan needs {planned} items (--initial {self.initial} + --query-sizes "
                              f"{','.join(map(str, self.query_sizes))}) but the pool has {pool_size}")
        if planned > pool_size:
            fits = max((pool_size - self.initial) // self.query_size, 0)
            raise ConfigError(
                f"the plan needs {planned} items (--initial {self.initial} + --rounds {self.rounds} x --query-size "
                f"{self.query_size}) but the pool has {pool_size}; use --rounds {fits} or a smaller --query-size")

    def plan_note(self, pool_size: int) -> str | None:
        """The annotator's version of `check_plan`: a pool that grows may fill the plan later, so the
        last rounds shrink (said once, at start) instead of refusing to start."""
        planned = self.planned_labels()
        if planned <= pool_size:
            return None
        return (f"the plan needs {planned} items (--initial {self.initial} + --rounds {self.rounds} x "
                f"--query-size {self.query_size}) but the pool has {pool_size}: the last batch will be smaller, "
                f"and labeling ends when the pool is exhausted")

    def train_config(self) -> TrainConfig:
        overrides = {"lr": self.lr, "augment": self.augment, "warm_start": self.warm_start or None}
        if self.epochs is not None:
            overrides["max_epochs"] = self.epochs
        return train_preset(self.train_preset, **overrides)

    def load_options(self) -> LoadOptions:
        return LoadOptions(data_dir=self.data_dir, download=self.download, subset=self.subset,
                           classes=self.classes, image_size=self.image_size, seed=self.seed,
                           cache_dir=self.cache_dir, strict=self.strict)


def default_settings() -> dict:
    """Every setting at its default, as config.json's `settings` records them."""
    return asdict(RunConfig())
