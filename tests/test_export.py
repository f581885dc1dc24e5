"""Exports (annotator/export.py): what they write through links and special files, formula cells, the
permissions of what they create, temporaries of killed exports, and the WAL after a long export."""
from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import app as app_module
from al_engine.config import RunConfig
from al_engine.data import Dataset
from annotator import create_app
from annotator import db as annotator_db
from annotator.db import AnnotationDB
from annotator.export import export_lines, neutralise, write_imagefolder, write_stream_export

TOKEN = "export-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)"]  # what a spreadsheet would run


def hostile_db(tmp_path: Path) -> str:
    """Class, file and user names that start like formulas, each answered once."""
    images = torch.zeros((8, 1, 28, 28), dtype=torch.uint8)
    dataset = Dataset(name="hostile", classes=list(HOSTILE), train_images=images,
                      train_labels=torch.full((8,), -1, dtype=torch.int64),
                      file_names=[f"{prefix}file{i}.png" for i, prefix in enumerate(["=", "+", "-", "@"] * 2)])
    config = RunConfig(dataset="digits", initial=8, query_size=2, rounds=1, epochs=1, device="cpu")
    path = str(tmp_path / "hostile.db")
    client = create_app({"DATABASE": path, "RUN_CONFIG": config, "DATASET": dataset, "ADMIN_TOKEN": TOKEN}).test_client()
    database = AnnotationDB(path)
    users = [database.add_user(name) for name in ("=cmd|' /C calc'!A0", "+me", "-you", "@them")]
    database.close()
    for item in range(8):
        token = users[item % 4]
        response = client.post("/api/annotations", json={"item_id": item, "label": item % 4},
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 201
    return path


def test_csv_cells_that_a_spreadsheet_would_run_get_a_leading_apostrophe(tmp_path):
    path = hostile_db(tmp_path)
    rows = list(csv.DictReader(io.StringIO("".join(export_lines(path, "csv")))))
    assert len(rows) == 8
    for row in rows:
        for column in ("label", "file_name", "annotator"):
            assert row[column].startswith("'") and row[column][1] in "=+-@", (column, row[column])
    assert {row["label"][1:] for row in rows} == set(HOSTILE)
    # JSONL is data, not a sheet: the values stay exactly as stored
    records = [json.loads(line) for line in export_lines(path, "jsonl")]
    assert {r["label"] for r in records} == set(HOSTILE) and all(r["annotator"][0] in "=+-@" for r in records)


def test_only_text_is_neutralised_and_numbers_stay_numbers():
    assert neutralise("\tx") == "'\tx" and neutralise("\rx") == "'\rx"
    assert neutralise(-0.5) == -0.5 and neutralise(3) == 3 and neutralise("a=b") == "a=b" and neutralise("") == ""


@pytest.fixture
def labeled(tmp_path):
    return hostile_db(tmp_path)


def test_an_export_onto_a_symlink_replaces_the_linked_file_and_keeps_the_link(tmp_path, labeled):
    real = tmp_path / "real" / "labels.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "labels.csv"
    link.symlink_to(real)
    assert write_stream_export(labeled, "csv", link) == 8
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().startswith("item,") and len(real.read_text().splitlines()) == 9


def test_an_export_into_a_fifo_writes_to_the_reader(tmp_path, labeled):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert write_stream_export(labeled, "jsonl", fifo) == 8
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not replaced by a regular file
    assert len(received[0].splitlines()) == 8


def test_new_exports_follow_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path, labeled):
    previous = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.csv"
        write_stream_export(labeled, "csv", fresh)
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("x")
        os.chmod(kept, 0o640)
        write_stream_export(labeled, "csv", kept)
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640
    finally:
        os.umask(previous)


def test_the_image_folder_export_gets_the_usual_folder_permissions(tmp_path, digits):
    config = RunConfig(dataset="digits", initial=4, query_size=2, rounds=1, epochs=1, device="cpu")
    path = str(tmp_path / "d.db")
    client = create_app({"DATABASE": path, "RUN_CONFIG": config, "DATASET": digits, "ADMIN_TOKEN": TOKEN}).test_client()
    item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
    client.post("/api/annotations", json={"item_id": item, "label": 1}, headers=ADMIN)
    previous = os.umask(0o022)
    try:
        assert write_imagefolder(path, tmp_path / "tree", dataset=digits) == 1
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "tree").st_mode) == 0o755  # mkdtemp would have made it 0700


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_next_export_removes_what_a_killed_export_left_and_spares_a_running_one(tmp_path, labeled, capsys):
    out = tmp_path / "labels.csv"
    killed = tmp_path / f".labels.csv.{dead_pid()}.0123abcd.tmp"
    killed.write_text("half an export")
    killed_tree = tmp_path / f".tree.{dead_pid()}.89abcdef.tmp"
    killed_tree.mkdir()
    (killed_tree / "x.png").write_bytes(b"png")
    running = tmp_path / f".labels.csv.{os.getpid()}.fedcba98.tmp"  # a live process's export in progress
    running.write_text("being written")
    other = tmp_path / ".notes.txt.1.0123abcd.tmp"  # not an export of this name: not ours to delete
    other.write_text("keep")
    assert app_module.main(["export", "--format", "csv", "--out", str(out), "--db", labeled]) == 0
    assert not killed.exists() and running.exists() and other.exists()
    assert app_module.main(["export", "--format", "imagefolder", "--out", str(tmp_path / "tree"), "--db", labeled]) == 0
    capsys.readouterr()
    assert not killed_tree.exists() and len(list((tmp_path / "tree").rglob("*.png"))) == 8


def test_the_wal_is_cut_back_after_a_long_export(tmp_path, monkeypatch, digits):
    """A long export holds a read snapshot; answers written meanwhile grow the WAL, which no checkpoint can
    empty until the export ends. Afterwards the WAL must shrink back to the limit (it never did)."""
    limit = 64 * 1024
    monkeypatch.setattr(annotator_db, "WAL_SIZE_LIMIT", limit)
    config = RunConfig(dataset="digits", initial=120, query_size=2, rounds=1, epochs=1, device="cpu")
    path = str(tmp_path / "w.db")
    create_app({"DATABASE": path, "RUN_CONFIG": config, "DATASET": digits, "ADMIN_TOKEN": TOKEN})
    writer = AnnotationDB(path, setup=False)
    owner = writer.user_for_token(TOKEN).id
    items = [row[0] for row in writer.db.execute("select item_id from batch_items order by position")]
    writer.record_answer(owner, items[0], 1)
    stream = export_lines(path, "csv", chunk=1)
    next(stream), next(stream)  # the export's snapshot is open
    for item in items[1:100]:
        writer.record_answer(owner, item, 2)
    wal = Path(path + "-wal")
    grown = wal.stat().st_size
    assert grown > 2 * limit
    list(stream)  # the export ends
    writer.record_answer(owner, items[100], 3)
    writer.record_answer(owner, items[101], 3)
    assert wal.stat().st_size <= limit < grown
    writer.close()
