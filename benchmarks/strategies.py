"""Wall time and peak extra memory of one query per strategy on the full Fashion-MNIST pool.

One query of 100 from 59,000 unlabeled items (1,000 labeled, seeded), with the small CNN trained once by
the default preset and shared by every strategy. Each strategy runs in a fresh subprocess, so its peak
memory is its own: peak_extra_mib = the process's peak resident set during the query minus its resident
set just before it (Linux: the peak is reset through /proc/self/clear_refs once the dataset, the model
and torch are loaded, then read from VmHWM).

References measured in the same run, side by side with the same model:
  ref-forward-pass        one plain forward pass over the pool (the 1.5x target of plain uncertainty)
  ref-dropout-full-passes T = 10 full stochastic forward passes (how the reference samples MC dropout)
  ref-bim-per-image       the reference's one-image-at-a-time BIM on a sample, extrapolated to the pool
  ref-deepfool-per-image  the reference's one-image-at-a-time DeepFool on a sample, extrapolated
  pair-dropout            BALD with head-only sampling and with T full passes, alternated in one process
  pair-attacks            batched and per-image BIM and DeepFool on the same sample, alternated in one process;
                          per-image BIM twice: input gradients only, and the reference's own loss.backward()
The load of a shared machine swings from minute to minute; the pair-* entries time both sides moments
apart in one process, which is the comparison to trust there.

Prints one JSON line per entry. Usage:
  python benchmarks/strategies.py [--strategies a,b,...] [--query-size 100] [--initial 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from al_engine.data import LoadOptions, Pool, load_dataset  # noqa: E402
from al_engine.models import build_model  # noqa: E402
from al_engine.strategies import QueryState, get_strategy  # noqa: E402
from al_engine.train import (evaluate_accuracy, image_batches, predict_proba, train_classifier,  # noqa: E402
                             train_preset)

STRATEGIES = ["least-confidence", "margin", "entropy", "least-confidence-dropout", "margin-dropout",
              "entropy-dropout", "bald", "kmeans", "kcenter-greedy", "coreset", "badge", "typiclust",
              "adversarial-bim", "adversarial-deepfool"]
REFERENCES = ["ref-forward-pass", "ref-dropout-full-passes", "ref-bim-per-image", "ref-deepfool-per-image",
              "pair-dropout", "pair-attacks"]
PER_IMAGE_SAMPLE = {"ref-bim-per-image": 300, "ref-deepfool-per-image": 60}  # images attacked one at a time


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the peak resident set to the current one; returns the current resident set in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mib("VmRSS")
    except OSError:  # not Linux: fall back on getrusage's lifetime peak (over-counts nothing, may under-count)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args):
    dataset = load_dataset("fashion-mnist", LoadOptions())
    pool = Pool(len(dataset.train_labels))
    initial = pool.initial_indices(args.initial, args.seed)
    pool.add_labels(initial, dataset.train_labels[initial].numpy(), 0)
    model = build_model("auto", dataset.image_shape, dataset.num_classes)
    return dataset, pool, initial, model


# --------------------------------------------------------------------------------------------
# The reference's per-image attacks (deep-active-learning's algorithm, one image per loop), for the ratio


def bim_one_image(model, image, step_size: float, cap: int) -> int:
    inputs = image.unsqueeze(0)
    perturbation = torch.zeros_like(inputs)
    with torch.enable_grad():
        adversarial = (inputs + perturbation).requires_grad_(True)
        logits = model(adversarial)
        label = logits.argmax(1)
        steps = 0
        while logits.argmax(1).item() == label.item() and steps < cap:  # the reference has no cap
            gradient, = torch.autograd.grad(F.cross_entropy(logits, label), adversarial)
            perturbation += step_size * gradient.sign()
            adversarial = (inputs + perturbation).requires_grad_(True)
            logits = model(adversarial)
            steps += 1
    return steps


def bim_one_image_reference_path(model, image, step_size: float, cap: int) -> int:
    """The reference's own code path: loss.backward() on the model, so every step also fills (and then
    zeroes) the weights' gradients, which the attack never uses."""
    inputs = image.unsqueeze(0).clone().requires_grad_(True)
    perturbation = torch.zeros_like(inputs)
    with torch.enable_grad():
        logits = model(inputs + perturbation)
        label = logits.argmax(1)
        steps = 0
        while logits.argmax(1).item() == label.item() and steps < cap:
            F.cross_entropy(logits, label).backward()
            perturbation += step_size * inputs.grad.sign()
            inputs.grad.zero_()
            logits = model(inputs + perturbation)
            steps += 1
    model.zero_grad(set_to_none=True)
    return steps


def deepfool_one_image(model, image, max_iter: int = 50) -> int:
    inputs = image.unsqueeze(0)
    perturbation = torch.zeros_like(inputs)
    with torch.enable_grad():
        adversarial = (inputs + perturbation).requires_grad_(True)
        logits = model(adversarial)
        label = logits.argmax(1).item()
        steps = 0
        while logits.argmax(1).item() == label and steps < max_iter:
            grad_label, = torch.autograd.grad(logits[0, label], adversarial, retain_graph=True)
            best, step_vector = float("inf"), None
            for other in range(logits.shape[1]):  # one backward pass per class, as the reference does
                if other == label:
                    continue
                grad_other, = torch.autograd.grad(logits[0, other], adversarial, retain_graph=True)
                direction = grad_other - grad_label
                gap = (logits[0, other] - logits[0, label]).item()
                norm = direction.norm().item()
                value = abs(gap) / max(norm, 1e-12)
                if value < best:
                    best, step_vector = value, value / max(norm, 1e-12) * direction
            perturbation += step_vector
            adversarial = (inputs + perturbation).requires_grad_(True)
            logits = model(adversarial)
            steps += 1
    return steps


def _alternate(runs: dict, repeats: int) -> dict:
    """Median seconds of each callable, run in turns `repeats` times."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {f"{name}_s": round(float(np.median(values)), 3) for name, values in times.items()}


def run_pair(name: str, state: QueryState) -> dict:
    from al_engine.strategies.adversarial import attack_copy, bim_attack, deepfool_attack

    model, dataset = state.model, state.dataset
    if name == "pair-dropout":
        def fresh():
            return QueryState(model=model, dataset=dataset, pool=state.pool, device=state.device, seed=0)
        result = _alternate({"head_only": lambda: get_strategy("bald").score(fresh()),
                             "full_passes": lambda: get_strategy("bald", full_passes=True).score(fresh())}, 2)
        result["speedup"] = round(result["full_passes_s"] / result["head_only_s"], 1)
        return result
    # The batched side runs as the strategies run it: a frozen channels-last copy, their default batch sizes.
    sample = np.random.default_rng(1).choice(state.unlabeled_indices, size=1024, replace=False)
    images = next(image_batches(dataset, sample, len(sample), state.device))
    attacked, attacked_images = attack_copy(model), images.contiguous(memory_format=torch.channels_last)
    deepfool_attack(attacked, attacked_images[:4], 0.02, 50)  # the first vectorised backward pays a set-up
    few = images[:32]
    result = _alternate({
        "bim_batched_1024": lambda: bim_attack(attacked, attacked_images, 0.05, 50),
        "bim_per_image_32": lambda: [bim_one_image(model, image, 0.05, 1000) for image in few],
        "bim_reference_path_32": lambda: [bim_one_image_reference_path(model, image, 0.05, 1000) for image in few],
        "deepfool_batched_256": lambda: deepfool_attack(attacked, attacked_images[:256], 0.02, 50),
        "deepfool_per_image_32": lambda: [deepfool_one_image(model, image) for image in few],
    }, 2)
    bim_batched = result["bim_batched_1024_s"] / 1024
    result["bim_speedup"] = round(result["bim_per_image_32_s"] / 32 / bim_batched, 1)
    result["bim_speedup_reference_path"] = round(result["bim_reference_path_32_s"] / 32 / bim_batched, 1)
    result["deepfool_speedup"] = round(result["deepfool_per_image_32_s"] / 32
                                       / (result["deepfool_batched_256_s"] / 256), 1)
    return result


def run_reference(name: str, state: QueryState, args) -> dict:
    model, dataset = state.model, state.dataset
    unlabeled = state.unlabeled_indices
    if name.startswith("pair-"):
        return run_pair(name, state)
    if name == "ref-forward-pass":
        predict_proba(model, dataset, unlabeled, state.device, state.train_config.eval_batch_size)
        return {}
    if name == "ref-dropout-full-passes":
        get_strategy("entropy-dropout", full_passes=True).score(state)
        return {}
    sample_size = PER_IMAGE_SAMPLE[name]
    sample = np.random.default_rng(0).choice(unlabeled, size=sample_size, replace=False)
    images = next(image_batches(dataset, sample, sample_size, state.device))
    started = time.perf_counter()
    if name == "ref-bim-per-image":
        steps = [bim_one_image(model, image, 0.05, 1000) for image in images]
    else:
        steps = [deepfool_one_image(model, image) for image in images]
    seconds = time.perf_counter() - started
    return {"sample": sample_size, "sample_s": round(seconds, 3), "mean_steps": float(np.mean(steps)),
            "extrapolated_s": round(seconds * len(unlabeled) / sample_size, 1)}


# --------------------------------------------------------------------------------------------
# One entry, in its own process


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dataset, pool, _, model = setup(args)
    model.load_state_dict(torch.load(args.model_path, weights_only=True))
    model.eval()
    state = QueryState(model=model, dataset=dataset, pool=pool, device=torch.device("cpu"), seed=args.seed)
    # A plain forward pass over the same pool, moments before the query, in the same process: the machine's
    # load changes from minute to minute, so ratios to this pass are what compares across entries.
    started = time.perf_counter()
    predict_proba(model, dataset, state.unlabeled_indices, state.device, state.train_config.eval_batch_size)
    forward_pass_s = time.perf_counter() - started
    before = reset_peak_rss()
    started = time.perf_counter()
    record = {"strategy": args.worker}
    if args.worker.startswith(("ref-", "pair-")):
        record.update(run_reference(args.worker, state, args))
    else:
        options = dict(option.split("=", 1) for option in args.option)
        strategy = get_strategy(args.worker, **options)
        indices, scores = strategy.query(state, args.query_size)
        record.update(strategy.diagnostics)  # what a strategy says about its own run (coreset's solves)
        record.update({"picked": len(indices), "labeled_picked": int(np.isin(indices, pool.labeled_indices).sum())})
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["peak_extra_mib"] = round(peak_rss_mib() - before, 1)
    record["forward_pass_s"] = round(forward_pass_s, 3)
    record["x_forward_pass"] = round(record.get("extrapolated_s", record["seconds"]) / forward_pass_s, 2)
    record.update({"unlabeled": len(state.unlabeled_indices), "labeled": len(state.labeled_indices),
                   "threads": torch.get_num_threads()})
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(REFERENCES + STRATEGIES))
    parser.add_argument("--query-size", type=int, default=100)
    parser.add_argument("--initial", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per entry")
    parser.add_argument("--model-cache", help="load the trained model from this file, or train and save it there")
    parser.add_argument("--option", action="append", default=[], help="key=value for the worker's strategy")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dataset, pool, initial, model = setup(args)
    setup_record = {"setup": "small-cnn, preset saturate", "cpu_threads": args.threads}
    if args.model_cache and Path(args.model_cache).is_file():
        model.load_state_dict(torch.load(args.model_cache, weights_only=True))
        setup_record["model"] = "loaded from --model-cache"
    else:
        trained = train_classifier(model, dataset, initial, dataset.train_labels[initial].numpy(),
                                   train_preset("saturate"), torch.device("cpu"), seed=args.seed)
        setup_record.update({"epochs": trained.epochs, "train_s": round(trained.seconds, 1)})
        if args.model_cache:
            torch.save(model.state_dict(), args.model_cache)
    model.eval()
    setup_record["test_accuracy"] = round(evaluate_accuracy(model, dataset, torch.device("cpu")), 4)
    setup_record["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(setup_record), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        model_path = str(Path(folder) / "model.pt")
        torch.save(model.state_dict(), model_path)
        for name in args.strategies.split(","):
            command = [sys.executable, __file__, "--worker", name, "--model-path", model_path,
                       "--query-size", str(args.query_size), "--initial", str(args.initial),
                       "--seed", str(args.seed), "--threads", str(args.threads)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode == 0 and lines:
                    record = json.loads(lines[-1])
                    record["load_average"] = round(os.getloadavg()[0], 2)
                    print(json.dumps(record), flush=True)
                else:
                    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    print(json.dumps({"strategy": name, "error": error}), flush=True)
            except subprocess.TimeoutExpired:
                print(json.dumps({"strategy": name, "error": f"timeout after {args.timeout} s"}), flush=True)


if __name__ == "__main__":
    main()
