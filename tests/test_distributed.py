"""Sharded scoring: the merge is exact by hand, and 2 processes pick what 1 process picks."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from al_engine.bench import BenchConfig, StrategySpec, run_bench
from al_engine.data import Pool, load_dataset, take_subset
from al_engine.config import RunConfig
from al_engine.runfiles import read_jsonl
from al_engine.distributed import merge_top_k, shard_bounds, sharded_query
from al_engine.models import build_model
from al_engine.strategies import QueryState, get_strategy, strategy_names, top_k
from al_engine.train import TrainConfig, train_classifier
from oracle.simulated import SimulatedOracle

ROOT = Path(__file__).resolve().parent.parent
# One of each plan: per-item scores, one random stream, and global views (when registered).
STRATEGIES = ["entropy", "margin", "least-confidence", "random", "kcenter-greedy", "badge", "bald", "kmeans",
              "typiclust"]
QUERY_SIZE = 12
# Lookahead distils a student each round: rank 0 alone must do it, and the picks must not change.
LOOKAHEAD_OPTIONS = {"mode": "full-fast", "candidate_size": 60, "eval_size": 100, "distill_epochs": 3}


@pytest.fixture(autouse=True)
def keep_thread_count():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_shards_cover_the_pool_once_and_differ_by_at_most_one():
    for count in (0, 1, 7, 10, 1001):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(count, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_merge_by_hand_breaks_ties_by_global_position():
    # Shard 0 holds positions 0-2, shard 1 positions 3-5; scores 0.9 tie at positions 2 and 3.
    picks = merge_top_k([(np.array([2, 0]), np.array([0.9, 0.5])), (np.array([3, 5]), np.array([0.9, 0.8]))], 3)
    assert picks[0].tolist() == [2, 3, 5]
    assert picks[1].tolist() == [0.9, 0.9, 0.8]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_merging_shard_top_ks_equals_the_global_top_k(world):
    rng = np.random.default_rng(world)
    scores = rng.integers(0, 20, size=203).astype(float)  # many ties on purpose
    k = 17
    shards = []
    for rank in range(world):
        start, stop = shard_bounds(len(scores), rank, world)
        local = top_k(scores[start:stop], min(k, stop - start))
        shards.append((start + local, scores[start:stop][local]))
    positions, merged = merge_top_k(shards, k)
    assert positions.tolist() == top_k(scores, k).tolist()
    assert merged.tolist() == scores[top_k(scores, k)].tolist()


# Strategies whose selection reads the embeddings of the whole unlabeled pool.
GLOBAL_VIEW_STRATEGIES = {"kcenter-greedy", "coreset", "kmeans", "badge", "typiclust", "bald",
                          "least-confidence-dropout", "margin-dropout", "entropy-dropout"}


def test_plans_follow_what_each_strategy_reads():
    assert get_strategy("entropy").sharding_plan() == ("shard", ())
    assert get_strategy("adversarial-bim").sharding_plan() == ("shard", ())
    assert get_strategy("random").sharding_plan() == ("main", ())
    for name in GLOBAL_VIEW_STRATEGIES:
        assert get_strategy(name).sharding_plan() == ("gather", ("unlabeled_embeddings",)), name
    assert get_strategy("lookahead", mode="exact").sharding_plan()[0] == "shard"
    assert get_strategy("lookahead", mode="full-fast").sharding_plan()[0] == "shard"
    assert get_strategy("lookahead", mode="last-layer").sharding_plan()[0] == "main"
    assert get_strategy("lookahead", mode="full-fast", batch_aware="true").sharding_plan()[0] == "main"


def test_the_sharding_module_names_no_strategy():
    source = (ROOT / "al_engine" / "distributed.py").read_text()
    for name in strategy_names():
        assert f'"{name}"' not in source, name


def test_one_process_is_plain_query():
    dataset = take_subset(load_dataset("digits"), 120, seed=0)
    pool = Pool(120)
    pool.add_labels(np.arange(10), dataset.train_labels[:10].numpy(), round_index=-1)
    model = build_model("small-cnn", dataset.image_shape, 10)
    state = QueryState(model=model.eval(), dataset=dataset, pool=pool, device=torch.device("cpu"))
    expected = get_strategy("margin").query(state, 5)
    got = sharded_query(get_strategy("margin"), QueryState(model=model, dataset=dataset, pool=pool,
                                                           device=torch.device("cpu")), 5)
    assert got[0].tolist() == expected[0].tolist()


# --------------------------------------------------------------------------------------------
# Two real processes (gloo) against one


def _problem(weights_path=None):
    """A small pool, 40 labels, and a model trained for two epochs (or loaded from weights_path)."""
    dataset = take_subset(load_dataset("digits"), 500, seed=1)
    pool = Pool(len(dataset.train_labels))
    initial = pool.initial_indices(40, 0)
    pool.add_labels(initial, dataset.train_labels[initial].numpy(), round_index=-1)
    torch.manual_seed(0)
    model = build_model("small-cnn", dataset.image_shape, dataset.num_classes)
    if weights_path is None:
        train_classifier(model, dataset, initial, pool.labels[initial], TrainConfig(max_epochs=2, fixed_epochs=True),
                         torch.device("cpu"))
    else:
        model.load_state_dict(torch.load(weights_path))
    return dataset, pool, model.eval()


def _state(dataset, pool, model):
    return QueryState(model=model, dataset=dataset, pool=pool, device=torch.device("cpu"), round_index=1, seed=3)


def _worker(rank, world, folder, strategies):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        dataset, pool, model = _problem(f"{folder}/weights.pt")
        if rank != 0:  # a different model on the other rank: sharded_query must broadcast rank 0's
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(1.0)
        results = {}
        for name in strategies:
            picks, scores = sharded_query(get_strategy(name), _state(dataset, pool, model), QUERY_SIZE)
            results[name] = {"picks": picks.tolist(), "scores": scores.tolist()}
        if "lookahead" in strategy_names():
            from al_engine.strategies import lookahead_round

            distil, calls = lookahead_round.distill_student, []
            lookahead_round.distill_student = lambda *args, **kwargs: calls.append(1) or distil(*args, **kwargs)
            strategy = get_strategy("lookahead", **LOOKAHEAD_OPTIONS)
            picks, scores = sharded_query(strategy, _state(dataset, pool, model), QUERY_SIZE)
            results["lookahead"] = {"picks": picks.tolist(), "scores": scores.tolist(), "distillations": len(calls),
                                    "lr": strategy.diagnostics["lr"]}
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump(results, handle)
        # A whole bench on the same group: rank 0 runs and writes, both ranks score.
        result = run_bench(_tiny_bench(f"{folder}/bench-two"), SimulatedOracle.for_run, progress=False,
                           dataset=dataset)
        assert result.is_main == (rank == 0)
    finally:
        dist.destroy_process_group()


def _tiny_bench(out):
    base = RunConfig(dataset="digits", model="small-cnn", initial=20, query_size=10, rounds=2, epochs=2,
                     train_preset="dal", device="cpu")
    return BenchConfig(base=base, strategies=[StrategySpec.parse(s) for s in ("entropy", "kcenter-greedy")
                                              if s.split(":")[0] in strategy_names()],
                       out=Path(out), seeds=[0])


def test_two_processes_pick_what_one_process_picks(tmp_path):
    torch.set_num_threads(1)
    strategies = [name for name in STRATEGIES if name in strategy_names()]
    dataset, pool, model = _problem()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    expected = {}
    for name in strategies:
        picks, scores = get_strategy(name).query(_state(dataset, pool, model), QUERY_SIZE)
        expected[name] = {"picks": picks.tolist(), "scores": scores.tolist()}
    if "lookahead" in strategy_names():
        strategy = get_strategy("lookahead", **LOOKAHEAD_OPTIONS)
        picks, scores = strategy.query(_state(dataset, pool, model), QUERY_SIZE)
        expected["lookahead"] = {"picks": picks.tolist(), "scores": scores.tolist(), "lr": strategy.diagnostics["lr"]}

    mp.start_processes(_worker, args=(2, str(tmp_path), strategies), nprocs=2, join=True, start_method="spawn")

    bench = _tiny_bench(tmp_path / "bench-one")
    run_bench(bench, SimulatedOracle.for_run, progress=False, dataset=dataset)
    for spec in bench.strategies:
        for name in ("queries.jsonl", "metrics.jsonl"):
            one = read_jsonl(tmp_path / "bench-one" / spec.folder / "seed-0" / name)
            two = read_jsonl(tmp_path / "bench-two" / spec.folder / "seed-0" / name)
            assert [r.get("indices", r.get("accuracy")) for r in one] == [r.get("indices", r.get("accuracy")) for r in two]
    summaries = [json.loads((tmp_path / f / "summary.json").read_text()) for f in ("bench-one", "bench-two")]
    assert {k: v["aulc_mean"] for k, v in summaries[0].items()} == {k: v["aulc_mean"] for k, v in summaries[1].items()}

    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in expected:
            assert got[name]["picks"] == expected[name]["picks"], f"{name} on rank {rank}"
            np.testing.assert_allclose(got[name]["scores"], expected[name]["scores"], rtol=1e-5, atol=1e-7)
        if "lookahead" in expected:  # one distillation in all, on rank 0; the other rank took its student
            assert got["lookahead"]["distillations"] == (1 if rank == 0 else 0)
            assert got["lookahead"]["lr"] == pytest.approx(expected["lookahead"]["lr"])


def test_torchrun_run_matches_one_process(tmp_path):
    """A whole simulated run under torchrun (2 ranks, gloo) writes what one process writes."""
    import app
    from al_engine.runfiles import read_jsonl

    arguments = ["--oracle", "simulated", "--dataset", "digits", "--subset", "400", "--strategy", "entropy",
                 "--initial", "30", "--query-size", "15", "--rounds", "2", "--epochs", "3", "--device", "cpu",
                 "--no-progress"]
    torch.set_num_threads(1)
    assert app.main([*arguments, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "app.py", *arguments, "--out", str(tmp_path / "two")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("done: round 2") == 1  # rank 0 reports; the worker stays quiet
    for name in ("queries.jsonl", "metrics.jsonl"):
        one, two = read_jsonl(tmp_path / "one" / name), read_jsonl(tmp_path / "two" / name)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            if name == "queries.jsonl":
                assert a["indices"] == b["indices"]
            else:
                assert (a["labeled"], a["accuracy"]) == (b["labeled"], b["accuracy"])
    assert not (tmp_path / "two" / "rank1").exists()


def _scoring_job_main():
    spec = importlib.util.spec_from_file_location("scoring_job", ROOT / "benchmarks" / "scoring_job.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is built
    spec.loader.exec_module(module)
    return module.main


def test_scoring_job_in_one_process(tmp_path):
    main = _scoring_job_main()
    assert main(["--strategy", "margin", "--subset", "300", "--initial", "20", "--epochs", "1", "--query-size", "7",
                 "--threads", "1", "--save-weights", str(tmp_path / "w.pt"), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["world_size"] == 1 and result["plan"] == "shard" and len(result["picks"]) == 7
    assert len(set(result["picks"])) == 7 and (tmp_path / "w.pt").stat().st_size > 0
    again = main(["--strategy", "margin", "--subset", "300", "--initial", "20", "--query-size", "7", "--threads", "1",
                  "--weights", str(tmp_path / "w.pt"), "--json", str(tmp_path / "r2.json")])
    assert again == 0 and json.loads((tmp_path / "r2.json").read_text())["picks"] == result["picks"]


def test_scoring_job_bad_strategy_is_one_line(capsys):
    main = _scoring_job_main()
    assert main(["--strategy", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and len(err.strip().splitlines()) == 1
