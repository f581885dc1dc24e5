"""Admin pages: named annotators (add, list), who holds which items (and releasing them), exports."""
from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, request, url_for

from al_engine.errors import UserError

from .connection import get_db
from .auth import require_user
from .db import ROLES

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _page(new_user=None, error=None):
    db = get_db()
    return render_template("admin.html", users=db.list_users(), roles=ROLES, new_user=new_user, error=error,
                           leases=db.active_leases())


@bp.get("/")
@require_user(admin=True)
def index():
    return _page()


@bp.post("/users")
@require_user(admin=True)
def add_user():
    name, role = request.form.get("name", ""), request.form.get("role", "annotator")
    try:
        token = get_db().add_user(name, role)
    except UserError as error:
        return _page(error=str(error)), 400
    new_user = {"name": name.strip(), "role": role, "token": token,
                "url": url_for("pages.index", token=token, _external=True)}
    return _page(new_user=new_user), 201


@bp.post("/leases/release")
@require_user(admin=True)
def release_leases():
    """Hand an annotator's leased items back to everyone (someone went for lunch with five images)."""
    value = request.form.get("annotator_id", "")
    if not (value.isascii() and value.isdigit()):
        abort(400, "'annotator_id' must be a user id")
    get_db().release_leases(user_id=int(value))
    return redirect(url_for("admin.index"))
