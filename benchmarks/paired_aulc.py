"""Paired AULC comparisons of a bench folder, as a markdown table (docs/results/seed-questions.md).

Usage: python benchmarks/paired_aulc.py BENCH_FOLDER [--versus random,margin] [--json]

For every strategy of the folder's summary.json: its AULC, and against each `--versus` strategy the
mean AULC difference over the seeds both ran, with its 95% t-interval (n - 1 degrees of freedom) and
the two-sided paired t-test's p. Where the runs recorded it (queries.jsonl diagnostics), the mean
distillation distance of the lookahead's student (`distill_distance`) is shown too.
A bench's own summary.md tests against random only; the seed's questions need margin as well.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats


def paired(a: dict, b: dict) -> dict | None:
    """Difference a - b over shared seeds: mean, 95% t-interval, p (None when fewer than 2 seeds)."""
    seeds = sorted(set(a) & set(b), key=int)
    if len(seeds) < 2:
        return None
    diff = np.array([a[s] - b[s] for s in seeds])
    mean, sd = float(diff.mean()), float(diff.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(diff) - 1)) * sd / math.sqrt(len(diff))
    p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue) if sd > 0 else float("nan")
    return {"seeds": len(seeds), "mean": mean, "low": mean - half, "high": mean + half, "p": p,
            "ahead": int((diff > 0).sum())}


def distill_distance(folder: Path, label: str) -> float | None:
    """Mean `distill_distance` over every round and seed of a strategy's runs, when recorded."""
    values = []
    for queries in (folder / label.replace(":", "+")).glob("seed-*/queries.jsonl"):
        for line in queries.read_text().splitlines():
            value = json.loads(line).get("diagnostics", {}).get("distill_distance")
            if value is not None:
                values.append(float(value))
    return float(np.mean(values)) if values else None


def table(folder: Path, versus: list[str]) -> tuple[str, dict]:
    summary = json.loads((folder / "summary.json").read_text())
    rows, record = [], {}
    header = "| strategy | seeds | AULC mean ± std | " + " | ".join(
        f"Δ AULC vs {v} [95% interval], p, seeds ahead" for v in versus) + " | student's distillation distance |"
    rows.append(header)
    rows.append("|---|---|---:|" + "---|" * len(versus) + "---:|")
    for label, entry in summary.items():
        per_seed = entry["aulc_per_seed"]
        cells, record[label] = [], {"aulc_mean": entry["aulc_mean"], "seeds": sorted(per_seed, key=int)}
        for other in versus:
            result = paired(per_seed, summary[other]["aulc_per_seed"]) if other in summary and other != label else None
            record[label][f"vs_{other}"] = result
            cells.append("—" if result is None else
                         f"{result['mean']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}], "
                         f"p = {result['p']:.3f}, {result['ahead']} of {result['seeds']}")
        distance = distill_distance(folder, label)
        record[label]["distill_distance"] = distance
        rows.append(f"| `{label}` | {','.join(record[label]['seeds'])} | {entry['aulc_mean']:.4f} ± "
                    f"{entry['aulc_std']:.4f} | " + " | ".join(cells)
                    + f" | {'' if distance is None else f'{distance:.1f}'} |")
    return "\n".join(rows), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--versus", default="random,margin")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of markdown")
    args = parser.parse_args(argv)
    if not (args.folder / "summary.json").is_file():
        print(f"error: {args.folder} holds no summary.json (run the bench first)", file=sys.stderr)
        return 2
    markdown, record = table(args.folder, [v for v in args.versus.split(",") if v])
    print(json.dumps(record, indent=2) if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
