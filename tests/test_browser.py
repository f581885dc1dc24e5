"""End to end in headless Chromium (Debian's package, driven by Playwright): label a whole batch with
the keyboard, undo and skip on the way, and see the next round begin without reloading the page."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("ANNOTATOR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TOKEN = "browser-token"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture
def server(tmp_path):
    """The annotator with its background engine worker, on a free loopback port."""
    from al_engine.config import RunConfig
    from annotator import create_app
    from annotator.cli import make_server

    config = RunConfig(dataset="digits", initial=6, query_size=4, rounds=2, epochs=2, seed=0, device="cpu")
    app = create_app({"DATABASE": str(tmp_path / "browser.db"), "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN,
                      "START_ENGINE": True})
    http = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}", app
    http.shutdown()
    app.extensions["annotator"].worker.stop()


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        yield page
        browser.close()


def shown_item(page) -> str:
    page.wait_for_function("document.getElementById('item-image').naturalWidth > 0"
                           " && !document.getElementById('image-frame').hidden", timeout=15000)
    return page.get_attribute("#item-image", "data-item-id")


def wait_answered(page, count: int) -> None:
    page.wait_for_function(f"document.getElementById('progress-done').textContent === '{count}'", timeout=15000)


def test_label_a_batch_with_the_keyboard_and_see_the_next_round(server, page):
    base, app = server
    images = []
    page.on("request", lambda request: images.append(request.url) if request.url.endswith("/image") else None)
    page.goto(f"{base}/?token={TOKEN}")
    assert page.url == f"{base}/"  # the token is gone from the address bar
    first = shown_item(page)
    page.wait_for_function("performance.getEntriesByType('resource')"
                           ".filter(e => e.name.endsWith('/image')).length >= 4")
    assert len(set(images)) >= 4  # the image on screen and the next ones, preloaded before any answer

    page.keyboard.press("3")
    wait_answered(page, 1)
    second = shown_item(page)
    assert second != first

    page.keyboard.press("Backspace")  # undo: the first image comes back, the count goes down
    wait_answered(page, 0)
    page.wait_for_function(f"document.getElementById('item-image').dataset.itemId === '{first}'")

    page.keyboard.press("?")
    assert page.is_visible("#keymap")
    page.keyboard.press("?")
    assert not page.is_visible("#keymap")

    page.keyboard.press("s")  # skip the first image: it is resolved but stays unlabeled
    wait_answered(page, 1)
    for done, key in enumerate(["1", "2", "0", "9", "5"], start=2):
        shown_item(page)
        page.keyboard.press(key)
        wait_answered(page, done)

    # The batch is done: the engine trains in the background and posts round 1 by itself.
    page.wait_for_function("document.getElementById('progress-round').textContent === '1'", timeout=60000)
    shown_item(page)
    assert page.text_content("#progress-size") == "4"
    db = app.extensions["annotator"].driver.db
    labels = dict(db.db.execute("select item_id, label from answers where round = 0").fetchall())
    # Key k answers the class at position k (the tenth with 0): on digits, key "1" is class "0".
    assert labels[int(first)] == -1 and sorted(v for v in labels.values() if v >= 0) == [0, 1, 4, 8, 9]


def test_the_sign_in_token_is_left_neither_in_the_address_bar_nor_in_the_history(server, page):
    base, _ = server
    page.goto(f"{base}/dashboard")  # an earlier page, so that there is a history to go back through
    page.goto(f"{base}/?token={TOKEN}")
    shown_item(page)  # the labeling page, reached by the sign-in page's location.replace
    assert page.url == f"{base}/"
    visited = [page.url]
    while page.go_back() is not None:  # every entry of this tab's history
        visited.append(page.url)
    assert TOKEN not in " ".join(visited), visited
    # the sign-in link's entry became the labeling page's: no extra entry to go back to
    assert visited == [f"{base}/", f"{base}/dashboard"], visited
