"""Named bench set-ups (`app.py bench --preset NAME`), so results can be set beside published ones.

A preset only fills in what the command line leaves unsaid: `--preset dal-fashion-mnist --rounds 3`
runs the preset with three rounds. Every field is one of the bench's own command-line settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A published set-up; None leaves the command line's default in place."""

    description: str
    source: str  # where the numbers come from
    dataset: str | None = None
    model: str | None = None
    initial: int | None = None  # labels in the seeded random initial set
    query_size: int | None = None  # labels per round
    rounds: int | None = None  # queried rounds
    train_preset: str | None = None  # a name in al_engine.train.TRAIN_PRESETS
    epochs: int | None = None  # cap on training epochs per round
    subset: int | None = None  # seeded random N items of the pool
    strategies: tuple[str, ...] | None = None  # default strategy list (bench syntax, e.g. "lookahead:mode=exact")
    seeds: tuple[int, ...] | None = None

    def settings(self) -> dict:
        """The command-line settings this preset fills in (those it leaves open are left out)."""
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in asdict(self).items()
                if key not in ("description", "source") and value is not None}


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        description="seconds-long smoke bench on the embedded digits (used by the tests; numbers mean little)",
        source="this project",
        dataset="digits", model="small-cnn", initial=40, query_size=20, rounds=3,
        train_preset="saturate", epochs=12, strategies=("random", "entropy", "margin"), seeds=(0, 1, 2),
    ),
    "dal-fashion-mnist": Preset(
        description="deep-active-learning defaults for Fashion-MNIST: 10000 initial, 1000 per round, "
                    "10 rounds, two-conv CNN, SGD lr 0.01 momentum 0.5, batch 64, 10 epochs",
        source="github.com/ej0cl6/deep-active-learning (demo.py, utils.py)",
        dataset="fashion-mnist", model="small-cnn", initial=10000, query_size=1000, rounds=10,
        train_preset="dal",
    ),
    "fashion-mnist": Preset(
        description="this project's results set-up: 1000 initial, 100 per round, 10 rounds, train to saturation",
        source="issue 7 (docs/results/fashion-mnist.md)",
        dataset="fashion-mnist", model="small-cnn", initial=1000, query_size=100, rounds=10,
        train_preset="saturate",
        strategies=("random", "entropy", "margin", "bald", "kcenter-greedy", "badge", "typiclust", "rnd",
                    "lookahead:mode=last-layer", "lookahead:batch_aware=true:mode=last-layer",
                    "lookahead:mode=full-fast"),  # lookahead's fast modes, and batch-aware picking
        seeds=(0, 1, 2, 3, 4),
    ),
    "cifar10-resnet18": Preset(
        description="the seed's CIFAR-10 set-up: ResNet-18, 5000 initial, 100 per round, SGD with "
                    "momentum and augmentation",
        source="the project seed",
        dataset="cifar10", model="resnet18", initial=5000, query_size=100, rounds=10,
        train_preset="resnet-cifar",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(preset_names())}")
    return PRESETS[name]
