"""What every query strategy shares: the state it reads, option parsing, and top-k selection.

A strategy subclasses `Strategy`, declares its options as a dataclass, and defines either
`score(state)` (one number per unlabeled item, larger = query first) or, for strategies that
pick one item after another (k-center, BADGE, ...), `select(state, k)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .. import seeding
from ..data import Dataset, Pool
from ..errors import ConfigError
from ..seeding import Stream
from ..train import TrainConfig, embed_pool, predict_proba


@dataclass
class QueryState:
    """Everything a strategy may read in one round. Expensive views are computed once and cached."""

    model: torch.nn.Module  # the classifier trained this round, in eval mode
    dataset: Dataset
    pool: Pool
    device: torch.device
    round_index: int = 0
    seed: int = 0
    train_config: TrainConfig = field(default_factory=TrainConfig)
    candidates: np.ndarray | None = None  # restrict the query to these pool indices (default: all unlabeled)
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.rng = seeding.rng(self.seed, self.round_index, Stream.QUERY_STATE)

    @property
    def unlabeled_indices(self) -> np.ndarray:
        if self.candidates is not None:
            return np.asarray(self.candidates, dtype=np.int64)
        return self.pool.unlabeled_indices

    @property
    def labeled_indices(self) -> np.ndarray:
        return self.pool.labeled_indices

    @property
    def num_classes(self) -> int:
        # From the class list, never from the labels seen so far (a class may still be missing).
        return self.dataset.num_classes

    def _cached(self, key: str, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def unlabeled_probs(self) -> torch.Tensor:
        """(U, C) class probabilities of the unlabeled items, dropout off."""
        return self._cached("unlabeled_probs", lambda: predict_proba(
            self.model, self.dataset, self.unlabeled_indices, self.device, self.train_config.eval_batch_size))

    def unlabeled_embeddings(self) -> torch.Tensor:
        """(U, D) penultimate features of the unlabeled items."""
        return self._cached("unlabeled_embeddings", lambda: embed_pool(
            self.model, self.dataset, self.unlabeled_indices, self.device, self.train_config.eval_batch_size))

    def labeled_embeddings(self) -> torch.Tensor:
        """(L, D) penultimate features of the labeled items."""
        return self._cached("labeled_embeddings", lambda: embed_pool(
            self.model, self.dataset, self.labeled_indices, self.device, self.train_config.eval_batch_size))


@dataclass
class NoOptions:
    """A strategy without options."""


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores; ties go to the lower position, so picks are deterministic."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("strategy produced NaN scores")
    order = np.lexsort((np.arange(len(scores)), -scores))  # primary: -score, secondary: position
    return order[:k]


def picks_available(query_size: int, candidates: int) -> int:
    """How many items a query of `query_size` returns from `candidates` unlabeled items: all of them
    when fewer are left (the last batch shrinks); a query size below 1 is refused."""
    if query_size < 1:
        raise ConfigError(f"query size must be at least 1, got {query_size}")
    return min(query_size, candidates)


class Strategy:
    """Base class: subclasses set `name`, `help`, `Options`, and define `score` or `select`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # How a sharded query (al_engine/distributed.py) splits the work: the QueryState views (method
    # names) a strategy's selection reads over the whole unlabeled pool, gathered from every rank's
    # shard; "main" when rank 0 must answer alone (one random stream over the whole pool).
    global_views: ClassVar[tuple[str, ...]] = ()
    main_only: ClassVar[bool] = False

    def __init__(self, **options):
        self.options = parse_options(self.Options, options, self.name)
        # What the last query measured about itself (lookahead's step and helped fraction, coreset's
        # solves); the run loop writes it beside the picks in queries.jsonl.
        self.diagnostics: dict = {}

    # Override one of these two.
    def score(self, state: QueryState) -> np.ndarray:
        """(U,) scores for state.unlabeled_indices, larger = query first."""
        raise NotImplementedError

    def select(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions into state.unlabeled_indices of the k picks, in pick order, and their scores."""
        scores = np.asarray(self.score(state), dtype=np.float64)
        positions = top_k(scores, k)
        return positions, scores[positions]

    def query(self, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k chosen pool indices (in pick order) and their scores."""
        candidates = state.unlabeled_indices
        k = picks_available(k, len(candidates))
        if k == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        positions, scores = self.select(state, k)
        positions = np.asarray(positions, dtype=np.int64)
        if len(np.unique(positions)) != len(positions) or len(positions) != k:
            raise RuntimeError(f"strategy {self.name!r} returned {len(positions)} picks with duplicates or a wrong count")
        return candidates[positions], np.asarray(scores, dtype=np.float64)

    def sharding_plan(self) -> tuple[str, tuple[str, ...]]:
        """("shard" | "gather" | "main", views to gather): item-by-item scores are sharded, a selection
        over a global view gathers the views, anything else runs on rank 0 alone."""
        if self.main_only:
            return "main", ()
        if self.global_views:
            return "gather", self.global_views
        if type(self).select is Strategy.select:  # scores item by item
            return "shard", ()
        return "main", ()

    # Sharded scoring (al_engine/distributed.py): work a strategy does once per round before it
    # scores (lookahead's student distillation) is done by rank 0 alone and handed to the others.
    def shared_round_state(self, state: QueryState) -> Any:
        """Rank 0's once-per-round preparation, picklable, for the other ranks; None when there is none."""
        return None

    def adopt_round_state(self, state: QueryState, shared: Any) -> None:
        """Use rank 0's `shared_round_state(state)` instead of preparing the round here."""

    # Strategies that carry state across rounds (RND's predictor) override these for resume.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _convert(value: Any, annotation: Any, key: str, strategy: str):
    """Turn a command-line string into the option's declared type."""
    if not isinstance(value, str):
        return value
    kind = annotation if isinstance(annotation, type) else {
        "int": int, "float": float, "bool": bool, "str": str}.get(str(annotation).split("|")[0].strip(), str)
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except ValueError:
        raise ConfigError(f"option {key}={value!r} of strategy {strategy!r} must be a {kind.__name__}") from None


def parse_options(options_class: type, given: dict, strategy: str):
    """Build the options dataclass; unknown keys and badly typed values are one clear ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"unknown option {', '.join(unknown)} for strategy {strategy!r}; valid options: {valid}")
    values = {key: _convert(value, fields[key].type, key, strategy) for key, value in given.items()}
    options = options_class(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


def options_help(options_class: type) -> str:
    """'key=default, ...' for `app.py strategies`."""
    parts = []
    for f in dataclasses.fields(options_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "?")
        parts.append(f"{f.name}={default}")
    return ", ".join(parts)
