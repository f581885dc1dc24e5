"""A scoring job: train once on a seeded initial set, then time sharded queries of one strategy.

    python benchmarks/scoring_job.py --strategy margin --subset 300 --json result.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scoring_job.py --strategy entropy

Rank 0 prints (and with --json writes) one JSON object: the picks, the query seconds of every
repeat, the sharding plan. benchmarks/distributed_scoring.py launches it in several configurations
and compares them; the tests run it in one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from al_engine.config import RunConfig  # noqa: E402
from app import key_value  # noqa: E402  (the command line's own KEY=VALUE type)
from al_engine.distributed import init_distributed, sharded_query  # noqa: E402
from al_engine.engine import Engine  # noqa: E402
from al_engine.errors import UserError  # noqa: E402
from al_engine.strategies import get_strategy  # noqa: E402
from al_engine.train import resolve_device  # noqa: E402


@dataclass
class ScoringJob:
    """What to train and which strategy to time."""

    dataset: str = "digits"
    subset: int | None = None  # seeded random N items of the pool
    model: str = "auto"
    strategy: str = "entropy"
    strategy_options: dict = dataclasses.field(default_factory=dict)
    initial: int = 100  # labels the model is trained on
    query_size: int = 100  # picks per query
    epochs: int = 5  # cap on training epochs
    seed: int = 0
    repeat: int = 1  # timed queries (the first one included)
    device: str = "cpu"
    threads: int = 0  # torch threads per process (0 = torch's default)
    weights: str | None = None  # load the model from this file instead of training
    save_weights: str | None = None  # rank 0 saves the trained model here (to reuse with `weights`)


def run_scoring_job(job: ScoringJob) -> dict | None:
    """Run the job on this rank; rank 0 returns the picks and timings, other ranks None."""
    get_strategy(job.strategy, **job.strategy_options)  # a bad name fails before any work
    if job.threads:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.device)
    context = init_distributed(device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
    config = RunConfig(dataset=job.dataset, subset=job.subset, model=job.model, strategy=job.strategy,
                       strategy_options=job.strategy_options, initial=job.initial, query_size=job.query_size,
                       epochs=job.epochs, seed=job.seed, device=str(device))
    engine = Engine(config)
    initial = engine.initial_indices()
    engine.add_answers(initial, engine.dataset.train_labels[initial].numpy(), round_index=-1)
    train_s = 0.0
    if job.weights:
        engine.model = engine.new_model()
        engine.model.load_state_dict(torch.load(job.weights, map_location=device, weights_only=True))
    elif context.is_main:  # the others receive rank 0's weights in sharded_query
        _, train_s, _ = engine.train(0)
        if job.save_weights:
            torch.save(engine.model.state_dict(), job.save_weights)
    else:
        engine.model = engine.new_model()
    engine.model.eval()
    times, picks, scores = [], None, None
    for _ in range(job.repeat):
        if context.active:
            dist.barrier()
        engine.strategy = get_strategy(job.strategy, **job.strategy_options)  # fresh: no cache from the last repeat
        state = engine.query_state(0)
        start = time.perf_counter()
        picks, scores = sharded_query(engine.strategy, state, job.query_size)
        times.append(time.perf_counter() - start)
    if context.active:
        dist.barrier()
        dist.destroy_process_group()
    if not context.is_main:
        return None
    return {"strategy": job.strategy, "strategy_options": job.strategy_options, "world_size": context.world_size,
            "backend": context.backend, "threads": torch.get_num_threads(), "device": str(device),
            "pool": engine.pool.size, "unlabeled": int(len(engine.pool.unlabeled_indices)),
            "plan": engine.strategy.sharding_plan()[0], "train_s": round(train_s, 3),
            "query_s": [round(t, 4) for t in times], "picks": [int(i) for i in picks],
            "scores": [float(s) for s in scores]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scoring_job.py", description=__doc__.split("\n\n")[0])
    defaults = ScoringJob()
    for name, value in dataclasses.asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if name == "strategy_options":
            parser.add_argument("--strategy-option", dest=name, type=key_value, action="append", default=[])
        elif name in ("subset", "weights", "save_weights"):
            parser.add_argument(flag, type=int if name == "subset" else str, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--json", help="also write rank 0's result to this file")
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name in dataclasses.asdict(defaults)}
    settings["strategy_options"] = dict(settings["strategy_options"])
    try:
        result = run_scoring_job(ScoringJob(**settings))
    except UserError as error:
        sys.stderr.write(f"scoring_job: error: {error}\n")
        return 2
    if result is not None:
        text = json.dumps(result)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
