"""Where a run stands without a test set: an audit sample's accuracy estimate, and a stopping signal.

Audit (`--audit-fraction F`): that share of each queried batch is drawn uniformly at random from
the unlabeled pool (before the strategy picks; the strategy chooses the rest of the batch from the
other unlabeled items). The model that chose the batch predicts the audit items before it ever
trains on them, so the share of audit answers it gets right is an unbiased estimate of its accuracy
on the unlabeled pool of that round (the items the annotators have not yet labeled), given with a
95% Wilson score interval. Each round's estimate rests on that round's audit items only: earlier
ones are training data by then.

Stopping signal (Bloodgood and Vijay-Shanker, "A method for stopping active learning based on
stabilizing predictions", CoNLL 2009): a fixed "stop set" of unlabeled items is drawn once; after
each round, Cohen's kappa measures how far the new model's predictions on it agree with the last
model's beyond chance. When the mean kappa of the last three rounds reaches 0.99 the predictions have
stopped changing: more labels of this kind are unlikely to change the model much, and the paper
suggests stopping there.
"""
from __future__ import annotations

import math

import numpy as np

from . import seeding
from .seeding import Stream

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
STOP_SET_SIZE = 2000  # items of the stop set (the paper's choice: a few thousand unlabeled items)
STOP_WINDOW = 3  # rounds whose kappas are averaged
STOP_THRESHOLD = 0.99  # the paper's threshold on that mean


def audit_count(fraction: float, batch: int) -> int:
    """Audit items in a batch of `batch`: F x batch rounded half up (0 when F is 0)."""
    if fraction <= 0 or batch <= 0:
        return 0
    return min(batch, int(math.floor(fraction * batch + 0.5)))


def draw_audit(unlabeled: np.ndarray, count: int, seed: int, round_index: int) -> np.ndarray:
    """`count` pool indices drawn uniformly without replacement from `unlabeled` (seeded per round), sorted."""
    count = min(count, len(unlabeled))
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    generator = seeding.rng(seed, round_index, Stream.AUDIT)
    return np.sort(generator.choice(np.asarray(unlabeled, dtype=np.int64), size=count, replace=False))


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion (correct of total); None when total is 0."""
    if total <= 0:
        return None
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def audit_estimate(predictions: np.ndarray, answers: np.ndarray) -> dict | None:
    """{n, correct, accuracy, low, high} of a model's predictions against the audit answers (skips,
    answer -1, left out); None when nothing was answered."""
    predictions, answers = np.asarray(predictions), np.asarray(answers)
    answered = answers >= 0
    total = int(answered.sum())
    if total == 0:
        return None
    correct = int((predictions[answered] == answers[answered]).sum())
    low, high = wilson_interval(correct, total)
    return {"n": total, "correct": correct, "accuracy": round(correct / total, 6),
            "low": round(low, 6), "high": round(high, 6)}


def cohen_kappa(first: np.ndarray, second: np.ndarray, num_classes: int | None = None) -> float:
    """Cohen's kappa between two label sequences: (observed - chance agreement) / (1 - chance).
    Two identical constant sequences agree perfectly (1.0), though chance agreement is 1 too."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    if first.shape != second.shape or first.size == 0:
        raise ValueError("kappa needs two non-empty sequences of one length")
    classes = int(max(first.max(), second.max()) + 1) if num_classes is None else num_classes
    observed = float((first == second).mean())
    chance = float((np.bincount(first, minlength=classes) / first.size)
                   @ (np.bincount(second, minlength=classes) / second.size))
    if chance >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - chance) / (1.0 - chance)


def stop_set(pool_size: int, seed: int, size: int = STOP_SET_SIZE) -> np.ndarray:
    """The fixed stop set: `size` pool indices (all when the pool is smaller), seeded, sorted."""
    generator = seeding.rng(seed, 0, Stream.STOP_SET)
    return np.sort(generator.choice(pool_size, size=min(size, pool_size), replace=False))


def stopping_signal(kappas: list, window: int = STOP_WINDOW, threshold: float = STOP_THRESHOLD) -> dict:
    """{kappa, kappa_mean, stop} for the latest round, given every round's kappa so far (None where a
    round had no predecessor): stop once the mean of the last `window` kappas reaches `threshold`."""
    known = [k for k in kappas if k is not None]
    latest = kappas[-1] if kappas else None
    if len(known) < window:
        return {"kappa": latest, "kappa_mean": None, "stop": False}
    mean = float(np.mean(known[-window:]))
    return {"kappa": latest, "kappa_mean": round(mean, 6), "stop": bool(mean >= threshold)}
