"""The review page: past answers with their images, filtered, relabeled with the labeling keys.

A relabel is a POST /api/annotations like any answer: on an item of a closed round it is a correction
("outcome": "corrected") that decides the item's training label from the next training on.
"""
from __future__ import annotations

from flask import Blueprint, abort, render_template, request

from .auth import require_user
from .connection import get_db
from .pages import class_buttons, page_config
from .state import annotator_state

bp = Blueprint("review", __name__)

PAGE_SIZE = 48  # items per review page


def _int_arg(name: str, low: int = 0, high: int | None = None) -> int | None:
    value = request.args.get(name, "")
    if value == "":
        return None
    if not (value.isascii() and value.isdigit()) or (high is not None and int(value) > high) or int(value) < low:
        abort(400, f"'{name}' must be a whole number" + (f" from {low} to {high}" if high is not None else ""))
    return int(value)


@bp.get("/review")
@require_user()
def review():
    state, db = annotator_state(), get_db()
    classes = state.classes
    label = request.args.get("class", "")
    if label and label not in classes:
        abort(400, f"unknown class {label!r}")
    annotator = request.args.get("annotator", "")
    users = [u for u in db.list_users() if u["answers"]]
    annotator_id = next((u["id"] for u in db.list_users() if u["name"] == annotator), None) if annotator else None
    if annotator and annotator_id is None:
        abort(400, f"unknown annotator {annotator!r}")
    queue = request.args.get("queue", "all")
    if queue not in ("all", "disagreements", "conflicts"):
        abort(400, "'queue' must be all, disagreements or conflicts")
    round_index = _int_arg("round")
    page = _int_arg("page", 1) or 1
    items, total = db.review_items(label=classes.index(label) if label else None, annotator_id=annotator_id,
                                   round_index=round_index, disagreements=queue == "disagreements",
                                   conflicts=queue == "conflicts", limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    filters = {"class": label, "annotator": annotator, "round": "" if round_index is None else round_index,
               "queue": queue}
    return render_template("review.html", items=items, total=total, page=page, page_size=PAGE_SIZE,
                           filters=filters, classes=class_buttons(), users=users,
                           rounds=[r["round"] for r in db.rounds()], config=page_config("review", 0))
