"""Labeling people trust (issue 15): the key map, corrections of closed rounds and the labels the engine
then trains on, the close grace for undo, review filters, heartbeat leases, admin release, the lease cap
and 409 on another's lease, overlap, agreement figures against hand-computed kappas, second opinions
while the engine trains, instructions, and the small defects (CSV type, favicon, strategy change)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from al_engine.config import RunConfig
from annotator import create_app
from annotator.agreement import cohen_kappa, dawid_skene, fleiss_kappa, majority_label
from annotator.db import LEASE_SECONDS, AnnotationDB, AnnotatorDBError
from annotator.pages import key_map

TOKEN = "workflow-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def config(**overrides) -> RunConfig:
    settings = dict(dataset="digits", strategy="entropy", initial=10, query_size=6, rounds=2, epochs=2, seed=0,
                    device="cpu")
    settings.update(overrides)
    return RunConfig(**settings)


@pytest.fixture
def make(tmp_path, digits):
    def build(name="w.db", **settings):
        run = settings.pop("RUN_CONFIG", None) or config()
        return create_app({"DATABASE": str(tmp_path / name), "RUN_CONFIG": run, "DATASET": digits,
                           "ADMIN_TOKEN": TOKEN, **settings})
    return build


def user(app, name, role="annotator") -> tuple[dict, int]:
    db = AnnotationDB(app.extensions["annotator"].database)
    try:
        token = db.add_user(name, role)
        return {"Authorization": f"Bearer {token}"}, db.user_for_token(token).id
    finally:
        db.close()


def answer_everything(client, headers, label=1) -> list[int]:
    answered = []
    while (response := client.get("/api/tasks?count=4", headers=headers)).get_json()["tasks"]:
        for task in response.get_json()["tasks"]:
            result = client.post("/api/annotations", json={"item_id": task["item_id"], "label": label}, headers=headers)
            assert result.status_code == 201, result.get_json()
            answered.append(task["item_id"])
    return answered


def batch(app, round_index=0) -> list[int]:
    db = app.extensions["annotator"].driver.db
    return [r[0] for r in db.db.execute("select item_id from batch_items where round = ? order by position",
                                        [round_index]).fetchall()]


# ------------------------------------------------------------------------------------------ keys


def test_a_class_named_by_one_key_answers_to_that_key_the_others_to_their_position():
    digits = [str(d) for d in range(10)]
    assert key_map(digits) == digits  # pressing 3 on a "3" records "3" (it recorded "2")
    assert key_map(["cat", "dog", "bird"]) == ["1", "2", "3"]
    assert key_map(["cat", "x", "dog"]) == ["1", "x", "3"]
    assert key_map(["2", "cat"]) == ["2", "1"]  # position 2 is taken by the class named "2"
    assert key_map(["S", "a", "cat"]) == ["1", "2", "3"]  # s and a mean skip and select-all, never a class
    twelve = key_map([f"class {i}" for i in range(12)])
    assert twelve[:10] == [*"1234567890"] and twelve[10:] == ["shift+1", "shift+2"]  # the 11th has a key
    many = key_map([f"c{i}" for i in range(30)])
    assert all(many) and len(set(many)) == 30


def test_the_buttons_and_the_key_map_show_the_keys(make):
    app = make()
    page = app.test_client().get("/", headers=ADMIN).get_data(as_text=True)
    buttons = re.findall(r'data-label="(\d+)" data-key="([^"]*)"[^>]*>\s*<kbd>([^<]*)</kbd><span>([^<]*)</span>', page)
    assert [(label, key, shown, name) for label, key, shown, name in buttons][:4] == [
        ("0", "0", "0", "0"), ("1", "1", "1", "1"), ("2", "2", "2", "2"), ("3", "3", "3", "3")]
    keymap = page[page.index('id="keymap"'):]
    assert "<kbd>3</kbd></td><td>3</td>" in keymap


def test_classes_past_the_tenth_get_shift_digits_on_the_page(tmp_path, tiny_dataset):
    from al_engine.data import Dataset

    classes = [f"kind{i}" for i in range(12)]
    data = Dataset(name="twelve", classes=classes, train_images=tiny_dataset.train_images,
                   train_labels=tiny_dataset.train_labels, test_images=None, test_labels=None)
    app = create_app({"DATABASE": str(tmp_path / "k.db"), "RUN_CONFIG": config(dataset="twelve", initial=6),
                      "DATASET": data, "ADMIN_TOKEN": TOKEN})
    page = app.test_client().get("/", headers=ADMIN).get_data(as_text=True)
    assert 'data-key="shift+2"' in page and "<kbd>⇧2</kbd><span>kind11</span>" in page
    assert '"keys": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "shift+1", "shift+2"]' in page


# ------------------------------------------------------------------------------------------ corrections


def test_a_correction_of_a_closed_round_is_what_the_next_training_learns(make):
    app = make()
    client, driver = app.test_client(), app.extensions["annotator"].driver
    answered = answer_everything(client, ADMIN, label=1)
    driver.run_until_idle()  # round 0 closed and trained, round 1 posted
    assert driver.db.current_round()["round"] == 1
    item = answered[0]
    response = client.post("/api/annotations", json={"item_id": item, "label": 7}, headers=ADMIN)
    assert response.status_code == 201 and response.get_json()["outcome"] == "corrected"

    trained_on = {}
    original = driver.engine.train

    def spy(round_index):
        labeled = driver.engine.pool.labeled_indices
        trained_on.update(zip(labeled.tolist(), driver.engine.pool.labels[labeled].tolist()))
        return original(round_index)

    driver.engine.train = spy
    answer_everything(client, ADMIN, label=2)
    driver.run_until_idle()
    assert trained_on[item] == 7  # the correction, not the first answer
    assert {trained_on[i] for i in answered[1:]} == {1}
    history = driver.db.answer_history(item)
    assert [(h["label"], h["change"]) for h in history] == [(1, "corrected")]  # both answers are kept
    assert [a["label"] for a in driver.db.answers_of(item)] == [7]


def test_the_batch_closing_answer_can_be_undone_during_the_grace(make):
    app = make(CLOSE_GRACE_S=30.0)
    client, driver = app.test_client(), app.extensions["annotator"].driver
    answered = answer_everything(client, ADMIN, label=1)
    assert not driver.step()  # complete, but the last answer is younger than the grace: still open
    assert driver.db.current_round()["state"] == "labeling"
    undo = client.delete(f"/api/annotations/{answered[-1]}", headers=ADMIN)
    assert undo.status_code == 200 and undo.get_json()["item_id"] == answered[-1]
    db = driver.db
    last = db.db.execute("select max(updated) from answers").fetchone()[0]
    client.post("/api/annotations", json={"item_id": answered[-1], "label": 4}, headers=ADMIN)
    last = db.db.execute("select max(updated) from answers").fetchone()[0]
    assert not db.close_round_if_complete(0, grace_s=30.0, now=last + 29)
    assert db.close_round_if_complete(0, grace_s=30.0, now=last + 31)


def test_review_filters_by_class_annotator_round_and_disagreement(make):
    app = make()
    client, driver = app.test_client(), app.extensions["annotator"].driver
    alice, alice_id = user(app, "alice")
    bob, _ = user(app, "bob")
    items = batch(app)
    for item in items[:4]:
        client.post("/api/annotations", json={"item_id": item, "label": 3}, headers=alice)
    client.post("/api/annotations", json={"item_id": items[0], "label": 5}, headers=bob)  # disagrees
    client.post("/api/annotations", json={"item_id": items[1], "label": 3}, headers=bob)  # agrees
    client.post("/api/annotations", json={"item_id": items[4], "label": 8}, headers=bob)

    def listed(query):
        page = client.get("/review" + query, headers=ADMIN)
        assert page.status_code == 200
        return [int(i) for i in re.findall(r'class="review-card[^"]*" data-item-id="(\d+)"', page.get_data(as_text=True))]

    assert sorted(listed("")) == sorted(items[:5])
    assert sorted(listed("?annotator=alice")) == sorted(items[:4])
    assert sorted(listed("?class=8")) == [items[4]]
    assert sorted(listed("?class=5")) == [items[0]]
    assert sorted(listed("?queue=disagreements")) == [items[0]]
    assert sorted(listed("?round=0&annotator=bob")) == sorted([items[0], items[1], items[4]])
    assert listed("?round=1") == []
    # settling the conflict (a relabel from the review page) takes it off the conflicts queue
    assert listed("?queue=conflicts") == [items[0]]
    answer_everything(client, ADMIN, label=1)
    driver.run_until_idle()
    relabel = client.post("/api/annotations", json={"item_id": items[0], "label": 5}, headers=ADMIN)
    assert relabel.get_json()["outcome"] == "corrected"
    assert listed("?queue=conflicts") == [] and listed("?queue=disagreements") == [items[0]]
    assert driver.db.training_answers(0)[1][driver.db.training_answers(0)[0].index(items[0])] == 5


def test_recent_answers_are_the_last_ten_newest_first(make):
    app = make(RUN_CONFIG=config(initial=14))
    client = app.test_client()
    answered = answer_everything(client, ADMIN, label=2)
    recent = client.get("/api/answers/recent", headers=ADMIN).get_json()["answers"]
    assert [a["item_id"] for a in recent] == answered[::-1][:10]
    assert recent[0]["label"] == 2 and recent[0]["image_url"] and recent[0]["closed"] is False


# ------------------------------------------------------------------------------------------ leases


def test_a_lease_lapses_without_a_heartbeat_and_lasts_with_one(make):
    app = make()
    _, alice_id = user(app, "alice")
    _, bob_id = user(app, "bob")
    db = app.extensions["annotator"].driver.db
    assert LEASE_SECONDS <= 120  # a closed tab's items come free within 2 minutes
    start = 1_000_000_000.0
    held = db.lease_tasks(alice_id, 2, now=start)
    later = start + LEASE_SECONDS + 1
    assert set(held) <= set(db.lease_tasks(bob_id, 6, now=later))  # no heartbeat: lapsed, bob gets them
    db.release_leases(user_id=bob_id)
    held = db.lease_tasks(alice_id, 2, now=later)
    assert db.renew_leases(alice_id, now=later + 60) == 2  # the page's heartbeat
    assert not set(held) & set(db.lease_tasks(bob_id, 6, now=later + LEASE_SECONDS + 1))


def test_the_heartbeat_endpoint_renews_my_leases(make):
    app = make()
    client = app.test_client()
    client.get("/api/tasks?count=3", headers=ADMIN)
    assert client.post("/api/heartbeat", headers=ADMIN).get_json() == {"renewed": 3}


def test_the_admin_page_lists_who_holds_what_and_releases_it(make):
    app = make()
    client = app.test_client()
    alice, alice_id = user(app, "alice")
    bob, _ = user(app, "bob")
    held = [t["item_id"] for t in client.get("/api/tasks?count=3", headers=alice).get_json()["tasks"]]
    page = client.get("/admin/", headers=ADMIN).get_data(as_text=True)
    assert "alice" in page and ", ".join(map(str, sorted(held))) in page
    assert client.post("/admin/leases/release", data={"annotator_id": str(alice_id)}, headers=ADMIN).status_code == 302
    assert set(held) <= {t["item_id"] for t in client.get("/api/tasks?count=6", headers=bob).get_json()["tasks"]}
    assert "Nobody holds" not in client.get("/admin/", headers=ADMIN).get_data(as_text=True)


def test_one_annotator_cannot_lease_the_whole_batch_nor_answer_anothers_lease(make):
    app = make(RUN_CONFIG=config(initial=60))
    client = app.test_client()
    alice, _ = user(app, "alice")
    bob, _ = user(app, "bob")
    taken = [t["item_id"] for t in client.get("/api/tasks?count=50", headers=alice).get_json()["tasks"]]
    assert len(taken) == 24  # the cap, not the 50 asked for
    others = client.get("/api/tasks?count=50", headers=bob).get_json()["tasks"]
    assert len(others) == 24 and not set(taken) & {t["item_id"] for t in others}
    refused = client.post("/api/annotations", json={"item_id": taken[0], "label": 1}, headers=bob)
    assert refused.status_code == 409 and "leased to another" in refused.get_json()["error"]
    bulk = client.post("/api/annotations/bulk", json={"item_ids": [taken[1]], "label": 1}, headers=bob)
    assert bulk.status_code == 409
    assert client.post("/api/annotations", json={"item_id": taken[0], "label": 1}, headers=ADMIN).status_code == 201


# ------------------------------------------------------------------------------------------ a team


def test_overlap_two_with_three_annotators(make):
    app = make(OVERLAP=2)
    client, driver = app.test_client(), app.extensions["annotator"].driver
    people = [user(app, name)[0] for name in ("ana", "ben", "cid")]
    answers: dict[int, list[int]] = {}
    turn = 0
    while True:
        progressed = False
        for who, headers in enumerate(people):
            task = client.get("/api/tasks/next", headers=headers)
            if task.status_code == 204:
                continue
            item = task.get_json()["item_id"]
            assert who not in answers.get(item, [])  # nobody is handed an item they answered
            status = client.get("/api/status", headers=ADMIN).get_json()
            done_items = sum(len(v) >= 2 for v in answers.values())
            assert status["remaining"] == 10 - done_items  # an item counts as done only with 2 answers
            assert client.post("/api/annotations", json={"item_id": item, "label": (item + who) % 3},
                               headers=headers).status_code == 201
            answers.setdefault(item, []).append(who)
            progressed = True
            turn += 1
        if not progressed:
            break
    assert len(answers) == 10 and all(len(set(v)) == len(v) == 2 for v in answers.values())
    assert driver.step() and driver.db.current_round()["round"] == 0  # closes...
    driver.run_until_idle()
    assert driver.db.current_round()["round"] == 1


def test_agreement_figures_match_hand_computed_kappas(make):
    app = make(RUN_CONFIG=config(initial=7))
    client = app.test_client()
    items = batch(app)
    labels = {"A": [0, 0, 1, 1, 0, 1], "B": [0, 1, 1, 1, 0, 0], "C": [0, 0, 1, 0, 0, 1]}
    for name, answers in labels.items():
        headers, _ = user(app, name)
        for item, label in zip(items, answers):
            assert client.post("/api/annotations", json={"item_id": item, "label": label}, headers=headers).status_code == 201
    loner, _ = user(app, "D")  # shares no item with anyone: in no kappa, and the dashboard still renders
    client.post("/api/annotations", json={"item_id": items[6], "label": 4}, headers=loner)
    report = client.get("/api/agreement", headers=ADMIN).get_json()
    assert report["labeled_items"] == 7 and report["items_with_several_answers"] == 6
    assert {tuple(p["annotators"]): p["shared_items"] for p in report["pairs"]}[("A", "D")] == 0
    pairs = {tuple(p["annotators"]): p for p in report["pairs"]}
    # By hand: A-B agree on 4 of 6, both answer 0 half the time: (4/6 - 1/2) / (1 - 1/2) = 1/3.
    assert pairs[("A", "B")]["cohen_kappa"] == pytest.approx(1 / 3)
    # A-C agree on 5 of 6; chance 1/2 * 4/6 + 1/2 * 2/6 = 1/2: (5/6 - 1/2) / (1/2) = 2/3.
    assert pairs[("A", "C")]["cohen_kappa"] == pytest.approx(2 / 3)
    # Fleiss: mean P_i = 4/6, P_e = (10/18)^2 + (8/18)^2 = 41/81: (54/81 - 41/81) / (40/81) = 13/40.
    assert report["fleiss_kappa"] == pytest.approx(13 / 40)
    assert report["with_majority"]["A"]["share"] == pytest.approx(1.0)
    assert report["with_majority"]["B"]["share"] == pytest.approx(4 / 6)
    assert report["with_majority"]["C"]["share"] == pytest.approx(5 / 6)
    confusion = np.array(report["confusion"])  # ordered pairs of answers to the same item
    assert confusion[0, 0] == 14 and confusion[1, 1] == 10 and confusion[0, 1] == confusion[1, 0] == 6
    assert confusion.sum() == 36
    page = client.get("/dashboard", headers=ADMIN).get_data(as_text=True)
    assert 'id="fleiss-kappa">0.325<' in page and "0.333" in page


def test_majority_ties_go_to_the_earliest_answer_and_skips_never_vote():
    assert majority_label([(1.0, 4), (2.0, 7)]) == 4
    assert majority_label([(3.0, 4), (2.0, 7)]) == 7
    assert majority_label([(1.0, 4), (2.0, 7), (3.0, 7)]) == 7
    assert cohen_kappa([], 3) is None and fleiss_kappa([[1]], 3) is None
    assert cohen_kappa([(2, 2), (2, 2)], 3) == 1.0


def test_dawid_skene_sees_through_annotators_who_always_answer_the_same_class():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    votes = {}
    for item, true in enumerate(truth):
        answers = {a: int(true) if rng.random() < 0.8 else int(rng.integers(0, 3)) for a in range(3)}
        answers.update({a: 0 for a in range(3, 6)})  # three "spammers"
        votes[item] = answers
    posterior = dawid_skene(votes, 3)
    ds = np.mean([np.argmax(posterior[i]) == truth[i] for i in votes])
    majority = np.mean([majority_label([(a, label) for a, label in votes[i].items()]) == truth[i] for i in votes])
    assert ds > 0.9 and ds > majority + 0.1


def test_the_dawid_skene_label_model_decides_the_training_labels(make):
    app = make(LABEL_MODEL="dawid-skene", RUN_CONFIG=config(initial=6))
    client = app.test_client()
    assert client.get("/api/agreement", headers=ADMIN).get_json()["label_model"] == "dawid-skene"
    items = batch(app)
    for name in ("A", "B"):
        headers, _ = user(app, name)
        for item in items:
            client.post("/api/annotations", json={"item_id": item, "label": 2}, headers=headers)
    assert app.extensions["annotator"].driver.db.training_answers(0)[1] == [2] * 6


def test_while_the_engine_trains_others_give_second_opinions(make):
    app = make()
    client, driver = app.test_client(), app.extensions["annotator"].driver
    bob, _ = user(app, "bob")
    answered = answer_everything(client, ADMIN, label=1)
    assert driver.db.close_round_if_complete(0)  # closed: what the engine trains on now
    assert client.get("/api/tasks/next", headers=bob).status_code == 204  # API clients: as before
    assert client.get("/api/tasks?count=4&checks=1", headers=ADMIN).get_json()["tasks"] == []  # answered them all
    tasks = client.get("/api/tasks?count=4&checks=1", headers=bob).get_json()["tasks"]
    assert len(tasks) == 4 and {t["kind"] for t in tasks} == {"check"} and {t["item_id"] for t in tasks} <= set(answered)
    second = client.post("/api/annotations", json={"item_id": tasks[0]["item_id"], "label": 9}, headers=bob)
    assert second.get_json()["outcome"] == "checked"
    items, labels, _ = driver.db.training_answers(0)
    assert labels[items.index(tasks[0]["item_id"])] == 1  # a tie of 1 and 9: the earliest answer stays
    assert client.get("/api/agreement", headers=ADMIN).get_json()["items_with_several_answers"] == 1


# ------------------------------------------------------------------------------------------ small defects


def test_csv_export_names_its_charset_once(make):
    app = make()
    client = app.test_client()
    answer_everything(client, ADMIN)
    response = client.get("/api/export?format=csv", headers=ADMIN)
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"


def test_every_page_has_an_icon(make):
    app = make()
    client = app.test_client()
    page = client.get("/", headers=ADMIN).get_data(as_text=True)
    assert 'rel="icon"' in page
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml"


def test_restarting_with_another_strategy_is_refused_unless_asked(make):
    make(RUN_CONFIG=config(strategy="entropy"))
    with pytest.raises(AnnotatorDBError, match="--allow-strategy-change"):
        make(RUN_CONFIG=config(strategy="margin"))
    app = make(RUN_CONFIG=config(strategy="margin"), ALLOW_STRATEGY_CHANGE=True)
    assert app.extensions["annotator"].driver.db.run_settings()["strategy"] == "margin"
    make(RUN_CONFIG=config(strategy="margin"))  # now the database's strategy


def test_the_server_queries_with_an_active_strategy_by_default():
    import app as cli

    assert cli.build_run_parser().parse_args([]).strategy == "margin"


def test_instructions_show_on_first_sign_in_and_under_h(make):
    app = make(INSTRUCTIONS="# Digits\nLabel **what you see**. <script>alert(1)</script>\n\n- unsure? press s")
    client = app.test_client()
    client.get(f"/?token={TOKEN}")
    page = client.get("/").get_data(as_text=True)
    assert "<strong>what you see</strong>" in page and "<script>alert" not in page and "&lt;script&gt;" in page
    assert '"show_instructions": true' in page
    version = re.search(r'"instructions": "(\w+)"', page).group(1)
    csrf = re.search(r'"csrf": "([^"]+)"', page).group(1)
    assert client.post("/api/instructions/seen", json={"version": version},
                       headers={"X-CSRF-Token": csrf}).status_code == 200
    assert '"show_instructions": false' in client.get("/").get_data(as_text=True)


def test_overlap_and_label_model_are_checked(make):
    from al_engine.errors import UserError

    with pytest.raises(UserError, match="overlap"):
        make(OVERLAP=0)
    with pytest.raises(UserError, match="label-model"):
        make(LABEL_MODEL="vote")
