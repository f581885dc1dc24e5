"""The cheap predictive test of issue 16: does a lower lookahead score predict a larger accuracy gain?

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/seed_questions.py --out docs/results/seed-questions --seeds 0
    python benchmarks/seed_questions.py --out docs/results/seed-questions --summary   # the table, from the files

For each seed: the run's round 0 (Fashion-MNIST, the seeded 1000 initial labels, the classifier the
default training gives), then candidate batches of 100: the current lookahead's top-100 and the
variants of the seed's open questions (a saturated student, the mean of 4 saturated students, other
step sizes, the unsquared distance, class- and cluster-stratified top-k, the converged ridge
lookahead), GLISTER, margin, and 8 random batches of the candidate split. Each batch is added to the
1000 labels and the classifier is retrained from scratch with `--train-seeds` training seeds (each
seed fixes the initialisation and batch order; the same seeds train the 1000-label baseline); the
gain is the test accuracy with the batch minus the baseline's, paired by training seed.

Every batch is also scored by the default lookahead and by the 4-student saturated ensemble (the
mean distance of its 100 items): the rank correlation between that score and the gain, across
batches, is the predictive test.

Resumable: `seed{S}.jsonl` under --out gets one JSON line per finished candidate (and one for the
baseline), and a rerun skips what is there; the two score arrays are kept in `seed{S}-scores.npz`
so a rerun needs no distillation. Reproducible at one thread (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from al_engine.config import RunConfig  # noqa: E402
from al_engine.engine import Engine  # noqa: E402
from al_engine.seeding import Stream, seed_everything, torch_seed  # noqa: E402
from al_engine.strategies import get_strategy  # noqa: E402
from al_engine.strategies.lookahead_round import split_pool  # noqa: E402
from al_engine.train import evaluate_accuracy, train_classifier  # noqa: E402

QUERY = 100
RANDOM_STREAM = 16016  # the random control batches: rng([seed, batch, 16016])
TRAIN_ROUND = 1000  # round index the retrainings are seeded with (never a run's round)

# name -> (strategy, options), in the order they run: the controls and the cheap variants early, so
# that a run cut short still has the comparisons that matter. "ensemble" also scores every batch.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "lookahead": ("lookahead", {}),
    "random-0": ("random-batch", {"batch": 0}),
    "margin": ("margin", {}),
    "random-1": ("random-batch", {"batch": 1}),
    "saturated": ("lookahead", {"saturate": True}),
    "ridge": ("lookahead", {"mode": "ridge"}),
    "random-2": ("random-batch", {"batch": 2}),
    "lr_scale=0.25": ("lookahead", {"lr_scale": 0.25}),
    "lr_scale=0.01": ("lookahead", {"lr_scale": 0.01}),
    "random-3": ("random-batch", {"batch": 3}),
    "stratify=class": ("lookahead", {"stratify": "class"}),
    "distance=l2": ("lookahead", {"distance": "l2"}),
    "random-4": ("random-batch", {"batch": 4}),
    "ensemble": ("lookahead", {"saturate": True, "students": 4}),
    "random-5": ("random-batch", {"batch": 5}),
    "stratify=cluster": ("lookahead", {"stratify": "cluster"}),
    "glister": ("glister", {}),
    "ntk-lookahead": ("ntk-lookahead", {}),
    "random-6": ("random-batch", {"batch": 6}),
    "random-7": ("random-batch", {"batch": 7}),
}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def class_entropy(labels: np.ndarray, classes: int) -> float:
    counts = np.bincount(labels, minlength=classes) / len(labels)
    counts = counts[counts > 0]
    return float(-(counts * np.log(counts)).sum() / math.log(classes))


class SeedRound:
    """One seed's round 0: the engine (1000 labels, classifier trained), and the retraining."""

    def __init__(self, seed: int, initial: int, train_seeds: int, device: str):
        config = RunConfig(dataset="fashion-mnist", strategy="random", initial=initial, query_size=QUERY, seed=seed,
                           device=device)
        self.engine = Engine(config)
        self.seed, self.train_seeds = seed, train_seeds
        self.truth = self.engine.dataset.train_labels.numpy()
        initial_indices = self.engine.initial_indices()
        self.engine.add_answers(initial_indices, self.truth[initial_indices], round_index=-1)
        self.accuracy, self.train_s, _ = self.engine.train(0)
        self.candidates, _ = split_pool(self.engine.pool.unlabeled_indices, 0.2, seed, 0)

    def state(self):
        return self.engine.query_state(0)  # seeded as the run's round 0 query is

    def retrain(self, extra: np.ndarray) -> list[float]:
        """Test accuracy of the classifier retrained on the labeled set plus `extra`, one per training seed."""
        labeled = np.r_[self.engine.pool.labeled_indices, np.asarray(extra, dtype=np.int64)]
        accuracies = []
        for train_seed in range(self.train_seeds):
            seed_everything(torch_seed(self.seed * 100 + train_seed, TRAIN_ROUND, Stream.MODEL_INIT))
            model = self.engine.new_model()
            train_classifier(model, self.engine.dataset, labeled, self.truth[labeled], self.engine.train_config,
                             self.engine.device, seed=torch_seed(self.seed * 100 + train_seed, TRAIN_ROUND,
                                                                 Stream.TRAIN_ORDER))
            accuracies.append(evaluate_accuracy(model, self.engine.dataset, self.engine.device))
        return accuracies

    def pick(self, strategy: str, options: dict) -> tuple[np.ndarray, dict, object]:
        if strategy == "random-batch":
            rng = np.random.default_rng([self.seed, options["batch"], RANDOM_STREAM])
            return np.sort(rng.choice(self.candidates, QUERY, replace=False)), {}, None
        chosen = get_strategy(strategy, **options)
        state = self.state()
        picks, _ = chosen.query(state, QUERY)
        return np.asarray(picks), dict(chosen.diagnostics), chosen


def distances_of(strategy, state) -> np.ndarray:
    """(pool size,) lookahead distance of every pool item (nan where it has none)."""
    out = np.full(len(state.pool.labels), np.nan)
    scores = strategy.score(state)
    finite = np.isfinite(scores)
    out[state.unlabeled_indices[finite]] = -scores[finite]
    return out


def run_seed(seed: int, out: Path, train_seeds: int, only: list[str] | None, device: str) -> None:
    from tqdm.auto import tqdm

    path = out / f"seed{seed}.jsonl"
    done = {line["candidate"] for line in read_lines(path)}
    order = ["baseline", *(CANDIDATES if only is None else only)]  # --only runs in the order given
    todo = [name for name in order if name not in done]
    if not todo:
        return
    start = time.perf_counter()
    round_ = SeedRound(seed, 1000, train_seeds, device)
    setup_s = time.perf_counter() - start
    scores_path = out / f"seed{seed}-scores.npz"
    saved = dict(np.load(scores_path)) if scores_path.exists() else {}

    def write(line: dict) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    baseline = next((line for line in read_lines(path) if line["candidate"] == "baseline"), None)
    if baseline is None:
        began = time.perf_counter()
        accuracies = round_.retrain(np.empty(0, dtype=np.int64))
        baseline = {"candidate": "baseline", "seed": seed, "labeled": 1000, "accuracy": accuracies,
                    "round0_accuracy": round_.accuracy, "round0_train_s": round(round_.train_s, 1),
                    "setup_s": round(setup_s, 1), "retrain_s": round(time.perf_counter() - began, 1),
                    "threads": torch.get_num_threads()}
        write(baseline)
    if "default" not in saved:
        began = time.perf_counter()
        saved["default"] = distances_of(get_strategy("lookahead"), round_.state())
        saved["default_s"] = np.array(time.perf_counter() - began)
        np.savez_compressed(scores_path, **saved)
    for name in tqdm([n for n in todo if n != "baseline"], desc=f"seed {seed}", unit="batch"):
        strategy, options = CANDIDATES[name]
        began = time.perf_counter()
        picks, diagnostics, chosen = round_.pick(strategy, options)
        pick_s = time.perf_counter() - began
        if name == "ensemble" and "ensemble" not in saved:
            began_scores = time.perf_counter()
            saved["ensemble"] = distances_of(chosen, round_.state())
            saved["ensemble_s"] = np.array(time.perf_counter() - began_scores)
            np.savez_compressed(scores_path, **saved)
        began = time.perf_counter()
        accuracies = round_.retrain(picks)
        retrain_s = time.perf_counter() - began
        line = {"candidate": name, "seed": seed, "strategy": strategy, "options": options,
                "accuracy": accuracies, "gain": [a - b for a, b in zip(accuracies, baseline["accuracy"])],
                "score_default": float(np.nanmean(saved["default"][picks])),
                "class_entropy": class_entropy(round_.truth[picks], round_.engine.dataset.num_classes),
                "pick_s": round(pick_s, 1), "retrain_s": round(retrain_s, 1),
                "picks": [int(i) for i in picks],
                "diagnostics": {k: v for k, v in diagnostics.items() if isinstance(v, (int, float, str, list))}}
        write(line)
    # The ensemble's score of every batch, once its scores exist (added in the summary, from the npz).


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval (nan bounds for fewer than 2 values)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def spearman_interval(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman's rho, its p-value and a 95% interval by the Fisher transform (se 1.06 / sqrt(n - 3))."""
    from scipy import stats

    rho, p = stats.spearmanr(x, y)
    n = len(x)
    if n < 4 or not np.isfinite(rho):
        return {"rho": float(rho), "p": float(p), "n": n}
    z, half = math.atanh(max(min(rho, 0.9999), -0.9999)), 1.96 * 1.06 / math.sqrt(n - 3)
    return {"rho": round(float(rho), 3), "p": round(float(p), 4), "n": n,
            "ci95": [round(math.tanh(z - half), 3), round(math.tanh(z + half), 3)]}


def summary(out: Path) -> dict:
    per_candidate: dict[str, list[float]] = {}
    entropies: dict[str, list[float]] = {}
    costs: dict[str, list[float]] = {}
    correlations = {}
    per_line: list[list[float]] = []
    per_batch: dict[tuple[int, str], list[float]] = {}
    for path in sorted(out.glob("seed*.jsonl")):
        seed = int(path.stem[4:])
        lines = [line for line in read_lines(path) if line["candidate"] != "baseline"]
        scores_path = out / f"seed{seed}-scores.npz"
        saved = dict(np.load(scores_path)) if scores_path.exists() else {}
        for line in lines:
            per_candidate.setdefault(line["candidate"], []).extend(line["gain"])
            per_line.append(line["gain"])
            per_batch[(seed, line["candidate"])] = line["gain"]
            entropies.setdefault(line["candidate"], []).append(line["class_entropy"])
            costs.setdefault(line["candidate"], []).append(line["pick_s"] + line["retrain_s"])
            if "ensemble" in saved:
                line["score_ensemble"] = float(np.nanmean(saved["ensemble"][line["picks"]]))
        gains = np.array([np.mean(line["gain"]) for line in lines])
        if len(lines) >= 4:
            entry = {"default": spearman_interval(np.array([line["score_default"] for line in lines]), gains)}
            if "ensemble" in saved:
                entry["ensemble"] = spearman_interval(np.array([line["score_ensemble"] for line in lines]), gains)
            lookahead_only = [line for line in lines if line["strategy"] in ("lookahead", "random-batch")]
            entry["default_lookahead_and_random_only"] = spearman_interval(
                np.array([line["score_default"] for line in lookahead_only]),
                np.array([np.mean(line["gain"]) for line in lookahead_only]))
            correlations[f"seed{seed}"] = entry
    # The retraining noise, pooled over every batch's training seeds (each batch alone has only 2):
    # the interval of a batch's mean gain is t(df) * pooled sd / sqrt(its retrainings).
    from scipy import stats

    batch_gains = [line_gains for line_gains in per_line if len(line_gains) > 1]
    df = sum(len(g) - 1 for g in batch_gains)
    pooled_sd = math.sqrt(sum(((np.asarray(g) - np.mean(g)) ** 2).sum() for g in batch_gains) / df) if df else math.nan
    t = float(stats.t.ppf(0.975, df)) if df else math.nan
    table = {}
    for name, values in per_candidate.items():
        mean = float(np.mean(values))
        half = t * pooled_sd / math.sqrt(len(values))
        table[name] = {"gain_mean": round(mean, 4), "gain_ci95": [round(mean - half, 4), round(mean + half, 4)],
                       "n": len(values), "class_entropy": round(float(np.mean(entropies[name])), 3),
                       "seconds_per_candidate": round(float(np.mean(costs[name])), 1)}
    random_batches = [float(np.mean(g)) for name, g in per_batch.items() if name[1].startswith("random-")]
    if random_batches:
        mean, low, high = mean_interval(random_batches)
        table["random (all batches)"] = {"gain_mean": round(mean, 4), "gain_ci95": [round(low, 4), round(high, 4)],
                                         "n": len(random_batches), "sd_between_batches": round(
                                             float(np.std(random_batches, ddof=1)), 4) if len(random_batches) > 1
                                         else None}
    return {"gains": table, "spearman_score_vs_gain": correlations,
            "retraining_noise": {"pooled_sd_of_one_gain": round(pooled_sd, 4), "df": df}}


def markdown(result: dict, out: Path) -> str:
    """The gains table and the correlations, as on docs/results/seed-questions.md."""
    scores: dict[str, list[float]] = {}
    seeds: dict[str, list[int]] = {}
    for path in sorted(out.glob("seed*.jsonl")):
        for line in read_lines(path):
            if line["candidate"] != "baseline":
                scores.setdefault(line["candidate"], []).append(line["score_default"])
                seeds.setdefault(line["candidate"], []).append(line["seed"])
    rows = ["| batch | seeds | retrainings | accuracy gain, mean [95% interval] | class entropy | "
            "default lookahead distance of the batch | seconds (pick + 2 retrainings) |", "|---|---|---:|---|---:|---:|---:|"]
    names = [n for n in CANDIDATES if n in result["gains"] and not n.startswith("random-")]
    names += ["random (all batches)"] + [n for n in CANDIDATES if n.startswith("random-") and n in result["gains"]]
    for name in names:
        row = result["gains"].get(name)
        if row is None:
            continue
        low, high = row["gain_ci95"]
        interval = "" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"
        seed_list = ",".join(str(s) for s in sorted(set(seeds.get(name, [])))) or "all"
        distance = f"{np.mean(scores[name]):.2f}" if name in scores else ""
        rows.append(f"| {name} | {seed_list} | {row['n']} | {row['gain_mean']:+.4f}{interval} | "
                    f"{row.get('class_entropy', '')} | {distance} | {row.get('seconds_per_candidate', '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the run files (seed{S}.jsonl)")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--train-seeds", type=int, default=2, help="retrainings per batch")
    parser.add_argument("--only", default=None,
                        help="comma-separated candidate names, run in this order (default: all, in CANDIDATES order)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--summary", action="store_true", help="print the table from the files and stop")
    parser.add_argument("--markdown", action="store_true", help="with --summary: the table as markdown")
    args = parser.parse_args(argv)
    if args.summary:
        result = summary(args.out)
        print(markdown(result, args.out) if args.markdown else json.dumps(result, indent=1))
        return 0
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - set(CANDIDATES))
    if unknown:
        print(f"error: unknown candidates {', '.join(unknown)}; choose from: {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(seed, args.out, args.train_seeds, only, args.device)
    print(json.dumps(summary(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
