"""The one place that seeds the engine's random number generators, and the named streams they draw from.

Every random choice of a run comes from (run seed, round, stream), so a run killed at any moment
and started again replays exactly what an uninterrupted one does, and two choices never share
numbers by accident. Two generators are seeded this way:

- torch's global generator and per-loop `torch.Generator`s, from `torch_seed(seed, round, stream)`
  (an integer; `seed_round` seeds Python, NumPy and torch with it);
- NumPy's `default_rng`, from `rng(seed, round, stream)`.

A stream's number (its salt) is part of every result the engine has recorded: changing one changes
picks. A new random choice gets a new member with a new number.
"""
from __future__ import annotations

import random
from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a random draw is for; the value is the salt mixed into the seed (fixed forever)."""

    # torch: torch_seed / seed_round
    MODEL_INIT = 0  # the classifier's initial weights (global generator, before the model is built)
    TRAIN_ORDER = 1  # the classifier's mini-batch order and augmentation
    QUERY = 2  # the global generators while a strategy queries
    STUDENT_INIT = 31  # lookahead: the student's initial weights
    STUDENT_ORDER = 32  # lookahead: the student's distillation batch order
    RND_TARGET = 91  # RND: the fixed random target network (round 0 only)
    RND_PREDICTOR = 92  # RND: the predictor's initial weights
    RND_ORDER = 93  # RND: the predictor's batch order
    # NumPy: rng
    QUERY_STATE = 17  # QueryState.rng, for strategies that sample (random, k-means' starts, MC dropout seeds)
    ORACLE_NOISE = 4242  # the simulated oracle's wrong answers (its round index is shifted by one)
    EVAL_SPLIT = 5003  # lookahead: the candidates / evaluation split of the unlabeled pool
    EVAL_SUBSAMPLE = 5004  # lookahead: eval_size subsample
    CANDIDATE_SUBSAMPLE = 5005  # lookahead: candidate_size subsample
    STEP_SAMPLE = 5007  # lookahead: the labeled items that measure the automatic step size
    TRUNK_DIRECTIONS = 5011  # lookahead full-fast: the candidates that give the trunk's principal directions
    AUDIT = 6001  # the audit sample of each batch (uniform over the unlabeled pool)
    STOP_SET = 6002  # the stopping signal's fixed stop set (round 0 only)
    COLD_START = 6003  # --initial-strategy typiclust: k-means' starts of the cold-start batch
    # Draws that predate named streams and mix in no salt (their keys are kept so that picks stay).
    INITIAL_SET = -1  # the seeded random initial labeled set: key [seed]
    UNTRAINED_BATCH = -2  # the annotator's random batch when nothing is labeled yet: key [seed, round]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_seed(seed: int, round_index: int, stream: Stream) -> int:
    """An integer seed for one stream of one round of one run (for torch generators)."""
    return (seed * 1_000_003 + round_index * 7919 + int(stream)) % (2**31 - 1)


def seed_round(seed: int, round_index: int, stream: Stream) -> None:
    """Seed every global generator for one stream of one round."""
    seed_everything(torch_seed(seed, round_index, stream))


def rng(seed: int, round_index: int, stream: Stream) -> np.random.Generator:
    """A NumPy generator for one stream of one round of one run."""
    if stream is Stream.INITIAL_SET:
        return np.random.default_rng(seed)
    if stream is Stream.UNTRAINED_BATCH:
        return np.random.default_rng([seed, round_index])
    return np.random.default_rng([seed, round_index, int(stream)])
