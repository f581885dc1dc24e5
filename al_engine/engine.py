"""`Engine`: the one owner of a run's state (dataset, pool, strategy, model, round), one step at a time.

Every driver of a run goes through it and nothing else: the simulated loop (loop.py), the
annotator's background worker, and the other ranks of a sharded query (distributed.py). What a
driver must keep to resume exactly is `state_dict()` (JSON-safe: the pool, the strategy's state, the
last round trained and, with warm start, the model's weights as text); `load_state_dict()` puts it
back, and `query_state(round)` builds (and seeds) the state a strategy reads.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from . import backbones
from .config import RunConfig
from .data import Dataset, Pool, load_dataset
from . import seeding
from .errors import ConfigError
from .estimate import audit_count, audit_estimate, cohen_kappa, draw_audit, stop_set, stopping_signal
from .models import FeatureClassifier, build_model, default_model_name
from .seeding import Stream, seed_round, torch_seed
from .strategies import QueryState, Strategy, get_strategy
from .tensor_text import decode_tensors, encode_tensors
from .train import evaluate_accuracy, predict_logits, resolve_device, train_classifier

# (engine, state, query_size) -> (pool indices, scores), in place of engine.strategy.query: the
# hook a torchrun run uses to shard the query over its ranks.
QueryHook = Callable[["Engine", QueryState, int], tuple[np.ndarray, np.ndarray]]


class Engine:
    """One run's state and its steps: train, query, add answers; saved and restored as one dict."""

    def __init__(self, config: RunConfig, dataset: Dataset | None = None,
                 on_epoch_end: Callable[[int, float], None] | None = None, query_hook: QueryHook | None = None):
        config.validate()
        self.config = config
        self.train_config = config.train_config()
        self.device = resolve_device(config.device)
        self.mode = backbones.model_mode(config.model, config.weights, config.finetune)
        # What people see (pixels, original files) and what the model reads (the same, or features).
        self.images = dataset if dataset is not None else load_dataset(config.dataset, config.load_options())
        self.dataset = model_dataset(config, self.images, self.device)
        self.strategy: Strategy = get_strategy(config.strategy, **config.strategy_options)
        self.pool = Pool(len(self.dataset.train_labels))
        self.model: FeatureClassifier | None = None
        self.round = -1  # the last round trained (-1: none yet)
        self.on_epoch_end = on_epoch_end
        self.query_hook = query_hook
        self.last_audit = np.empty(0, dtype=np.int64)  # the audit items of the last query's batch
        self.stop_items: np.ndarray | None = None  # the stopping signal's stop set (drawn at first use)
        self.stop_predictions: np.ndarray | None = None  # the last model's predictions on it
        self.kappas: list = []  # kappa of every round so far (None for the first)
        if self.mode == "project" and config.weights:
            backbones.load_project_network(config.model, config.weights, self.dataset.image_shape,
                                           self.dataset.num_classes)  # fail early if the file does not fit
        elif self.mode == "project":
            try:  # fail before any work if the model cannot take these images
                build_model(config.model, self.dataset.image_shape, self.dataset.num_classes, config.embed_dim)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    @property
    def model_name(self) -> str:
        if self.mode == "frozen":
            return f"head on frozen {self.config.model} features"
        if self.mode == "finetune":
            return f"{self.config.model} (fine-tuned)"
        if self.config.weights:
            return f"{self.config.model} (fine-tuned from {self.config.weights})"
        return default_model_name(self.dataset.image_shape) if self.config.model == "auto" else self.config.model

    def new_model(self) -> FeatureClassifier:
        """A freshly initialised network of the run's architecture, on the run's device: a project
        network, the head over frozen features, or the whole torchvision network (from its weights)."""
        if self.mode == "finetune":
            backbone = backbones.build_backbone(self.config.model, self.config.weights, self.dataset.image_shape[-1])
            model = backbones.build_finetune_model(backbone, self.dataset.num_classes, self.config.embed_dim)
        elif self.mode == "project" and self.config.weights:  # a project network fine-tuned from a weights file
            model = backbones.load_project_network(self.config.model, self.config.weights,
                                                   self.dataset.image_shape, self.dataset.num_classes)
        else:
            name = "head" if self.mode == "frozen" else self.config.model
            model = build_model(name, self.dataset.image_shape, self.dataset.num_classes, self.config.embed_dim)
        return model.to(self.device)

    def initial_indices(self, count: int | None = None) -> np.ndarray:
        """The initial labeled set (`count` items, default --initial), before any model exists: seeded
        random, or with --initial-strategy typiclust the most typical item of each of `count` k-means
        clusters of the cold-start points (`cold_start_points`)."""
        count = self.config.initial if count is None else count
        if self.config.initial_strategy != "typiclust" or count == 0:
            return self.pool.initial_indices(count, self.config.seed)
        if count > self.pool.size:
            raise ConfigError(f"--initial {count} is larger than the pool ({self.pool.size} items)")
        from .strategies.typiclust import TypiclustOptions, typiclust_picks

        options = self.strategy.options if self.config.strategy == "typiclust" else TypiclustOptions()
        unlabeled = self.pool.unlabeled_indices
        points = self.cold_start_points(unlabeled)
        positions, _ = typiclust_picks(points, points[:0], count, seeding.rng(self.config.seed, 0, Stream.COLD_START),
                                       options)
        return unlabeled[positions]

    def cold_start_points(self, indices: np.ndarray) -> torch.Tensor:
        """What the cold start clusters: the frozen backbone's features (L2-normalised, as typiclust
        clusters them) when the run has a backbone, else the pool's standardised pixels."""
        from .strategies.typiclust import backbone_points, pixel_points

        if self.dataset.is_features:
            return backbone_points(self.dataset, indices, self.device)
        return pixel_points(self.dataset, indices, self.device)

    def add_answers(self, indices, answers, round_index: int) -> None:
        """Record the oracle's answers to pool `indices`; a skip (-1) leaves its item unlabeled."""
        indices, answers = np.asarray(indices, dtype=np.int64), np.asarray(answers, dtype=np.int64)
        answered = answers >= 0
        self.pool.add_labels(indices[answered], answers[answered], round_index)

    def train(self, round_index: int) -> tuple[float | None, float, int]:
        """Train on the labeled set (from scratch unless warm start); returns accuracy, seconds, epochs."""
        seed_round(self.config.seed, round_index, Stream.MODEL_INIT)
        if self.model is None or not self.train_config.warm_start:
            self.model = self.new_model()
        labeled = self.pool.labeled_indices
        result = train_classifier(self.model, self.dataset, labeled, self.pool.labels[labeled], self.train_config,
                                  self.device, seed=torch_seed(self.config.seed, round_index, Stream.TRAIN_ORDER),
                                  on_epoch_end=self.on_epoch_end)
        accuracy = evaluate_accuracy(self.model, self.dataset, self.device, self.train_config.eval_batch_size)
        self.round = round_index
        return accuracy, result.seconds, result.epochs

    def query_state(self, round_index: int) -> QueryState:
        """What the strategy reads this round; seeds the global generators as every rank must."""
        if self.model is None:
            raise RuntimeError("train before querying")
        seed_round(self.config.seed, round_index, Stream.QUERY)
        return QueryState(model=self.model, dataset=self.dataset, pool=self.pool, device=self.device,
                          round_index=round_index, seed=self.config.seed, train_config=self.train_config)

    def query(self, round_index: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The next batch: up to the round's batch size (--query-size, or --query-sizes' entry) items;
        returns pool indices, scores and seconds. With --audit-fraction, the batch ends with its
        audit items (`last_audit`, score 0), drawn uniformly from the unlabeled pool before the
        strategy picks the rest from the other unlabeled items."""
        start = time.perf_counter()
        size = self.config.batch_size(round_index)
        unlabeled = self.pool.unlabeled_indices
        audit = draw_audit(unlabeled, audit_count(self.config.audit_fraction, min(size, len(unlabeled))),
                           self.config.seed, round_index)
        self.last_audit = audit
        state = self.query_state(round_index)
        if len(audit):
            state.pool = self.pool.hiding(audit)  # the strategy never sees the audit items as candidates
        picks = size - len(audit)
        if picks <= 0 or not len(state.unlabeled_indices):
            indices, scores = np.empty(0, dtype=np.int64), np.empty(0)
        elif self.query_hook is None:
            indices, scores = self.strategy.query(state, picks)
        else:
            indices, scores = self.query_hook(self, state, picks)
        if np.intersect1d(indices, self.pool.labeled_indices).size:
            raise RuntimeError(f"strategy {self.config.strategy!r} returned a labeled index")
        if np.intersect1d(indices, audit).size:
            raise RuntimeError(f"strategy {self.config.strategy!r} returned an audit item")
        indices = np.concatenate([np.asarray(indices, dtype=np.int64), audit])
        scores = np.concatenate([np.asarray(scores, dtype=np.float64), np.zeros(len(audit))])
        return indices, scores, time.perf_counter() - start

    def predict(self, indices: np.ndarray) -> np.ndarray:
        """The current model's predicted class of pool `indices` (dropout off)."""
        if self.model is None:
            raise RuntimeError("train before predicting")
        if len(indices) == 0:
            return np.empty(0, dtype=np.int64)
        logits = predict_logits(self.model, self.dataset, np.asarray(indices), self.device,
                                self.train_config.eval_batch_size)
        return logits.argmax(dim=1).cpu().numpy()

    def audit_estimate(self, indices: np.ndarray, answers: np.ndarray) -> dict | None:
        """The current model's accuracy on audit items `indices` against their `answers`, with its 95%
        Wilson interval (estimate.audit_estimate); call it before the model trains on them."""
        return audit_estimate(self.predict(indices), answers)

    def stability(self) -> dict:
        """The stopping signal after this round's training: Cohen's kappa between this model's and the
        last model's predictions on the fixed stop set, the mean of the last three, and whether it has
        reached 0.99 (estimate.py)."""
        if self.stop_items is None:
            self.stop_items = stop_set(self.pool.size, self.config.seed)
        predictions = self.predict(self.stop_items)
        kappa = None
        if self.stop_predictions is not None:
            kappa = round(cohen_kappa(self.stop_predictions, predictions, self.dataset.num_classes), 6)
        self.stop_predictions = predictions
        self.kappas.append(kappa)
        return stopping_signal(self.kappas)

    def state_dict(self, with_model: bool = True) -> dict:
        """Everything a driver keeps to resume exactly, JSON-safe. The model's weights are kept only
        with warm start (otherwise every round trains from scratch and nothing carries over)."""
        state = {"round": self.round, "pool": self.pool.to_dict(), "strategy": self.strategy.state_dict()}
        if self.stop_predictions is not None:  # the stopping signal's memory
            state["stability"] = {"predictions": self.stop_predictions.tolist(), "kappas": self.kappas}
        if with_model and self.train_config.warm_start and self.model is not None:
            state["model"] = encode_tensors(self.model.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict` returned (the pool is required; the rest as far as it is there)."""
        self.pool = Pool.from_dict(state["pool"])
        self.round = int(state.get("round", self.round))
        self.strategy.load_state_dict(state.get("strategy", {}))
        if "stability" in state:
            self.stop_predictions = np.asarray(state["stability"]["predictions"], dtype=np.int64)
            self.kappas = list(state["stability"]["kappas"])
        if "model" in state and self.train_config.warm_start:
            model = self.new_model()
            try:
                model.load_state_dict(decode_tensors(state["model"]))
            except RuntimeError:  # the shapes changed (a class was added): the next round starts fresh
                return
            self.model = model.to(self.device)

    def describe(self) -> dict:
        """The run's record for config.json: every setting, what they resolved to, and versions."""
        return {"settings": asdict(self.config), "train": asdict(self.train_config), "model": self.model_name,
                "device": str(self.device), "dataset": self.dataset.describe(), "versions": package_versions()}


def model_dataset(config: RunConfig, dataset: Dataset, device: torch.device, progress: bool = True) -> Dataset:
    """The dataset as the run's model reads it: pixels (project networks; fine-tuning, normalised the way
    the backbone's weights expect), or the frozen backbone's features, computed once and cached."""
    mode = backbones.model_mode(config.model, config.weights, config.finetune)
    if mode == "project" or dataset.is_features:
        return dataset
    if backbones.project_weights_file(config.model, config.weights):  # frozen: a project network's embed()
        backbone = backbones.build_project_backbone(config.model, config.weights, dataset)
        return backbones.build_feature_dataset(dataset, backbone, config.cache_dir, device, progress=progress)
    backbone = backbones.build_backbone(config.model, config.weights, dataset.image_shape[-1], progress=progress)
    if mode == "finetune":
        return backbones.finetune_dataset(dataset, backbone)
    return backbones.build_feature_dataset(dataset, backbone, config.cache_dir, device, progress=progress)


def package_versions() -> dict:
    import scipy
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
