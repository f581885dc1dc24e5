"""The JSON API: status, tasks (leases, heartbeat), answers and corrections, images, learning curve,
agreement and export.

Errors are JSON `{"error", "status"}` with a 4xx code: 400 bad input, 401 not signed in,
403 not allowed, 404 unknown item, 409 the item is leased to someone else (or an undo on a closed round).
"""
from __future__ import annotations

from flask import Blueprint, Response, abort, jsonify, request, stream_with_context, url_for

from .connection import get_db
from .state import annotator_state
from .auth import current_user, require_user
from .db import SKIP
from .export import MEDIA_TYPES, STREAM_FORMATS, export_lines
from .images import cached_picture, picture_info

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_TASKS = 50  # items one request may lease at once (grid mode)


def status_payload() -> dict:
    state = annotator_state()
    db = get_db()
    progress = db.batch_progress()
    labeled = db.labeled_count()
    engine = state.status.snapshot()
    if engine["state"] == "waiting" and progress["state"] == "labeling":  # fresher than the worker's last look
        done = progress["query_size"] - progress["remaining"]
        engine["detail"] = f"{done} of {progress['query_size']} answered"
        engine["progress"] = round(done / max(progress["query_size"], 1), 3)
    return {
        "round": progress["round"], "labeled": labeled, "unlabeled": state.driver.engine.pool.size - labeled,
        "query_size": progress["query_size"], "remaining": progress["remaining"],
        # the contract's first names for the same two numbers (docs/annotator.md), kept for API clients
        "batch_size": progress["query_size"], "batch_remaining": progress["remaining"],
        "engine": engine["state"], "engine_progress": engine["progress"], "engine_detail": engine["detail"],
        "round_state": progress["state"], "finished": db.is_finished(),
    }


def task_payload(item_id: int) -> dict:
    """An item to label: its id, where its picture is, and the file's name and size (pixels, upright)."""
    state = annotator_state()
    return {"item_id": item_id, "image_url": url_for("api.item_image", item_id=item_id),
            **picture_info(state.images, state.pool_index(item_id))}


@bp.get("/status")
@require_user()
def status():
    return jsonify(status_payload())


@bp.get("/tasks/next")
@require_user()
def next_task():
    items = get_db().lease_tasks(current_user().id, 1)
    if not items:
        return Response(status=204)
    return jsonify(task_payload(items[0]))


@bp.get("/tasks")
@require_user()
def tasks():
    """Up to `count` items leased to this annotator: the page shows the first and preloads the rest.
    `checks=1`: when the open batch has nothing for them (the engine trains), closed rounds' items for
    a blind second opinion (each task says its "kind": "label" or "check")."""
    count = request.args.get("count", "1")
    # ASCII digits only: str.isdigit() also accepts '²' or '①', which int() then refuses
    if not (count.isascii() and count.isdigit() and len(count) <= 3) or not 1 <= int(count) <= MAX_TASKS:
        abort(400, f"count must be an integer from 1 to {MAX_TASKS}")
    checks = request.args.get("checks", "0")
    if checks not in ("0", "1"):
        abort(400, "checks must be 0 or 1")
    db, user = get_db(), current_user()
    items = db.lease_tasks(user.id, int(count), checks=checks == "1")
    kinds = db.task_kinds(user.id, items)
    return jsonify(tasks=[{**task_payload(item), "kind": kinds.get(item, "label")} for item in items],
                   status=status_payload())


@bp.post("/heartbeat")
@require_user()
def heartbeat():
    """An open labeling page says it is still there: its leases run on (they lapse without it)."""
    return jsonify(renewed=get_db().renew_leases(current_user().id))


@bp.get("/answers/recent")
@require_user()
def recent_answers():
    """My last 10 answers, newest first, each with its picture: the labeling page's history."""
    classes = annotator_state().classes
    return jsonify(answers=[{**task_payload(a["item_id"]), "label": a["label"],
                             "label_name": classes[a["label"]] if a["label"] >= 0 else None, "round": a["round"],
                             "closed": a["state"] != "labeling", "source": a["source"]}
                            for a in get_db().recent_answers(current_user().id, 10)])


@bp.get("/agreement")
@require_user()
def agreement():
    """Cohen's kappa per pair of annotators, Fleiss' kappa over all, confusion between annotators,
    and each annotator's agreement with the majority."""
    db = get_db()
    return jsonify(overlap=db.overlap(), label_model=db.label_model(), **db.agreement(annotator_state().classes))


@bp.post("/instructions/seen")
@require_user()
def instructions_seen():
    """The page showed the guidelines: do not open them by themselves again until they change."""
    version = json_body().get("version")
    if not isinstance(version, str) or not version.isalnum() or len(version) > 64:
        abort(400, "'version' must be the guidelines' version string")
    get_db().mark_instructions_seen(current_user().id, version)
    return jsonify(version=version)


def parse_label(body: dict) -> int:
    """A class index or class name from the body; `"skip": true` records a skip."""
    classes = annotator_state().classes
    if body.get("skip") is True:
        return SKIP
    label = body.get("label")
    if isinstance(label, bool) or label is None:
        abort(400, f"'label' must be a class index 0..{len(classes) - 1} or a class name")
    if isinstance(label, str):
        if label not in classes:
            abort(400, f"unknown class {label!r}; classes: {', '.join(classes)}")
        return classes.index(label)
    if not isinstance(label, int) or not 0 <= label < len(classes):
        abort(400, f"'label' must be a class index 0..{len(classes) - 1} or a class name")
    return label


def parse_item_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        abort(400, "'item_id' must be a non-negative integer")
    check_in_pool(value)
    return value


def check_in_pool(item_id: int) -> int:
    """The item's pool position; 404 for an id that is not in the pool (past its end, which also keeps
    it from SQLite, whose integers stop at 2**63; or a file that has vanished from the folder)."""
    position = annotator_state().pool_index(item_id)
    if position is None:
        abort(404, f"item {item_id} is in no batch")
    return position


def json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json's decoder recurses per nesting level: `[[[[...` within the size limit
        abort(400, "the JSON body is nested too deeply")
    if not isinstance(body, dict):
        abort(400, "send a JSON object (Content-Type: application/json)")
    return body


def parse_time_taken(body: dict) -> int | None:
    taken = body.get("time_taken_ms")
    if taken is None:
        return None
    if isinstance(taken, bool) or not isinstance(taken, (int, float)) or not 0 <= taken < 1e9:
        abort(400, "'time_taken_ms' must be a non-negative number of milliseconds")
    return int(taken)


@bp.post("/annotations")
@require_user()
def annotate():
    """201 for a new, repeated (idempotent) or replaced answer; committed before the response."""
    body = json_body()
    item_id, label = parse_item_id(body.get("item_id")), parse_label(body)
    user = current_user()
    outcome = get_db().record_answer(user.id, item_id, label, parse_time_taken(body), is_admin=user.is_admin)
    annotator_state().notify_engine()
    return jsonify(item_id=item_id, label=label, outcome=outcome), 201


@bp.post("/annotations/bulk")
@require_user()
def annotate_many():
    """Grid mode: one label for many items in one transaction: an unknown or closed item answers
    404/409 and records none of them."""
    body = json_body()
    item_ids = body.get("item_ids")
    if not isinstance(item_ids, list) or not 1 <= len(item_ids) <= MAX_TASKS:
        abort(400, f"'item_ids' must be a list of 1 to {MAX_TASKS} item ids")
    item_ids = [parse_item_id(item) for item in item_ids]
    label = parse_label(body)
    user = current_user()
    outcomes = get_db().record_answers(user.id, list(dict.fromkeys(item_ids)), label, is_admin=user.is_admin)
    annotator_state().notify_engine()
    return jsonify(item_ids=list(dict.fromkeys(item_ids)), label=label, outcomes=outcomes), 201


@bp.delete("/annotations/<int:item_id>")
@require_user()
def undo(item_id: int):
    """Undo: withdraw my answer to an item of the open batch; the item is leased back to me."""
    check_in_pool(item_id)
    get_db().undo_answer(current_user().id, item_id)
    return jsonify(task_payload(item_id))


@bp.get("/items/<int:item_id>/image.png")  # the first URL of the API, kept for its clients
@bp.get("/items/<int:item_id>/image")  # registered first: the URL url_for builds
@require_user()
def item_image(item_id: int):
    """The item's picture: the original file (upright, aspect kept) or a crisp upscale (benchmarks)."""
    state = annotator_state()
    position = check_in_pool(item_id)
    if not get_db().item_in_batches(item_id):
        abort(404, f"item {item_id} is in no batch")
    picture = cached_picture(state.pictures, state.images, item_id, position)
    response = Response(picture.data, mimetype=picture.mimetype)
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response


@bp.get("/rounds")
@require_user()
def rounds():
    db = get_db()
    audit = {e["round"]: e for e in db.audit_estimates()}
    return jsonify(rounds=[{**{k: r[k] for k in ("round", "state", "strategy", "query_size", "labeled", "accuracy",
                                                 "train_s", "query_s", "epochs", "kappa", "kappa_mean")},
                            "stop": bool(r["stop"]), "audit": audit.get(r["round"])} for r in db.rounds()])


@bp.get("/export")
@require_user(admin=True)
def export():
    fmt = request.args.get("format", "csv")
    if fmt not in STREAM_FORMATS:
        abort(400, f"unknown export format {fmt!r}; choose from: {', '.join(STREAM_FORMATS)}")
    lines = export_lines(annotator_state().database, fmt)
    response = Response(stream_with_context(lines), content_type=MEDIA_TYPES[fmt])  # carries its charset
    response.headers["Content-Disposition"] = f'attachment; filename="annotations.{fmt}"'
    return response
