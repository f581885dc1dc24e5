"""The annotator's commands: users, export (csv, jsonl, imagefolder), and the server surviving kill -9."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app as app_module
from al_engine.data import load_dataset
from al_engine.config import RunConfig
from annotator import create_app

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = app_module.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def labeled_db(tmp_path, digits, labels=(0, 1, 1)) -> str:
    path = str(tmp_path / "a.db")
    config = RunConfig(dataset="digits", initial=5, query_size=3, rounds=1, epochs=2, device="cpu")
    client = create_app({"DATABASE": path, "RUN_CONFIG": config, "DATASET": digits, "ADMIN_TOKEN": TOKEN}).test_client()
    for label in labels:
        item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
        client.post("/api/annotations", json={"item_id": item, "label": label}, headers=ADMIN)
    return path


def test_users_add_prints_a_token_and_list_shows_the_user(tmp_path, capsys):
    db = str(tmp_path / "u.db")
    code, out, _ = run_cli(capsys, "users", "add", "grace", "--role", "admin", "--db", db)
    assert code == 0 and "grace" in out and "?token=" in out
    code, out, _ = run_cli(capsys, "users", "list", "--db", db)
    assert code == 0 and "grace" in out and "admin" in out
    code, _, err = run_cli(capsys, "users", "add", "grace", "--db", db)
    assert code == 2 and err.count("\n") == 1 and "already exists" in err


def test_export_without_a_database_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--format", "csv", "--out", str(tmp_path / "x.csv"),
                           "--db", str(tmp_path / "missing.db"))
    assert code == 2 and err.count("\n") == 1 and "no annotator database" in err


def test_export_csv_and_jsonl_are_written_whole(tmp_path, digits, capsys):
    db = labeled_db(tmp_path, digits)
    out = tmp_path / "out" / "labels.csv"
    code, stdout, _ = run_cli(capsys, "export", "--format", "csv", "--out", str(out), "--db", db)
    assert code == 0 and "exported 3 answers" in stdout
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["0", "1", "1"] and {r["annotator"] for r in rows} == {"owner"}
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    jsonl = tmp_path / "labels.jsonl"
    assert run_cli(capsys, "export", "--format", "jsonl", "--out", str(jsonl), "--db", db)[0] == 0
    assert [json.loads(line)["label_index"] for line in jsonl.read_text().splitlines()] == [0, 1, 1]


def test_export_imagefolder_writes_one_folder_per_class(tmp_path, digits, capsys):
    db = labeled_db(tmp_path, digits)
    out = tmp_path / "tree"
    code, stdout, _ = run_cli(capsys, "export", "--format", "imagefolder", "--out", str(out), "--db", db)
    assert code == 0 and "3 labeled images" in stdout
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    assert len(list((out / "0").glob("*.png"))) == 1 and len(list((out / "1").glob("*.png"))) == 2
    with Image.open(next((out / "1").glob("*.png"))) as image:
        assert image.size == (28, 28)
    code, _, err = run_cli(capsys, "export", "--format", "imagefolder", "--out", str(out), "--db", db)
    assert code == 2 and "not an empty folder" in err


def test_a_flat_folder_of_unlabeled_images_is_labeled_and_exported_with_its_files(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    db = str(tmp_path / "p.db")
    config = RunConfig(dataset="imagefolder", data_dir=str(folder), classes=["cat", "dog"], image_size=16,
                       initial=0, query_size=3, rounds=1, epochs=2, device="cpu")
    app = create_app({"DATABASE": db, "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN})
    client = app.test_client()
    assert client.get("/api/status", headers=ADMIN).get_json()["batch_size"] == 3  # random first batch
    for label in ("cat", "dog", "dog"):
        item = client.get("/api/tasks/next", headers=ADMIN).get_json()["item_id"]
        assert client.post("/api/annotations", json={"item_id": item, "label": label}, headers=ADMIN).status_code == 201
    app.extensions["annotator"].driver.run_until_idle()
    status = client.get("/api/status", headers=ADMIN).get_json()
    assert status["round"] == 1 and status["batch_remaining"] == 3
    rows = list(csv.DictReader(client.get("/api/export?format=csv", headers=ADMIN).get_data(as_text=True).splitlines()))
    assert all(r["file_name"].startswith("img") for r in rows) and [r["label"] for r in rows].count("dog") == 2
    out = tmp_path / "tree"
    assert run_cli(capsys, "export", "--format", "imagefolder", "--out", str(out), "--db", db)[0] == 0
    copied = sorted(p.name.split("_", 1)[1] for p in (out / "dog").iterdir())
    assert len(copied) == 2 and all((folder / name).read_bytes() == next((out / "dog").glob(f"*_{name}")).read_bytes()
                                    for name in copied)  # the original files, byte for byte


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "app.py", "--db", db, "--token", TOKEN, "--port", str(port), "--initial", "10",
               "--query-size", "5", "--rounds", "2", "--epochs", "2", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    for line in process.stdout:
        if "sign in at" in line:
            assert f"http://127.0.0.1:{port}/?token={TOKEN}" in line
            return process
        if time.time() > deadline:
            break
    process.kill()
    raise AssertionError("the server did not print its sign-in URL")


def call(port: int, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=dict(ADMIN),
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read()
        return response.status, json.loads(data) if data else None


def test_answers_survive_kill_9_and_the_restart_resumes_the_same_round(tmp_path):
    db, port = str(tmp_path / "kill.db"), free_port()
    server = start_server(db, port)
    try:
        answered = []
        for label in range(4):
            status, task = call(port, "/api/tasks/next")
            assert status == 200
            assert call(port, "/api/annotations", {"item_id": task["item_id"], "label": label})[0] == 201
            answered.append(task["item_id"])
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
    server = start_server(db, port)
    try:
        _, status = call(port, "/api/status")
        assert status["round"] == 0 and status["labeled"] == 4 and status["batch_remaining"] == 6
        _, task = call(port, "/api/tasks/next")
        assert task["item_id"] not in answered
    finally:
        server.terminate()
        server.wait(10)


def test_a_busy_port_is_one_line_and_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(capsys, "--port", str(port), "--db", str(tmp_path / "a.db"))
    assert code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_ctrl_c_stops_the_server_and_its_worker_cleanly(tmp_path):
    server = start_server(str(tmp_path / "int.db"), free_port())
    server.send_signal(signal.SIGINT)
    output, _ = server.communicate(timeout=90)  # a worker mid-round on a loaded 2-core machine takes 30 s and more
    assert server.returncode == 0 and "Traceback" not in output and "terminate called" not in output


def test_the_sign_in_link_is_url_encoded():
    from annotator.cli import sign_in_url

    assert sign_in_url("0.0.0.0", 8080, "ab&c#d") == "http://127.0.0.1:8080/?token=ab%26c%23d"
    assert sign_in_url("::1", 5000, "a b/é") == "http://[::1]:5000/?token=a%20b%2F%C3%A9"


def test_a_running_server_holds_its_database_and_its_links_work(tmp_path, capsys):
    """A real `python app.py` with a token that needs encoding: the printed link signs in (the cookie is
    named after the port), `users add` prints this server's address, and a second server on the same
    database is refused with one line while the first keeps working."""
    import http.cookiejar

    db, port, token = str(tmp_path / "held.db"), free_port(), "ab&c#d é"
    command = [sys.executable, "app.py", "--db", db, "--token", token, "--port", str(port), "--initial", "10",
               "--query-size", "5", "--rounds", "2", "--epochs", "2", "--device", "cpu"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        link = next(line.split("sign in at ")[1].strip() for line in server.stdout if "sign in at" in line)
        assert link == f"http://127.0.0.1:{port}/?token=ab%26c%23d%20%C3%A9"
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(link, timeout=10) as response:
            assert response.status == 200 and "Signed in as owner" in response.read().decode()
        assert [cookie.name for cookie in jar] == [f"annotator_session_{port}"]
        with opener.open(f"http://127.0.0.1:{port}/whoami", timeout=10) as response:
            assert json.loads(response.read()) == {"name": "owner", "role": "admin"}

        code, out, _ = run_cli(capsys, "users", "--db", db, "add", "ida")
        assert code == 0 and f"sign-in link: http://127.0.0.1:{port}/?token=" in out

        code, _, err = run_cli(capsys, "--db", db, "--port", str(free_port()), "--token", "other", "--device", "cpu")
        assert code == 2 and err.count("\n") == 1 and "in use by another server" in err
        with opener.open(f"http://127.0.0.1:{port}/whoami", timeout=10) as response:  # the first is unharmed
            assert json.loads(response.read())["name"] == "owner"
    finally:
        server.kill()
        server.wait(10)


def test_the_server_closes_half_sent_connections_after_its_channel_timeout(tmp_path, digits, monkeypatch):
    """waitress, as app.py serves: a connection that sends half a request and stops is closed after the
    channel timeout (30 s; 1 s here), while a whole request on another connection is answered at once."""
    import threading

    from annotator import cli
    from server_harness import count_closed, open_idle_connections

    monkeypatch.setattr(cli, "CHANNEL_TIMEOUT_S", 1)
    monkeypatch.setattr(cli, "CLEANUP_INTERVAL_S", 1)
    config = RunConfig(dataset="digits", initial=5, query_size=3, rounds=1, epochs=2, device="cpu")
    app = create_app({"DATABASE": str(tmp_path / "t.db"), "RUN_CONFIG": config, "DATASET": digits, "ADMIN_TOKEN": TOKEN})
    server = cli.make_server(app, "127.0.0.1", 0)
    assert 16 <= server.connection_limit <= cli.MAX_CONNECTIONS and server.threads >= 4
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        idle = open_idle_connections(server.server_port, 5)
        assert call(server.server_port, "/api/status")[0] == 200
        time.sleep(0.3)
        assert count_closed(idle) == 0
        deadline = time.monotonic() + 10
        while count_closed(idle) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count_closed(idle) == 5
        for sock in idle:
            sock.close()
    finally:
        server.shutdown()
    thread.join(10)
    assert not thread.is_alive()  # shutdown() from another thread ends serve_forever
