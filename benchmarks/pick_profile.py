"""What each strategy of a finished bench picked: class balance of its batches, and its diagnostics.

    python benchmarks/pick_profile.py runs/fmnist            # one JSON line per strategy

Reads every run's queries.jsonl under the bench folder and the pool's true labels (the bench's
dataset, read from bench.json). Per strategy, over all its runs and rounds:
  class_entropy      mean over batches of the entropy of the batch's true-class histogram, divided by
                     log(classes): 1 = perfectly balanced, 0 = one class only (random sits near 0.98)
  top_class_share    mean over batches of the share of the most picked class
  class_share        share of all picks per class name, over every batch
  diagnostics        mean of each numeric diagnostic the strategy wrote (lookahead's helped_fraction, ...)
This explains curves, it does not rank strategies: a batch can be balanced and useless.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from al_engine.bench import StrategySpec  # noqa: E402
from al_engine.data import load_dataset  # noqa: E402
from al_engine.config import RunConfig  # noqa: E402
from al_engine.runfiles import read_jsonl  # noqa: E402


def profile_batches(batches: list[np.ndarray], num_classes: int) -> dict:
    """Class-balance figures of batches of true labels (see the module's docstring)."""
    entropies, top_shares = [], []
    totals = np.zeros(num_classes)
    for labels in batches:
        counts = np.bincount(labels, minlength=num_classes).astype(float)
        totals += counts
        shares = counts / counts.sum()
        nonzero = shares[shares > 0]
        entropies.append(float(-(nonzero * np.log(nonzero)).sum() / math.log(num_classes)))
        top_shares.append(float(shares.max()))
    return {"batches": len(batches), "class_entropy": round(float(np.mean(entropies)), 4),
            "top_class_share": round(float(np.mean(top_shares)), 4),
            "class_share": (totals / max(totals.sum(), 1)).round(4).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", help="a bench folder (holds bench.json)")
    args = parser.parse_args()
    bench = Path(args.bench)
    settings = json.loads((bench / "bench.json").read_text())["settings"]
    config = RunConfig(**{key: value for key, value in settings.items() if key in RunConfig.__dataclass_fields__})
    dataset = load_dataset(config.dataset, config.load_options())
    labels = dataset.train_labels.numpy()
    batches: dict[str, list[np.ndarray]] = defaultdict(list)
    diagnostics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for queries in sorted(bench.glob("*/seed-*/queries.jsonl")):
        run_config = json.loads((queries.parent / "config.json").read_text())["settings"]
        name = StrategySpec(run_config["strategy"], tuple(sorted(run_config["strategy_options"].items()))).label
        for line in read_jsonl(queries):
            batches[name].append(labels[np.asarray(line["indices"], dtype=np.int64)])
            for key, value in line.get("diagnostics", {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    diagnostics[name][key].append(float(value))
    for name in sorted(batches):
        record = {"strategy": name, **profile_batches(batches[name], len(dataset.classes)),
                  "classes": list(dataset.classes)}
        if diagnostics[name]:
            record["diagnostics"] = {key: float(f"{np.mean(values):.4g}") for key, values in diagnostics[name].items()}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
