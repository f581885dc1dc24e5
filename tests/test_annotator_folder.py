"""A project on a folder of one's own pictures that changes over weeks: files added, files gone,
unreadable files, classes added, labels imported (annotator/__init__.py, db.py's manifest, imports.py)."""
from __future__ import annotations

import csv
import io
import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

import app as app_module
from al_engine.config import RunConfig
from al_engine.errors import ConfigError, UserError
from annotator import create_app
from annotator.db import AnnotationDB

TOKEN = "folder-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def write_picture(path, shade: int, size=(24, 18)):
    Image.new("RGB", size, (shade, shade, shade)).save(path)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate("abcdefghij"):
        write_picture(folder / f"{name}.png", 20 * i, size=(16 + 4 * i, 12 + 3 * i))
    return folder


def folder_config(folder, **overrides) -> RunConfig:
    settings = dict(dataset="imagefolder", data_dir=str(folder), classes=["dark", "light"], image_size=16,
                    initial=4, query_size=3, rounds=2, epochs=1, device="cpu")
    settings.update(overrides)
    return RunConfig(**settings)


def start(db, folder, **overrides):
    app = create_app({"DATABASE": str(db), "RUN_CONFIG": folder_config(folder, **overrides), "ADMIN_TOKEN": TOKEN})
    return app, app.test_client()


def answer_batch(client, label_of):
    """Answer every leased item of the open batch with label_of(file name); returns {name: label}."""
    given = {}
    while (response := client.get("/api/tasks/next", headers=ADMIN)).status_code == 200:
        task = response.get_json()
        label = label_of(task["name"])
        assert client.post("/api/annotations", json={"item_id": task["item_id"], "label": label},
                           headers=ADMIN).status_code == 201
        given[task["name"]] = label
    return given


def by_name(db) -> dict[str, str]:
    """The latest answer per file name, as the database holds it."""
    database = AnnotationDB(str(db))
    try:
        return {row["file_name"]: row["label"] for row in database.iter_export(["dark", "light"], latest_only=True)}
    finally:
        database.close()


def shade_label(name: str) -> str:
    return "dark" if name[0] in "abcde" or name[0] == "0" else "light"


def test_new_files_join_the_pool_on_restart_with_every_answer_kept(tmp_path, photos):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    first = answer_batch(client, shade_label)
    assert len(first) == 4
    app.extensions["annotator"].driver.close()
    for name in ("0", "k", "l"):  # "0.png" sorts first: a sorted listing would move every item
        write_picture(photos / f"{name}.png", 250)
    app, client = start(db, photos)
    state = app.extensions["annotator"]
    assert sorted(state.folder.added) == ["0.png", "k.png", "l.png"]
    assert state.dataset.train_images.shape[0] == 13
    assert by_name(db) == first  # every answer still on its own picture
    # the known files kept their pool positions: the new ones came after them
    assert state.dataset.file_names[:10] == [f"{n}.png" for n in "abcdefghij"]
    assert state.ids.identity


def test_a_vanished_file_leaves_the_batches_and_training_but_its_answer_stays(tmp_path, photos):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    first = answer_batch(client, shade_label)
    driver = app.extensions["annotator"].driver
    driver.run_until_idle()  # trains on the 4 answers, posts round 1
    open_batch = [row[0] for row in sqlite3.connect(db).execute(
        "select i.file_name from batch_items b join items i on i.id = b.item_id where b.round = 1")]
    driver.close()
    gone_answered, gone_open = next(iter(first)), open_batch[0]
    (photos / gone_answered).unlink()
    (photos / gone_open).unlink()
    write_picture(photos / "0.png", 10)  # D1: delete a file, add one that sorts first

    app, client = start(db, photos)
    state = app.extensions["annotator"]
    assert sorted(state.folder.vanished) == sorted([gone_answered, gone_open])
    assert not state.ids.identity
    assert by_name(db)[gone_answered] == first[gone_answered]  # the answer is kept
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert status["query_size"] == 2  # the vanished file left the open batch
    # every task shows the file the database says it is; pictures and names agree
    names = []
    while (response := client.get("/api/tasks/next", headers=ADMIN)).status_code == 200:
        task = response.get_json()
        names.append(task["name"])
        picture = Image.open(io.BytesIO(client.get(task["image_url"], headers=ADMIN).data))
        assert picture.size == Image.open(photos / task["name"]).size
        client.post("/api/annotations", json={"item_id": task["item_id"], "label": "dark"}, headers=ADMIN)
    assert gone_open not in names and len(names) == 2
    state.driver.load_engine_state(1)
    trained_on = {state.dataset.file_names[i] for i in state.driver.engine.pool.labeled_indices}
    assert gone_answered not in trained_on and len(trained_on) == len(first) - 1 + 2
    # the database still says which file each item is: item ids did not move
    database = AnnotationDB(str(db))
    assert database.file_ids()["0.png"] == 10 and database.file_ids()["a.png"] == 0
    database.close()


def test_unreadable_files_are_skipped_and_listed_once_never_a_failed_start(tmp_path, photos, capsys):
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.jpg").write_text("not a picture")
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(good, "PNG")
    (photos / "truncated.png").write_bytes(good.getvalue()[:60])
    app, client = start(tmp_path / "p.db", photos)
    skipped = sorted(name for name, _ in app.extensions["annotator"].folder.skipped)
    assert skipped == ["empty.png", "notes.jpg", "truncated.png"]
    assert app.extensions["annotator"].dataset.train_images.shape[0] == 10
    lines = app.extensions["annotator"].folder.lines()
    assert len(lines) == 1 and lines[0].startswith("3 unreadable image file(s) skipped")
    page = client.get("/dashboard", headers=ADMIN).get_data(as_text=True)
    assert "truncated.png" in page and "3 unreadable" in page
    with pytest.raises(UserError, match="3 unreadable image file.*--strict"):
        start(tmp_path / "strict.db", photos, strict=True)


def test_classes_may_be_added_at_the_end_but_never_removed_or_reordered(tmp_path, photos):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    answer_batch(client, shade_label)
    app.extensions["annotator"].driver.run_until_idle()
    app.extensions["annotator"].driver.close()
    with pytest.raises(UserError, match="classes may be added at the end"):
        start(db, photos, classes=["light", "dark"])
    with pytest.raises(UserError, match="never removed or reordered"):
        start(db, photos, classes=["dark"] + ["x"])
    app, client = start(db, photos, classes=["dark", "light", "grey"])
    assert app.extensions["annotator"].classes == ["dark", "light", "grey"]
    task = client.get("/api/tasks/next", headers=ADMIN).get_json()
    assert client.post("/api/annotations", json={"item_id": task["item_id"], "label": "grey"},
                       headers=ADMIN).status_code == 201
    stored = json.loads(sqlite3.connect(db).execute("select value from meta where key = 'run'").fetchone()[0])
    assert stored["classes"] == ["dark", "light", "grey"]


def test_a_failed_first_start_leaves_the_database_unbound(tmp_path, photos):
    db = tmp_path / "p.db"
    with pytest.raises(ConfigError, match="larger than the pool"):
        start(db, photos, initial=40)
    app, client = start(db, photos, initial=4, seed=3)  # the corrected command, another seed: accepted
    assert client.get("/api/status", headers=ADMIN).get_json()["query_size"] == 4


def test_another_folder_is_refused_not_silently_re_bound(tmp_path, photos):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    answer_batch(client, shade_label)
    app.extensions["annotator"].driver.close()
    other = tmp_path / "other"
    other.mkdir()
    for name in "xyz":
        write_picture(other / f"{name}.png", 100)
    with pytest.raises(UserError, match="belongs to another run .*data folder"):
        start(db, other)


def test_a_database_of_the_older_version_is_checked_against_its_item_names(tmp_path, photos):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    answer_batch(client, shade_label)
    app.extensions["annotator"].driver.close()
    raw = sqlite3.connect(db)  # as an older version left it: no manifest, no resolved folder
    raw.execute("delete from files")
    run = json.loads(raw.execute("select value from meta where key = 'run'").fetchone()[0])
    run.pop("data_root")
    raw.execute("update meta set value = ? where key = 'run'", [json.dumps(run)])
    raw.commit()
    raw.close()
    write_picture(photos / "0.png", 5)  # shifts every sorted position by one
    with pytest.raises(UserError, match="older version whose item .* folder has changed"):
        start(db, photos)
    (photos / "0.png").unlink()
    app, client = start(db, photos)  # unchanged folder: the manifest is built from it
    assert AnnotationDB(str(db)).known_files() == [f"{n}.png" for n in "abcdefghij"]


def test_the_plan_check_says_once_that_the_last_batch_shrinks(tmp_path, photos):
    app, _ = start(tmp_path / "p.db", photos, initial=4, query_size=5, rounds=3)
    lines = app.extensions["annotator"].folder.lines()
    assert lines == ["the plan needs 19 items (--initial 4 + --rounds 3 x --query-size 5) but the pool has 10: "
                     "the last batch will be smaller, and labeling ends when the pool is exhausted"]


# ------------------------------------------------------------------------------------------ import


def run_cli(capsys, *argv):
    status = app_module.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_import_from_csv_counts_as_labeled_is_exported_and_never_queried(tmp_path, photos, capsys):
    db = tmp_path / "p.db"
    app, client = start(db, photos, initial=2, query_size=3)
    app.extensions["annotator"].driver.close()
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nc.png,dark\n./d.png,dark\nsub/i.png,light\nmissing.png,light\nj.png,light\n")
    status, out, err = run_cli(capsys, "import", str(labels), "--db", str(db))
    assert status == 0, err
    assert "imported 4 labels" in out and "1 file(s) are not in the project" in err and "missing.png" in err
    app, client = start(db, photos, initial=2, query_size=3)
    state = app.extensions["annotator"]
    exported = {r["file_name"]: (r["label"], r["annotator"]) for r in csv.DictReader(
        client.get("/api/export?format=csv", headers=ADMIN).get_data(as_text=True).splitlines())}
    assert exported["i.png"] == ("light", "import") and exported["c.png"] == ("dark", "import")
    imported = {"c.png", "d.png", "i.png", "j.png"}
    initial = set(answer_batch(client, shade_label))
    state.driver.run_until_idle()
    trained = {state.dataset.file_names[i] for i in state.driver.engine.pool.labeled_indices}
    assert imported <= trained and trained == imported | initial
    queried = [row[0] for row in sqlite3.connect(db).execute(
        "select i.file_name from batch_items b join items i on i.id = b.item_id where b.round = 1")]
    assert len(queried) == 3 and not set(queried) & (imported | initial)


def test_import_from_a_class_per_folder_tree(tmp_path, photos, capsys):
    db = tmp_path / "p.db"
    app, _ = start(db, photos)
    app.extensions["annotator"].driver.close()
    tree = tmp_path / "tree"
    (tree / "dark" / "nested").mkdir(parents=True)
    (tree / "light").mkdir()
    write_picture(tree / "dark" / "a.png", 0)
    write_picture(tree / "dark" / "nested" / "b.png", 0)
    write_picture(tree / "light" / "h.png", 0)
    (tree / "light" / "readme.txt").write_text("not an image")
    assert run_cli(capsys, "import", str(tree), "--db", str(db))[0] == 0
    assert by_name(db) == {"a.png": "dark", "b.png": "dark", "h.png": "light"}


@pytest.mark.parametrize("content, needle", [
    ("name,class\na.png,dark\n", "needs a header with the columns file"),
    ("file,label\na.png,purple\n", "line 2: unknown class 'purple'"),
    ("file,label\nnothere.png,dark\n", "none of the 1 file(s)"),
])
def test_a_bad_import_file_is_one_line_and_status_2(tmp_path, photos, capsys, content, needle):
    db = tmp_path / "p.db"
    app, _ = start(db, photos)
    app.extensions["annotator"].driver.close()
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    status, out, err = run_cli(capsys, "import", str(labels), "--db", str(db))
    assert status == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert by_name(db) == {}


def test_import_needs_a_started_project(tmp_path, capsys):
    status, _, err = run_cli(capsys, "import", str(tmp_path / "x.csv"), "--db", str(tmp_path / "none.db"))
    assert status == 2 and "no annotator database" in err


def test_an_export_round_trips_through_import(tmp_path, photos, capsys):
    db = tmp_path / "p.db"
    app, client = start(db, photos)
    given = answer_batch(client, shade_label)
    app.extensions["annotator"].driver.close()
    exported = tmp_path / "labels.csv"
    assert run_cli(capsys, "export", "--format", "csv", "--out", str(exported), "--db", str(db))[0] == 0
    fresh = tmp_path / "fresh.db"
    app, _ = start(fresh, photos, seed=1)
    app.extensions["annotator"].driver.close()
    assert run_cli(capsys, "import", str(exported), "--db", str(fresh))[0] == 0
    assert by_name(fresh) == given


def test_vanished_file_numbers_stay_consistent_in_the_pool_order(tmp_path, photos):
    """np sanity: the pool after a file vanished lists the remaining files, known ones first."""
    db = tmp_path / "p.db"
    app, _ = start(db, photos)
    app.extensions["annotator"].driver.close()
    (photos / "c.png").unlink()
    app, _ = start(db, photos)
    state = app.extensions["annotator"]
    ids = state.ids.of_pool
    names = AnnotationDB(str(db)).known_files()
    assert [names[i] for i in ids] == state.dataset.file_names
    assert np.all(np.diff(ids) > 0)
