"""The simulated round loop: train -> evaluate -> query -> ask the oracle -> record, round after round.

Round r (0..R) trains on the labeled set and evaluates; rounds 0..R-1 then query a batch, whose
answers join the labeled set of round r+1. So a run with --rounds R writes R+1 lines to
metrics.jsonl and R lines to queries.jsonl (runfiles.py has the files and how a run resumes).
The annotator drives the same Engine from its background worker, with people as the oracle.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import numpy as np

from .config import RunConfig, default_settings
from .data import Dataset, describe_skipped
from .engine import Engine, QueryHook
from .errors import ConfigError
from .runfiles import RunFiles, json_safe, read_jsonl


class Oracle(Protocol):
    """Answers a batch of pool indices with class indices (-1 = skipped, the item stays unlabeled)."""

    def answer(self, indices: np.ndarray, round_index: int) -> np.ndarray: ...


@dataclass
class RoundMetrics:
    """One line of metrics.jsonl."""

    round: int
    labeled: int  # items the round's model was trained on
    accuracy: float | None  # on the held-out test split; None without one
    train_s: float  # seconds of training
    query_s: float  # seconds of the query (0 when the round queried nothing)
    strategy: str
    seed: int
    epochs: int = 0  # training epochs run
    # Without a test set (estimate.py): the audit items of the batch this round's model chose, answered,
    # against its predictions made before it trained on them: {n, correct, accuracy, low, high} (95%
    # Wilson interval); None when the round had no audit items.
    audit: dict | None = None
    kappa: float | None = None  # stopping signal: Cohen's kappa with the last round's predictions on the stop set
    kappa_mean: float | None = None  # mean kappa of the last three rounds (None before three)
    stop: bool = False  # kappa_mean reached 0.99: predictions have stabilised (Bloodgood & Vijay-Shanker 2009)


def run_simulation(config: RunConfig, oracle_factory: Callable[[Dataset, RunConfig], Oracle],
                   progress: bool = True, dataset: Dataset | None = None,
                   query_hook: QueryHook | None = None) -> list[dict]:
    """Run (or resume) a whole simulated benchmark in config.out; returns the metrics of every round."""
    from tqdm.auto import tqdm

    if not config.out:
        raise ConfigError("a simulated run needs --out DIR")
    engine = Engine(config, dataset=dataset, query_hook=query_hook)
    if not engine.dataset.has_ground_truth:
        raise ConfigError(f"dataset {config.dataset!r} has no ground-truth labels to simulate an oracle with")
    config.check_plan(engine.pool.size)
    skipped = describe_skipped(engine.images.skipped)
    if skipped:
        print(f"app.py: {skipped}", file=sys.stderr)
    oracle = oracle_factory(engine.dataset, config)
    files = RunFiles(config.out)
    start_round, saved = files.resume(asdict(config), config.rounds, default_settings())
    if saved is None:
        initial = engine.initial_indices()
        engine.add_answers(initial, oracle.answer(initial, -1), round_index=-1)
    else:
        engine.load_state_dict(saved)
    files.write_config(engine.describe())

    bar = tqdm(total=config.rounds + 1, initial=start_round, desc=f"{config.strategy} seed {config.seed}",
               unit="round", disable=not progress, leave=False)
    for round_index in range(start_round, config.rounds + 1):
        accuracy, train_s, epochs = engine.train(round_index)
        metrics = RoundMetrics(round_index, engine.pool.num_labeled, accuracy, round(train_s, 3), 0.0,
                               config.strategy, config.seed, epochs, **engine.stability())
        last, query_line = round_index == config.rounds, None
        if not last and len(engine.pool.unlabeled_indices):
            indices, scores, query_s = engine.query(round_index)
            answers = oracle.answer(indices, round_index)
            audit = engine.last_audit
            if len(audit):  # estimated before the model trains on them
                metrics.audit = engine.audit_estimate(audit, answers[np.isin(indices, audit)])
            engine.add_answers(indices, answers, round_index)
            metrics.query_s = round(query_s, 3)
            query_line = {"round": round_index, "indices": indices.tolist(), "scores": [float(s) for s in scores]}
            if len(audit):
                query_line["audit"] = audit.tolist()
            if engine.strategy.diagnostics:
                query_line["diagnostics"] = json_safe(engine.strategy.diagnostics)
        files.append_round(asdict(metrics), query_line)
        files.save_state(round_index + 1, queried=not last, engine_state=engine.state_dict())
        bar.set_postfix(labeled=metrics.labeled, acc="n/a" if accuracy is None else f"{accuracy:.3f}")
        bar.update(1)
    bar.close()
    return read_jsonl(files.metrics)
