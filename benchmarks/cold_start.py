"""Cold start on Fashion-MNIST: self-supervised features vs a network from scratch, one JSON line each.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/cold_start.py --out docs/results/cold-start
    python benchmarks/cold_start.py --out docs/results/cold-start --seeds 0,1,2,3,4     # the full grid

Phases, each resumable (a rerun skips what is finished and continues what was cut):
1. pretrain: `app.py pretrain`'s SimCLR on the 60,000 pool images, no labels, the small CNN
   (`--epochs`, `--pretrain-budget` seconds per invocation); its time and loss curve.
2. probe: linear-probe accuracy with all 60,000 labels (a multinomial logistic regression trained
   by L-BFGS on standardised features, scored on the 10,000 test images) of the SimCLR features,
   and, for scale, of the same network randomly initialised and of the raw pixels.
3. grid: learning curves at 10, 20, 50, 100, 200, 500 labels (10 initial, then batches of
   10, 30, 50, 100, 300: `--query-sizes`), strategies random, margin and typiclust, each on
   (a) the small CNN trained from scratch each round (as the project's runs do) and (b) a head on the
   frozen SimCLR features (`--weights`). Typiclust's arm chooses its first 10 with
   `--initial-strategy typiclust` too (cold start: (a) clusters the pixels, (b) the features); random
   and margin start from the seeded random 10. Each cell is one run folder under OUT/cells/, resumed
   round by round by the engine's own run files.

Every line printed is also appended to OUT/results.jsonl (one line per finished item, rewritten
when a phase is redone), so the results page can be written from it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULE = [10, 30, 50, 100, 300]  # 10 initial labels -> 20, 50, 100, 200, 500
STRATEGIES = ("random", "margin", "typiclust")
ARMS = ("scratch", "ssl")


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "results.jsonl", "a") as handle:
        handle.write(line + "\n")


def done(out: Path) -> dict:
    """(kind, key) -> record of what results.jsonl already holds."""
    found = {}
    path = out / "results.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                found[(record["kind"], record.get("key"))] = record
    return found


def weights_file(out: Path) -> Path:
    return out / "small-cnn-simclr.pt"


def phase_pretrain(args, out: Path, dataset) -> dict:
    from al_engine.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(dataset="fashion-mnist", model="small-cnn", out=str(weights_file(out)), epochs=args.epochs,
                            time_budget=args.pretrain_budget, flip=True, seed=0, device=args.device)
    result = pretrain(config, dataset=dataset, progress=not args.no_progress)
    return {"kind": "pretrain", "key": "small-cnn", "method": result.method, "epochs": result.epochs_done,
            "finished": result.finished, "seconds": result.seconds, "losses": result.losses,
            "feature_dim": result.feature_dim, "batch_size": config.batch_size, "temperature": config.temperature,
            "lr": config.lr, "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def linear_probe(train_x, train_y, test_x, test_y, max_iter: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression (L-BFGS, tiny L2) on standardised features."""
    import torch

    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    layer = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(train_x), train_y) + 1e-4 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((layer(test_x).argmax(1) == test_y).float().mean())


def phase_probe(args, out: Path, dataset, key: str) -> dict:
    import torch

    from al_engine import backbones
    from al_engine.models import build_model

    start = time.perf_counter()
    if key == "pixels":
        train_x, test_x = dataset.train_images.flatten(1).float(), dataset.test_images.flatten(1).float()
    else:
        if key == "simclr":
            backbone = backbones.build_project_backbone("small-cnn", weights_file(out), dataset)
        else:  # the same network, randomly initialised (seed 0), as a floor
            torch.manual_seed(0)
            random_file = out / "small-cnn-random-init.pt"
            network = build_model("small-cnn", dataset.image_shape, 10)
            torch.save({k: v for k, v in network.state_dict().items() if not k.startswith("fc_out.")}, random_file)
            backbone = backbones.build_project_backbone("small-cnn", random_file, dataset)
            random_file.unlink()
        train_x = backbones.extract_features(backbone, dataset.train_images)
        test_x = backbones.extract_features(backbone, dataset.test_images)
    accuracy = linear_probe(train_x, dataset.train_labels, test_x, dataset.test_labels)
    return {"kind": "probe", "key": key, "features": int(train_x.shape[1]), "labels": int(len(dataset.train_labels)),
            "test_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - start, 1)}


def run_cell(args, out: Path, dataset, arm: str, strategy: str, seed: int) -> dict:
    from al_engine.config import RunConfig
    from al_engine.loop import run_simulation
    from oracle.simulated import SimulatedOracle

    settings = dict(dataset="fashion-mnist", model="small-cnn", strategy=strategy, initial=10,
                    query_sizes=list(SCHEDULE), seed=seed, device=args.device,
                    initial_strategy="typiclust" if strategy == "typiclust" else "random",
                    out=str(out / "cells" / f"{arm}-{strategy}-s{seed}"), cache_dir=args.cache_dir)
    if arm == "ssl":
        settings.update(weights=str(weights_file(out)), embed_dim=256)
    start = time.perf_counter()
    metrics = run_simulation(RunConfig(**settings), SimulatedOracle.for_run, progress=not args.no_progress,
                             dataset=dataset)
    return {"kind": "cell", "key": f"{arm}-{strategy}-s{seed}", "arm": arm, "strategy": strategy, "seed": seed,
            "labeled": [m["labeled"] for m in metrics], "accuracy": [round(m["accuracy"], 4) for m in metrics],
            "kappa": [m.get("kappa") for m in metrics], "seconds": round(time.perf_counter() - start, 1)}


def report(out: Path) -> str:
    """Markdown tables of what results.jsonl holds: test accuracy (%) per budget, mean (and sd over the
    seeds finished, with their count) per arm and strategy, and (b) - (a) per strategy."""
    records = list(done(out).values())
    cells = [r for r in records if r["kind"] == "cell"]
    budgets = [10, 20, 50, 100, 200, 500]
    lines = ["| arm | strategy | seeds | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for arm in ARMS:
        for strategy in STRATEGIES:
            runs = [c for c in cells if c["arm"] == arm and c["strategy"] == strategy]
            if not runs:
                continue
            values = np.array([[100 * a for a in c["accuracy"]] for c in runs])
            spread = values.std(0, ddof=1) if len(runs) > 1 else None
            row = [f"{m:.1f}" + (f" ± {sd:.1f}" if spread is not None else "") for m, sd in
                   zip(values.mean(0), spread if spread is not None else values.mean(0))]
            seeds = ",".join(str(c["seed"]) for c in sorted(runs, key=lambda c: c["seed"]))
            lines.append(f"| {'(a) scratch' if arm == 'scratch' else '(b) SSL head'} | {strategy} | {seeds} | "
                         + " | ".join(row) + " |")
    for strategy in STRATEGIES:  # paired: only the seeds both arms finished
        by_seed = {arm: {c["seed"]: c["accuracy"] for c in cells if c["arm"] == arm and c["strategy"] == strategy}
                   for arm in ARMS}
        common = sorted(set(by_seed["scratch"]) & set(by_seed["ssl"]))
        if common:
            gain = np.mean([np.subtract(by_seed["ssl"][s], by_seed["scratch"][s]) for s in common], axis=0) * 100
            lines.append(f"| (b) - (a), paired | {strategy} | {','.join(map(str, common))} | "
                         + " | ".join(f"{g:+.1f}" for g in gain) + " |")
    by_seed = {strategy: {c["seed"]: c["accuracy"] for c in cells if c["arm"] == "ssl" and c["strategy"] == strategy}
               for strategy in STRATEGIES}
    common = sorted(set(by_seed["typiclust"]) & set(by_seed["random"]))
    if common:
        gain = np.mean([np.subtract(by_seed["typiclust"][s], by_seed["random"][s]) for s in common], axis=0) * 100
        lines.append(f"| (b) typiclust - random, paired | | {','.join(map(str, common))} | "
                     + " | ".join(f"{g:+.1f}" for g in gain) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder of the results (resumed when it exists)")
    parser.add_argument("--phases", default="pretrain,probe,grid")
    parser.add_argument("--epochs", type=int, default=100, help="SimCLR epochs")
    parser.add_argument("--pretrain-budget", type=float, default=None, help="seconds of pretraining per invocation")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the user's cache)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of what is finished; run nothing")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.out)))
        return 0

    from al_engine.data import LoadOptions, load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("fashion-mnist", LoadOptions())
    phases = args.phases.split(",")
    finished = done(out)
    if "pretrain" in phases:
        record = finished.get(("pretrain", "small-cnn"))
        if record is None or not record["finished"] or record["epochs"] < args.epochs:
            record = phase_pretrain(args, out, dataset)
            emit(out, record)
        if not record["finished"]:
            return 0  # stopped by the budget: rerun to continue
    if "probe" in phases:
        for key in ("simclr", "random-init", "pixels"):
            if ("probe", key) not in finished:
                emit(out, phase_probe(args, out, dataset, key))
    if "grid" in phases:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for strategy in args.strategies.split(","):
                for arm in args.arms.split(","):
                    key = f"{arm}-{strategy}-s{seed}"
                    if ("cell", key) not in finished:
                        emit(out, run_cell(args, out, dataset, arm, strategy, seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
