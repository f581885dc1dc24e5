"""Access control, checked over the app's own route table: every route but sign-in and static files needs
a valid session or token; annotators cannot export, manage users or see tokens; tokens are stored hashed
and compared in constant time; every state-changing form and call carries a CSRF token; cookies are
HttpOnly and SameSite."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from annotator import db as annotator_db
from annotator.db import AnnotationDB

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "access-owner-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC = {"static", "favicon"}  # endpoints anyone may reach (the icon a browser asks for); `/` is sign-in only with ?token=
ADMIN_ONLY = {"admin.index", "admin.add_user", "admin.release_leases", "api.export"}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def app(make_annotator_app):
    return make_annotator_app(TOKEN)


@pytest.fixture
def tokens(app):
    database = AnnotationDB(app.extensions["annotator"].database)
    try:
        return {"alice": database.add_user("alice"), "bob": database.add_user("bob"),
                "carol": database.add_user("carol", "admin")}
    finally:
        database.close()


def routes(app) -> list[tuple[str, str, str]]:
    """(endpoint, method, a concrete URL) for every rule of the app; item ids are a batch item."""
    item = app.extensions["annotator"].driver.db.db.execute("select item_id from batch_items limit 1").fetchone()[0]
    found = []
    for rule in app.url_map.iter_rules():
        url = rule.rule.replace("<int:item_id>", str(item)).replace("<path:filename>", "style.css")
        assert "<" not in url, f"add a value for the converters of {rule.rule}"
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((rule.endpoint, method, url))
    return found


def test_every_route_but_static_files_needs_a_session_or_token(app):
    client = app.test_client()
    checked = 0
    for endpoint, method, url in routes(app):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Token " + TOKEN}):
            response = client.open(url, method=method, headers=headers)
            if endpoint in PUBLIC:
                assert response.status_code == 200, url
            else:
                assert response.status_code == 401, (method, url, headers, response.status_code)
                checked += 1
    assert checked >= 3 * 15  # the table really was walked


def test_a_forged_or_stale_session_cookie_is_not_a_sign_in(app, make_annotator_app):
    client = app.test_client()
    client.set_cookie("annotator_session", "eyJ1c2VyX2lkIjoxfQ.forged.signature")
    assert client.get("/api/status").status_code == 401
    assert client.get(f"/?token={TOKEN}").status_code == 302
    assert client.get("/api/status").status_code == 200
    # a restart with a new start-up token signs the owner's old sessions out
    restarted = make_annotator_app("a-new-token")  # the same database
    stale = restarted.test_client()
    stale.set_cookie("annotator_session", client.get_cookie("annotator_session").value)
    assert stale.get("/api/status").status_code == 401


def test_annotators_get_403_exactly_on_the_admin_routes(app, tokens):
    client = app.test_client()
    annotator = {"Authorization": f"Bearer {tokens['alice']}"}
    forbidden = set()
    for endpoint, method, url in routes(app):
        if endpoint in PUBLIC or endpoint == "auth.signout":
            continue
        response = client.open(url, method=method, headers=annotator, data={"name": "mallory"})
        if response.status_code == 403:
            forbidden.add(endpoint)
        else:
            assert response.status_code < 500
        admin_response = app.test_client().open(url, method=method, headers={"Authorization": f"Bearer {tokens['carol']}"},
                                                data={"name": f"user-{endpoint}"})
        assert admin_response.status_code != 403, endpoint  # an added admin is an admin
    assert forbidden == ADMIN_ONLY
    users = [u["name"] for u in AnnotationDB(app.extensions["annotator"].database).list_users()]
    assert "mallory" not in users


def test_no_response_shows_a_token_or_token_hash_to_anyone(app, tokens):
    """Annotators (and admins) never see others' tokens: crawl every GET route as each user."""
    secrets = {TOKEN, *tokens.values()}
    hashes = {annotator_db.hash_token(token) for token in secrets}
    for name, token in (("alice", tokens["alice"]), ("carol", tokens["carol"]), ("owner", TOKEN)):
        client = app.test_client()
        for endpoint, method, url in routes(app):
            if method != "GET" or endpoint == "static":
                continue
            body = client.get(url, headers={"Authorization": f"Bearer {token}"}).get_data()
            for secret in secrets | hashes:
                if secret == token:
                    continue  # one's own token may appear (e.g. a sign-in link); none here does
                assert secret.encode() not in body, (name, url)
                assert secret[:16].encode() not in body, (name, url)


def test_tokens_are_stored_only_as_hashes(app, tokens):
    database = Path(app.extensions["annotator"].database)
    raw = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
    for token in (TOKEN, *tokens.values()):
        assert token.encode() not in raw
        assert annotator_db.hash_token(token).encode() in raw


def test_tokens_are_compared_in_constant_time(app, tokens, monkeypatch):
    compared = []
    original = annotator_db.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(annotator_db.hmac, "compare_digest", spy)
    client = app.test_client()
    assert client.get("/api/status", headers={"Authorization": f"Bearer {tokens['bob']}"}).status_code == 200
    assert (annotator_db.hash_token(tokens["bob"]),) * 2 in compared
    # a token that differs from a real one in its last character is refused like any other
    assert client.get("/api/status", headers={"Authorization": f"Bearer {tokens['bob'][:-1]}x"}).status_code == 401


def csrf_of(html: str) -> str:
    return re.search(r'"csrf": "([^"]+)"|name="csrf_token" value="([^"]+)"', html).group(0)


def test_every_form_in_every_page_carries_the_session_csrf_token(app):
    client = app.test_client()
    client.get(f"/?token={TOKEN}")
    forms = 0
    for url in ("/", "/grid", "/dashboard", "/admin/"):
        html = client.get(url).get_data(as_text=True)
        for form in re.findall(r"<form\b[^>]*>.*?</form>", html, flags=re.S):
            if re.search(r'method="dialog"', form):
                continue  # closes a dialog in the browser; never sent
            forms += 1
            assert re.search(r'method="post"', form, flags=re.I), form[:80]
            token = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert token, f"form without CSRF token on {url}: {form[:120]}"
    assert forms >= 3  # sign-out on each page, add-user on the admin page
    assert not re.search(r'<form(?![^>]*method="(post|dialog)")', "".join(
        client.get(url).get_data(as_text=True) for url in ("/", "/grid", "/dashboard", "/admin/")))
    script = (ROOT / "static" / "label.js").read_text()
    assert '"X-CSRF-Token": config.csrf' in script  # the page's fetch calls send the token


def test_cookie_requests_that_change_state_need_the_csrf_token_on_every_unsafe_route(app):
    client = app.test_client()
    client.get(f"/?token={TOKEN}")
    page = client.get("/admin/").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    unsafe = [(endpoint, method, url) for endpoint, method, url in routes(app) if method in UNSAFE]
    assert {endpoint for endpoint, _, _ in unsafe} >= {"api.annotate", "api.annotate_many", "api.undo",
                                                       "admin.add_user", "auth.signout"}
    for endpoint, method, url in unsafe:
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": csrf[:-1]}):
            response = client.open(url, method=method, headers=headers, data={"name": "csrf-victim"})
            assert response.status_code == 403, (endpoint, headers)
    assert client.get("/api/status").status_code == 200  # still signed in: sign-out was refused too
    accepted = client.post("/admin/users", data={"name": "with-token", "csrf_token": csrf})
    assert accepted.status_code == 201
    assert "csrf-victim" not in accepted.get_data(as_text=True)


def test_the_session_cookie_is_httponly_and_samesite(app):
    response = app.test_client().get(f"/?token={TOKEN}")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("annotator_session=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie  # the cookie holds a signed user id, never the token


def test_every_response_forbids_framing_and_mime_sniffing(app):
    client = app.test_client()
    for response in (client.get("/"), client.get(f"/?token={TOKEN}"), client.get("/dashboard"),
                     client.get("/api/status", headers=ADMIN), client.get("/static/style.css")):
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
