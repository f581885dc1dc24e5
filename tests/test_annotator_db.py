"""The annotator database and the engine driver: schema, durability, resume, concurrency."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from al_engine.data import load_dataset
from al_engine.errors import UserError
from al_engine.config import RunConfig
from al_engine.engine import Engine
from annotator import create_app
from annotator.db import SCHEMA_VERSION, AnnotationDB, AnnotatorDBError, Conflict, NotFound
from annotator.worker import EngineDriver
from oracle.human import HumanOracle

TOKEN = "t0ken"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_config(**overrides) -> RunConfig:
    settings = dict(dataset="digits", initial=10, query_size=5, rounds=3, epochs=2, seed=0, device="cpu")
    settings.update(overrides)
    return RunConfig(**settings)


def make_app(path, digits, **overrides):
    return create_app({"DATABASE": str(path), "RUN_CONFIG": small_config(**overrides), "DATASET": digits,
                       "ADMIN_TOKEN": TOKEN})


def test_a_new_database_is_in_wal_mode_at_the_current_schema(tmp_path):
    db = AnnotationDB(tmp_path / "a.db")
    assert db.schema_version() == SCHEMA_VERSION
    assert db.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert {"meta", "users", "rounds", "items", "batch_items", "answers", "leases"} <= set(db.db.table_names())
    db.close()
    AnnotationDB(tmp_path / "a.db").close()  # reopening does not migrate twice


def test_a_version_1_database_is_migrated_with_its_rounds(tmp_path):
    import sqlite3

    import sqlite_utils

    from annotator import db as db_module

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(sqlite3.connect(path))
    db_module.MIGRATIONS[1](old)  # a file written by the first schema
    old.execute("insert into meta(key, value) values ('schema_version', '1')")
    old.execute("insert into rounds(round, state, batch_size) values (0, 'labeling', 7)")
    old.conn.commit()
    old.close()
    db = AnnotationDB(path)
    assert db.schema_version() == SCHEMA_VERSION
    assert db.current_round()["query_size"] == 7 and db.batch_progress()["query_size"] == 7


def test_a_database_from_a_newer_program_is_refused(tmp_path):
    db = AnnotationDB(tmp_path / "a.db")
    db.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    db.close()
    with pytest.raises(AnnotatorDBError, match="newer"):
        AnnotationDB(tmp_path / "a.db")


def test_a_file_that_is_not_sqlite_is_one_clear_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AnnotatorDBError, match="cannot use database"):
        AnnotationDB(path)


def test_a_database_belongs_to_one_run(tmp_path, digits):
    make_app(tmp_path / "a.db", digits)
    with pytest.raises(UserError, match="another run"):
        make_app(tmp_path / "a.db", digits, seed=1)


def test_user_names_and_roles_are_checked(tmp_path):
    db = AnnotationDB(tmp_path / "a.db")
    token = db.add_user("dana")
    assert db.user_for_token(token).name == "dana" and db.user_for_token("nope") is None
    assert token not in str(list(db.db.query("select * from users")))  # only a hash is stored
    for name, role in (("dana", "annotator"), ("", "annotator"), ("x", "boss"), ("owner", "admin")):
        with pytest.raises(UserError):
            db.add_user(name, role)
    db.close()


def test_every_acknowledged_answer_survives_a_restart_in_the_same_round(tmp_path, digits):
    path = tmp_path / "a.db"
    client = make_app(path, digits).test_client()
    answered = {}
    for label in range(6):
        item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
        assert client.post("/api/annotations", json={"item_id": item, "label": label}, headers=ADMIN).status_code == 201
        answered[item] = label
    # A new app on the same file (as after kill -9): same round, same answers, the rest still open.
    restarted = make_app(path, digits, rounds=3).test_client()
    status = restarted.get("/api/status", headers=ADMIN).get_json()
    assert status["round"] == 0 and status["batch_remaining"] == 4 and status["labeled"] == 6
    db = AnnotationDB(path)
    items, labels, _ = db.training_answers(0)
    assert dict(zip(items, labels)) == answered


def test_a_round_closed_before_a_crash_is_trained_after_the_restart(tmp_path, digits):
    path = tmp_path / "a.db"
    app = make_app(path, digits)
    client = app.test_client()
    while (task := client.get("/api/tasks/next", headers=ADMIN)).status_code == 200:
        client.post("/api/annotations", json={"item_id": task.get_json()["item_id"], "label": 3}, headers=ADMIN)
    assert app.extensions["annotator"].driver.oracle.collect(0) is not None  # closed, then "killed" before training
    restarted = make_app(path, digits)
    restarted.extensions["annotator"].driver.run_until_idle()
    status = restarted.test_client().get("/api/status", headers=ADMIN).get_json()
    assert status["round"] == 1 and status["labeled"] == 10 and status["batch_remaining"] == 5


def test_training_uses_the_latest_answer_per_item(tmp_path, digits):
    path = tmp_path / "a.db"
    make_app(path, digits)
    db = AnnotationDB(path)
    alice, bob = db.add_user("alice"), db.add_user("bob")
    alice_id, bob_id = db.user_for_token(alice).id, db.user_for_token(bob).id
    item = db.lease_tasks(alice_id)[0]
    db.record_answer(alice_id, item, 2)
    db.record_answer(bob_id, item, 5)
    db.record_answer(alice_id, item, 7)  # alice changes her mind last: 7 wins for training
    items, labels, rounds = db.training_answers(0)
    assert (items, labels, rounds) == ([item], [7], [0])
    assert len(db.answers_of(item)) == 2  # but both annotators' answers are kept


def test_answers_for_unknown_items_are_refused_and_closed_rounds_corrected(tmp_path, digits):
    path = tmp_path / "a.db"
    make_app(path, digits)
    db = AnnotationDB(path)
    user = db.user_for_token(TOKEN).id
    with pytest.raises(NotFound):
        db.record_answer(user, 10**6, 1)
    while items := db.lease_tasks(user, 10):
        for item in items:
            db.record_answer(user, item, 1)
    assert db.close_round_if_complete(0)
    with pytest.raises(Conflict):  # a closed round's item is corrected with a class, never skipped
        db.record_answer(user, item, -1)
    assert db.record_answer(user, item, 2) == "corrected"
    with pytest.raises(Conflict):
        db.create_round(0, [1], [0.0], "random", 0)


def test_concurrent_annotators_never_get_the_same_item_and_lose_no_answer(tmp_path, digits):
    path = tmp_path / "a.db"
    make_app(path, digits, initial=40)
    setup = AnnotationDB(path)
    users = [setup.user_for_token(setup.add_user(f"user{i}")).id for i in range(4)]
    setup.close()
    seen: dict[int, list[int]] = {user: [] for user in users}
    errors = []

    def annotate(user: int) -> None:
        db = AnnotationDB(path, setup=False)
        try:
            while items := db.lease_tasks(user, 1):
                db.record_answer(user, items[0], user % 10)
                seen[user].append(items[0])
        except Exception as error:  # surfaced below
            errors.append(error)
        finally:
            db.close()

    threads = [threading.Thread(target=annotate, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    all_items = [item for items in seen.values() for item in items]
    assert len(all_items) == len(set(all_items)) == 40  # each item answered once, none lost
    db = AnnotationDB(path)
    assert db.batch_progress()["remaining"] == 0 and len(db.training_answers(0)[0]) == 40


def test_the_human_oracle_blocks_until_people_answer(tmp_path, digits):
    path = tmp_path / "a.db"
    AnnotationDB(path).close()
    db = AnnotationDB(path)
    owner = db.ensure_owner(TOKEN).id
    oracle = HumanOracle(db, digits)
    indices = np.array([4, 8, 15])
    result = {}
    thread = threading.Thread(target=lambda: result.update(labels=oracle.answer(indices, 0, poll_s=0.02)))
    thread.start()
    person = AnnotationDB(path, setup=False)
    while not person.lease_tasks(owner, 3):
        pass
    person.record_answer(owner, 4, 1)
    person.record_answer(owner, 8, -1)  # skipped: the oracle says -1, the item stays unlabeled
    assert thread.is_alive()
    person.record_answer(owner, 15, 9)
    thread.join(10)
    assert result["labels"].tolist() == [1, -1, 9]


def test_the_driver_posts_rounds_with_the_strategy_and_model_version(tmp_path, digits):
    path = tmp_path / "a.db"
    config = small_config(strategy="entropy", initial=0, query_size=6)
    driver = EngineDriver(Engine(config, dataset=digits), str(path))
    driver.db.ensure_owner(TOKEN)
    assert driver.step()
    first = driver.db.current_round()
    assert first["round"] == 0 and first["query_size"] == 6 and first["strategy"] == "random"  # no model yet
    owner = driver.db.user_for_token(TOKEN).id
    while items := driver.db.lease_tasks(owner, 6):  # lease_cap: 4 at a time
        for item in items:
            driver.db.record_answer(owner, item, int(digits.train_labels[item]))
    driver.run_until_idle()
    batch = list(driver.db.db.query("select strategy, model_version, score from batch_items where round = 1"))
    assert len(batch) == 6 and {b["strategy"] for b in batch} == {"entropy"} and {b["model_version"] for b in batch} == {1}
    assert all(b["score"] > 0 for b in batch)  # entropies of the picks, kept with each item
    assert driver.status.snapshot()["state"] == "waiting"


def test_answers_keep_the_order_they_were_given_even_when_the_clock_steps_back(tmp_path, digits, monkeypatch):
    """Two annotators answer one item; between the answers the clock is stepped back an hour (NTP, a
    person). The training label breaks the tie by the earliest answer given (the first, which the wall
    clock calls newer), and the export's latest answer is the second, which the clock calls older."""
    from annotator import db as annotator_db

    make_app(tmp_path / "c.db", digits)
    db = AnnotationDB(tmp_path / "c.db")
    first, second = (db.user_for_token(db.add_user(name)).id for name in ("early", "late"))
    item = db.db.execute("select item_id from batch_items where round = 0 order by position").fetchone()[0]
    clock = [1_000_000.0]
    monkeypatch.setattr(annotator_db, "_now", lambda: clock[0])
    db.record_answer(first, item, 1)
    clock[0] -= 3600
    db.record_answer(second, item, 2)
    assert db.training_answers(0)[1] == [1]  # majority of 1 vs 1: the earliest given
    assert db.class_counts() == {1: 1}
    latest = list(db.iter_export(digits.classes, latest_only=True))
    assert [row["label_index"] for row in latest] == [2]
    clock[0] -= 3600  # the first annotator corrects their answer later still, on an even earlier clock
    assert db.record_answer(first, item, 3) == "replaced"
    assert db.training_answers(0)[1] == [3]
    db.close()


def test_migration_3_orders_existing_answers_as_the_clock_did(tmp_path, digits):
    """A version-2 database's answers get `seq` in (updated, id) order, so its latest answers stay latest."""
    make_app(tmp_path / "m.db", digits)
    db = AnnotationDB(tmp_path / "m.db")
    owner = db.user_for_token(TOKEN).id
    other = db.user_for_token(db.add_user("other")).id
    items = [row[0] for row in db.db.execute("select item_id from batch_items where round = 0 order by position")]
    db.record_answer(owner, items[0], 4)
    db.record_answer(other, items[0], 5)
    db.db.execute("update answers set updated = 10 where annotator_id = ?", [other])  # other's was earlier
    db.db.execute("update answers set updated = 20 where annotator_id = ?", [owner])
    db.db.execute("drop index idx_answers_seq")
    db.db.execute("alter table answers drop column seq")
    db.db.execute("drop table sessions")
    db.db.execute("alter table users drop column removed")
    db.db.execute("update meta set value = '2' where key = 'schema_version'")
    db.close()
    migrated = AnnotationDB(tmp_path / "m.db")
    assert migrated.schema_version() == SCHEMA_VERSION
    assert migrated.training_answers(0)[1] == [4]
    assert "sessions" in migrated.db.table_names() and "removed" in migrated.db["users"].columns_dict
    migrated.close()


def test_an_engine_step_that_keeps_failing_stops_the_worker_instead_of_retrying_forever(tmp_path, digits):
    import time

    from annotator.worker import EngineWorker

    make_app(tmp_path / "f.db", digits)
    driver = EngineDriver(Engine(small_config(), dataset=digits), str(tmp_path / "f.db"))
    tries = []

    def failing_step():
        tries.append(time.monotonic())
        raise IndexError("index -1 is out of bounds for axis 0 with size 0")

    driver.step = failing_step
    worker = EngineWorker(driver)
    worker.retry_s = 0.01
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and len(tries) == worker.max_failures
    snapshot = worker.status.snapshot()
    assert snapshot["state"] == "error" and "IndexError" in snapshot["detail"] and "stopped after" in snapshot["detail"]
