"""The annotator without a test split: audit items marked in the database and the export, their
estimate (predicted before anyone answered) on the dashboard and in /api/rounds, the stopping
signal beside it, and migration 5 on an older database."""
from __future__ import annotations

import csv
import dataclasses
import re

import pytest

from al_engine.config import RunConfig
from annotator import create_app
from annotator.db import SCHEMA_VERSION, AnnotationDB

TOKEN = "audit-token"


@pytest.fixture
def no_test_split(digits):
    return dataclasses.replace(digits, test_images=None, test_labels=None)


def answer_everything(client, csrf, digits):
    while (task := client.get("/api/tasks/next")).status_code == 200:
        item = task.get_json()["item_id"]
        label = int(digits.train_labels[item])
        client.post("/api/annotations", json={"item_id": item, "label": label}, headers={"X-CSRF-Token": csrf})


def signed_in_audit_app(tmp_path, dataset, rounds: int, epochs: int, audit_fraction: float):
    """(client, csrf token, engine driver) of an annotator on digits with an audit share, the initial
    batch already queried."""
    config = RunConfig(dataset="digits", initial=20, query_size=10, rounds=rounds, epochs=epochs, seed=0,
                       device="cpu", audit_fraction=audit_fraction)
    app = create_app({"DATABASE": str(tmp_path / "a.db"), "RUN_CONFIG": config, "DATASET": dataset,
                      "ADMIN_TOKEN": TOKEN})
    client = app.test_client()
    client.get(f"/?token={TOKEN}")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)
    driver = app.extensions["annotator"].driver
    driver.run_until_idle()
    return client, csrf, driver


def test_audit_items_are_marked_estimated_and_shown_without_a_test_split(tmp_path, no_test_split, digits):
    client, csrf, driver = signed_in_audit_app(tmp_path, no_test_split, rounds=2, epochs=3, audit_fraction=0.4)
    for _ in range(3):  # the initial batch and two queried rounds
        answer_everything(client, csrf, digits)
        driver.run_until_idle()

    db = AnnotationDB(str(tmp_path / "a.db"))
    rows = list(db.db.query("select round, strategy, audit, predicted from batch_items where round > 0 order by round, position"))
    for batch_round in (1, 2):
        batch = [r for r in rows if r["round"] == batch_round]
        audit = [r for r in batch if r["audit"]]
        assert len(batch) == 10 and len(audit) == 4
        assert all(r["strategy"] == "audit" and r["predicted"] is not None for r in audit)
        assert all(r["strategy"] == "random" and r["predicted"] is None for r in batch if not r["audit"])
        assert [r["audit"] for r in batch] == [0] * 6 + [1] * 4  # the audit items close the batch

    # The estimate compares the stored predictions with the answers (here the truth).
    estimates = db.audit_estimates()
    assert [e["round"] for e in estimates] == [0, 1] and all(e["n"] == 4 for e in estimates)
    first = [r for r in rows if r["round"] == 1 and r["audit"]]
    truth = [int(digits.train_labels[r["item_id"]]) for r in db.db.query(
        "select item_id from batch_items where round = 1 and audit = 1 order by position")]
    assert estimates[0]["correct"] == sum(r["predicted"] == t for r, t in zip(first, truth))
    assert estimates[0]["low"] <= estimates[0]["accuracy"] <= estimates[0]["high"]

    rounds = client.get("/api/rounds").get_json()["rounds"]
    assert rounds[0]["audit"]["n"] == 4 and rounds[0]["kappa"] is None and rounds[1]["kappa"] is not None

    page = client.get("/dashboard", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "Estimated accuracy (audit sample)" in page and 'id="audit-note"' in page
    assert page.count('class="curve-point"') == 2 and page.count('class="curve-line interval"') == 2
    assert 'id="stopping-signal"' in page and "Cohen" in page and "n=4" in page

    export = client.get("/api/export?format=csv").get_data(as_text=True)
    exported = list(csv.DictReader(export.splitlines()))
    assert sum(r["strategy"] == "audit" for r in exported) == 8
    db.close()


def test_with_a_test_split_the_curve_stays_the_test_accuracy(tmp_path, digits):
    client, csrf, driver = signed_in_audit_app(tmp_path, digits, rounds=1, epochs=2, audit_fraction=0.3)
    answer_everything(client, csrf, digits)
    driver.run_until_idle()
    page = client.get("/dashboard", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "Learning curve" in page and "Estimated accuracy" not in page


def test_migration_5_adds_the_columns_to_an_older_database(tmp_path):
    import sqlite_utils

    from annotator import db as db_module

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(str(path))
    db_module.MIGRATIONS[1](old)
    db_module.MIGRATIONS[2](old)
    old.execute("insert into meta(key, value) values ('schema_version', '2')")
    old.conn.commit()
    old.close()
    db = AnnotationDB(str(path))
    assert db.schema_version() == SCHEMA_VERSION >= 5
    assert {"audit", "predicted"} <= {c.name for c in db.db["batch_items"].columns}
    assert {"kappa", "kappa_mean", "stop"} <= {c.name for c in db.db["rounds"].columns}
    db_module._migrate_to_5(db.db)  # idempotent
    db.close()
