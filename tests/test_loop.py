"""The round loop: run files as DESIGN.md says, pool invariants, and resume == uninterrupted."""
import json

from pathlib import Path

import numpy as np
import pytest

from al_engine.engine import Engine
from al_engine.errors import ConfigError
from al_engine.loop import run_simulation
from al_engine.runfiles import RunFiles, read_jsonl
from oracle.simulated import SimulatedOracle, noisy_answers


def test_run_writes_the_contract_files(make_run_config):
    config = make_run_config(rounds=2)
    metrics = run_simulation(config, SimulatedOracle.for_run, progress=False)
    files = RunFiles(config.out)
    saved = json.loads(files.config.read_text())
    assert saved["settings"]["strategy"] == "entropy"
    assert saved["dataset"]["pool_size"] == 1442 and saved["dataset"]["classes"][0] == "0"
    assert "torch" in saved["versions"]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert [m["labeled"] for m in metrics] == [30, 50, 70]
    for record in metrics:
        assert set(record) >= {"round", "labeled", "accuracy", "train_s", "query_s", "strategy", "seed"}
        assert 0.0 <= record["accuracy"] <= 1.0
    queries = read_jsonl(files.queries)
    assert [q["round"] for q in queries] == [0, 1]
    state = json.loads(files.state.read_text())
    picked = [i for q in queries for i in q["indices"]]
    assert len(picked) == len(set(picked)) == 40
    assert all(len(q["scores"]) == len(q["indices"]) == 20 for q in queries)
    # Queries never return an item that was labeled before them.
    rounds = dict(zip(state["pool"]["indices"], state["pool"]["rounds"]))
    for query in queries:
        assert all(rounds[i] == query["round"] for i in query["indices"])
    # Entropy's scores come out in pick order: non-increasing.
    assert all((np.diff(q["scores"]) <= 1e-12).all() for q in queries)


def test_resume_gives_the_same_results_as_an_uninterrupted_run(tmp_path, make_run_config):
    straight = make_run_config(rounds=3, out=str(tmp_path / "straight"))
    run_simulation(straight, SimulatedOracle.for_run, progress=False)
    # A run that stopped after two rounds (as if killed), then started again on the same folder.
    resumed = make_run_config(rounds=1, out=str(tmp_path / "resumed"))
    run_simulation(resumed, SimulatedOracle.for_run, progress=False)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 2, "labeled": 7')  # a line cut short by a kill
    resumed.rounds = 3
    run_simulation(resumed, SimulatedOracle.for_run, progress=False)
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["round"] for m in b] == [0, 1, 2, 3]
    assert [(m["labeled"], m["accuracy"]) for m in a] == [(m["labeled"], m["accuracy"]) for m in b]
    assert read_jsonl(tmp_path / "straight" / "queries.jsonl") == read_jsonl(tmp_path / "resumed" / "queries.jsonl")


def test_resume_refuses_a_folder_with_other_settings(make_run_config):
    config = make_run_config(rounds=0)
    run_simulation(config, SimulatedOracle.for_run, progress=False)
    config.strategy = "random"
    with pytest.raises(ConfigError, match="other settings"):
        run_simulation(config, SimulatedOracle.for_run, progress=False)


def test_a_plan_larger_than_the_pool_is_one_error_at_start(make_run_config, tmp_path):
    # 30 + 3 x 20 = 90 items from a pool of 60: refused before any training, with the rounds that fit
    config = make_run_config(subset=60, initial=30, query_size=20, rounds=3, strategy="random")
    with pytest.raises(ConfigError, match=r"needs 90 items .* pool has 60; use --rounds 1"):
        run_simulation(config, SimulatedOracle.for_run, progress=False)
    assert not (Path(config.out) / "metrics.jsonl").exists()


def test_a_plan_that_exactly_fills_the_pool_runs_every_round(make_run_config):
    config = make_run_config(subset=60, initial=20, query_size=20, rounds=2, strategy="random")
    metrics = run_simulation(config, SimulatedOracle.for_run, progress=False)
    assert [m["labeled"] for m in metrics] == [20, 40, 60]


def test_engine_rejects_bad_settings(make_run_config):
    with pytest.raises(ConfigError, match="query-size"):
        Engine(make_run_config(query_size=0))
    with pytest.raises(ConfigError, match="unknown strategy"):
        Engine(make_run_config(strategy="psychic"))
    with pytest.raises(ConfigError, match="larger than the pool"):
        Engine(make_run_config(initial=5000)).initial_indices()


def test_noisy_answers_flip_at_the_asked_rate_and_never_to_the_true_class():
    labels = np.arange(20000) % 10
    indices = np.arange(20000)
    answers = noisy_answers(labels, indices, 0.3, 10, seed=0, round_index=0)
    wrong = answers != labels
    assert 0.28 < wrong.mean() < 0.32
    assert ((answers >= 0) & (answers < 10)).all()
    assert np.array_equal(answers, noisy_answers(labels, indices, 0.3, 10, seed=0, round_index=0))
    assert np.array_equal(noisy_answers(labels, indices, 0.0, 10, 0, 0), labels)


def test_simulated_oracle_answers_from_ground_truth(digits):
    oracle = SimulatedOracle(digits.train_labels.numpy(), 10)
    assert oracle.answer(np.array([3, 1]), 0).tolist() == digits.train_labels[[3, 1]].tolist()
    with pytest.raises(ConfigError):
        SimulatedOracle(np.array([0, -1]), 2)
    with pytest.raises(ConfigError):
        SimulatedOracle(np.array([0, 1]), 2, noise=1.5)


@pytest.mark.parametrize("batch_aware", [False, True])
def test_queries_carry_what_the_strategy_measured_about_itself_as_strict_json(make_run_config, batch_aware):
    config = make_run_config(rounds=2, strategy="lookahead",
                             strategy_options={"mode": "last-layer", "eval_size": 200, "distill_epochs": 2,
                                               "batch_aware": batch_aware})
    run_simulation(config, SimulatedOracle.for_run, progress=False)
    text = RunFiles(config.out).queries.read_text()
    assert "NaN" not in text and "Infinity" not in text
    queries = [json.loads(line) for line in text.splitlines()]
    for query in queries:
        diagnostics = query["diagnostics"]
        assert 0.0 <= diagnostics["helped_fraction"] <= 1.0
        assert diagnostics["lr"] > 0 and diagnostics["evaluation"] == 200


def test_strategies_without_diagnostics_write_plain_query_lines(make_run_config):
    config = make_run_config(rounds=1)
    run_simulation(config, SimulatedOracle.for_run, progress=False)
    assert "diagnostics" not in read_jsonl(RunFiles(config.out).queries)[0]
