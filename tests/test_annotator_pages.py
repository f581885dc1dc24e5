"""The pages through Flask's test client: sign-in, cookies, CSRF, roles, dashboard partials."""
from __future__ import annotations

import re

import pytest

from annotator.db import AnnotationDB

TOKEN = "page-token"


@pytest.fixture
def app(make_annotator_app):
    return make_annotator_app(TOKEN)


@pytest.fixture
def client(app):
    return app.test_client()


def signed_in(client, token=TOKEN):
    response = client.get(f"/?token={token}")
    assert response.status_code == 200 and "Signed in as" in response.get_data(as_text=True)
    return response


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_sign_in_sets_an_httponly_samesite_cookie_and_drops_the_token_from_the_url(client):
    cookie = signed_in(client).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'class="class-button"' in html and "<kbd>1</kbd>" in html and "<kbd>0</kbd>" in html
    assert "htmx-2.0.11.min.js" in html and "//cdn" not in html and "unpkg" not in html


def test_pages_without_sign_in_or_with_a_bad_token_are_401(client):
    assert client.get("/").status_code == 401
    assert client.get("/dashboard").status_code == 401
    response = client.get("/?token=wrong")
    assert response.status_code == 401 and "not valid" in response.get_data(as_text=True)


def test_a_new_start_up_token_signs_old_owner_sessions_out(client, app):
    signed_in(client)
    assert client.get("/").status_code == 200
    db = AnnotationDB(app.extensions["annotator"].database)
    db.ensure_owner("the-next-start-token")
    db.close()
    assert client.get("/").status_code == 401


def test_cookie_requests_that_change_state_need_the_csrf_token(client):
    signed_in(client)
    html = client.get("/").get_data(as_text=True)
    csrf = csrf_of(html)
    item = client.get("/api/tasks/next").get_json()["item_id"]
    body = {"item_id": item, "label": 1}
    assert client.post("/api/annotations", json=body).status_code == 403
    assert client.post("/api/annotations", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/api/annotations", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    assert client.post("/signout").status_code == 403
    assert client.post("/signout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/").status_code == 401


def test_annotators_may_not_open_admin_pages(client, app):
    db = AnnotationDB(app.extensions["annotator"].database)
    token = db.add_user("erin")
    db.close()
    signed_in(client, token)
    assert client.get("/").status_code == 200
    assert client.get("/admin/").status_code == 403
    assert client.get("/api/export?format=csv").status_code == 403
    assert ">Admin<" not in client.get("/dashboard").get_data(as_text=True)


def test_admin_adds_an_annotator_through_the_form(client):
    signed_in(client)
    csrf = csrf_of(client.get("/admin/").get_data(as_text=True))
    assert client.post("/admin/users", data={"name": "frank", "role": "annotator"}).status_code == 403
    response = client.post("/admin/users", data={"name": "frank", "role": "annotator", "csrf_token": csrf})
    assert response.status_code == 201
    url = re.search(r'value="(http://[^"]+\?token=([^"]+))"', response.get_data(as_text=True))
    other = client.application.test_client()
    signed_in(other, url.group(2))
    assert other.get("/whoami").get_json() == {"name": "frank", "role": "annotator"}
    again = client.post("/admin/users", data={"name": "frank", "role": "annotator", "csrf_token": csrf})
    assert again.status_code == 400 and "already exists" in again.get_data(as_text=True)


def test_the_dashboard_is_a_page_and_a_self_polling_htmx_partial(client, app):
    signed_in(client)
    page = client.get("/dashboard").get_data(as_text=True)
    assert "<html" in page and 'id="dashboard-live"' in page and "Learning curve" in page
    partial = client.get("/dashboard", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<html" not in partial and 'hx-trigger="load delay:3s"' in partial  # waiting for people: slow poll
    engine = client.get("/partials/engine", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert 'class="engine engine-waiting"' in engine and "hx-trigger" in engine


def test_the_dashboard_draws_the_learning_curve_and_stops_polling_when_finished(client, app):
    signed_in(client)
    csrf = csrf_of(client.get("/").get_data(as_text=True))
    driver = app.extensions["annotator"].driver
    for _ in range(2):  # the initial batch and the single queried round
        while (task := client.get("/api/tasks/next")).status_code == 200:
            client.post("/api/annotations", json={"item_id": task.get_json()["item_id"], "label": 2},
                        headers={"X-CSRF-Token": csrf})
        driver.run_until_idle()
    partial = client.get("/dashboard", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "hx-trigger" not in partial  # finished: no more polling
    assert partial.count('class="curve-point"') == 2 and "<polyline" in partial
    assert re.search(r"<td class=\"class-name\">2</td>.*?<td class=\"num\">10</td>", partial, re.S)
    engine = client.get("/partials/engine").get_data(as_text=True)
    assert "engine-finished" in engine and "hx-trigger" not in engine


def test_grid_mode_page(client):
    signed_in(client)
    html = client.get("/grid").get_data(as_text=True)
    assert 'id="grid"' in html and '"mode": "grid"' in html and "label.js" in html
