"""Speed-up of sharded scoring: 2 processes (torchrun, gloo) against 1, one JSON line per measurement.

    python benchmarks/distributed_scoring.py                       # entropy on all of Fashion-MNIST
    python benchmarks/distributed_scoring.py --strategy lookahead --strategy-option mode=exact \
        --strategy-option candidate_size=256 --strategy-option eval_size=2000 --subset 20000

The model is trained once and its weights are shared by every configuration, so every
configuration scores the same model and must return the same picks (checked: "same_picks").
Configurations, all on the same cores:
  1 process x 1 thread, N processes x 1 thread (N = --processes), 1 process x N threads.
Picks are compared with 1 x 1: sharding must not change them; more threads may (float sums in
another order), which matters for strategies that train (lookahead distils a student).
query_s is the best of --repeat timed queries (the least disturbed by other load on the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_job(arguments: list[str], processes: int, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    job = str(ROOT / "benchmarks" / "scoring_job.py")
    launcher = [sys.executable, job] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", job]
    completed = subprocess.run([*launcher, *arguments, "--threads", str(threads), "--json", str(out)], cwd=ROOT,
                               env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"job failed ({processes} processes x {threads} threads):\n{completed.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--subset", type=int)
    parser.add_argument("--strategy", default="entropy")
    parser.add_argument("--strategy-option", action="append", default=[])
    parser.add_argument("--initial", type=int, default=1000)
    parser.add_argument("--query-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-threaded", action="store_true",
                        help="skip the 1 process x N threads configuration (slow on a loaded machine)")
    args = parser.parse_args()

    common = ["--dataset", args.dataset, "--strategy", args.strategy, "--initial", str(args.initial),
              "--query-size", str(args.query_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
              "--repeat", str(args.repeat)]
    common += ["--subset", str(args.subset)] if args.subset else []
    for option in args.strategy_option:
        common += ["--strategy-option", option]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.pt"
        configurations = [("1x1", 1, 1), (f"{args.processes}x1", args.processes, 1)]
        if not args.no_threaded:
            configurations.append((f"1x{args.processes}", 1, args.processes))
        for number, (name, processes, threads) in enumerate(configurations):
            extra = ["--save-weights", str(weights)] if number == 0 else ["--weights", str(weights)]
            result = run_job(common + extra, processes, threads, Path(folder) / f"{name}.json")
            results[name] = result
            emit({"benchmark": "distributed_scoring", "config": name, "processes": processes,
                  "threads_per_process": threads, "strategy": args.strategy,
                  "strategy_options": result["strategy_options"], "plan": result["plan"],
                  "dataset": args.dataset, "pool": result["pool"], "unlabeled": result["unlabeled"],
                  "query_size": args.query_size, "query_s": result["query_s"], "best_query_s": min(result["query_s"]),
                  "same_picks_as_1x1": result["picks"] == results["1x1"]["picks"]})
    base = results["1x1"]
    sharded = results[f"{args.processes}x1"]
    threaded = results.get(f"1x{args.processes}")
    emit({"benchmark": "distributed_scoring", "summary": True, "strategy": args.strategy,
          "strategy_options": base["strategy_options"], "processes": args.processes,
          "speedup_vs_1_process_1_thread": round(min(base["query_s"]) / min(sharded["query_s"]), 3),
          "speedup_vs_1_process_same_cores": None if threaded is None else
          round(min(threaded["query_s"]) / min(sharded["query_s"]), 3),
          "sharded_same_picks_as_1_process": sharded["picks"] == base["picks"],
          "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
