"""Turn the JSON lines of benchmarks/strategies.py into the markdown table of docs/strategies.md.

Usage: python benchmarks/strategies_table.py RESULTS.jsonl
Ratios are taken within the run (same model, same machine, same moment): plain uncertainty against one
forward pass, the dropout strategies against T full forward passes, the attacks against the per-image
reference attack extrapolated to the pool.
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
    print("| strategy | wall s | peak extra MiB | reference (same run) | reference s | speed-up | load avg |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, record in by_name.items():
        if "error" in record:
            print(f"| {name} | error: {record['error']} | | | | | |")
            continue
        seconds = record.get("extrapolated_s", record["seconds"])
        label = f"{seconds:.1f}" + (f" (extrapolated from {record['sample']} images)" if "sample" in record else "")
        reference, ratio, ref_s = "", "", ""
        if name in REFERENCE_OF and REFERENCE_OF[name][0] in by_name:
            ref = by_name[REFERENCE_OF[name][0]]
            ref_seconds = ref.get("extrapolated_s", ref.get("seconds"))
            if ref_seconds:
                reference, ref_s = REFERENCE_OF[name][1], f"{ref_seconds:.1f}"
                ratio = f"{ref_seconds / seconds:.1f}x" if name not in ("least-confidence", "margin", "entropy") \
                    else f"{seconds / ref_seconds:.2f}x of it"
        print(f"| {name} | {label} | {record.get('peak_extra_mib', '')} | {reference} | {ref_s} | {ratio} | "
              f"{record.get('load_average', '')} |")


if __name__ == "__main__":
    main(sys.argv[1])
