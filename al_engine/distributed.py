"""Sharded scoring of the unlabeled pool with torch.distributed (launched by torchrun).

Scoring the pool is the part of a round that grows with the data, so every rank takes a contiguous
shard of `state.unlabeled_indices` and works only on it. How the shards' work is joined depends on
the strategy (`sharding_plan`):

- "shard":  per-item scores (entropy, margin, adversarial, lookahead's exact/batched/full-fast modes).
            Each rank scores its shard through `state.candidates`, keeps its own top k, and the
            k best of all ranks are merged. What a strategy prepares once per round before
            scoring (lookahead's distilled student) rank 0 prepares alone and broadcasts
            (`Strategy.shared_round_state`). The merge is exact: every global top-k item is in its
            shard's top k, and ties go to the lower position in the whole pool, as `top_k` breaks them.
- "gather": strategies that need a global view (k-center, k-means, BADGE, TypiClust, MC dropout).
            Each rank computes the per-item views the strategy reads (its shard's embeddings), the
            views are all-gathered in pool order, and rank 0 runs the strategy's selection on them;
            the forward passes over the pool, the costly part, are what is sharded.
- "main":   rank 0 answers alone and broadcasts (random sampling, whose numbers come from one
            stream over the whole pool, and any strategy this module knows nothing about).

Every rank must hold the same model: `sharded_query` broadcasts rank 0's weights first. Gloo is used
on CPUs and NCCL on GPUs. `torchrun ... app.py --oracle simulated ...` runs a whole run this way
(`run_simulation_distributed`: rank 0 trains and writes, all ranks score). `python -m
al_engine.distributed` is a scoring job (train on a seeded initial set, then time sharded queries)
for the tests and benchmarks/distributed_scoring.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .arguments import key_value
from .errors import ConfigError, UserError
from .strategies import QueryState, Strategy, top_k

# Strategies that select from a global view, and the QueryState views (cached under the method's
# name) their selection reads over the unlabeled pool. Labeled views are small: rank 0 computes them.
GATHER_VIEWS: dict[str, tuple[str, ...]] = {
    "kcenter-greedy": ("unlabeled_embeddings",),
    "coreset": ("unlabeled_embeddings",),
    "kmeans": ("unlabeled_embeddings",),
    "badge": ("unlabeled_embeddings",),
    "typiclust": ("unlabeled_embeddings",),
    # MC dropout samples only the head (dropout sits before the last layer), from one seeded stream
    # over the pool: gathering the trunk's features keeps the picks those of one process.
    "bald": ("unlabeled_embeddings",),
    "least-confidence-dropout": ("unlabeled_embeddings",),
    "margin-dropout": ("unlabeled_embeddings",),
    "entropy-dropout": ("unlabeled_embeddings",),
}
# Scores drawn from one random stream over the whole pool: cheap, and only exact when done once.
MAIN_ONLY = {"random"}


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device | str = "cpu") -> DistributedContext:
    """Join the process group torchrun describes in the environment (one process: a no-op).

    gloo for CPU tensors, NCCL for CUDA; on CUDA each rank takes the GPU of its LOCAL_RANK.
    A group that is already initialised (by the caller) is used as it is.
    """
    if is_initialised():
        return current_context()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistributedContext()
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank, backend)


def is_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_context() -> DistributedContext:
    if is_initialised():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                                  dist.get_backend())
    return DistributedContext()


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of `count` items; sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sharding_plan(strategy: Strategy) -> tuple[str, tuple[str, ...]]:
    """("shard" | "gather" | "main", views to gather) for this strategy (see the module docstring).

    A strategy class may declare its own plan with the attributes `distributed` and `global_views`.
    """
    declared = getattr(strategy, "distributed", None)
    if declared is not None:
        return declared, tuple(getattr(strategy, "global_views", ()))
    if strategy.name in MAIN_ONLY:
        return "main", ()
    if strategy.name in GATHER_VIEWS:
        return "gather", GATHER_VIEWS[strategy.name]
    if strategy.name == "lookahead":
        options = strategy.options
        # last-layer re-scores a shortlist it certifies over all candidates: cheap, and global.
        if getattr(options, "mode", "") == "last-layer" or getattr(options, "batch_aware", False):
            return "main", ()
        return "shard", ()
    if type(strategy).select is Strategy.select:  # scores item by item
        return "shard", ()
    return "main", ()


def broadcast_model(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's weights and buffers those of rank `src`."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=src)


def _all_gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order (shards may differ in length)."""
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def _broadcast_result(result, src: int = 0):
    holder = [result]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def merge_top_k(shard_picks: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (global position, score) pairs of all shards: highest score, then lowest position."""
    positions = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in shard_picks])
    scores = np.concatenate([np.asarray(s, dtype=np.float64) for _, s in shard_picks])
    order = np.lexsort((positions, -scores))[:k]
    return positions[order], scores[order]


def sharded_query(strategy: Strategy, state: QueryState, k: int, sync_model: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`strategy.query(state, k)` with the pool's scoring spread over the process group.

    Every rank calls it with the same state (pool, round, seed); every rank gets the same picks.
    Without an initialised group of more than one process it is `strategy.query`.
    """
    context = current_context()
    if not context.active:
        return strategy.query(state, k)
    if k < 1:
        raise ConfigError(f"query size must be at least 1, got {k}")
    if sync_model:
        broadcast_model(state.model)
    candidates = state.unlabeled_indices
    k = min(k, len(candidates))
    if k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    mode, views = sharding_plan(strategy)
    bounds = [shard_bounds(len(candidates), r, context.world_size) for r in range(context.world_size)]
    start, stop = bounds[context.rank]
    shard_state = dataclasses.replace(state, candidates=candidates[start:stop], cache={})

    if mode == "shard":
        # Once-per-round preparation (lookahead's distillation) is done on rank 0 and handed out; a
        # strategy without any (the class decides, so every rank agrees) costs no collective.
        if type(strategy).shared_round_state is not Strategy.shared_round_state:
            shared = _broadcast_result(strategy.shared_round_state(state) if context.is_main else None)
            if shared is not None and not context.is_main:
                strategy.adopt_round_state(state, shared)
        if stop > start:
            scores = np.asarray(strategy.score(shard_state), dtype=np.float64)
            local = top_k(scores, min(k, stop - start))
            mine = (start + local, scores[local])
        else:
            mine = (np.empty(0, dtype=np.int64), np.empty(0))
        everyone: list = [None] * context.world_size
        dist.all_gather_object(everyone, mine)
        positions, scores = merge_top_k(everyone, k)
        return candidates[positions], scores

    if mode == "gather":
        full_state = dataclasses.replace(state, cache=dict(state.cache))
        counts = [b - a for a, b in bounds]
        for view in views:
            local = getattr(shard_state, view)()
            full_state.cache[view] = _all_gather_rows(local.contiguous(), counts)
        result = strategy.query(full_state, k) if context.is_main else None
        return _broadcast_result(result)

    if mode == "main":
        return _broadcast_result(strategy.query(state, k) if context.is_main else None)
    raise ValueError(f"unknown sharding mode {mode!r} for strategy {strategy.name!r}")


# --------------------------------------------------------------------------------------------
# A whole simulated run under torchrun: rank 0 runs the loop, every rank scores its shard


class QueryCoordinator:
    """Rank 0's query hook: tell the other ranks what to score this round, then score with them."""

    def __call__(self, strategy: Strategy, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        _broadcast_result({"round": state.round_index, "k": k, "pool": state.pool.to_dict(),
                           "strategy_state": strategy.state_dict()})
        return sharded_query(strategy, state, k)

    def stop(self) -> None:
        _broadcast_result({"stop": True})


def serve_queries(config, dataset=None) -> int:
    """A worker rank's loop: rebuild each round's state from rank 0's message and score its shard.

    Returns the number of rounds served. The model's weights arrive with every query.
    """
    from .data import Pool, load_dataset
    from .models import build_model
    from .seeding import round_seed, seed_everything
    from .strategies import get_strategy
    from .train import resolve_device

    device = resolve_device(config.device)
    dataset = dataset if dataset is not None else load_dataset(config.dataset, config.load_options())
    strategy = get_strategy(config.strategy, **config.strategy_options)
    train_config = config.train_config()
    model = build_model(config.model, dataset.image_shape, dataset.num_classes, config.embed_dim).to(device).eval()
    served = 0
    while True:
        message = _broadcast_result(None)
        if message.get("stop"):
            return served
        strategy.load_state_dict(message["strategy_state"])
        seed_everything(round_seed(config.seed, message["round"], 2))  # as Engine.query seeds rank 0
        state = QueryState(model=model, dataset=dataset, pool=Pool.from_dict(message["pool"]), device=device,
                           round_index=message["round"], seed=config.seed, train_config=train_config)
        sharded_query(strategy, state, message["k"])
        served += 1


def run_or_serve(config, oracle_factory, context: DistributedContext, progress: bool = True,
                 dataset=None) -> list[dict]:
    """One run on a group that is already up: rank 0 runs the loop and writes, the others score.

    Returns the run's metrics on rank 0 and [] on the others; with one process it is `run_simulation`.
    """
    from .loop import run_simulation

    if not context.active:
        return run_simulation(config, oracle_factory, progress=progress, dataset=dataset)
    if context.is_main:
        coordinator = QueryCoordinator()
        try:
            return run_simulation(config, oracle_factory, progress=progress, dataset=dataset, query_hook=coordinator)
        finally:
            coordinator.stop()  # also when rank 0 fails, so the workers do not wait forever
    serve_queries(config, dataset)
    return []


def broadcast_from_main(value, context: DistributedContext):
    """Rank 0's `value` on every rank (as it is, with one process)."""
    return _broadcast_result(value) if context.active else value


def run_simulation_distributed(config, oracle_factory, progress: bool = True, dataset=None) -> list[dict]:
    """`loop.run_simulation` with the pool's scoring sharded over the ranks torchrun started.

    Rank 0 trains, asks the oracle and writes every file; the other ranks only score (they return []).
    Launched without torchrun it is `run_simulation` itself.
    """
    from .train import resolve_device

    owned = not is_initialised()
    context = init_distributed(resolve_device(config.device))
    try:
        return run_or_serve(config, oracle_factory, context, progress=progress and context.is_main, dataset=dataset)
    finally:
        if owned and context.active:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# A scoring job for torchrun: tests and benchmarks


@dataclass
class ScoringJob:
    """Train once on a seeded initial set, then time `repeat` sharded queries of one strategy."""

    dataset: str = "digits"
    subset: int | None = None  # seeded random N items of the pool
    model: str = "auto"
    strategy: str = "entropy"
    strategy_options: dict = dataclasses.field(default_factory=dict)
    initial: int = 100  # labels the model is trained on
    query_size: int = 100  # picks per query
    epochs: int = 5  # training epochs (fixed)
    seed: int = 0
    repeat: int = 1  # timed queries (the first one included)
    device: str = "cpu"
    threads: int = 0  # torch threads per process (0 = torch's default)
    weights: str | None = None  # load the model from this file instead of training
    save_weights: str | None = None  # rank 0 saves the trained model here (to reuse with `weights`)


def run_scoring_job(job: ScoringJob) -> dict | None:
    """Run the job on this rank; rank 0 returns the picks and timings, other ranks None."""
    from .data import LoadOptions, Pool, load_dataset
    from .models import build_model
    from .seeding import round_seed, seed_everything
    from .strategies import get_strategy
    from .train import resolve_device, train_classifier, train_preset

    strategy = get_strategy(job.strategy, **job.strategy_options)  # a bad name fails before any work
    if job.threads:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.device)
    context = init_distributed(device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
    dataset = load_dataset(job.dataset, LoadOptions(subset=job.subset, seed=job.seed))
    pool = Pool(len(dataset.train_labels))
    initial = pool.initial_indices(job.initial, job.seed)
    pool.add_labels(initial, dataset.train_labels[initial].numpy(), round_index=-1)
    seed_everything(job.seed)
    model = build_model(job.model, dataset.image_shape, dataset.num_classes).to(device)
    train_config = train_preset("saturate", max_epochs=job.epochs, fixed_epochs=True)
    train_s = 0.0
    if job.weights:
        model.load_state_dict(torch.load(job.weights, map_location=device))
    elif context.is_main:  # the others receive rank 0's weights in sharded_query
        train_s = train_classifier(model, dataset, initial, pool.labels[initial], train_config, device,
                                   seed=job.seed).seconds
        if job.save_weights:
            torch.save(model.state_dict(), job.save_weights)
    model.eval()
    times, picks, scores = [], None, None
    for _ in range(job.repeat):
        if context.active:
            dist.barrier()
        strategy = get_strategy(job.strategy, **job.strategy_options)  # fresh: no cache from the last repeat
        seed_everything(round_seed(job.seed, 0, 2))  # every rank's random state as Engine.query sets it
        state = QueryState(model=model, dataset=dataset, pool=pool, device=device, round_index=0, seed=job.seed,
                           train_config=train_config)
        start = time.perf_counter()
        picks, scores = sharded_query(strategy, state, job.query_size)
        times.append(time.perf_counter() - start)
    if context.active:
        dist.barrier()
        dist.destroy_process_group()
    if not context.is_main:
        return None
    return {"strategy": job.strategy, "strategy_options": job.strategy_options, "world_size": context.world_size,
            "backend": context.backend, "threads": torch.get_num_threads(), "device": str(device),
            "pool": len(dataset.train_labels), "unlabeled": int(len(pool.unlabeled_indices)),
            "plan": sharding_plan(strategy)[0], "train_s": round(train_s, 3),
            "query_s": [round(t, 4) for t in times], "picks": [int(i) for i in picks],
            "scores": [float(s) for s in scores]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m al_engine.distributed",
                                     description="Time sharded scoring of one strategy (launch with torchrun).")
    defaults = ScoringJob()
    for name, value in dataclasses.asdict(defaults).items():
        if name == "strategy_options":
            parser.add_argument("--strategy-option", type=key_value, action="append", default=[])
        elif name in ("subset", "weights", "save_weights"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int if name == "subset" else str, default=None)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", help="also write rank 0's result to this file")
    args = parser.parse_args(argv)
    job = ScoringJob(**{name: getattr(args, name) for name in dataclasses.asdict(defaults) if name != "strategy_options"},
                     strategy_options=dict(args.strategy_option))
    try:
        result = run_scoring_job(job)
    except UserError as error:
        sys.stderr.write(f"al_engine.distributed: error: {error}\n")
        return 2
    if result is not None:
        text = json.dumps(result)
        print(text)
        if args.json:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
