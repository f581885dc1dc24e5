"""Sharded scoring of the unlabeled pool with torch.distributed (launched by torchrun).

Scoring the pool is the part of a round that grows with the data, so every rank takes a contiguous
shard of `state.unlabeled_indices` and works only on it. How the shards' work is joined depends on
the strategy (`Strategy.sharding_plan`, declared by each strategy class; this module knows no names):

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
            stream over the whole pool; lookahead's last-layer mode, which certifies its shortlist
            over every candidate; any selection without gathered views).

Every rank must hold the same model: `sharded_query` broadcasts rank 0's weights first. Gloo is used
on CPUs and NCCL on GPUs. `torchrun ... app.py --oracle simulated ...` runs a whole run this way
(`run_simulation_distributed`: rank 0 trains and writes, all ranks score). benchmarks/scoring_job.py
times sharded queries alone.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .engine import Engine
from .loop import run_simulation
from .strategies import QueryState, Strategy, picks_available, top_k
from .train import resolve_device

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
    candidates = state.unlabeled_indices
    k = picks_available(k, len(candidates))
    if sync_model:
        broadcast_model(state.model)
    if k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    mode, views = strategy.sharding_plan()
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

    def __call__(self, engine: Engine, state: QueryState, k: int) -> tuple[np.ndarray, np.ndarray]:
        # The model's weights go out in sharded_query; the rest of the engine's state goes here.
        _broadcast_result({"round": state.round_index, "k": k, "engine": engine.state_dict(with_model=False)})
        return sharded_query(engine.strategy, state, k)

    def stop(self) -> None:
        _broadcast_result({"stop": True})


def serve_queries(config, dataset=None) -> int:
    """A worker rank's loop: load each round's engine state from rank 0's message, score its shard.

    Returns the number of rounds served.
    """
    engine = Engine(config, dataset=dataset)
    engine.model = engine.new_model().eval()  # its weights arrive with every query
    served = 0
    while True:
        message = _broadcast_result(None)
        if message.get("stop"):
            return served
        engine.load_state_dict(message["engine"])
        sharded_query(engine.strategy, engine.query_state(message["round"]), message["k"])
        served += 1


def run_or_serve(config, oracle_factory, context: DistributedContext, progress: bool = True,
                 dataset=None) -> list[dict]:
    """One run on a group that is already up: rank 0 runs the loop and writes, the others score.

    Returns the run's metrics on rank 0 and [] on the others; with one process it is `run_simulation`.
    """
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
    owned = not is_initialised()
    context = init_distributed(resolve_device(config.device))
    try:
        return run_or_serve(config, oracle_factory, context, progress=progress and context.is_main, dataset=dataset)
    finally:
        if owned and context.active:
            dist.destroy_process_group()
