"""Admin pages: named annotators (add, list) and the export links."""
from __future__ import annotations

from flask import Blueprint, render_template, request, url_for

from al_engine.errors import UserError

from .connection import get_db
from .auth import require_user
from .db import ROLES

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("/")
@require_user(admin=True)
def index():
    return render_template("admin.html", users=get_db().list_users(), roles=ROLES, new_user=None, error=None)


@bp.post("/users")
@require_user(admin=True)
def add_user():
    name, role = request.form.get("name", ""), request.form.get("role", "annotator")
    try:
        token = get_db().add_user(name, role)
    except UserError as error:
        return render_template("admin.html", users=get_db().list_users(), roles=ROLES, new_user=None,
                               error=str(error)), 400
    new_user = {"name": name.strip(), "role": role, "token": token,
                "url": url_for("pages.index", token=token, _external=True)}
    return render_template("admin.html", users=get_db().list_users(), roles=ROLES, new_user=new_user, error=None), 201
