"""`app.py bench`: every (strategy, seed) run of a grid under one folder, resumable, then the report.

    OUT/bench.json                    the grid and the wall time of every invocation
    OUT/<strategy>/seed-<s>/          one run's files (config.json, metrics.jsonl, ...)
    OUT/summary.json, summary.md      AULC and final accuracy per strategy, paired test vs random
    OUT/curves.png, query_time.png    learning curves with ±1 std bands; query seconds per round

A strategy may carry options, written `name:key=value:key=value` (e.g. `lookahead:mode=last-layer`),
so one bench can hold the same strategy twice. Finished runs are skipped and a half-finished run
resumes where its state.json says, so killing a bench and starting it again loses at most one round.

The oracle factory is a parameter: the engine does not import the oracle package (app.py passes
`oracle.simulated.SimulatedOracle.for_run`).
"""
from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import RunConfig, default_settings
from .data import Dataset, load_dataset, take_subset
from .distributed import broadcast_from_main, init_distributed, is_initialised, run_or_serve
from .errors import ConfigError
from .loop import run_simulation
from .report import BASELINE, RunCurve, write_report
from .runfiles import RunFiles, read_jsonl
from .strategies import get_strategy
from .train import resolve_device

DEFAULT_SEEDS = [0, 1, 2, 3, 4]  # 3 seeds can make a strategy look better or worse than random by chance
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(frozen=True)
class StrategySpec:
    """One column of the grid: a registered strategy and its options (as given, strings)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "StrategySpec":
        """'name' or 'name:key=value:key=value'."""
        name, *parts = [part.strip() for part in text.strip().split(":")]
        if not name:
            raise ConfigError(f"strategy {text!r} has no name; write name or name:key=value")
        options = {}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"strategy {text!r}: expected key=value after ':', got {part!r}")
            if key.strip() in options:
                raise ConfigError(f"strategy {text!r} sets option {key.strip()!r} twice")
            options[key.strip()] = value.strip()
        return cls(name, tuple(sorted(options.items())))

    @property
    def label(self) -> str:
        """The name the report uses; options in sorted order, so equal set-ups have equal labels."""
        return self.name + "".join(f":{key}={value}" for key, value in self.options)

    @property
    def folder(self) -> str:
        """A file-system-safe folder name, distinct for distinct labels."""
        plain = self.label.replace(":", "+")
        safe = _SAFE.sub("_", plain)
        if safe != plain or "+" in self.name or any("+" in f"{k}{v}" for k, v in self.options):
            safe += "-" + hashlib.sha1(self.label.encode()).hexdigest()[:6]
        return safe

    def check(self) -> None:
        """Fail now, not hours into the bench, on an unknown name or a bad option."""
        get_strategy(self.name, **dict(self.options))


@dataclass
class BenchConfig:
    """A grid of runs: `base` holds every run setting but strategy, seed and out."""

    base: RunConfig
    strategies: list[StrategySpec]
    out: Path
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    preset: str | None = None
    keep_going: bool = False  # a run that crashes is recorded and the bench goes on
    workers: int = 1  # runs at once, each in its own process with an equal share of the CPU threads
    worker_threads: int = 0  # torch threads per worker process; 0 = the machine's cores shared equally

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError("bench needs --strategies (or a --preset that names them)")
        labels = [spec.label for spec in self.strategies]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(f"strategy listed twice: {', '.join(duplicates)}")
        if not self.seeds:
            raise ConfigError("bench needs at least one seed")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds lists a seed twice: {self.seeds}")
        for spec in self.strategies:
            spec.check()
        self.base.validate()

    def run_config(self, spec: StrategySpec, seed: int) -> RunConfig:
        return dataclasses.replace(self.base, strategy=spec.name, strategy_options=dict(spec.options), seed=seed,
                                   out=str(self.run_dir(spec, seed)))

    def run_dir(self, spec: StrategySpec, seed: int) -> Path:
        return Path(self.out) / spec.folder / f"seed-{seed}"


@dataclass
class BenchResult:
    summary: dict
    finished: int  # runs complete after this call
    skipped: int  # runs that were already complete before it
    failures: list[dict]
    wall_s: float
    is_main: bool = True  # False on the other ranks of a torchrun bench, which write nothing


OracleFactory = Callable[[Dataset, RunConfig], object]


def is_finished(config: RunConfig) -> bool:
    """True when the run folder holds every round; raises if it holds a run with other settings."""
    files = RunFiles(config.out)
    if files.finished_rounds() < config.rounds + 1:
        return False
    files.check_comparable(dataclasses.asdict(config), default_settings())
    return True


class _DatasetCache:
    """Load the dataset once per bench; a --subset is drawn per seed exactly as a single run draws it."""

    def __init__(self, base: RunConfig, dataset: Dataset | None):
        self.base = base
        self.full = dataset
        self.by_seed: dict[int, Dataset] = {}

    def for_seed(self, seed: int) -> Dataset:
        if seed not in self.by_seed:
            if self.full is None:
                options = dataclasses.replace(self.base.load_options(), subset=None)
                self.full = load_dataset(self.base.dataset, options)
            subset = self.base.subset
            self.by_seed[seed] = self.full if subset is None else take_subset(self.full, subset, seed)
        return self.by_seed[seed]


def run_bench(bench: BenchConfig, oracle_factory: OracleFactory, progress: bool = True,
              dataset: Dataset | None = None) -> BenchResult:
    """Run every (strategy, seed) pair not yet finished, then write the report into bench.out.

    Under torchrun every rank walks the same grid: rank 0 trains, writes and reports, and all ranks
    score each query's shard (al_engine.distributed).
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    bench.validate()
    start = time.perf_counter()
    owned = not is_initialised()
    context = init_distributed(resolve_device(bench.base.device))
    try:
        out = Path(bench.out)
        # seed-major: a bench stopped early holds whole seeds, every strategy paired with random
        grid = [(spec, seed) for seed in bench.seeds for spec in bench.strategies]
        finished_before = None
        if context.is_main:
            out.mkdir(parents=True, exist_ok=True)
            finished_before = {(spec.label, seed) for spec, seed in grid if is_finished(bench.run_config(spec, seed))}
        finished_before = broadcast_from_main(finished_before, context)  # rank 0's files decide for all
        todo = [(spec, seed) for spec, seed in grid if (spec.label, seed) not in finished_before]
        failures: list[dict] = []
        bar = tqdm(total=len(grid), initial=len(finished_before), desc="bench", unit="run",
                   disable=not (progress and context.is_main))

        def record_failure(spec: StrategySpec, seed: int, error: Exception) -> None:
            if isinstance(error, ConfigError) or not bench.keep_going:
                raise error  # a setting wrong for one run is wrong for the grid; a bug stops it unless asked
            failures.append({"strategy": spec.label, "seed": seed, "error": f"{type(error).__name__}: {error}"})
            sys.stderr.write(f"bench: {spec.label} seed {seed} failed: {type(error).__name__}: {error}\n")

        if bench.workers > 1:
            if context.active:
                raise ConfigError("--workers runs whole runs in parallel on one machine; under torchrun "
                                  "the ranks already share each run's scoring, so leave --workers at 1")
            _run_in_workers(bench, todo, oracle_factory, dataset, bar, record_failure)
        else:
            datasets = _DatasetCache(bench.base, dataset)
            for spec, seed in todo:
                bar.set_postfix_str(f"{spec.label} seed {seed}")
                try:
                    run_or_serve(bench.run_config(spec, seed), oracle_factory, context,
                                 progress=progress and context.is_main, dataset=datasets.for_seed(seed))
                except Exception as error:
                    record_failure(spec, seed, error)
                bar.update(1)
        bar.close()
        wall_s = time.perf_counter() - start
        if not context.is_main:
            return BenchResult({}, 0, len(finished_before), failures, wall_s, is_main=False)
        log = _update_bench_log(bench, wall_s, len(finished_before), failures)
        summary, finished = write_bench_report(bench, log)
        return BenchResult(summary, finished, len(finished_before), failures, wall_s)
    finally:
        if owned and context.active:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Parallel runs: each (strategy, seed) is independent, so whole runs go to worker processes

_worker_datasets: _DatasetCache | None = None  # one per worker process, loaded on its first run


def _init_worker(base: RunConfig, dataset: Dataset | None, threads: int) -> None:
    global _worker_datasets
    import torch

    torch.set_num_threads(threads)
    _worker_datasets = _DatasetCache(base, dataset)


def _run_in_worker(config: RunConfig, oracle_factory: OracleFactory) -> None:
    run_simulation(config, oracle_factory, progress=False, dataset=_worker_datasets.for_seed(config.seed))


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared equally, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def _run_in_workers(bench: BenchConfig, todo: list, oracle_factory: OracleFactory, dataset: Dataset | None,
                    bar, record_failure) -> None:
    """Run `todo` on bench.workers processes (spawned: a fresh interpreter each, safe with torch threads).

    Small networks on a CPU use two threads poorly (one batch of 32 is too little work to split), so
    two one-thread runs side by side finish more runs per hour than one two-thread run.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=bench.workers, mp_context=context, initializer=_init_worker,
                             initargs=(bench.base, dataset,
                                       bench.worker_threads or worker_threads(bench.workers))) as pool:
        futures = {pool.submit(_run_in_worker, bench.run_config(spec, seed), oracle_factory): (spec, seed)
                   for spec, seed in todo}
        try:
            for future in as_completed(futures):
                spec, seed = futures[future]
                bar.set_postfix_str(f"{spec.label} seed {seed} done")
                try:
                    future.result()
                except Exception as error:
                    record_failure(spec, seed, error)
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()  # runs not started yet; a run in progress resumes next time
            raise


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def clock_seconds(invocations: list[dict]) -> float:
    """Wall-clock seconds during which at least one invocation ran.

    Invocations run one after another add up; invocations run at once on the same folder (two
    bench processes on disjoint strategies) count their shared time once. An invocation spans
    [finished - wall_s, finished]: `finished_unix` where recorded, else `finished_at` (to the second).
    """
    spans = []
    for item in invocations:
        end = item.get("finished_unix")
        if end is None:
            end = calendar.timegm(time.strptime(item["finished_at"], TIME_FORMAT))
        spans.append((float(end) - float(item["wall_s"]), float(end)))
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _wall_times(log: dict) -> None:
    log["wall_s_summed"] = round(sum(item["wall_s"] for item in log["invocations"]), 3)
    log["wall_s_total"] = round(clock_seconds(log["invocations"]), 3)


def _update_bench_log(bench: BenchConfig, wall_s: float, skipped: int, failures: list[dict]) -> dict:
    """bench.json: the grid, and one record per invocation (wall time adds up over resumes)."""
    path = Path(bench.out) / "bench.json"
    log = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    settings = dataclasses.asdict(bench.base)
    for key in ("strategy", "strategy_options", "seed", "out"):
        settings.pop(key, None)
    log.update({"strategies": [spec.label for spec in bench.strategies], "seeds": list(bench.seeds),
                "preset": bench.preset, "settings": settings})
    now = time.time()
    log["invocations"].append({"finished_at": time.strftime(TIME_FORMAT, time.gmtime(now)),
                               "finished_unix": round(now, 3), "wall_s": round(wall_s, 3), "runs_skipped": skipped,
                               "failures": failures})
    _wall_times(log)
    path.write_text(json.dumps(log, indent=2) + "\n")
    return log


def collect_curves(bench: BenchConfig) -> list[RunCurve]:
    """The learning curves of every finished run of the grid (unfinished ones are left out)."""
    curves = []
    for spec in bench.strategies:
        for seed in bench.seeds:
            config = bench.run_config(spec, seed)
            if not is_finished(config):
                continue
            metrics = [row for row in read_jsonl(RunFiles(config.out).metrics) if row["round"] <= config.rounds]
            curves.append(RunCurve.from_metrics(spec.label, seed, metrics))
    return curves


def write_bench_report(bench: BenchConfig, log: dict) -> tuple[dict, int]:
    """Write summary.json, summary.md and the plots from the finished runs; returns (summary, runs)."""
    base = bench.base
    curves = collect_curves(bench)
    order = [spec.label for spec in bench.strategies]
    if BASELINE in order:  # the baseline first, so its colour is the same in every plot
        order.remove(BASELINE)
        order.insert(0, BASELINE)
    grid_size = len(bench.strategies) * len(bench.seeds)
    notes = [
        f"dataset `{base.dataset}`" + (f" (subset {base.subset})" if base.subset else "") +
        f", model `{base.model}`, training preset `{base.train_preset}`" +
        (f" (epochs ≤ {base.epochs})" if base.epochs else ""),
        f"{base.initial} initial labels, {base.rounds} rounds of {base.query_size}; seeds {bench.seeds}",
        f"{len(curves)} of {grid_size} runs finished; bench wall time {log['wall_s_total']:.1f} s"
        + (f" over {len(log['invocations'])} invocations (clock time while any ran; summed"
           f" {log['wall_s_summed']:.1f} s)" if len(log["invocations"]) > 1 else ""),
    ]
    if bench.preset:
        notes.insert(0, f"preset `{bench.preset}`")
    files = write_report(curves, bench.out, order=order, title="Benchmark summary", notes=notes)
    summary = json.loads(files.summary_json.read_text())
    return summary, len(curves)


def rewrite_report(bench: BenchConfig) -> int:
    """Run nothing: write the summary and plots again from the runs already finished; returns their count."""
    bench.validate()
    path = Path(bench.out) / "bench.json"
    log = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    _wall_times(log)
    return write_bench_report(bench, log)[1]
