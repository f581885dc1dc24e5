"""The JSON API through Flask's test client: sign-in, leases, answers, undo, images, export, errors."""
from __future__ import annotations

import csv
import io
import json

import pytest

from al_engine.data import load_dataset
from al_engine.config import RunConfig
from annotator import create_app
from annotator.db import LEASE_SECONDS, AnnotationDB

TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_config(**overrides) -> RunConfig:
    settings = dict(dataset="digits", initial=10, query_size=5, rounds=2, epochs=2, seed=0, device="cpu")
    settings.update(overrides)
    return RunConfig(**settings)


@pytest.fixture
def app(tmp_path, digits):
    return create_app({"DATABASE": str(tmp_path / "annotations.db"), "RUN_CONFIG": small_config(),
                       "DATASET": digits, "ADMIN_TOKEN": TOKEN})


@pytest.fixture
def client(app):
    return app.test_client()


def add_user(app, name, role="annotator") -> dict:
    db = AnnotationDB(app.extensions["annotator"].database)
    try:
        return {"Authorization": f"Bearer {db.add_user(name, role)}"}
    finally:
        db.close()


def answer_all(client, headers, label=1) -> list[int]:
    answered = []
    while (response := client.get("/api/tasks/next", headers=headers)).status_code == 200:
        item = response.get_json()["item_id"]
        assert client.post("/api/annotations", json={"item_id": item, "label": label}, headers=headers).status_code == 201
        answered.append(item)
    assert response.status_code == 204
    return answered


def test_status_has_the_contract_keys_and_the_first_random_batch(client, digits):
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert {"round", "labeled", "unlabeled", "batch_size", "batch_remaining", "engine"} <= set(status)
    assert status["round"] == 0 and status["batch_size"] == 10 and status["batch_remaining"] == 10
    assert status["labeled"] == 0 and status["unlabeled"] == len(digits.train_labels)


def test_the_api_wants_a_valid_token(client):
    assert client.get("/api/status").status_code == 401
    response = client.get("/api/status", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and "error" in response.get_json()
    assert client.get("/api/tasks/next", headers={"Authorization": "Basic abc"}).status_code == 401


def test_next_task_leases_an_item_and_serves_its_image(client):
    task = client.get("/api/tasks/next", headers=ADMIN).get_json()
    assert set(task) >= {"item_id", "image_url"}
    image = client.get(task["image_url"], headers=ADMIN)
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
    # The same annotator asking again gets the item they already hold, not a new one.
    assert client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"] == task["item_id"]


def test_images_only_for_items_in_a_batch(client, app):
    batch = {row[0] for row in AnnotationDB(app.extensions["annotator"].database).db.execute(
        "select item_id from batch_items").fetchall()}
    outside = next(i for i in range(2000) if i not in batch)
    assert client.get(f"/api/items/{outside}/image.png", headers=ADMIN).status_code == 404
    assert client.get("/api/items/999999/image.png", headers=ADMIN).status_code == 404
    assert client.get("/api/items/-1/image.png", headers=ADMIN).status_code == 404
    assert client.get("/api/items/..%2f..%2fetc%2fpasswd/image.png", headers=ADMIN).status_code == 404


def test_a_lease_keeps_an_item_from_other_annotators_until_it_expires(client, app):
    alice, bob = add_user(app, "alice"), add_user(app, "bob")
    first = client.get("/api/tasks/next", headers=alice).get_json()["item_id"]
    second = client.get("/api/tasks/next", headers=bob).get_json()["item_id"]
    assert first != second
    db = AnnotationDB(app.extensions["annotator"].database)
    bob_id = db.user_for_token(bob["Authorization"].split()[1]).id
    later = db.lease_tasks(bob_id, count=20, now=__import__("time").time() + LEASE_SECONDS + 1)
    assert first in later  # after 10 minutes alice's lease has lapsed and bob may take the item
    db.close()


def test_tasks_with_count_leases_several_for_preloading(client):
    data = client.get("/api/tasks?count=4", headers=ADMIN).get_json()
    assert len(data["tasks"]) == 4 and len({t["item_id"] for t in data["tasks"]}) == 4
    assert client.get("/api/tasks?count=0", headers=ADMIN).status_code == 400
    assert client.get("/api/tasks?count=abc", headers=ADMIN).status_code == 400


def test_same_answer_twice_is_harmless_and_a_different_one_replaces_it(client, app):
    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    outcomes = [client.post("/api/annotations", json={"item_id": item, "label": label}, headers=ADMIN)
                for label in (3, 3, 5)]
    assert [r.status_code for r in outcomes] == [201, 201, 201]
    assert [r.get_json()["outcome"] for r in outcomes] == ["created", "unchanged", "replaced"]
    answers = AnnotationDB(app.extensions["annotator"].database).answers_of(item)
    assert [(a["annotator"], a["label"]) for a in answers] == [("owner", 5)]


def test_answers_from_different_annotators_are_all_kept(client, app):
    alice, bob = add_user(app, "alice"), add_user(app, "bob")
    item = client.get("/api/tasks/next", headers=alice).get_json()["item_id"]
    client.post("/api/annotations", json={"item_id": item, "label": 2}, headers=alice)
    client.post("/api/annotations", json={"item_id": item, "label": 7}, headers=bob)
    answers = AnnotationDB(app.extensions["annotator"].database).answers_of(item)
    assert sorted((a["annotator"], a["label"]) for a in answers) == [("alice", 2), ("bob", 7)]


def test_a_label_may_be_a_class_name(client):
    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    response = client.post("/api/annotations", json={"item_id": item, "label": "7"}, headers=ADMIN)
    assert response.status_code == 201 and response.get_json()["label"] == 7


@pytest.mark.parametrize("body, status", [
    ({"item_id": 0, "label": 99}, 400),
    ({"item_id": 0, "label": -1}, 400),
    ({"item_id": 0, "label": True}, 400),
    ({"item_id": 0, "label": "cat"}, 400),
    ({"item_id": "0", "label": 1}, 400),
    ({"item_id": -3, "label": 1}, 400),
    ({"label": 1}, 400),
    ({"item_id": 999999, "label": 1}, 404),
    ([1, 2], 400),
])
def test_bad_answers_get_a_4xx_json_error(client, body, status):
    response = client.post("/api/annotations", json=body, headers=ADMIN)
    assert response.status_code == status
    assert response.get_json()["error"]


def test_a_body_that_is_not_json_is_a_400(client):
    response = client.post("/api/annotations", data="item_id=1", headers=ADMIN,
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400 and "JSON" in response.get_json()["error"]


def test_undo_withdraws_my_answer_and_gives_the_item_back(client):
    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    client.post("/api/annotations", json={"item_id": item, "label": 4}, headers=ADMIN)
    assert client.get("/api/status", headers=ADMIN).get_json()["batch_remaining"] == 9
    response = client.delete(f"/api/annotations/{item}", headers=ADMIN)
    assert response.status_code == 200 and response.get_json()["item_id"] == item
    assert client.get("/api/status", headers=ADMIN).get_json()["batch_remaining"] == 10
    assert client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"] == item
    assert client.delete(f"/api/annotations/{item}", headers=ADMIN).status_code == 404


def test_skip_resolves_the_item_without_labeling_it(client, app):
    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    response = client.post("/api/annotations", json={"item_id": item, "skip": True}, headers=ADMIN)
    assert response.status_code == 201 and response.get_json()["label"] == -1
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert status["batch_remaining"] == 9 and status["labeled"] == 0


def test_a_finished_batch_trains_and_queries_the_next_round(client, app):
    answered = answer_all(client, ADMIN, label=1)
    assert len(answered) == 10
    driver = app.extensions["annotator"].driver
    driver.run_until_idle()
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert status["round"] == 1 and status["batch_size"] == 5 and status["labeled"] == 10
    assert status["engine"] == "waiting"
    # An item of the closed round cannot be undone (the engine trained on it) but it can be corrected.
    assert client.delete(f"/api/annotations/{answered[0]}", headers=ADMIN).status_code == 409
    response = client.post("/api/annotations", json={"item_id": answered[0], "label": 2}, headers=ADMIN)
    assert response.status_code == 201 and response.get_json()["outcome"] == "corrected"
    rounds = client.get("/api/rounds", headers=ADMIN).get_json()["rounds"]
    assert rounds[0]["state"] == "trained" and rounds[0]["labeled"] == 10 and 0 <= rounds[0]["accuracy"] <= 1
    new_items = {t["item_id"] for t in client.get("/api/tasks?count=10", headers=ADMIN).get_json()["tasks"]}
    assert len(new_items) == 4 and not new_items & set(answered)  # 4: one person holds at most lease_cap


def test_the_run_finishes_after_the_last_round(client, app):
    driver = app.extensions["annotator"].driver
    for _ in range(3):  # the initial batch and two queried rounds
        answer_all(client, ADMIN)
        driver.run_until_idle()
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert status["finished"] and status["engine"] == "finished" and status["labeled"] == 20
    assert client.get("/api/tasks/next", headers=ADMIN).status_code == 204


def test_bulk_answers_for_grid_mode(client):
    tasks = client.get("/api/tasks?count=3", headers=ADMIN).get_json()["tasks"]
    ids = [t["item_id"] for t in tasks]
    response = client.post("/api/annotations/bulk", json={"item_ids": ids, "label": 6}, headers=ADMIN)
    assert response.status_code == 201 and response.get_json()["outcomes"] == ["created"] * 3
    assert client.get("/api/status", headers=ADMIN).get_json()["batch_remaining"] == 7
    assert client.post("/api/annotations/bulk", json={"item_ids": [], "label": 6}, headers=ADMIN).status_code == 400


def test_export_is_for_admins_only(client, app):
    annotator = add_user(app, "carol")
    assert client.get("/api/export?format=csv", headers=annotator).status_code == 403
    assert client.get("/api/export?format=xml", headers=ADMIN).status_code == 400


def test_export_csv_and_jsonl_hold_every_answer_with_its_provenance(client, app):
    alice = add_user(app, "alice")
    item = client.get("/api/tasks/next", headers=alice).get_json()["item_id"]
    client.post("/api/annotations", json={"item_id": item, "label": 2, "time_taken_ms": 850}, headers=alice)
    client.post("/api/annotations", json={"item_id": item, "label": 3}, headers=ADMIN)
    skipped = client.get("/api/tasks/next", headers=alice).get_json()["item_id"]
    client.post("/api/annotations", json={"item_id": skipped, "skip": True}, headers=alice)

    rows = list(csv.DictReader(io.StringIO(client.get("/api/export?format=csv", headers=ADMIN).get_data(as_text=True))))
    assert [(r["annotator"], r["label"]) for r in rows] == [("alice", "2"), ("owner", "3")]  # skips are not labels
    assert rows[0]["item"] == str(item) and rows[0]["pool_index"] == str(item)
    assert rows[0]["round"] == "0" and rows[0]["strategy"] == "random" and rows[0]["time_taken_ms"] == "850"
    assert rows[0]["time"].endswith("Z")

    response = client.get("/api/export?format=jsonl", headers=ADMIN)
    assert response.headers["Content-Disposition"].startswith("attachment")
    records = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [r["label_index"] for r in records] == [2, 3]
    assert set(records[0]) >= {"item", "file_name", "label", "annotator", "time", "round", "strategy", "score"}


def test_a_failing_database_is_a_503_json_error_not_a_traceback(client, app, monkeypatch):
    import sqlite3

    from annotator import db as db_module

    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    real_execute = db_module.sqlite_utils.Database.execute

    def failing_execute(self, sql, *args, **kwargs):
        if sql.lstrip().lower().startswith("insert into answers"):
            raise sqlite3.OperationalError("disk I/O error")
        return real_execute(self, sql, *args, **kwargs)

    monkeypatch.setattr(db_module.sqlite_utils.Database, "execute", failing_execute)
    response = client.post("/api/annotations", json={"item_id": item, "label": 1}, headers=ADMIN)
    assert response.status_code == 503 and "disk I/O error" in response.get_json()["error"]
    monkeypatch.undo()
    assert client.get("/api/status", headers=ADMIN).get_json()["batch_remaining"] == 10  # nothing half-stored
