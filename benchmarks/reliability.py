"""Reliability figures for docs/reliability.md: kill/restart cycles and concurrent annotators.

Prints JSON lines:
  {"bench": "crash_cycles", ...}   SIGKILL the server at random moments while annotators answer, restart it on
                                   the same database; every acknowledged answer kept? (problems: [] = yes)
  {"bench": "load", ...}           N concurrent annotators answer one batch: collisions, stored vs acknowledged,
                                   5xx count, p50/p95 latency of next item + answer

The tests (tests/test_crash_server.py, tests/test_load_server.py) run the same scenarios, smaller; this
script runs more cycles, by default as fresh `python app.py` processes (--mode exec), and bigger batches.
Bounded: loopback only (127.0.0.1), --cycles kills, --items answers per annotator.
    python benchmarks/reliability.py [--cycles 30] [--mode exec|fork] [--items 25] [--annotators 8,32]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import crash_cycles, load_rounds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30, help="kill/restart cycles")
    parser.add_argument("--mode", choices=["exec", "fork"], default="exec",
                        help="exec: a fresh `python app.py` per start; fork: from a warm launcher (as the tests)")
    parser.add_argument("--crash-annotators", type=int, default=4)
    parser.add_argument("--think", type=float, default=0.05, help="seconds an annotator looks at an item")
    parser.add_argument("--items", type=int, default=25, help="answers per annotator in the load rounds")
    parser.add_argument("--annotators", default="8,32", help="concurrent annotators per load round")
    parser.add_argument("--skip-crash", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()

    if not args.skip_crash:
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            report = crash_cycles(Path(work), cycles=args.cycles, annotators=args.crash_annotators, mode=args.mode,
                                  kill_after_s=(0.05, 3.0), think_s=args.think)
            report["problems"] = report["problems"][:10]
            print(json.dumps({"bench": "crash_cycles", "seconds": round(time.perf_counter() - started, 1), **report}),
                  flush=True)
    if not args.skip_load:
        counts = tuple(int(n) for n in args.annotators.split(","))
        with tempfile.TemporaryDirectory() as work:
            for report in load_rounds(Path(work), annotator_counts=counts, items_per_annotator=args.items,
                                      mode=args.mode):
                print(json.dumps({"bench": "load", "mode": args.mode, **report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
