"""Foundation measurements, one JSON line each (never part of the unit tests).

    python benchmarks/foundation.py throughput      # training and inference images/s of each model
    python benchmarks/foundation.py accuracy        # test accuracy at 1000 random labels: default vs literature preset
    python benchmarks/foundation.py round           # wall time of one full round on Fashion-MNIST (entropy)
    python benchmarks/foundation.py curves          # 10-round entropy and random runs on Fashion-MNIST

Runs on whatever device --device picks (default auto); numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from al_engine.data import load_dataset  # noqa: E402
from al_engine.config import RunConfig  # noqa: E402
from al_engine.engine import Engine  # noqa: E402
from al_engine.loop import run_simulation  # noqa: E402
from al_engine.runfiles import read_jsonl  # noqa: E402
from al_engine.models import build_model  # noqa: E402
from al_engine.train import evaluate_accuracy, resolve_device, train_classifier, train_preset  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def throughput(device: torch.device) -> None:
    for name, shape in (("small-cnn", (1, 28, 28)), ("colour-cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))):
        model = build_model(name, shape, 10).to(device)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        batch = torch.randn(64, *shape, device=device)
        target = torch.randint(0, 10, (64,), device=device)
        steps = 5 if name == "resnet18" else 40
        model.train()
        for phase in ("warm-up", "timed"):
            start = time.perf_counter()
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(model(batch), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        train_rate = steps * 64 / (time.perf_counter() - start)
        model.eval()
        big = torch.randn(1024, *shape, device=device)
        with torch.inference_mode():
            model(big)
            repeats = 1 if name == "resnet18" else 5
            start = time.perf_counter()
            for _ in range(repeats):
                model(big)
        infer_rate = repeats * 1024 / (time.perf_counter() - start)
        emit({"bench": "throughput", "model": name, "device": str(device),
              "train_images_per_s": round(train_rate), "inference_images_per_s": round(infer_rate)})


def accuracy(device: torch.device, seeds: list[int]) -> None:
    dataset = load_dataset("fashion-mnist")
    for preset in ("saturate", "dal"):
        results = []
        for seed in seeds:
            torch.manual_seed(seed)
            indices = np.sort(np.random.default_rng(seed).choice(len(dataset.train_labels), 1000, replace=False))
            model = build_model("auto", dataset.image_shape, 10)
            result = train_classifier(model, dataset, indices, dataset.train_labels[indices].numpy(),
                                      train_preset(preset), device, seed=seed)
            results.append((evaluate_accuracy(model, dataset, device), result.seconds, result.epochs))
        acc = [r[0] for r in results]
        emit({"bench": "accuracy_at_1000", "dataset": "fashion-mnist", "preset": preset, "seeds": seeds,
              "accuracy": [round(a, 4) for a in acc], "accuracy_mean": round(float(np.mean(acc)), 4),
              "train_s_mean": round(float(np.mean([r[1] for r in results])), 2),
              "epochs": [r[2] for r in results]})


def one_round(device: torch.device) -> None:
    config = RunConfig(dataset="fashion-mnist", strategy="entropy", initial=1000, query_size=100, rounds=1,
                       device=str(device))
    start = time.perf_counter()
    engine = Engine(config)
    load_s = time.perf_counter() - start
    engine.pool.add_labels(engine.initial_indices(), engine.dataset.train_labels[engine.initial_indices()].numpy(), -1)
    start = time.perf_counter()
    accuracy_value, train_s, epochs = engine.train(0)
    indices, _, query_s = engine.query(0)
    total = time.perf_counter() - start
    emit({"bench": "one_round", "dataset": "fashion-mnist", "labeled": 1000, "pool": 59000, "strategy": "entropy",
          "load_s": round(load_s, 2), "train_s": round(train_s, 2), "epochs": epochs,
          "evaluate_and_query_s": round(total - train_s, 2), "query_s": round(query_s, 2),
          "round_s": round(total, 2), "accuracy": round(accuracy_value, 4)})


def curves(device: torch.device, seeds: list[int], out: Path) -> None:
    for strategy in ("random", "entropy"):
        for seed in seeds:
            config = RunConfig(dataset="fashion-mnist", strategy=strategy, initial=1000, query_size=100, rounds=10,
                               seed=seed, device=str(device), out=str(out / f"{strategy}-seed{seed}"))
            from oracle.simulated import SimulatedOracle

            start = time.perf_counter()
            run_simulation(config, SimulatedOracle.for_run, progress=False)
            metrics = read_jsonl(Path(config.out) / "metrics.jsonl")
            emit({"bench": "curve", "dataset": "fashion-mnist", "strategy": strategy, "seed": seed,
                  "labeled": [m["labeled"] for m in metrics],
                  "accuracy": [round(m["accuracy"], 4) for m in metrics],
                  "round_s_mean": round(float(np.mean([m["train_s"] + m["query_s"] for m in metrics])), 2),
                  "wall_s": round(time.perf_counter() - start, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["throughput", "accuracy", "round", "curves"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="folder for the curve runs (default: a temporary one)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    emit({"bench": "machine", "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__})
    for part in args.parts:
        if part == "throughput":
            throughput(device)
        elif part == "accuracy":
            accuracy(device, seeds)
        elif part == "round":
            one_round(device)
        elif part == "curves":
            with tempfile.TemporaryDirectory() as tmp:
                curves(device, seeds, Path(args.out) if args.out else Path(tmp))
        else:
            parser.error(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
