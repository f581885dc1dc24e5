"""Crash safety of the annotator: SIGKILL a real server while annotators answer, and kill the engine
mid-training or mid-query; no acknowledged answer is lost, none is stored twice, no batch is posted twice.

Servers are `app.main(...)` processes on 127.0.0.1 started by tests/server_harness.py (forked from a
launcher that imported app.py once; benchmarks/reliability.py runs more cycles as fresh `python app.py`).
"""
from __future__ import annotations

import json

import pytest

from server_harness import (TOKEN, Launcher, add_annotators, call, crash_cycles, label_for, read_db,
                            round_invariants, start_server)

CYCLES = 20  # kill/restart cycles in the test (bounded: about 3 s each on two cores)


def test_killing_the_server_twenty_times_keeps_every_acknowledged_answer(tmp_path):
    report = crash_cycles(tmp_path, cycles=CYCLES, annotators=4, kill_after_s=(0.05, 1.5), think_s=0.05)
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}))
    assert report["problems"] == []
    assert report["cycles_with_all_acked_kept"] == CYCLES
    assert report["unexpected_count"] == 0, report["unexpected"]
    assert report["acknowledged"] >= 40  # the clients really answered between kills
    assert report["stored"] >= report["acknowledged"]
    assert report["rounds_reached"] >= 3  # the engine resumed and moved on after kills
    # kills landed while answers were coming in (about 3 in 4; the rest mostly while the engine trained,
    # which the engine-crash tests below hit deterministically, so that share is printed, not asserted)
    assert report["killed_in_state"].get("labeling", 0) >= 5


def answer_round(server, round_index: int) -> int:
    answered = 0
    while True:
        status, body = call(server.base, "/api/tasks/next", TOKEN)
        if status == 204:
            return answered
        assert status == 200, body
        status, body = call(server.base, "/api/annotations", TOKEN,
                            {"item_id": body["item_id"], "label": label_for(body["item_id"])})
        assert status == 201, body
        answered += 1


def wait_for_round(server, round_index: int, timeout: float = 90.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.status()
        if status["round"] == round_index and status["round_state"] == "labeling":
            return status
        time.sleep(0.1)
    raise AssertionError(f"round {round_index} was not posted: {status}\n{server.process.log_tail()}")


SETTINGS = {"initial": 20, "query_size": 10, "rounds": 3, "epochs": 2, "strategy": "entropy"}


@pytest.fixture(scope="module")
def launcher():
    with Launcher("fork") as started:
        yield started


@pytest.fixture(scope="module")
def uninterrupted_round_1(launcher, tmp_path_factory):
    """Round 1's batch when nothing crashes: what every crashed run must post, once."""
    work = tmp_path_factory.mktemp("reference")
    server = start_server(launcher, work / "db.sqlite", work, **SETTINGS)
    try:
        server.wait_ready()
        answer_round(server, 0)
        wait_for_round(server, 1)
    finally:
        server.process.kill()
    return [item for round_index, item, _ in read_db(work / "db.sqlite")["batches"] if round_index == 1]


@pytest.mark.parametrize("stage", ["train", "query", "posted"])
def test_engine_killed_mid_round_restarts_it_and_posts_the_batch_once(stage, launcher, uninterrupted_round_1,
                                                                     tmp_path):
    db = tmp_path / "db.sqlite"
    add_annotators(db, 1)  # the database exists before the first start, as after `app.py users add`
    server = start_server(launcher, db, tmp_path, env={"ANNOTATOR_CRASH_AT": stage}, **SETTINGS)
    server.wait_ready()
    assert answer_round(server, 0) == SETTINGS["initial"]
    assert server.process.wait_dead(90), f"the crash hook {stage!r} did not fire:\n{server.process.log_tail()}"

    crashed = read_db(db)
    states = [state for _, state, _ in crashed["rounds"]]
    assert states == (["trained", "labeling"] if stage == "posted" else ["closed"])  # nothing half-written
    assert len(crashed["answers"]) == SETTINGS["initial"]

    for restart in range(2 if stage == "posted" else 1):  # a second restart must find nothing to redo
        server = start_server(launcher, db, tmp_path, **SETTINGS)
        server.wait_ready()
        status = wait_for_round(server, 1)
        server.process.kill()
        resumed = read_db(db)
        assert round_invariants(resumed, SETTINGS["initial"], SETTINGS["query_size"]) == []
        assert [state for _, state, _ in resumed["rounds"]] == ["trained", "labeling"], restart
        assert status["batch_remaining"] == SETTINGS["query_size"]
        round_1 = [item for round_index, item, _ in resumed["batches"] if round_index == 1]
        assert round_1 == uninterrupted_round_1  # the same seeded training and query as without a crash
        assert sorted(resumed["answers"]) == sorted(crashed["answers"])


def test_a_restart_keeps_the_strategy_state_and_the_warm_start_model(tmp_path, digits):
    """RND's predictor (fine-tuned across rounds) and --warm-start's weights are stored with each trained
    round: a run restarted between rounds posts the same next batch as one that never stopped."""
    import torch

    from al_engine.config import RunConfig
    from annotator import create_app

    config = RunConfig(dataset="digits", strategy="rnd", strategy_options={"epochs": 1}, warm_start=True,
                       initial=10, query_size=5, rounds=3, epochs=1, seed=0, device="cpu")

    def start(db):
        return create_app({"DATABASE": str(db), "RUN_CONFIG": config, "DATASET": digits, "ADMIN_TOKEN": TOKEN})

    def answer_open_round(app):
        client = app.test_client()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while (response := client.get("/api/tasks/next", headers=headers)).status_code == 200:
            item = response.get_json()["item_id"]
            label = int(digits.train_labels[item])
            assert client.post("/api/annotations", json={"item_id": item, "label": label}, headers=headers).status_code == 201
        app.extensions["annotator"].driver.run_until_idle()

    batches = {}
    for name, restart in (("uninterrupted", False), ("restarted", True)):
        db = tmp_path / f"{name}.db"
        app = start(db)
        answer_open_round(app)  # round 0 -> model 1, RND predictor trained once, round 1 posted
        if restart:
            trained = app.extensions["annotator"].driver.engine
            app = start(db)  # a new process would do exactly this: a fresh Engine and driver on the same database
            restored = app.extensions["annotator"].driver.engine
            assert restored.strategy.state_dict() == trained.strategy.state_dict()
            assert all(torch.equal(a, b) for a, b in zip(restored.model.state_dict().values(),
                                                          trained.model.state_dict().values()))
        answer_open_round(app)  # round 1 -> warm-started model 2, predictor fine-tuned again, round 2 posted
        batches[name] = [item for r, item, _ in read_db(db)["batches"] if r == 2]
    assert len(batches["uninterrupted"]) == 5
    assert batches["restarted"] == batches["uninterrupted"]
