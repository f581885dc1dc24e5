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
    rows = db.db.execute("select item_id, label, time_taken_ms from answers where round = 0").fetchall()
    labels = {item: label for item, label, _ in rows}
    # A class named by one key answers to that key: on digits, key "1" is class "1" (it was "0").
    assert labels[int(first)] == -1 and sorted(v for v in labels.values() if v >= 0) == [0, 1, 2, 5, 9]
    assert all(taken and taken > 0 for _, _, taken in rows)  # the time on each image is measured (was 0)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def answers_in_db(app) -> int:
    return app.extensions["annotator"].driver.db.db.execute("select count(*) from answers").fetchone()[0]


def test_a_clicked_button_does_not_answer_again_on_space_or_enter(server, page):
    base, app = server
    page.goto(f"{base}/?token={TOKEN}")
    first = shown_item(page)
    page.click('.class-button[data-label="4"]')
    wait_answered(page, 1)
    assert shown_item(page) != first
    for key in ("Space", "Enter", " "):
        page.keyboard.press(key)
    page.wait_for_timeout(600)
    assert page.text_content("#progress-done") == "1" and answers_in_db(app) == 1


def test_label_on_a_phone_by_tapping(server, browser):
    base, app = server
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    page.goto(f"{base}/?token={TOKEN}")
    shown_item(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # Admin and Sign out on screen (was 578)
    assert page.is_visible("button.link-button")
    boxes = page.eval_on_selector_all(".class-button", "els => els.map(e => e.getBoundingClientRect().bottom)")
    assert len(boxes) == 10 and max(boxes) <= 844  # every class reachable without scrolling
    caption = page.text_content("#item-caption") + page.text_content("#item-size")
    assert "px" in caption
    for done in range(1, 5):
        shown_item(page)
        page.tap(f'.class-button[data-label="{done}"]')
        wait_answered(page, done)
    if os.environ.get("ANNOTATOR_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["ANNOTATOR_SCREENSHOTS"], "labeling-phone.png"))
    labels = sorted(r[0] for r in app.extensions["annotator"].driver.db.db.execute("select label from answers"))
    assert labels == [1, 2, 3, 4]
    context.close()


def test_on_a_tablet_the_class_buttons_are_on_screen(server, browser):
    base, _ = server
    page = browser.new_page(viewport={"width": 820, "height": 1180})
    page.goto(f"{base}/?token={TOKEN}")
    shown_item(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 820
    assert max(page.eval_on_selector_all(".class-button", "els => els.map(e => e.getBoundingClientRect().bottom)")) <= 1180


def test_the_dark_theme_follows_the_system(server, browser):
    base, _ = server
    colours = {}
    for scheme in ("light", "dark"):
        page = browser.new_page(color_scheme=scheme, viewport={"width": 1280, "height": 800})
        page.goto(f"{base}/?token={TOKEN}")
        shown_item(page)
        colours[scheme] = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        colours[scheme + " panel"] = page.evaluate("getComputedStyle(document.querySelector('.sidebar')).backgroundColor")
        if scheme == "dark" and os.environ.get("ANNOTATOR_SCREENSHOTS"):
            page.screenshot(path=os.path.join(os.environ["ANNOTATOR_SCREENSHOTS"], "labeling-dark.png"))
    assert colours["light"] == "rgb(245, 246, 248)"
    assert colours["dark"] == "rgb(17, 20, 24)" and colours["dark panel"] == "rgb(27, 32, 39)"


def test_zoom_toggles_between_fit_and_actual_pixels(server, page):
    base, _ = server
    page.goto(f"{base}/?token={TOKEN}")
    shown_item(page)
    fit = page.evaluate("document.getElementById('item-image').getBoundingClientRect().width")
    page.keyboard.press("z")
    assert page.text_content("#zoom-state") == "100%"
    natural = page.evaluate("document.getElementById('item-image').naturalWidth")
    assert page.evaluate("document.getElementById('item-image').getBoundingClientRect().width") == natural != fit
    page.click("#item-image")
    assert page.text_content("#zoom-state") == "fit"


def test_undo_the_batch_closing_answer_then_correct_a_closed_round_and_relabel_on_review(server, page):
    base, app = server
    db = app.extensions["annotator"].driver.db
    page.goto(f"{base}/?token={TOKEN}")
    for done in range(1, 7):  # the whole initial batch of 6
        shown_item(page)
        page.keyboard.press("1")
        wait_answered(page, done)
    page.keyboard.press("Backspace")  # within the 5 s grace: the round is still open, the answer withdrawn
    wait_answered(page, 5)
    last = shown_item(page)
    page.keyboard.press("2")
    wait_answered(page, 6)
    page.wait_for_function("document.getElementById('progress-round').textContent === '1'", timeout=60000)
    page.keyboard.press("Backspace")  # round 0 is closed and trained: the image comes back as a correction
    page.wait_for_function(f"document.getElementById('item-image').dataset.itemId === '{last}'"
                           " && !document.getElementById('task-note').hidden", timeout=15000)
    page.keyboard.press("7")
    page.wait_for_function("document.getElementById('toast').textContent.startsWith('Corrected')", timeout=15000)
    rows = db.db.execute("select label, source from answers where item_id = ?", [int(last)]).fetchall()
    assert rows == [(7, "review")]
    page.goto(f"{base}/review?round=0")
    first_card = page.get_attribute(".review-card", "data-item-id")
    page.click(f'.review-card[data-item-id="{first_card}"]')
    page.keyboard.press("3")
    page.wait_for_function("document.getElementById('toast').textContent.startsWith('Corrected')", timeout=15000)
    assert db.db.execute("select label, source from answers where item_id = ?", [int(first_card)]).fetchall() == [(3, "review")]
    if os.environ.get("ANNOTATOR_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["ANNOTATOR_SCREENSHOTS"], "review.png"), full_page=True)


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


def test_a_photo_is_shown_in_its_own_shape_not_letterboxed_in_a_square(tmp_path, page):
    """A wide photo fills the frame's width at its aspect ratio, a tall one keeps its height; both are
    drawn smoothly (a nearest-neighbour shrink would alias them), while small images stay crisp."""
    from PIL import Image

    from al_engine.config import RunConfig
    from annotator import create_app
    from annotator.cli import make_server

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (1500, 500), (200, 30, 30)).save(folder / "a wide.jpg", quality=90)
    Image.new("RGB", (400, 800), (10, 160, 10)).save(folder / "b tall.jpg", quality=90)
    config = RunConfig(dataset="imagefolder", data_dir=str(folder), classes=["outdoor", "indoor"], image_size=16,
                       initial=2, query_size=1, rounds=1, epochs=1, seed=0, device="cpu")
    app = create_app({"DATABASE": str(tmp_path / "photos.db"), "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN,
                      "START_ENGINE": True})
    http = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{http.server_port}/?token={TOKEN}")
        shapes = {}
        for _ in range(2):
            shown_item(page)
            name = page.text_content("#item-caption")
            box = page.evaluate("(() => { const r = document.getElementById('item-image').getBoundingClientRect();"
                                " return [r.width, r.height, getComputedStyle(document.getElementById('item-image'))"
                                ".imageRendering]; })()")
            shapes[name] = box
            page.keyboard.press("1")
            page.wait_for_function(f"document.getElementById('item-caption').textContent !== {name!r}"
                                   " || document.getElementById('image-frame').hidden", timeout=15000)
        wide_w, wide_h, wide_rendering = shapes["a wide.jpg"]
        tall_w, tall_h, _ = shapes["b tall.jpg"]
        assert wide_w / wide_h == pytest.approx(3.0, rel=0.02) and tall_w / tall_h == pytest.approx(0.5, rel=0.02)
        assert wide_w > tall_w and tall_h > wide_h  # each as large as its shape allows, none squeezed into a square
        assert wide_rendering == "auto"
    finally:
        http.shutdown()
        app.extensions["annotator"].worker.stop()
