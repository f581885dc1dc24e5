"""How several annotators' answers become one training label, and how far the annotators agree.

Pure functions over plain lists (no SQL, no Flask): `annotator/db.py` reads the answers and hands
them here; the API and the dashboard show the figures.

- `majority_label`: the most frequent label; a tie goes to the label answered first.
- `dawid_skene`: the EM estimate of Dawid & Skene (1979): each annotator has a confusion matrix,
  each item a posterior over classes; initialised from the majority vote.
- `cohen_kappa`: two annotators on the items both answered; `fleiss_kappa`: all annotators, items
  with at least two answers (the form of Fleiss (1971) that allows a varying number of raters per item).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

import numpy as np


def majority_label(votes: list[tuple[float, int]]) -> int:
    """votes: (time answered, label) pairs. The most frequent label; ties: the one answered earliest."""
    counts = Counter(label for _, label in votes)
    top = max(counts.values())
    tied = {label for label, count in counts.items() if count == top}
    return min((when, label) for when, label in votes if label in tied)[1]


def dawid_skene(votes: dict[int, dict[int, int]], num_classes: int, iterations: int = 50,
                tolerance: float = 1e-6) -> dict[int, np.ndarray]:
    """votes: {item: {annotator: label}}. Returns {item: (C,) posterior over classes}.

    EM: the M-step estimates class priors and each annotator's (C, C) confusion matrix (rows: true
    class, columns: answered class, add-0.01 smoothing) from the posteriors; the E-step recomputes the
    posteriors from them. Starts from the majority vote's one-hot posteriors."""
    items = sorted(votes)
    if not items:
        return {}
    annotators = sorted({a for answers in votes.values() for a in answers})
    column = {a: j for j, a in enumerate(annotators)}
    labels = np.full((len(items), len(annotators)), -1)  # (N, A) answered class, -1 where none
    for i, item in enumerate(items):
        for annotator, label in votes[item].items():
            labels[i, column[annotator]] = label
    posterior = np.zeros((len(items), num_classes))  # (N, C)
    for i in range(len(items)):
        answered = labels[i][labels[i] >= 0]
        counts = np.bincount(answered, minlength=num_classes).astype(float)
        posterior[i, np.flatnonzero(counts == counts.max())] = 1.0
        posterior[i] /= posterior[i].sum()
    for _ in range(iterations):
        prior = posterior.mean(axis=0) + 1e-9  # (C,)
        confusion = np.full((len(annotators), num_classes, num_classes), 0.01)  # (A, C true, C answered)
        for j in range(len(annotators)):
            answered = labels[:, j] >= 0
            for c in range(num_classes):
                confusion[j, :, c] += posterior[answered & (labels[:, j] == c)].sum(axis=0)
        confusion /= confusion.sum(axis=2, keepdims=True)
        log_posterior = np.tile(np.log(prior), (len(items), 1))  # (N, C)
        for j in range(len(annotators)):
            answered = labels[:, j] >= 0
            log_posterior[answered] += np.log(confusion[j][:, labels[answered, j]]).T
        log_posterior -= log_posterior.max(axis=1, keepdims=True)
        updated = np.exp(log_posterior)
        updated /= updated.sum(axis=1, keepdims=True)
        change = np.abs(updated - posterior).max()
        posterior = updated
        if change < tolerance:
            break
    return {item: posterior[i] for i, item in enumerate(items)}


def cohen_kappa(pairs: list[tuple[int, int]], num_classes: int) -> float | None:
    """Cohen's kappa of two annotators from their (label_a, label_b) answers to the same items.
    None without a shared item; 1.0 when both always answer one and the same class."""
    if not pairs:
        return None
    table = np.zeros((num_classes, num_classes))
    for a, b in pairs:
        table[a, b] += 1
    total = table.sum()
    observed = np.trace(table) / total
    expected = float((table.sum(axis=1) / total) @ (table.sum(axis=0) / total))
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return float((observed - expected) / (1.0 - expected))


def fleiss_kappa(item_labels: list[list[int]], num_classes: int) -> float | None:
    """Fleiss' kappa over items answered by at least two annotators (item_labels: each item's labels)."""
    rated = [labels for labels in item_labels if len(labels) >= 2]
    if not rated:
        return None
    counts = np.array([np.bincount(labels, minlength=num_classes) for labels in rated], dtype=float)  # (N, C)
    raters = counts.sum(axis=1)
    per_item = ((counts ** 2).sum(axis=1) - raters) / (raters * (raters - 1))
    observed = per_item.mean()
    shares = counts.sum(axis=0) / counts.sum()
    expected = float((shares ** 2).sum())
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return float((observed - expected) / (1.0 - expected))


def agreement_report(answers: dict[int, dict[str, int]], classes: list[str]) -> dict:
    """Everything GET /api/agreement shows, from {item: {annotator name: label}} (non-skip answers).

    pairs: Cohen's kappa and raw agreement per pair of annotators over their shared items;
    fleiss_kappa over every item with two or more answers; confusion: (C, C) counts of
    (one annotator's class, another's class) over every pair of answers to the same item, symmetric;
    with_majority: per annotator, the share of their answers (on items with two or more answers)
    that equal the item's majority label."""
    num_classes = len(classes)
    names = sorted({name for item in answers.values() for name in item})
    pairs = []
    for first, second in combinations(names, 2):
        shared = [(item[first], item[second]) for item in answers.values() if first in item and second in item]
        kappa = cohen_kappa(shared, num_classes)
        pairs.append({"annotators": [first, second], "shared_items": len(shared), "cohen_kappa": kappa,
                      "agreement": (sum(a == b for a, b in shared) / len(shared)) if shared else None})
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    with_majority = defaultdict(lambda: [0, 0])
    multi = [item for item in answers.values() if len(item) >= 2]
    for item in multi:
        for (_, a), (_, b) in combinations(sorted(item.items()), 2):
            confusion[a, b] += 1
            confusion[b, a] += 1
        counts = Counter(item.values())
        top = max(counts.values())
        winners = {label for label, count in counts.items() if count == top}
        for name, label in item.items():
            with_majority[name][1] += 1
            with_majority[name][0] += int(label in winners and len(winners) == 1)
    return {
        "annotators": names, "labeled_items": len(answers), "items_with_several_answers": len(multi),
        "fleiss_kappa": fleiss_kappa([list(item.values()) for item in answers.values()], num_classes),
        "pairs": pairs, "classes": classes, "confusion": confusion.tolist(),
        "with_majority": {name: {"answered": total, "agree": agree, "share": agree / total if total else None}
                          for name, (agree, total) in sorted(with_majority.items())},
    }
