"""Reliability figures for docs/reliability.md: kill/restart cycles, concurrent annotators, idle sockets.

Prints JSON lines (and writes them to --out):
  {"bench": "crash_cycles", ...}   SIGKILL the server at random moments while annotators answer, restart it on
                                   the same database; every acknowledged answer kept? (problems: [] = yes)
  {"bench": "load", ...}           N concurrent annotators answer one batch: collisions, stored vs acknowledged,
                                   5xx count, p50/p95 latency of next item + answer
  {"bench": "idle_connections", ...}  --idle half-sent requests held open against a server started under a
                                   1,024 open-file limit: legitimate GET /api/status latency before and during
                                   (and, with --hold, how many the server closed after that many seconds)
Each line carries "server": "waitress" (app.py as it is) or, with --compare-werkzeug, also "werkzeug"
(the same app on werkzeug's threaded development server, as before issue 18: benchmarks/werkzeug_server.py).

The tests (tests/test_crash_server.py, tests/test_load_server.py) run the same scenarios, smaller; this
script runs more cycles, by default as fresh `python app.py` processes (--mode exec), and bigger batches.
Bounded: loopback only (127.0.0.1), --cycles kills, --items answers per annotator, --idle sockets.
    python benchmarks/reliability.py [--cycles 30] [--mode exec|fork] [--items 25] [--annotators 8,32]
                                     [--idle 1100] [--hold 40] [--compare-werkzeug] [--out FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import crash_cycles, idle_connection_attack, load_rounds  # noqa: E402

PROGRAMS = {"waitress": "app.py", "werkzeug": "benchmarks/werkzeug_server.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30, help="kill/restart cycles")
    parser.add_argument("--mode", choices=["exec", "fork"], default="exec",
                        help="exec: a fresh `python app.py` per start; fork: from a warm launcher (as the tests)")
    parser.add_argument("--crash-annotators", type=int, default=4)
    parser.add_argument("--think", type=float, default=0.05, help="seconds an annotator looks at an item")
    parser.add_argument("--items", type=int, default=25, help="answers per annotator in the load rounds")
    parser.add_argument("--annotators", default="8,32", help="concurrent annotators per load round")
    parser.add_argument("--idle", type=int, default=1100, help="half-sent connections of the idle-socket attack")
    parser.add_argument("--probe", type=float, default=15.0, help="seconds of legitimate calls before and during it")
    parser.add_argument("--hold", type=float, default=40.0,
                        help="seconds the idle connections are held (then: how many the server closed); 0: no wait")
    parser.add_argument("--compare-werkzeug", action="store_true",
                        help="measure the old server (werkzeug, threaded) too, in the same run (exec mode)")
    parser.add_argument("--skip-crash", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    servers = ["waitress", "werkzeug"] if args.compare_werkzeug else ["waitress"]
    if args.compare_werkzeug and args.mode != "exec":
        parser.error("--compare-werkzeug needs --mode exec")

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as handle:
                handle.write(line + "\n")

    emit({"bench": "machine", "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
          "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for server in servers:
        program = PROGRAMS[server]
        if not args.skip_idle:
            with tempfile.TemporaryDirectory() as work:
                report = idle_connection_attack(Path(work), idle=args.idle, mode=args.mode, program=program,
                                                probe_s=args.probe, hold_s=args.hold)
                emit({"bench": "idle_connections", "server": server, "mode": args.mode, **report,
                      "load_average_1m": round(os.getloadavg()[0], 2)})
        if not args.skip_load:
            counts = tuple(int(n) for n in args.annotators.split(","))
            with tempfile.TemporaryDirectory() as work:
                for report in load_rounds(Path(work), annotator_counts=counts, items_per_annotator=args.items,
                                          mode=args.mode, program=program):
                    emit({"bench": "load", "server": server, "mode": args.mode, **report,
                          "load_average_1m": round(os.getloadavg()[0], 2)})
        if not args.skip_crash:
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                report = crash_cycles(Path(work), cycles=args.cycles, annotators=args.crash_annotators, mode=args.mode,
                                      kill_after_s=(0.05, 3.0), think_s=args.think, program=program)
                report["problems"] = report["problems"][:10]
                emit({"bench": "crash_cycles", "server": server, "seconds": round(time.perf_counter() - started, 1),
                      **report, "load_average_1m": round(os.getloadavg()[0], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
