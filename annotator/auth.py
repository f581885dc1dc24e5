"""Sign-in: a token in the URL (`/?token=T`) starts a session; the API also takes `Authorization: Bearer T`.

Sessions live on the server (`sessions` table): the cookie (Flask's signed cookie: HttpOnly,
SameSite=Lax, named per port) holds a random session id and a CSRF token, and the database holds only
the id's SHA-256. So a session can be ended for every copy of its cookie (sign-out, `app.py users
remove`, a new start-up `--token` for the owner's), and neither the database file nor the signing
secret in it is enough to make one.
Requests authenticated by the cookie must carry the CSRF token to change anything (a form field
`csrf_token` or the header `X-CSRF-Token`); Bearer requests need none (a browser never adds them).
"""
from __future__ import annotations

import functools
import hmac
import secrets

from flask import Blueprint, abort, redirect, render_template, request, session, url_for

from .connection import get_db
from .errors import wants_json
from .db import User

bp = Blueprint("auth", __name__)

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


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
    elif isinstance(session.get("sid"), str):
        user = get_db().user_for_session(session["sid"])
        method = "session" if user is not None else None
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
    session["sid"] = get_db().create_session(user.id)
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


INVALID_LINK = "this sign-in link is not valid (the server prints a new one at each start)"


def session_user() -> User | None:
    """The user of this browser's session cookie (not of a Bearer header), or None."""
    sid = session.get("sid")
    return get_db().user_for_session(sid) if isinstance(sid, str) else None


def sign_in_page(token: str):
    """GET /?token=T. Signs in at once when this browser has no session of another user; otherwise asks
    for a click (a POST with the session's CSRF token), so that another site cannot silently swap the
    person's session for one of its own (login CSRF). The page then takes the token out of the history."""
    user = get_db().user_for_token(token)
    if user is None:
        abort(401, INVALID_LINK)
    signed_in = session_user()
    if signed_in is not None and signed_in.id != user.id:
        response = render_template("signin.html", switch=True, link_user=user, signed_in=signed_in, token=token)
    else:
        sign_in(token)
        response = render_template("signin.html", switch=False, link_user=user)
    return response, 200, {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@bp.post("/signin")
def signin():
    """The click of the switch-user page: the token in the form, the current session's CSRF token."""
    if session_user() is not None:
        request.environ[AUTH_KEY] = (session_user(), "session")
        check_csrf()
    token = request.form.get("token", "")
    if sign_in(token) is None:
        abort(401, INVALID_LINK)
    return redirect(url_for("pages.index"), code=303)


@bp.post("/signout")
@require_user()
def signout():
    if isinstance(session.get("sid"), str):
        get_db().end_session(session["sid"])  # a copy of the cookie saved elsewhere stops working too
    session.clear()
    return redirect(url_for("pages.index"))


def current_user_or_none() -> User | None:
    """current_user for templates: the error page is rendered when the lookup itself failed (a database
    gone or locked), and must then show the error instead of failing again into an empty 500."""
    try:
        return current_user()
    except Exception:  # noqa: BLE001 - the error being shown is already reported
        request.environ[AUTH_KEY] = (None, None)
        return None


@bp.app_context_processor
def template_helpers():
    return {"csrf_token": csrf_token, "current_user": current_user_or_none}
