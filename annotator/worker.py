"""The annotator's engine: a background worker that trains and queries while people label.

Everything the worker needs to resume lives in the database: the rounds, each batch with the
strategy, score and model version that chose its items, every answer, and the engine's state after
the last trained round (`Engine.state_dict`, less the pool, which the answers are). The worker keeps
no state of its own that a restart could lose: on start it reads the latest round and continues
from there (`EngineDriver.step`). People answer through `oracle.human.HumanOracle`, over this
database.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from al_engine import seeding
from al_engine.engine import Engine
from al_engine.seeding import Stream
from al_engine.strategies import picks_available
from oracle.human import HumanOracle, ItemIds

from .db import AnnotationDB, database_gone_message, file_identity

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


class EngineDriver:
    """Advances the run one step at a time from what the database says; `step` is synchronous so tests
    can drive it, and `EngineWorker` calls it from a background thread."""

    def __init__(self, engine: Engine, db_path: str, status: EngineStatus | None = None,
                 ids: ItemIds | None = None, close_grace_s: float = 0.0):
        self.engine = engine
        self.close_grace_s = close_grace_s  # seconds a complete batch stays open for an undo of its last answer
        self.db = AnnotationDB(db_path)  # this thread's own connection
        self.db_path = db_path
        self.db_identity = file_identity(db_path)  # an open connection keeps writing to a deleted file: look
        self.oracle = HumanOracle(self.db, engine.dataset, ids)
        self.status = status or EngineStatus()
        self.engine.on_epoch_end = self._on_epoch_end
        self.stop_requested = threading.Event()
        self._round = 0
        current = self.db.current_round()
        if current is not None:  # a restart: the engine as the database left it
            self.load_engine_state(current["round"])

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
        return self.engine.initial_indices(picks_available(self.config.query_size, self.engine.pool.size))

    def step(self) -> bool:
        """Do the next piece of work; False when there is nothing to do until people answer (or ever)."""
        current = self.db.current_round()
        if current is None:
            indices = self.first_batch()
            chosen_by = self.config.initial_strategy  # random, or typiclust (cold start)
            self.oracle.post_batch(0, indices, np.zeros(len(indices)), chosen_by, 0)
            self.status.set("waiting", 0.0, f"initial {chosen_by} batch posted", 0)
            return True
        round_index = current["round"]
        if self.db.is_finished():
            self.status.set("finished", 1.0, f"all {round_index + 1} batches answered", round_index)
            return False
        if current["state"] == "labeling":
            closed = self.db.close_round_if_complete(round_index, self.close_grace_s)
            if not closed or self.oracle.collect(round_index) is None:
                progress = self.db.batch_progress()
                done = progress["query_size"] - progress["remaining"]
                self.status.set("waiting", done / max(progress["query_size"], 1),
                                f"{done} of {progress['query_size']} answered", round_index)
                return False
            return True
        # closed (or trained without a successor after a crash): train on every answer so far, then query
        self.train_and_query(round_index)
        return True

    def load_engine_state(self, round_index: int) -> None:
        """The engine as after round `round_index`'s answers: the state stored with the last trained
        round (strategy state, warm-start weights), and the pool as the database's answers say."""
        stored = self.db.get_meta("engine_state")
        state = json.loads(stored) if stored is not None else {}
        items, labels, rounds = self.oracle.pool_answers(*self.db.training_answers(round_index))
        state["pool"] = {"size": self.engine.pool.size, "indices": items, "labels": labels, "rounds": rounds}
        self.engine.load_state_dict(state)

    def train_and_query(self, round_index: int) -> None:
        self._round = round_index
        self.load_engine_state(round_index)
        labeled = self.engine.pool.num_labeled
        self.status.set("training", 0.0, f"training on {labeled} labeled items", round_index)
        stability = None
        if labeled:
            accuracy, train_s, epochs = self.engine.train(round_index)
            stability = self.engine.stability()
        else:  # every answer was a skip: nothing to learn from, query at random again
            accuracy, train_s, epochs = None, 0.0, 0
        next_batch, query_s = None, 0.0
        unlabeled = self.engine.pool.unlabeled_indices
        if round_index < self.config.rounds and len(unlabeled):
            self.status.set("querying", 0.0, f"{self.config.strategy} over {len(unlabeled)} unlabeled items",
                            round_index)
            if labeled:
                indices, scores, query_s = self.engine.query(round_index)
                strategy = self.config.strategy
            else:
                size = picks_available(self.config.query_size, len(unlabeled))
                indices = seeding.rng(self.config.seed, round_index, Stream.UNTRAINED_BATCH).choice(
                    unlabeled, size=size, replace=False)
                scores, strategy = np.zeros(size), "random"
            next_batch = self.oracle.batch_record(indices, scores, strategy, round_index + 1)
            audit = self.engine.last_audit if labeled else np.empty(0, dtype=np.int64)
            if len(audit):  # the model's predictions, made before anyone answers (the accuracy estimate)
                predicted = dict(zip(audit.tolist(), self.engine.predict(audit).tolist()))
                next_batch["audit"] = [predicted.get(int(i)) for i in indices]
            crash_point("query")
        state = self.engine.state_dict()
        del state["pool"]  # the answers are the pool
        self.db.record_training(round_index, labeled, accuracy, round(train_s, 3), round(query_s, 3), epochs,
                                next_batch, engine_state=json.dumps(state), stability=stability)
        crash_point("posted")
        if next_batch:
            self.status.set("waiting", 0.0, f"round {round_index + 1} posted", round_index + 1)
        else:
            self.status.set("finished", 1.0, "last round trained", round_index)

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
        self.retry_s = 5.0  # seconds before retrying a failed step, doubled after each further failure
        self.max_failures = 4  # consecutive failed steps after which the engine stops (about 35 s of retries)
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

    def database_gone(self) -> bool:
        return file_identity(self.driver.db_path) != self.driver.db_identity

    def run(self) -> None:
        self.status.set("starting")
        failures = 0  # consecutive failed steps
        while not self._stopping.is_set():
            if self.database_gone():  # training on would write into a deleted file that nobody reads again
                message = database_gone_message(self.driver.db_path)
                log.error("engine stopped: %s", message)
                print(f"annotator: engine stopped: {message}", file=sys.stderr, flush=True)
                self.status.set("error", 0.0, message)
                self.driver.close()
                return
            try:
                busy = self.driver.step()
                failures = 0
            except EngineStopped:
                break
            except Exception as error:  # keep serving answers; show the failure on the dashboard
                log.exception("engine step failed")
                failures += 1
                message = f"{type(error).__name__}: {error}"
                if failures >= self.max_failures:  # the same step failed every time: retrying is pointless
                    message = (f"{message} (the engine stopped after {failures} failed tries; answers are still "
                               "stored: fix the cause and restart the server)")
                    print(f"annotator: engine stopped: {message}", file=sys.stderr, flush=True)
                    self.status.set("error", 0.0, message)
                    self.driver.close()
                    return
                self.status.set("error", 0.0, message)
                busy = False
                self._stopping.wait(self.retry_s * 2 ** (failures - 1))  # 5, 10, 20 s ...
            if not busy:
                self._wake.wait(self.poll_s)
                self._wake.clear()
        self.status.set("stopped")
        self.driver.close()
