"""Sign-in: a token in the URL (`/?token=T`) starts a session; the API also takes `Authorization: Bearer T`.

Sessions are Flask's signed cookie (HttpOnly, SameSite=Lax) holding the user id, a CSRF token and a
prefix of the user's token hash, so that a new start-up token signs the old owner sessions out.
Requests authenticated by the cookie must carry the CSRF token to change anything (a form field
`csrf_token` or the header `X-CSRF-Token`); Bearer requests need none (a browser never adds them).
"""
from __future__ import annotations

import functools
import hmac
import secrets

from flask import Blueprint, abort, redirect, request, session, url_for

from .connection import get_db
from .errors import wants_json
from .db import User

bp = Blueprint("auth", __name__)

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _token_tag(user: User) -> str:
    return (user.token_hash or "")[:16]


AUTH_KEY = "annotator.auth"  # (user, method) cached on the request itself, not on `g`: an app
# context can outlive its request (a streamed export keeps it pushed), and a later request reusing it
# must not inherit the previous request's user


def current_user() -> User | None:
    """The user of this request (Bearer header first, then the session cookie), or None."""
    if AUTH_KEY in request.environ:
        return request.environ[AUTH_KEY][0]
    user, method = None, None
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            user, method = get_db().user_for_token(token.strip()), "bearer"
    elif "user_id" in session:
        candidate = get_db().user_by_id(session["user_id"])
        if candidate is not None and hmac.compare_digest(session.get("token_tag", ""), _token_tag(candidate)):
            user, method = candidate, "session"
    request.environ[AUTH_KEY] = (user, method)
    return user


def auth_method() -> str | None:
    current_user()
    return request.environ[AUTH_KEY][1]


def sign_in(token: str) -> User | None:
    user = get_db().user_for_token(token)
    if user is None:
        return None
    session.clear()
    session["user_id"] = user.id
    session["token_tag"] = _token_tag(user)
    session["csrf"] = secrets.token_urlsafe(24)
    request.environ[AUTH_KEY] = (user, "session")
    return user


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf() -> None:
    if request.method not in UNSAFE_METHODS or auth_method() != "session":
        return
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        abort(403, "missing or wrong CSRF token; reload the page")


def require_user(admin: bool = False):
    """Views behind sign-in: 401 without a valid token or session, 403 for an annotator on admin views."""
    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            user = current_user()
            if user is None:
                if wants_json():
                    abort(401, "sign in: send 'Authorization: Bearer TOKEN'")
                abort(401, "open the sign-in link (with ?token=...) that the server printed at start-up")
            check_csrf()
            if admin and not user.is_admin:
                abort(403, "only an admin may do this")
            return view(*args, **kwargs)
        return wrapped
    return decorator


@bp.post("/signout")
@require_user()
def signout():
    session.clear()
    return redirect(url_for("pages.index"))


@bp.app_context_processor
def template_helpers():
    return {"csrf_token": csrf_token, "current_user": current_user}
