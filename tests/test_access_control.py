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
    assert client.get(f"/?token={TOKEN}").status_code == 200
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


# --------------------------------------------------------------------------------------------
# Sessions live on the server: revocable, and not forgeable from the database file


def signing_serializer(app):
    return app.session_interface.get_signing_serializer(app)


def test_the_database_file_alone_does_not_make_a_session(app):
    """Someone who can read the database (its signing secret, the users' token hashes) still cannot sign a
    cookie that the server takes: a session id must be one whose hash is in `sessions`, and only hashes are."""
    database = AnnotationDB(app.extensions["annotator"].database)
    owner = database.user_for_token(TOKEN)
    database.close()
    serializer = signing_serializer(app)
    client = app.test_client()
    client.get(f"/?token={TOKEN}")  # a real session exists, so its hash is in the file
    raw = Path(app.extensions["annotator"].database).read_bytes()
    stored_hash = re.search(rb"[0-9a-f]{64}", raw)
    forged_cookies = [
        {"user_id": owner.id, "token_tag": owner.token_hash[:16], "csrf": "x"},  # what the old cookie held
        {"sid": "guess", "csrf": "x"},
        {"sid": stored_hash.group(0).decode(), "csrf": "x"},  # a hash read from the file is not an id
    ]
    for content in forged_cookies:
        forger = app.test_client()
        forger.set_cookie("annotator_session", serializer.dumps(content))
        assert forger.get("/api/status").status_code == 401, content


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(app):
    browser = app.test_client()
    browser.get(f"/?token={TOKEN}")
    saved = browser.get_cookie("annotator_session").value  # e.g. copied by malware, or a second tab's
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/dashboard").get_data(as_text=True)).group(1)
    assert browser.post("/signout", data={"csrf_token": csrf}).status_code == 302
    replay = app.test_client()
    replay.set_cookie("annotator_session", saved)
    assert replay.get("/api/status").status_code == 401
    assert browser.get("/api/status").status_code == 401


def test_users_remove_revokes_the_token_and_every_session_at_once(app, tokens, capsys):
    import app as app_module

    database_path = app.extensions["annotator"].database
    browsers = [app.test_client() for _ in range(2)]
    for browser in browsers:
        browser.get(f"/?token={tokens['alice']}")
        assert browser.get("/whoami").get_json()["name"] == "alice"
    assert app_module.main(["users", "--db", database_path, "remove", "alice"]) == 0
    assert "2 signed-in session(s) ended" in capsys.readouterr().out
    for browser in browsers:
        assert browser.get("/api/status").status_code == 401
    client = app.test_client()
    assert client.get("/api/status", headers={"Authorization": f"Bearer {tokens['alice']}"}).status_code == 401
    assert client.get(f"/?token={tokens['alice']}").status_code == 401
    assert client.get("/api/status", headers={"Authorization": f"Bearer {tokens['bob']}"}).status_code == 200
    assert app_module.main(["users", "--db", database_path, "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"alice\s+annotator\s+0\s+removed", listing) and re.search(r"bob\s+annotator\s+0\s+active", listing)
    # added again, alice gets a new token; the old one stays dead
    assert app_module.main(["users", "--db", database_path, "add", "alice"]) == 0
    new_token = re.search(r"shown once\): (\S+)", capsys.readouterr().out).group(1)
    assert client.get("/api/status", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200
    assert client.get("/api/status", headers={"Authorization": f"Bearer {tokens['alice']}"}).status_code == 401


def test_a_new_start_up_token_ends_the_owner_sessions_but_the_same_token_keeps_them(app, make_annotator_app, tokens):
    owner, alice = app.test_client(), app.test_client()
    owner.get(f"/?token={TOKEN}")
    alice.get(f"/?token={tokens['alice']}")
    same = make_annotator_app(TOKEN)  # a restart with the same --token
    kept = same.test_client()
    kept.set_cookie("annotator_session", owner.get_cookie("annotator_session").value)
    assert kept.get("/api/status").status_code == 200
    restarted = make_annotator_app("another-token")
    for cookie, expected in ((owner.get_cookie("annotator_session").value, 401),
                             (alice.get_cookie("annotator_session").value, 200)):  # only the owner's end
        client = restarted.test_client()
        client.set_cookie("annotator_session", cookie)
        assert client.get("/api/status").status_code == expected


def test_a_sign_in_link_for_another_user_asks_for_a_click(app, tokens):
    """Login CSRF: another site sends the owner's browser to /?token=MALLORY. The session is not replaced;
    a page asks, and only its POST (with this session's CSRF token) switches."""
    browser = app.test_client()
    browser.get(f"/?token={TOKEN}")
    page = browser.get(f"/?token={tokens['alice']}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "Switch user?" in html and "alice" in html
    assert browser.get("/whoami").get_json()["name"] == "owner"  # nothing changed yet
    assert browser.post("/signin", data={"token": tokens["alice"]}).status_code == 403  # a cross-site form
    assert browser.post("/signin", data={"token": tokens["alice"], "csrf_token": "forged"}).status_code == 403
    assert browser.get("/whoami").get_json()["name"] == "owner"
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    switched = browser.post("/signin", data={"token": tokens["alice"], "csrf_token": csrf})
    assert switched.status_code == 303 and switched.headers["Location"] == "/"
    assert browser.get("/whoami").get_json()["name"] == "alice"
    # the same user's link again, or a first sign-in, needs no click
    assert "Signed in as alice" in browser.get(f"/?token={tokens['alice']}").get_data(as_text=True)


def test_the_sign_in_page_takes_the_token_out_of_the_history_and_is_not_cached(app):
    response = app.test_client().get(f"/?token={TOKEN}")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and TOKEN not in html
    assert response.headers["Cache-Control"] == "no-store" and response.headers["Referrer-Policy"] == "no-referrer"
    script = re.search(r'<script src="([^"]*signin\.js)"', html).group(1)
    source = (ROOT / "static" / "signin.js").read_text()
    assert script.endswith("/static/signin.js")
    assert 'history.replaceState(null, "", "/")' in source and "location.replace(next)" in source


def test_the_database_and_its_wal_are_readable_by_the_owner_only(app):
    import os
    import stat

    path = Path(app.extensions["annotator"].database)
    app.test_client().get(f"/?token={TOKEN}")  # a write: the WAL exists
    for name in (path, Path(str(path) + "-wal")):
        assert name.exists()
        assert stat.S_IMODE(os.stat(name).st_mode) & 0o077 == 0, (name, oct(os.stat(name).st_mode))
