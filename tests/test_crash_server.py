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
    report = crash_cycles(tmp_path, cycles=CYCLES, annotators=4, kill_after_s=(0.1, 2.0))
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}))
    assert report["problems"] == []
    assert report["cycles_with_all_acked_kept"] == CYCLES
    assert report["unexpected_count"] == 0, report["unexpected"]
    assert report["acknowledged"] >= 40  # the clients really answered between kills
    assert report["stored"] >= report["acknowledged"]
    assert report["rounds_reached"] >= 3  # the engine resumed and moved on after kills


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
