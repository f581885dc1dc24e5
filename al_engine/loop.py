"""The round: train -> evaluate -> query -> ask the oracle -> record, and the files a run writes.

`Engine` holds one run's state and does one step at a time; `run_simulation` drives it with an
oracle that answers at once. The annotator drives the same Engine from a background worker.

Round r (0..R) trains on the labeled set and evaluates; rounds 0..R-1 then query a batch, whose
answers join the labeled set of round r+1. So a run with --rounds R writes R+1 lines to
metrics.jsonl and R lines to queries.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from .data import Dataset, LoadOptions, Pool, load_dataset
from .errors import ConfigError
from .models import FeatureClassifier, build_model, default_model_name
from .seeding import round_seed, seed_everything
from .strategies import QueryState, get_strategy
from .train import TrainConfig, evaluate_accuracy, resolve_device, train_classifier, train_preset


class Oracle(Protocol):
    """Answers a batch of pool indices with class indices (-1 = skipped, the item stays unlabeled)."""

    def answer(self, indices: np.ndarray, round_index: int) -> np.ndarray: ...


@dataclass
class RunConfig:
    """Every setting of one run; written to config.json."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # keep a seeded random N of the pool
    classes: list[str] | None = None  # for a flat folder of unlabeled images
    image_size: int = 32  # pixels, image folders only
    model: str = "auto"
    embed_dim: int = 50  # width of the penultimate feature
    strategy: str = "random"
    strategy_options: dict = field(default_factory=dict)
    initial: int = 100  # size of the seeded random initial labeled set
    query_size: int = 100  # items per queried batch
    rounds: int = 10  # number of queried batches
    seed: int = 0
    train_preset: str = "saturate"
    epochs: int | None = None  # overrides the preset's epoch cap
    lr: float | None = None  # overrides the preset's step size
    augment: bool | None = None  # overrides the preset's augmentation
    warm_start: bool = False
    device: str = "auto"
    oracle_noise: float = 0.0  # probability that the simulated oracle answers a wrong class
    out: str | None = None

    def validate(self) -> None:
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
                           classes=self.classes, image_size=self.image_size, seed=self.seed)


@dataclass
class RoundMetrics:
    round: int
    labeled: int
    accuracy: float | None
    train_s: float
    query_s: float
    strategy: str
    seed: int
    epochs: int = 0


class Engine:
    """One run's state: dataset, pool, strategy and the current model; one step at a time."""

    # (strategy, state, k) -> (indices, scores) in place of strategy.query; a torchrun run shards with it.
    query_hook: Callable | None = None

    def __init__(self, config: RunConfig, dataset: Dataset | None = None,
                 on_epoch_end: Callable[[int, float], None] | None = None):
        config.validate()
        self.config = config
        self.train_config = config.train_config()
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.dataset, config.load_options())
        self.strategy = get_strategy(config.strategy, **config.strategy_options)
        self.pool = Pool(len(self.dataset.train_labels))
        self.model: FeatureClassifier | None = None
        self.on_epoch_end = on_epoch_end
        try:  # fail before any work if the model cannot take these images
            build_model(config.model, self.dataset.image_shape, self.dataset.num_classes, config.embed_dim)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def model_name(self) -> str:
        return default_model_name(self.dataset.image_shape) if self.config.model == "auto" else self.config.model

    def initial_indices(self) -> np.ndarray:
        return self.pool.initial_indices(self.config.initial, self.config.seed)

    def train(self, round_index: int) -> tuple[float | None, float, int]:
        """Train on the labeled set (from scratch unless warm start); returns accuracy, seconds, epochs."""
        seed_everything(round_seed(self.config.seed, round_index))
        if self.model is None or not self.train_config.warm_start:
            self.model = build_model(self.config.model, self.dataset.image_shape, self.dataset.num_classes,
                                     self.config.embed_dim).to(self.device)
        labeled = self.pool.labeled_indices
        result = train_classifier(self.model, self.dataset, labeled, self.pool.labels[labeled], self.train_config,
                                  self.device, seed=round_seed(self.config.seed, round_index, 1),
                                  on_epoch_end=self.on_epoch_end)
        accuracy = evaluate_accuracy(self.model, self.dataset, self.device, self.train_config.eval_batch_size)
        return accuracy, result.seconds, result.epochs

    def query(self, round_index: int, query_size: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Ask the strategy for a batch; returns pool indices, scores and seconds."""
        if self.model is None:
            raise RuntimeError("train before querying")
        seed_everything(round_seed(self.config.seed, round_index, 2))
        start = time.perf_counter()
        state = QueryState(model=self.model, dataset=self.dataset, pool=self.pool, device=self.device,
                           round_index=round_index, seed=self.config.seed, train_config=self.train_config)
        query = self.strategy.query if self.query_hook is None else partial(self.query_hook, self.strategy)
        indices, scores = query(state, query_size or self.config.query_size)
        if np.intersect1d(indices, self.pool.labeled_indices).size:
            raise RuntimeError(f"strategy {self.config.strategy!r} returned a labeled index")
        return indices, scores, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Run files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def json_safe(value):
    """`value` with NaN and infinities as None and numpy scalars as Python numbers: strict JSON."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _keep_lines(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop lines a killed run wrote after its last saved state, so a resume never writes them twice."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if keep(record):
            lines.append(json.dumps(record))
    _atomic_write(path, "".join(line + "\n" for line in lines))


def package_versions() -> dict:
    import numpy, scipy, sklearn  # noqa: E401 - versions only

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunFiles:
    """config.json, metrics.jsonl, queries.jsonl and state.json (the resume point) of one run."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.config = self.out / "config.json"
        self.metrics = self.out / "metrics.jsonl"
        self.queries = self.out / "queries.jsonl"
        self.state = self.out / "state.json"

    def finished_rounds(self) -> int:
        """How many rounds (0-based count) a previous run on this folder completed."""
        if not self.state.exists():
            return 0
        return int(json.loads(self.state.read_text())["completed_rounds"])


def _comparable(config: dict) -> dict:
    # Settings that may change between a run and its resume: more rounds, where it runs.
    return {k: v for k, v in config.items() if k not in ("rounds", "device", "out")}


def run_simulation(config: RunConfig, oracle_factory: Callable[[Dataset, RunConfig], Oracle],
                   progress: bool = True, dataset: Dataset | None = None,
                   query_hook: Callable | None = None) -> list[dict]:
    """Run (or resume) a whole simulated benchmark; returns the metrics of every round."""
    from tqdm.auto import tqdm

    if not config.out:
        raise ConfigError("a simulated run needs --out DIR")
    engine = Engine(config, dataset=dataset)
    engine.query_hook = query_hook
    if not engine.dataset.has_ground_truth:
        raise ConfigError(f"dataset {config.dataset!r} has no ground-truth labels to simulate an oracle with")
    oracle = oracle_factory(engine.dataset, config)
    files = RunFiles(config.out)
    files.out.mkdir(parents=True, exist_ok=True)
    config_record = {
        "settings": asdict(config),
        "train": asdict(engine.train_config),
        "model": engine.model_name,
        "device": str(engine.device),
        "dataset": engine.dataset.describe(),
        "versions": package_versions(),
    }

    start_round = 0
    if files.state.exists():
        saved = json.loads(files.state.read_text())
        previous = json.loads(files.config.read_text())["settings"] if files.config.exists() else {}
        if _comparable(previous) != _comparable(asdict(config)):
            raise ConfigError(f"{files.out} holds a run with other settings; choose another --out")
        start_round = int(saved["completed_rounds"])
        if not saved.get("queried", True) and start_round <= config.rounds:
            # The last finished round was the final one of a shorter run and queried nothing:
            # redo it (training is seeded per round, so it replays exactly) and query this time.
            start_round -= 1
        engine.pool = Pool.from_dict(saved["pool"])
        engine.strategy.load_state_dict(saved.get("strategy", {}))
        if config.warm_start and (files.out / "model.pt").exists():
            engine.model = build_model(config.model, engine.dataset.image_shape, engine.dataset.num_classes,
                                       config.embed_dim).to(engine.device)
            engine.model.load_state_dict(torch.load(files.out / "model.pt", map_location=engine.device))
        _keep_lines(files.metrics, lambda r: r["round"] < start_round)
        _keep_lines(files.queries, lambda r: r["round"] < start_round)
    else:
        for path in (files.metrics, files.queries):
            path.unlink(missing_ok=True)
        initial = engine.initial_indices()
        engine.pool.add_labels(initial, oracle.answer(initial, -1), round_index=-1)
    _atomic_write(files.config, json.dumps(config_record, indent=2))

    bar = tqdm(total=config.rounds + 1, initial=start_round, desc=f"{config.strategy} seed {config.seed}",
               unit="round", disable=not progress, leave=False)
    for round_index in range(start_round, config.rounds + 1):
        accuracy, train_s, epochs = engine.train(round_index)
        labeled = engine.pool.num_labeled
        query_s, last = 0.0, round_index == config.rounds
        if not last and len(engine.pool.unlabeled_indices):
            indices, scores, query_s = engine.query(round_index)
            answers = np.asarray(oracle.answer(indices, round_index), dtype=np.int64)
            answered = answers >= 0
            engine.pool.add_labels(indices[answered], answers[answered], round_index)
            line = {"round": round_index, "indices": indices.tolist(), "scores": [float(s) for s in scores]}
            if engine.strategy.diagnostics:
                line["diagnostics"] = json_safe(engine.strategy.diagnostics)
            _append_line(files.queries, line)
        metrics = RoundMetrics(round=round_index, labeled=labeled, accuracy=accuracy, train_s=round(train_s, 3), query_s=round(query_s, 3),
                               strategy=config.strategy, seed=config.seed, epochs=epochs)
        _append_line(files.metrics, asdict(metrics))
        if config.warm_start:
            torch.save(engine.model.state_dict(), files.out / "model.pt")
        _atomic_write(files.state, json.dumps({
            "completed_rounds": round_index + 1,
            "queried": not last,  # False: a longer run resuming here must still query this round
            "pool": engine.pool.to_dict(),
            "strategy": engine.strategy.state_dict(),
        }))
        bar.set_postfix(labeled=metrics.labeled, acc=f"{accuracy:.3f}" if accuracy is not None else "n/a")
        bar.update(1)
    bar.close()
    return read_jsonl(files.metrics)


def noisy_answers(labels: np.ndarray, indices: np.ndarray, noise: float, num_classes: int,
                  seed: int, round_index: int) -> np.ndarray:
    """Ground-truth labels, each replaced with probability `noise` by a different class (seeded per round)."""
    answers = labels[np.asarray(indices, dtype=np.int64)].copy()
    if noise > 0 and len(answers):
        rng = np.random.default_rng([seed, round_index + 1, 4242])
        flip = rng.random(len(answers)) < noise
        shift = rng.integers(1, num_classes, size=len(answers))  # any class but the true one
        answers[flip] = (answers[flip] + shift[flip]) % num_classes
    return answers
