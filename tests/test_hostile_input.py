"""Hostile input, table-driven: every API route and the CLI get bad input and answer with a clear 4xx JSON
error or one CLI line (exit 2): never a traceback, never a 5xx, and nothing already stored changes.
Property-based tests (hypothesis) of the API's request validation close the gaps between the rows."""
from __future__ import annotations

import json
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import app as app_module
from al_engine.data import Dataset
from al_engine.config import RunConfig
from annotator import create_app
from annotator import db as annotator_db
from annotator.db import AnnotationDB
from annotator.export import write_imagefolder

TOKEN = "hostile-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ERROR_CODES = {400, 401, 403, 404, 405, 409, 413}


def small_config(**overrides) -> RunConfig:
    settings_ = dict(dataset="digits", initial=10, query_size=5, rounds=2, epochs=2, seed=0, device="cpu")
    settings_.update(overrides)
    return RunConfig(**settings_)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, digits):
    """An app with stored answers (two by the admin, one by an annotator) to check nothing changes."""
    db_path = tmp_path_factory.mktemp("hostile") / "annotations.db"
    app = create_app({"DATABASE": str(db_path), "RUN_CONFIG": small_config(), "DATASET": digits,
                      "ADMIN_TOKEN": TOKEN})
    database = AnnotationDB(db_path)
    annotator = {"Authorization": f"Bearer {database.add_user('ann')}"}
    batch = [row[0] for row in database.db.execute("select item_id from batch_items where round = 0 order by position")]
    database.close()
    client = app.test_client()
    for item, headers in ((batch[0], ADMIN), (batch[1], ADMIN), (batch[2], annotator)):
        assert client.post("/api/annotations", json={"item_id": item, "label": 3}, headers=headers).status_code == 201
    outside = next(i for i in range(len(digits.train_labels)) if i not in batch)
    return {"app": app, "client": client, "db": db_path, "annotator": annotator, "batch": batch,
            "answered": batch[0], "others": batch[2], "outside": outside, "pool": len(digits.train_labels)}


def stored(db_path: Path) -> str:
    """Everything the database holds, as SQL text (compared before and after each bad request)."""
    connection = sqlite3.connect(db_path)
    try:
        return "\n".join(connection.iterdump())
    finally:
        connection.close()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# name -> (method, path, auth, request kwargs, expected status); {answered}, {outside}... are filled from ctx.
API_CASES = {
    "status without token": ("GET", "/api/status", None, {}, 401),
    "status with a wrong token": ("GET", "/api/status", "Bearer not-a-token", {}, 401),
    "status with an empty bearer": ("GET", "/api/status", "Bearer ", {}, 401),
    "status with basic auth": ("GET", "/api/status", f"Basic {TOKEN}", {}, 401),
    "status with a 64 KB token": ("GET", "/api/status", "Bearer " + "x" * 65536, {}, 401),
    "status with a NUL token": ("GET", "/api/status", "Bearer \x00", {}, 401),
    "next task without token": ("GET", "/api/tasks/next", None, {}, 401),
    "tasks count zero": ("GET", "/api/tasks?count=0", "admin", {}, 400),
    "tasks count negative": ("GET", "/api/tasks?count=-1", "admin", {}, 400),
    "tasks count too many": ("GET", "/api/tasks?count=51", "admin", {}, 400),
    "tasks count text": ("GET", "/api/tasks?count=lots", "admin", {}, 400),
    "tasks count float": ("GET", "/api/tasks?count=1.5", "admin", {}, 400),
    "tasks count huge": ("GET", "/api/tasks?count=" + "9" * 400, "admin", {}, 400),
    # digits that str.isdigit() accepts and int() refuses (a 500 before), or reads as a number (٣ = 3)
    "tasks count superscript two": ("GET", "/api/tasks?count=%C2%B2", "admin", {}, 400),
    "tasks count superscript three": ("GET", "/api/tasks?count=%C2%B3", "admin", {}, 400),
    "tasks count circled one": ("GET", "/api/tasks?count=%E2%91%A0", "admin", {}, 400),
    "tasks count arabic-indic three": ("GET", "/api/tasks?count=%D9%A3", "admin", {}, 400),
    "answer without token": ("POST", "/api/annotations", None, {"json": {"item_id": "{answered}", "label": 1}}, 401),
    "answer with a wrong token": ("POST", "/api/annotations", "Bearer nope",
                                  {"json": {"item_id": "{answered}", "label": 1}}, 401),
    "answer without body": ("POST", "/api/annotations", "admin", {}, 400),
    "answer malformed json": ("POST", "/api/annotations", "admin",
                              {"data": '{"item_id": 1, "label":', "content_type": "application/json"}, 400),
    "answer invalid utf-8": ("POST", "/api/annotations", "admin",
                             {"data": b'\xff\xfe{"item_id"', "content_type": "application/json"}, 400),
    "answer json array": ("POST", "/api/annotations", "admin", {"json": [1, 2]}, 400),
    "answer json string": ("POST", "/api/annotations", "admin", {"json": "label"}, 400),
    "answer json null": ("POST", "/api/annotations", "admin", {"data": "null", "content_type": "application/json"}, 400),
    "answer as text/plain": ("POST", "/api/annotations", "admin",
                             {"data": '{"item_id": 1, "label": 1}', "content_type": "text/plain"}, 400),
    "answer as a form": ("POST", "/api/annotations", "admin", {"data": {"item_id": "1", "label": "1"}}, 400),
    "answer nested 100k deep": ("POST", "/api/annotations", "admin",
                                {"data": nested(100_000), "content_type": "application/json"}, 400),
    "answer body of 2 MB": ("POST", "/api/annotations", "admin",
                            {"data": json.dumps({"item_id": 1, "label": 1, "pad": "x" * 2_000_000}),
                             "content_type": "application/json"}, 413),
    "answer without item_id": ("POST", "/api/annotations", "admin", {"json": {"label": 1}}, 400),
    "answer item_id as string": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}s", "label": 1}}, 400),
    "answer item_id float": ("POST", "/api/annotations", "admin", {"json": {"item_id": 1.5, "label": 1}}, 400),
    "answer item_id bool": ("POST", "/api/annotations", "admin", {"json": {"item_id": True, "label": 1}}, 400),
    "answer item_id negative": ("POST", "/api/annotations", "admin", {"json": {"item_id": -1, "label": 1}}, 400),
    "answer item_id list": ("POST", "/api/annotations", "admin", {"json": {"item_id": [1], "label": 1}}, 400),
    "answer item_id 10**30": ("POST", "/api/annotations", "admin", {"json": {"item_id": 10**30, "label": 1}}, 404),
    "answer item_id NaN": ("POST", "/api/annotations", "admin",
                           {"data": '{"item_id": NaN, "label": 1}', "content_type": "application/json"}, 400),
    "answer unknown item": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{outside}", "label": 1}}, 404),
    "answer item past the pool": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{pool}", "label": 1}}, 404),
    "answer label 10 of 10 classes": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": 10}}, 400),
    "answer label -1": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": -1}}, 400),
    "answer label 10**30": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": 10**30}}, 400),
    "answer unknown class name": ("POST", "/api/annotations", "admin",
                                  {"json": {"item_id": "{answered}", "label": "giraffe"}}, 400),
    "answer label '42' (not a class name)": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": "42"}}, 400),
    "answer label float": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": 1.0}}, 400),
    "answer label bool": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": True}}, 400),
    "answer label null": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": None}}, 400),
    "answer label dict": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": {"a": 1}}}, 400),
    "answer skip as string": ("POST", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "skip": "yes"}}, 400),
    "answer negative time": ("POST", "/api/annotations", "admin",
                             {"json": {"item_id": "{answered}", "label": 1, "time_taken_ms": -5}}, 400),
    "answer time as text": ("POST", "/api/annotations", "admin",
                            {"json": {"item_id": "{answered}", "label": 1, "time_taken_ms": "fast"}}, 400),
    "answer time infinity": ("POST", "/api/annotations", "admin",
                             {"data": '{"item_id": 1, "label": 1, "time_taken_ms": Infinity}',
                              "content_type": "application/json"}, 400),
    "answer with PUT": ("PUT", "/api/annotations", "admin", {"json": {"item_id": "{answered}", "label": 1}}, 405),
    "bulk without list": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": 5, "label": 1}}, 400),
    "bulk empty list": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": [], "label": 1}}, 400),
    "bulk 51 items": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": list(range(51)), "label": 1}}, 400),
    "bulk strings": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": ["a"], "label": 1}}, 400),
    "bulk with one unknown item": ("POST", "/api/annotations/bulk", "admin",
                                   {"json": {"item_ids": ["{others}", "{outside}"], "label": 5}}, 404),
    "bulk item 10**30": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": [10**30], "label": 1}}, 404),
    "bulk bad label": ("POST", "/api/annotations/bulk", "admin", {"json": {"item_ids": ["{others}"], "label": 99}}, 400),
    "undo without token": ("DELETE", "/api/annotations/{answered}", None, {}, 401),
    "undo unknown item": ("DELETE", "/api/annotations/{outside}", "admin", {}, 404),
    "undo another annotator's answer": ("DELETE", "/api/annotations/{others}", "admin", {}, 404),
    "undo item 10**30": ("DELETE", "/api/annotations/" + str(10**30), "admin", {}, 404),
    "undo item -1": ("DELETE", "/api/annotations/-1", "admin", {}, 404),
    "undo item text": ("DELETE", "/api/annotations/abc", "admin", {}, 404),
    "image without token": ("GET", "/api/items/{answered}/image.png", None, {}, 401),
    "image of an item in no batch": ("GET", "/api/items/{outside}/image.png", "admin", {}, 404),
    "image past the pool": ("GET", "/api/items/{pool}/image.png", "admin", {}, 404),
    "image 10**30": ("GET", "/api/items/" + str(10**30) + "/image.png", "admin", {}, 404),
    "image path traversal": ("GET", "/api/items/../../app.py", "admin", {}, 404),
    "image encoded traversal": ("GET", "/api/items/%2e%2e/%2e%2e/app.py", "admin", {}, 404),
    "image encoded slash": ("GET", "/api/items/1%2f..%2f..%2fapp.py/image.png", "admin", {}, 404),
    "static traversal": ("GET", "/static/../app.py", None, {}, 404),
    "static encoded traversal": ("GET", "/static/%2e%2e/app.py", None, {}, 404),
    "static encoded slash": ("GET", "/static/..%2fapp.py", None, {}, 404),
    "static absolute path": ("GET", "/static//etc/passwd", None, {"follow_redirects": True}, 404),  # merged: /static/etc/passwd
    "export without token": ("GET", "/api/export?format=csv", None, {}, 401),
    "export as annotator": ("GET", "/api/export?format=csv", "annotator", {}, 403),
    "export format xml": ("GET", "/api/export?format=xml", "admin", {}, 400),
    "export format imagefolder": ("GET", "/api/export?format=imagefolder", "admin", {}, 400),
    "export format traversal": ("GET", "/api/export?format=../../etc/passwd", "admin", {}, 400),
    "export format empty": ("GET", "/api/export?format=", "admin", {}, 400),
    "rounds without token": ("GET", "/api/rounds", None, {}, 401),
    "unknown api route": ("GET", "/api/nope", "admin", {}, 404),
    "admin page as annotator": ("GET", "/admin/", "annotator", {}, 403),
    "add user as annotator": ("POST", "/admin/users", "annotator", {"data": {"name": "mallory"}}, 403),
    "add user without token": ("POST", "/admin/users", None, {"data": {"name": "mallory"}}, 401),
    "add user empty name": ("POST", "/admin/users", "admin", {"data": {"name": "  "}}, 400),
    "add user 65 chars": ("POST", "/admin/users", "admin", {"data": {"name": "n" * 65}}, 400),
    "add user control chars": ("POST", "/admin/users", "admin", {"data": {"name": "a\nb\x00"}}, 400),
    "add user reserved name": ("POST", "/admin/users", "admin", {"data": {"name": "owner"}}, 400),
    "add user duplicate": ("POST", "/admin/users", "admin", {"data": {"name": "ann"}}, 400),
    "add user unknown role": ("POST", "/admin/users", "admin", {"data": {"name": "eve", "role": "root"}}, 400),
    "tasks checks yes": ("GET", "/api/tasks?checks=yes", "admin", {}, 400),
    "heartbeat without token": ("POST", "/api/heartbeat", None, {}, 401),
    "recent answers without token": ("GET", "/api/answers/recent", None, {}, 401),
    "agreement without token": ("GET", "/api/agreement", None, {}, 401),
    "instructions seen without version": ("POST", "/api/instructions/seen", "admin", {"json": {}}, 400),
    "instructions seen markup version": ("POST", "/api/instructions/seen", "admin",
                                         {"json": {"version": "<script>"}}, 400),
    "release leases as annotator": ("POST", "/admin/leases/release", "annotator", {"data": {"annotator_id": "1"}}, 403),
    "release leases of no user": ("POST", "/admin/leases/release", "admin", {"data": {"annotator_id": "x"}}, 400),
    "review without token": ("GET", "/review", None, {}, 401),
    "review unknown class": ("GET", "/review?class=giraffe", "admin", {}, 400),
    "review round text": ("GET", "/review?round=abc", "admin", {}, 400),
    "review round superscript": ("GET", "/review?round=%C2%B2", "admin", {}, 400),
    "review unknown annotator": ("GET", "/review?annotator=mallory", "admin", {}, 400),
    "review unknown queue": ("GET", "/review?queue=everything", "admin", {}, 400),
    "favicon with a wrong token": ("GET", "/favicon.ico/x", None, {}, 404),
    "sign in with a wrong token": ("GET", "/?token=wrong", None, {}, 401),
    "sign in with a 5000-char token": ("GET", "/?token=" + "t" * 5000, None, {}, 401),
    "sign-in form without token": ("POST", "/signin", None, {"data": {}}, 401),
    "sign-in form with a wrong token": ("POST", "/signin", None, {"data": {"token": "wrong"}}, 401),
    "sign-in form with a token as JSON": ("POST", "/signin", None, {"json": {"token": TOKEN}}, 401),
}


def fill(value, ctx):
    """Replace "{name}" placeholders (whole or inside a string) with ctx's numbers."""
    if isinstance(value, str):
        for key in ("answered", "others", "outside", "pool"):
            if value == "{" + key + "}":
                return ctx[key]
            value = value.replace("{" + key + "}", str(ctx[key]))
        return value
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, ctx) for k, v in value.items()}
    return value


def headers_for(auth, ctx) -> dict:
    if auth is None:
        return {}
    if auth == "admin":
        return dict(ADMIN)
    if auth == "annotator":
        return dict(ctx["annotator"])
    return {"Authorization": auth}


def assert_clean_error(response, path: str) -> None:
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and 'File "' not in body
    if path.startswith("/api/"):
        payload = response.get_json()
        assert payload["status"] == response.status_code and payload["error"]


@pytest.mark.parametrize("name", list(API_CASES))
def test_a_bad_request_is_a_clear_4xx_and_changes_nothing(name, ctx):
    method, path, auth, kwargs, expected = API_CASES[name]
    path, kwargs = fill(path, ctx), fill(kwargs, ctx)
    before = stored(ctx["db"])
    response = ctx["client"].open(path, method=method, headers=headers_for(auth, ctx), **kwargs)
    assert response.status_code == expected, response.get_data(as_text=True)[:300]
    assert_clean_error(response, path)
    assert stored(ctx["db"]) == before


def test_the_table_covers_every_route(ctx):
    """A new route must get hostile rows too."""
    covered = set()
    for method, path, *_ in API_CASES.values():
        adapter = ctx["app"].url_map.bind("localhost")
        try:
            covered.add(adapter.match(fill(path, ctx).split("?")[0], method=method)[0])
        except Exception:  # noqa: BLE001 - rows that must not match any route
            pass
    routes = {rule.endpoint for rule in ctx["app"].url_map.iter_rules()}
    assert routes - covered <= {"static", "favicon", "auth.signout", "pages.grid", "pages.dashboard",
                                "pages.engine_partial", "pages.whoami"}  # the pages: tests/test_access_control.py


def test_a_locked_database_is_a_503_json_error_and_nothing_is_stored(ctx, monkeypatch):
    """Another process holds SQLite's write lock: the request waits BUSY_TIMEOUT_S, then says so (503:
    try again; a 4xx would blame the client). The answer is not stored, the client was not told 201."""
    monkeypatch.setattr(annotator_db, "BUSY_TIMEOUT_S", 0.2)
    before = stored(ctx["db"])
    locker = sqlite3.connect(ctx["db"], isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        response = ctx["client"].post("/api/annotations", json={"item_id": ctx["batch"][4], "label": 2}, headers=ADMIN)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert response.status_code == 503
    assert "busy" in response.get_json()["error"] or "locked" in response.get_json()["error"]
    assert_clean_error(response, "/api/")
    assert stored(ctx["db"]) == before


# --------------------------------------------------------------------------------------------
# Property-based: the validation of POST /api/annotations and /api/tasks?count=

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item_id=JSON_VALUES | st.integers(min_value=-2, max_value=2000), label=JSON_VALUES | st.integers(-2, 12),
       extra=st.dictionaries(st.sampled_from(["skip", "time_taken_ms", "noise"]), JSON_VALUES, max_size=2))
def test_any_answer_body_is_201_or_a_clean_4xx(ctx, item_id, label, extra):
    body = {"item_id": item_id, "label": label, **extra}
    before = stored(ctx["db"])
    response = ctx["client"].post("/api/annotations", data=json.dumps(body), content_type="application/json",
                                  headers=ADMIN)
    if response.status_code == 201:
        valid_item = isinstance(item_id, int) and not isinstance(item_id, bool) and item_id in ctx["batch"]
        assert valid_item
        assert response.get_json()["label"] in range(10) or extra.get("skip") is True
    else:
        assert response.status_code in ERROR_CODES
        assert_clean_error(response, "/api/")
        assert stored(ctx["db"]) == before


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item_ids=JSON_VALUES | st.lists(st.integers(-2, 2000) | JSON_VALUES, max_size=60), label=JSON_VALUES)
def test_any_bulk_body_is_201_or_a_clean_4xx_that_stores_nothing(ctx, item_ids, label):
    before = stored(ctx["db"])
    response = ctx["client"].post("/api/annotations/bulk", data=json.dumps({"item_ids": item_ids, "label": label}),
                                  content_type="application/json", headers=ADMIN)
    if response.status_code == 201:
        assert isinstance(item_ids, list) and set(item_ids) <= set(ctx["batch"])
    else:
        assert response.status_code in ERROR_CODES
        assert_clean_error(response, "/api/")
        assert stored(ctx["db"]) == before  # all or nothing: no answer of a refused bulk request is kept


@settings(max_examples=40, deadline=None)
@given(item=st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=12))
def test_any_undo_or_image_id_is_handled(ctx, item):
    assume(item not in ctx["batch"])  # a real undo is not hostile (and would change the other rows' state)
    for method, path in (("DELETE", f"/api/annotations/{item}"), ("GET", f"/api/items/{item}/image.png")):
        response = ctx["client"].open(path, method=method, headers=ADMIN)
        assert response.status_code < 500, path
        if response.status_code >= 400:
            assert_clean_error(response, "/api/")


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_json_body_are_handled(ctx, raw):
    response = ctx["client"].post("/api/annotations", data=raw, content_type="application/json", headers=ADMIN)
    assert response.status_code in ERROR_CODES | {201}
    assert_clean_error(response, "/api/")


@settings(max_examples=60, deadline=None)
@given(count=st.text(max_size=12))
def test_any_task_count_is_a_lease_or_a_400(ctx, count):
    response = ctx["client"].get("/api/tasks", query_string={"count": count}, headers=ADMIN)
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert 1 <= int(count) <= 50 and len(response.get_json()["tasks"]) <= int(count)


# --------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size (the decompression-bomb check fires on open, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def image_folder(tmp_path: Path, bad_name: str, bad_bytes: bytes, good: int = 3) -> str:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(good):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"ok{i}.png")
    (folder / bad_name).write_bytes(bad_bytes)
    return str(folder)


def existing_db(tmp_path: Path) -> str:
    path = tmp_path / "real.db"
    AnnotationDB(path).close()
    return str(path)


def newer_db(tmp_path: Path) -> str:
    path = tmp_path / "newer.db"
    database = AnnotationDB(path)
    database.set_meta("schema_version", "99")
    database.close()
    return str(path)


def garbage_file(tmp_path: Path) -> str:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\n" * 100)
    return str(path)


def truncated_db(tmp_path: Path) -> str:
    path = Path(existing_db(tmp_path))
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(path.read_bytes()[:1500])
    return str(path)


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path / "afile"


def a_symlink_to_an_empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    return str(tmp_path / "link")


def served_then_deleted(tmp_path: Path) -> str:
    """A database a server ran on (its lock file says so), deleted since."""
    path = existing_db(tmp_path)
    lock = annotator_db.ServerLock(path)
    lock.mark_served()
    lock.release()
    Path(path).unlink()
    return path


def a_folder(tmp_path: Path) -> str:
    (tmp_path / "adir.db").mkdir()
    return str(tmp_path / "adir.db")


def serve(port_args, db, *extra):
    return ["--db", db, "--port", str(port_args), "--device", "cpu", *extra]


# name -> (builder of argv from tmp_path and a free port, words the error line must contain)
CLI_CASES = {
    "unknown subcommand option": (lambda t, p: ["export", "--format", "csv", "--out", "x", "--bogus"], "unrecognized"),
    "export format xml": (lambda t, p: ["export", "--format", "xml", "--out", str(t / "x")], "invalid choice"),
    "export without database": (lambda t, p: ["export", "--format", "csv", "--out", str(t / "x"), "--db",
                                              str(t / "missing.db")], "no annotator database"),
    "export from a garbage file": (lambda t, p: ["export", "--format", "csv", "--out", str(t / "x.csv"), "--db",
                                                 garbage_file(t)], "not a database"),
    "export from a truncated database": (lambda t, p: ["export", "--format", "jsonl", "--out", str(t / "x.jsonl"),
                                                       "--db", truncated_db(t)], "database"),
    "export csv onto a folder": (lambda t, p: ["export", "--format", "csv", "--out", str(t), "--db", existing_db(t)],
                                 "is a folder"),
    "export imagefolder into a non-empty folder": (lambda t, p: ["export", "--format", "imagefolder", "--out", str(t),
                                                                 "--db", existing_db(t)], "not an empty folder"),
    "users add empty name": (lambda t, p: ["users", "--db", str(t / "u.db"), "add", " "], "1 to 64"),
    "users add reserved name": (lambda t, p: ["users", "--db", str(t / "u.db"), "add", "owner"], "reserved"),
    "users add unknown role": (lambda t, p: ["users", "add", "bob", "--role", "root", "--db", str(t / "u.db")],
                               "invalid choice"),
    "users add to a newer database": (lambda t, p: ["users", "--db", newer_db(t), "add", "bob"], "newer"),
    "users add to a folder": (lambda t, p: ["users", "--db", a_folder(t), "add", "bob"], "cannot use database"),
    "users list without database": (lambda t, p: ["users", "--db", str(t / "none.db"), "list"], "no annotator database"),
    "serve on port 70000": (lambda t, p: serve(70000, str(t / "s.db")), "1..65535"),
    "serve with an empty token": (lambda t, p: serve(p, str(t / "s.db"), "--token", ""), "must not be empty"),
    "serve on a garbage database": (lambda t, p: serve(p, garbage_file(t)), "not a database"),
    "serve on a folder as database": (lambda t, p: serve(p, a_folder(t)), "cannot use database"),
    "serve with a database of a newer version": (lambda t, p: serve(p, newer_db(t)), "newer"),
    # An unreadable file beside good ones is now skipped and reported (the server starts); a folder
    # whose only picture is unreadable is still one error line naming it.
    "serve with a corrupt image": (lambda t, p: serve(p, str(t / "s.db"), "--dataset", "imagefolder", "--data-dir",
                                                      image_folder(t, "broken.png", b"\x89PNG\r\n garbage", good=0),
                                                      "--classes", "a,b"), "broken.png"),
    "serve with a decompression bomb": (lambda t, p: serve(p, str(t / "s.db"), "--dataset", "imagefolder", "--data-dir",
                                                           image_folder(t, "bomb.png", png_header(30000, 30000), good=0),
                                                           "--classes", "a,b"), "bomb.png"),
    "serve with a missing image folder": (lambda t, p: serve(p, str(t / "s.db"), "--dataset", "imagefolder",
                                                             "--data-dir", str(t / "nowhere")), "does not exist"),
    "serve with an unknown strategy": (lambda t, p: serve(p, str(t / "s.db"), "--strategy", "psychic"), "invalid choice"),
    "serve with a text port": (lambda t, p: ["--port", "http"], "invalid int"),
    "export csv under a file": (lambda t, p: ["export", "--format", "csv", "--out", str(a_file(t) / "labels.csv"),
                                              "--db", existing_db(t)], "not a folder"),
    "export jsonl under a file": (lambda t, p: ["export", "--format", "jsonl", "--out",
                                                str(a_file(t) / "x" / "labels.jsonl"), "--db", existing_db(t)],
                                  "not a folder"),
    "export imagefolder onto a symlink": (lambda t, p: ["export", "--format", "imagefolder", "--out",
                                                        a_symlink_to_an_empty_folder(t), "--db", existing_db(t)],
                                          "symbolic link"),
    "serve with seed -1": (lambda t, p: serve(p, str(t / "s.db"), "--seed", "-1"), "--seed must lie in"),
    "simulated run with seed -1": (lambda t, p: ["--oracle", "simulated", "--seed", "-1", "--out", str(t / "r")],
                                   "--seed must lie in"),
    "serve with lr nan": (lambda t, p: serve(p, str(t / "s.db"), "--lr", "nan"), "--lr must be"),
    "simulated run with lr inf": (lambda t, p: ["--oracle", "simulated", "--lr", "inf", "--out", str(t / "r")],
                                  "--lr must be"),
    "serve with lr 0": (lambda t, p: serve(p, str(t / "s.db"), "--lr", "0"), "--lr must be"),
    "serve with 0 threads": (lambda t, p: serve(p, str(t / "s.db"), "--threads", "0"), "--threads"),
    "serve on a database deleted since a server ran on it": (lambda t, p: serve(p, served_then_deleted(t)),
                                                             "is missing"),
    "users remove unknown": (lambda t, p: ["users", "--db", existing_db(t), "remove", "nobody"], "no user named"),
    "users remove the owner": (lambda t, p: ["users", "--db", existing_db(t), "remove", "owner"], "start-up token"),
    "users remove without database": (lambda t, p: ["users", "--db", str(t / "none.db"), "remove", "bob"],
                                      "no annotator database"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_a_bad_command_line_is_one_error_line_and_exit_2(name, tmp_path, capsys):
    from server_harness import free_port

    build, words = CLI_CASES[name]
    argv = build(tmp_path, free_port())
    with pytest.raises(SystemExit) if name in ("unknown subcommand option", "export format xml", "users add unknown role",
                                               "serve with an unknown strategy", "serve with a text port") else _no_raise():
        code = app_module.main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("app.py") and "Traceback" not in err, err
    assert words in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_second_server_on_the_same_database_is_one_line_and_exit_2(tmp_path, capsys):
    """One server per database: the first holds DB.lock (here: this process), the second is refused at
    once, before it loads data or touches the database (which would steal the first one's token)."""
    from server_harness import free_port

    path = existing_db(tmp_path)
    before = stored(Path(path))
    lock = annotator_db.ServerLock(path)
    try:
        assert app_module.main(serve(free_port(), path, "--token", "second")) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "in use by another server" in err and "Traceback" not in err
    assert stored(Path(path)) == before


@pytest.mark.parametrize("code", ["EROFS", "EACCES", "ENOSPC"])
def test_export_onto_a_read_only_or_full_place_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, code):
    """A read-only filesystem cannot be made without privileges, and root writes anywhere: the refusal of
    the kernel is simulated where the export creates its file."""
    import errno
    import os

    from annotator import export as export_module

    path = existing_db(tmp_path)
    real_open = os.open

    def refusing_open(name, flags, *args, **kwargs):
        if str(name).endswith(".tmp"):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(export_module.os, "open", refusing_open)
    assert app_module.main(["export", "--format", "csv", "--out", str(tmp_path / "out.csv"), "--db", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and os.strerror(getattr(errno, code)) in err, err
    assert not list(tmp_path.glob(".out.csv.*"))


def test_users_add_on_a_locked_database_is_one_line_and_stores_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(annotator_db, "BUSY_TIMEOUT_S", 0.2)
    path = existing_db(tmp_path)
    before = stored(Path(path))
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        assert app_module.main(["users", "--db", path, "add", "bob"]) == 2
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("busy" in err or "locked" in err)
    assert stored(Path(path)) == before


# --------------------------------------------------------------------------------------------
# Path traversal through names stored in the database: class names and file names


def test_imagefolder_export_keeps_hostile_class_and_file_names_inside_its_folder(tmp_path):
    classes = ["../../escaped", "/etc", "..", "a/b"]
    images = torch.zeros((6, 1, 28, 28), dtype=torch.uint8)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    dataset = Dataset(name="hostile", classes=classes, train_images=images,
                      train_labels=torch.full((6,), -1, dtype=torch.int64),
                      file_names=["../secret.txt", str(secret), "x.png", "y.png", "z.png", "w.png"])
    config = RunConfig(dataset="digits", initial=6, query_size=2, rounds=1, epochs=1, device="cpu")
    app = create_app({"DATABASE": str(tmp_path / "h.db"), "RUN_CONFIG": config, "DATASET": dataset,
                      "ADMIN_TOKEN": TOKEN})
    client = app.test_client()
    for item in range(6):
        assert client.post("/api/annotations", json={"item_id": item, "label": item % 4}, headers=ADMIN).status_code == 201
    out = tmp_path / "export" / "tree"
    assert write_imagefolder(str(tmp_path / "h.db"), out, dataset=dataset, data_dir=str(data_dir)) == 6
    written = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert len(written) == 6 and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert all(p.read_bytes() != secret.read_bytes() for p in written)  # encoded from the pool, not copied
    assert not (tmp_path / "escaped").exists() and len(list(out.iterdir())) == len(classes)


# --------------------------------------------------------------------------------------------
# Failing storage: a lookup that raises, a database deleted under the running app


@pytest.mark.parametrize("path", ["/api/status", "/dashboard", "/"])
def test_a_failing_user_lookup_is_a_503_with_its_message_not_an_empty_500(ctx, monkeypatch, path):
    def failing(*_args, **_kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    client = ctx["app"].test_client()
    assert client.get(f"/?token={TOKEN}").status_code == 200  # a session, for the cookie path
    monkeypatch.setattr(AnnotationDB, "user_for_token", failing)
    monkeypatch.setattr(AnnotationDB, "user_for_session", failing)
    for headers in (ADMIN, {}):
        response = client.get(path, headers=headers)
        assert response.status_code == 503, (path, headers, response.status_code)
        body = response.get_data(as_text=True)
        assert "disk I/O error" in body and "Traceback" not in body
        if path.startswith("/api/"):
            assert response.get_json() == {"error": "disk I/O error", "status": 503}


def test_a_database_deleted_under_the_app_is_a_503_and_is_not_recreated(tmp_path, digits):
    import time

    path = tmp_path / "gone.db"
    app = create_app({"DATABASE": str(path), "RUN_CONFIG": small_config(), "DATASET": digits, "ADMIN_TOKEN": TOKEN,
                      "START_ENGINE": True})
    state = app.extensions["annotator"]
    client = app.test_client()
    assert client.get("/api/status", headers=ADMIN).status_code == 200
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)
    response = client.get("/api/status", headers=ADMIN)
    assert response.status_code == 503 and "deleted or replaced" in response.get_json()["error"]
    assert client.post("/api/annotations", json={"item_id": 0, "label": 1}, headers=ADMIN).status_code == 503
    assert not path.exists()  # not silently recreated as an empty database
    deadline = time.monotonic() + 10
    while state.worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state.worker.is_alive()  # the engine stopped, saying why
    snapshot = state.status.snapshot()
    assert snapshot["state"] == "error" and "deleted or replaced" in snapshot["detail"]
    assert not path.exists()
