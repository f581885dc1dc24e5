"""Turn the JSON lines of benchmarks/strategies.py into the markdown table of docs/strategies.md.

Usage: python benchmarks/strategies_table.py RESULTS.jsonl
Every entry also timed one plain forward pass over the pool in its own process moments before its query
(`forward_pass_s`); the machine's load changes from minute to minute, so costs are compared in units of
that pass (`x_forward_pass`), and a speed-up is the reference's cost over the strategy's, both in those units.
"""
from __future__ import annotations

import json
import sys

REFERENCE_OF = {
    "least-confidence": ("ref-forward-pass", "forward pass"),
    "margin": ("ref-forward-pass", "forward pass"),
    "entropy": ("ref-forward-pass", "forward pass"),
    "least-confidence-dropout": ("ref-dropout-full-passes", "T=10 full passes"),
    "margin-dropout": ("ref-dropout-full-passes", "T=10 full passes"),
    "entropy-dropout": ("ref-dropout-full-passes", "T=10 full passes"),
    "bald": ("ref-dropout-full-passes", "T=10 full passes"),
    "adversarial-bim": ("ref-bim-per-image", "per-image BIM"),
    "adversarial-deepfool": ("ref-deepfool-per-image", "per-image DeepFool"),
}


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path) if line.startswith("{")]
    by_name = {r["strategy"]: r for r in records if "strategy" in r}
    setup = next((r for r in records if "setup" in r), {})
    print(f"Setup: {setup.get('setup', '?')}, test accuracy {setup.get('test_accuracy', '?')}, "
          f"{setup.get('cpu_threads', '?')} CPU threads.\n")
    print("| strategy | wall s | forward pass s (same process) | cost in forward passes | peak extra MiB "
          "| reference (same run) | reference, forward passes | speed-up |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name, record in by_name.items():
        if "error" in record:
            print(f"| {name} | error: {record['error']} | | | | | | |")
            continue
        seconds = record.get("extrapolated_s", record["seconds"])
        label = f"{seconds:.1f}" + (f" (extrapolated from {record['sample']} images)" if "sample" in record else "")
        cost = record.get("x_forward_pass")
        reference, ref_cost, ratio = "", "", ""
        if name in REFERENCE_OF and REFERENCE_OF[name][0] in by_name:
            ref = by_name[REFERENCE_OF[name][0]]
            reference = REFERENCE_OF[name][1]
            ref_cost = ref.get("x_forward_pass", "")
            if cost and ref_cost and name not in ("least-confidence", "margin", "entropy"):
                ratio = f"{ref_cost / cost:.1f}x"
        print(f"| {name} | {label} | {record.get('forward_pass_s', '')} | {cost or ''} | "
              f"{record.get('peak_extra_mib', '')} | {reference} | {ref_cost} | {ratio} |")

if __name__ == "__main__":
    main(sys.argv[1])
