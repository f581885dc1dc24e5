"""Recorded picks that a change of the engine's structure must not move.

    python benchmarks/pick_reference.py record  --out docs/results/pick-reference
    python benchmarks/pick_reference.py compare --reference docs/results/pick-reference [--out runs/pick-check]

`record` runs a fixed set of runs at one torch thread (OMP_NUM_THREADS=1: bit-identical run to run on
one machine; another thread count changes float sums and, after a round or two, the picks) and keeps
each run's metrics.jsonl and queries.jsonl. `compare` runs the same set again and prints one JSON line
per run and a verdict: the picks (`indices`) and accuracies must be identical, scores within 1e-5.

The runs:
- `quick/`: `app.py bench --preset quick --seeds 0,1,2,3,4` (random, entropy, margin on digits);
- `fmnist-margin/`, `fmnist-lookahead-last-layer/`: two rounds on Fashion-MNIST from 1000 labels;
- `annotator/`: the annotator's own engine (the human oracle's driver) answered from the ground
  truth through the JSON API for three rounds of entropy on digits, so the web side's round loop is
  held to its picks as well.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORE_TOLERANCE = 1e-5

CLI_RUNS = {
    "fmnist-margin": ["--oracle", "simulated", "--dataset", "fashion-mnist", "--strategy", "margin",
                      "--initial", "1000", "--query-size", "100", "--rounds", "2", "--seed", "0"],
    "fmnist-lookahead-last-layer": ["--oracle", "simulated", "--dataset", "fashion-mnist", "--strategy", "lookahead",
                                    "--strategy-option", "mode=last-layer", "--initial", "1000", "--query-size", "100",
                                    "--rounds", "2", "--seed", "0"],
}
BENCH_ARGS = ["bench", "--preset", "quick", "--seeds", "0,1,2,3,4"]


def one_thread_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def app(args: list[str]) -> None:
    command = [sys.executable, str(ROOT / "app.py"), *args, "--device", "cpu", "--no-progress"]
    subprocess.run(command, check=True, env=one_thread_env(), cwd=ROOT)


ANNOTATOR_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from al_engine.data import LoadOptions, load_dataset
from al_engine.config import RunConfig
from annotator import create_app

out = sys.argv[1]
dataset = load_dataset("digits", LoadOptions())
config = RunConfig(dataset="digits", strategy="entropy", initial=30, query_size=20, rounds=3, epochs=15, seed=0,
                   device="cpu")
app = create_app({"DATABASE": out + "/annotator.db", "RUN_CONFIG": config, "DATASET": dataset,
                  "ADMIN_TOKEN": "reference-token"})
state = app.extensions["annotator"]
client = app.test_client()
headers = {"Authorization": "Bearer reference-token"}
truth = dataset.train_labels.numpy()
for _ in range(config.rounds + 1):
    while True:
        response = client.get("/api/tasks/next", headers=headers)
        if response.status_code == 204:
            break
        item = response.get_json()["item_id"]
        client.post("/api/annotations", json={"item_id": item, "label": int(truth[item])}, headers=headers)
    state.driver.run_until_idle()
with open(out + "/metrics.jsonl", "w") as metrics, open(out + "/queries.jsonl", "w") as queries:
    for row in client.get("/api/rounds", headers=headers).get_json()["rounds"]:
        metrics.write(json.dumps({"round": row["round"], "labeled": row["labeled"], "accuracy": row["accuracy"]}) + "\n")
    db = state.driver.db.db
    for (round_index,) in db.execute("select distinct round from batch_items order by round").fetchall():
        rows = db.execute("select item_id, score from batch_items where round = ? order by position",
                          [round_index]).fetchall()
        queries.write(json.dumps({"round": round_index, "indices": [r[0] for r in rows],
                                  "scores": [r[1] for r in rows]}) + "\n")
"""


def annotator_run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotator.db").unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", ANNOTATOR_SCRIPT, str(out)], check=True, env=one_thread_env(), cwd=ROOT)


def run_all(out: Path) -> list[Path]:
    """Run every reference run under `out`; returns the run folders (each holds metrics/queries.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    app(BENCH_ARGS + ["--out", str(out / "quick")])
    for name, args in CLI_RUNS.items():
        app(args + ["--out", str(out / name)])
    annotator_run(out / "annotator")
    return sorted(path.parent for path in out.rglob("queries.jsonl"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compare_run(reference: Path, candidate: Path) -> dict:
    """Picks and accuracies identical, scores within SCORE_TOLERANCE, round by round."""
    problems = []
    ref_queries, new_queries = read_jsonl(reference / "queries.jsonl"), read_jsonl(candidate / "queries.jsonl")
    if len(ref_queries) != len(new_queries):
        problems.append(f"{len(new_queries)} query lines, reference has {len(ref_queries)}")
    worst = 0.0
    for old, new in zip(ref_queries, new_queries):
        if old["indices"] != new["indices"]:
            problems.append(f"round {old['round']}: picks differ")
        for a, b in zip(old["scores"], new["scores"]):
            if a is None or b is None or a in (float("inf"), float("-inf")):
                if a != b:
                    problems.append(f"round {old['round']}: score {a} became {b}")
                continue
            worst = max(worst, abs(a - b))
    if worst > SCORE_TOLERANCE:
        problems.append(f"largest score difference {worst:.3g} > {SCORE_TOLERANCE}")
    ref_metrics, new_metrics = read_jsonl(reference / "metrics.jsonl"), read_jsonl(candidate / "metrics.jsonl")
    accuracies = ([m["accuracy"] for m in ref_metrics], [m["accuracy"] for m in new_metrics])
    if accuracies[0] != accuracies[1]:
        problems.append(f"accuracies differ: {accuracies[0]} vs {accuracies[1]}")
    return {"rounds": len(ref_queries), "max_score_difference": worst, "identical": not problems,
            "problems": problems}


def keep_reference(runs: list[Path], out: Path) -> None:
    """Only the files the comparison reads, plus the bench's summary, stay in the reference folder."""
    for run in runs:
        for path in run.iterdir():
            if path.name not in ("metrics.jsonl", "queries.jsonl", "config.json"):
                path.unlink() if path.is_file() else shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    record = sub.add_parser("record", help="run the set and keep it as the reference")
    record.add_argument("--out", required=True, type=Path)
    compare = sub.add_parser("compare", help="run the set again and compare it with the reference")
    compare.add_argument("--reference", required=True, type=Path)
    compare.add_argument("--out", type=Path, help="where the new runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.action == "record":
        if args.out.exists():
            shutil.rmtree(args.out)
        keep_reference(run_all(args.out), args.out)
        print(json.dumps({"recorded": str(args.out)}))
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="pick-check-"))
    if out.exists():
        shutil.rmtree(out)
    run_all(out)
    failed = 0
    for reference in sorted(path.parent for path in args.reference.rglob("queries.jsonl")):
        name = str(reference.relative_to(args.reference))
        result = {"run": name, **compare_run(reference, out / name)}
        failed += not result["identical"]
        print(json.dumps(result))
    print(json.dumps({"runs_differing": failed, "verdict": "identical" if not failed else "DIFFERENT"}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
