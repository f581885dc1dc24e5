"""The human oracle: people answer each batch, through a store of rounds and answers.

The engine's `Oracle` protocol is synchronous (`answer(indices, round) -> labels`). People are not:
a batch stays open for minutes or days, across restarts. So the human oracle has an asynchronous
shape, and the blocking `answer` on top of it for callers that want the protocol:

    post_batch(round, indices, scores, strategy, model_version)   put a batch in the store
    collect(round) -> labels | None                               None while items are unanswered;
                                                                  labels aligned with the batch, -1 = skipped

The store is whatever keeps rounds and answers durably (the annotator hands it its database,
`annotator.db.AnnotationDB`); this module only needs the few methods of `AnswerStore`, so the
oracle depends on no web code.
"""
from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

from al_engine.data import Dataset


class AnswerStore(Protocol):
    """Durable rounds and answers (the annotator's database)."""

    def current_round(self) -> dict | None:
        """The latest round as a mapping with at least "round" and "state", or None before the first."""

    def create_round(self, round_index: int, item_ids: list[int], scores: list[float], strategy: str,
                     model_version: int, file_names: list[str | None] | None = None) -> None:
        """Post a batch for people to answer."""

    def close_round_if_complete(self, round_index: int) -> bool:
        """Close the round once every item has an answer; True when it is (or already was) closed."""

    def batch_answers(self, round_index: int) -> list[int]:
        """The training label of each item of the round's batch, in pick order (-1 where none)."""


class ItemIds:
    """Pool position <-> the store's item id. Benchmark pools use the position itself; an image folder
    gives each file a stable id (the annotator's manifest), so a folder that grows or loses files
    keeps every answer on its picture while the pool's positions follow the files present."""

    def __init__(self, pool_size: int, item_ids: Sequence[int] | None = None):
        self.of_pool = np.arange(pool_size, dtype=np.int64) if item_ids is None else np.asarray(item_ids, np.int64)
        if len(self.of_pool) != pool_size:
            raise ValueError(f"{len(self.of_pool)} item ids for a pool of {pool_size}")
        self.identity = bool(np.array_equal(self.of_pool, np.arange(pool_size)))
        self._pool_of = None if self.identity else {int(i): p for p, i in enumerate(self.of_pool.tolist())}

    def item_ids(self, indices) -> list[int]:
        """The item ids of pool positions `indices`."""
        return [int(i) for i in self.of_pool[np.asarray(indices, dtype=np.int64)]] if len(indices) else []

    def pool_index(self, item_id: int) -> int | None:
        """The pool position of an item, or None when its file is not in the pool (vanished, unknown)."""
        if self.identity:
            return item_id if 0 <= item_id < len(self.of_pool) else None
        return self._pool_of.get(item_id)


class HumanOracle:
    """Batches go into the store; answers come back from it."""

    def __init__(self, store: AnswerStore, dataset: Dataset, ids: ItemIds | None = None):
        self.store = store
        self.dataset = dataset
        self.ids = ids or ItemIds(int(dataset.train_images.shape[0]))

    def batch_record(self, indices, scores, strategy: str, model_version: int) -> dict:
        """The keyword arguments of `AnswerStore.create_round` for a batch (file names where known)."""
        positions = [int(i) for i in indices]
        names = self.dataset.file_names
        return {"item_ids": self.ids.item_ids(positions), "scores": [float(s) for s in scores], "strategy": strategy,
                "model_version": model_version,
                "file_names": [names[i] for i in positions] if names is not None else None}

    def pool_answers(self, items: list[int], *columns: list) -> tuple[list[int], ...]:
        """Answers given by item id -> the same by pool position, leaving out items not in the pool."""
        kept = [(self.ids.pool_index(item), position) for position, item in enumerate(items)]
        kept = [(index, position) for index, position in kept if index is not None]
        return ([index for index, _ in kept], *[[column[p] for _, p in kept] for column in columns])

    def post_batch(self, round_index: int, indices, scores, strategy: str, model_version: int) -> None:
        self.store.create_round(round_index, **self.batch_record(indices, scores, strategy, model_version))

    def collect(self, round_index: int) -> np.ndarray | None:
        """The batch's answers once every item has one (closing the round), else None."""
        if not self.store.close_round_if_complete(round_index):
            return None
        return np.asarray(self.store.batch_answers(round_index), dtype=np.int64)

    def answer(self, indices, round_index: int, poll_s: float = 0.5) -> np.ndarray:
        """The engine's blocking Oracle protocol: post the batch if new, wait until people answer it."""
        current = self.store.current_round()
        if current is None or current["round"] < round_index:
            self.post_batch(round_index, indices, np.zeros(len(indices)), "external", 0)
        while (labels := self.collect(round_index)) is None:
            time.sleep(poll_s)
        return labels
