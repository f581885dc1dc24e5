"""Every setting of one run (`RunConfig`), checked once, where the run is built.

The command line (app.py) builds a RunConfig from its arguments by field name, so a flag and the
setting it fills have the same name; config.json records `asdict(config)` as the run's `settings`.
"""
from __future__ import annotations

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
