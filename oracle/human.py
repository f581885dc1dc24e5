"""The human oracle: people answer each batch in the browser; the engine runs in a background worker.

The engine's `Oracle` protocol is synchronous (`answer(indices, round) -> labels`). People are not:
a batch stays open for minutes or days, across restarts. So the human oracle has an asynchronous
shape that the worker uses, and the blocking `answer` on top of it for callers that want the protocol:

    post_batch(round, indices, scores, strategy, model_version)   put a batch in the database
    collect(round) -> labels | None                               None while items are unanswered;
                                                                  labels aligned with the batch, -1 = skipped

Everything the worker needs to resume lives in the database (`annotator.db`): the rounds, each
batch with the strategy, score and model version that chose its items, and every answer. The
worker keeps no state of its own that a restart could lose: on start it reads the latest round
and continues from there (`EngineDriver.step`).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from al_engine.data import Dataset, Pool
from al_engine.loop import Engine
from al_engine.models import build_model
from annotator.db import SKIP, AnnotationDB

log = logging.getLogger(__name__)

STATES = ("starting", "training", "querying", "waiting", "finished", "error", "stopped")

# Tests only: set to "train" (after the first epoch), "query" (after the strategy ran, before the
# batch is stored) or "posted" (after the next batch is stored) to SIGKILL the server process there.
CRASH_ENV = "ANNOTATOR_CRASH_AT"


def crash_point(stage: str) -> None:
    """Die like a killed process (no cleanup, no flush) if the crash test asked for this stage."""
    if os.environ.get(CRASH_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


class EngineStopped(Exception):
    """Raised between training epochs when the server shuts down: the round is retrained on restart."""


@dataclass
class EngineStatus:
    """What the engine is doing, for the status API and the dashboard (shared across threads)."""

    state: str = "stopped"  # one of STATES
    progress: float = 0.0  # 0..1 within the current state (training: epochs done / epoch cap)
    detail: str = ""
    round: int | None = None
    updated: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set(self, state: str, progress: float = 0.0, detail: str = "", round_index: int | None = None) -> None:
        with self._lock:
            self.state, self.progress, self.detail = state, progress, detail
            if round_index is not None:
                self.round = round_index
            self.updated = time.time()

    def snapshot(self) -> dict:
        with self._lock:
            return {"state": self.state, "progress": round(self.progress, 3), "detail": self.detail,
                    "round": self.round, "updated": self.updated}


class HumanOracle:
    """Batches go into the annotator database; answers come back from it."""

    def __init__(self, db: AnnotationDB, dataset: Dataset):
        self.db = db
        self.dataset = dataset

    def post_batch(self, round_index: int, indices, scores, strategy: str, model_version: int) -> None:
        self.db.create_round(round_index, **self.batch_record(indices, scores, strategy, model_version))

    def batch_record(self, indices, scores, strategy: str, model_version: int) -> dict:
        item_ids = [int(i) for i in indices]
        names = self.dataset.file_names
        return {"item_ids": item_ids, "scores": [float(s) for s in scores], "strategy": strategy,
                "model_version": model_version,
                "file_names": [names[i] for i in item_ids] if names is not None else None}

    def collect(self, round_index: int) -> np.ndarray | None:
        """The batch's answers once every item has one (closing the round), else None."""
        if not self.db.close_round_if_complete(round_index):
            return None
        batch = self.db.db.execute("select item_id from batch_items where round = ? order by position",
                                   [round_index]).fetchall()
        items, labels, _ = self.db.training_answers(round_index)
        latest = dict(zip(items, labels))
        return np.array([latest.get(row[0], SKIP) for row in batch], dtype=np.int64)

    def answer(self, indices, round_index: int, poll_s: float = 0.5) -> np.ndarray:
        """The engine's blocking Oracle protocol: post the batch if new, wait until people answer it."""
        current = self.db.current_round()
        if current is None or current["round"] < round_index:
            self.post_batch(round_index, indices, np.zeros(len(indices)), "external", 0)
        while (labels := self.collect(round_index)) is None:
            time.sleep(poll_s)
        return labels


class EngineDriver:
    """Advances the run one step at a time from what the database says; `step` is synchronous so tests
    can drive it, and `EngineWorker` calls it from a background thread."""

    def __init__(self, engine: Engine, db_path: str, status: EngineStatus | None = None):
        self.engine = engine
        self.db = AnnotationDB(db_path)  # this thread's own connection
        self.oracle = HumanOracle(self.db, engine.dataset)
        self.status = status or EngineStatus()
        self.engine.on_epoch_end = self._on_epoch_end
        self.stop_requested = threading.Event()
        self._round = 0
        self.restore_engine_state()

    @property
    def config(self):
        return self.engine.config

    def _on_epoch_end(self, epoch: int, loss: float) -> None:
        if self.stop_requested.is_set():
            raise EngineStopped()
        crash_point("train")
        cap = max(self.engine.train_config.max_epochs, 1)
        self.status.set("training", min((epoch + 1) / cap, 1.0), f"epoch {epoch + 1}, loss {loss:.3f}", self._round)

    def first_batch(self) -> np.ndarray:
        """The initial random batch (there is no model yet): `initial` items, or one query's worth."""
        if self.config.initial > 0:
            return self.engine.initial_indices()
        count = min(self.config.query_size, self.engine.pool.size)
        rng = np.random.default_rng(self.config.seed)
        return np.sort(rng.choice(self.engine.pool.size, size=count, replace=False))

    def step(self) -> bool:
        """Do the next piece of work; False when there is nothing to do until people answer (or ever)."""
        current = self.db.current_round()
        if current is None:
            indices = self.first_batch()
            self.oracle.post_batch(0, indices, np.zeros(len(indices)), "random", 0)
            self.status.set("waiting", 0.0, "initial random batch posted", 0)
            return True
        round_index = current["round"]
        if self.db.is_finished():
            self.status.set("finished", 1.0, f"all {round_index + 1} batches answered", round_index)
            return False
        if current["state"] == "labeling":
            if self.oracle.collect(round_index) is None:
                progress = self.db.batch_progress()
                done = progress["batch_size"] - progress["batch_remaining"]
                self.status.set("waiting", done / max(progress["batch_size"], 1),
                                f"{done} of {progress['batch_size']} answered", round_index)
                return False
            return True
        # closed (or trained without a successor after a crash): train on every answer so far, then query
        self.train_and_query(round_index)
        return True

    def engine_state(self) -> str:
        """What the engine carries from one round to the next besides the answers: the strategy's
        state (e.g. RND's predictor) and, with --warm-start, the model's weights (base64 of torch.save)."""
        state = {"strategy": self.engine.strategy.state_dict()}
        if self.engine.train_config.warm_start and self.engine.model is not None:
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}, buffer)
            state["model"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return json.dumps(state)

    def restore_engine_state(self) -> None:
        """After a restart: the state stored with the last trained round, as if the server had never stopped."""
        stored = self.db.get_meta("engine_state")
        if stored is None:
            return
        state = json.loads(stored)
        self.engine.strategy.load_state_dict(state.get("strategy", {}))
        if "model" in state and self.engine.train_config.warm_start:
            weights = torch.load(io.BytesIO(base64.b64decode(state["model"])), map_location="cpu", weights_only=True)
            dataset = self.engine.dataset
            model = build_model(self.config.model, dataset.image_shape, dataset.num_classes, self.config.embed_dim)
            model.load_state_dict(weights)
            self.engine.model = model.to(self.engine.device)

    def rebuild_pool(self, round_index: int) -> None:
        items, labels, rounds = self.db.training_answers(round_index)
        self.engine.pool = Pool.from_dict({"size": self.engine.pool.size, "indices": items, "labels": labels,
                                           "rounds": rounds})

    def train_and_query(self, round_index: int) -> None:
        self._round = round_index
        self.rebuild_pool(round_index)
        labeled = self.engine.pool.num_labeled
        self.status.set("training", 0.0, f"training on {labeled} labeled items", round_index)
        if labeled:
            accuracy, train_s, epochs = self.engine.train(round_index)
        else:  # every answer was a skip: nothing to learn from, query at random again
            accuracy, train_s, epochs = None, 0.0, 0
        next_batch, query_s = None, 0.0
        unlabeled = len(self.engine.pool.unlabeled_indices)
        if round_index < self.config.rounds and unlabeled:
            self.status.set("querying", 0.0, f"{self.config.strategy} over {unlabeled} unlabeled items", round_index)
            size = min(self.config.query_size, unlabeled)
            if self.engine.model is None:
                rng = np.random.default_rng([self.config.seed, round_index])
                indices = rng.choice(self.engine.pool.unlabeled_indices, size=size, replace=False)
                scores, strategy = np.zeros(size), "random"
            else:
                indices, scores, query_s = self.engine.query(round_index, size)
                strategy = self.config.strategy
            next_batch = self.oracle.batch_record(indices, scores, strategy, round_index + 1)
            crash_point("query")
        self.db.record_training(round_index, labeled, accuracy, round(train_s, 3), round(query_s, 3), epochs,
                                next_batch, engine_state=self.engine_state())
        crash_point("posted")
        state = "waiting" if next_batch else "finished"
        self.status.set(state, 0.0 if next_batch else 1.0,
                        f"round {round_index + 1} posted" if next_batch else "last round trained", round_index + 1
                        if next_batch else round_index)

    def run_until_idle(self, max_steps: int = 100) -> None:
        """Step until the engine waits for people (or is finished): what tests use instead of a thread."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError("engine did not become idle")

    def close(self) -> None:
        self.db.close()


class EngineWorker(threading.Thread):
    """Runs `EngineDriver.step` in the background, never inside a request; `notify` wakes it early."""

    def __init__(self, driver: EngineDriver, poll_s: float = 1.0):
        super().__init__(name="engine-worker", daemon=True)
        self.driver = driver
        self.poll_s = poll_s  # seconds between checks of the open batch when nobody notifies
        self._wake = threading.Event()
        self._stopping = threading.Event()

    @property
    def status(self) -> EngineStatus:
        return self.driver.status

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self.driver.stop_requested.set()  # ends a training at its next epoch
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        self.status.set("starting")
        while not self._stopping.is_set():
            try:
                busy = self.driver.step()
            except EngineStopped:
                break
            except Exception as error:  # keep serving answers; show the failure on the dashboard
                log.exception("engine step failed")
                self.status.set("error", 0.0, f"{type(error).__name__}: {error}")
                busy = False
                self._stopping.wait(5.0)
            if not busy:
                self._wake.wait(self.poll_s)
                self._wake.clear()
        self.status.set("stopped")
        self.driver.close()
