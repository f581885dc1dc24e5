"""Make the screenshots in docs/img/: the labeling page (desktop, phone, dark), grid mode, the review
page and the dashboard on Fashion-MNIST.

Runs three rounds with the ground truth as the "annotator" (entropy strategy), a fourth person giving
second opinions on each closed batch (10% of them wrong, for the agreement figures), leaves the fourth
batch part-answered, then photographs the pages in headless Chromium.
    python docs/screenshots.py [--chromium /usr/bin/chromium]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "screenshot-token"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from al_engine.config import RunConfig
    from annotator import create_app
    from annotator.cli import make_server
    from annotator.pages import key_map

    config = RunConfig(dataset="fashion-mnist", strategy="entropy", initial=100, query_size=50, rounds=8,
                       epochs=15, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        app = create_app({"DATABASE": str(Path(folder) / "shots.db"), "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN})
        state = app.extensions["annotator"]
        driver, truth = state.driver, state.dataset.train_labels.numpy()
        db = driver.db
        owner = db.user_for_token(TOKEN).id
        helpers = [db.user_for_token(db.add_user(name)).id for name in ("ana", "ben")]
        checker = db.user_for_token(db.add_user("cy")).id
        noise = __import__("random").Random(0)
        for round_index in range(4):
            items = [row[0] for row in db.db.execute("select item_id from batch_items where round = ? "
                                                     "order by position", [round_index]).fetchall()]
            if round_index == 3:
                items = items[:18]  # leave the current batch part-answered
            for position, item in enumerate(items):
                user = [owner, *helpers][position % 3]
                db.record_answer(user, item, int(truth[item]), time_taken_ms=900 + 37 * position)
            if round_index < 3:
                assert db.close_round_if_complete(round_index)
                for item in db.lease_tasks(checker, 24, checks=True):  # second opinions while it trains
                    label = int(truth[item]) if noise.random() > 0.1 else noise.randrange(10)
                    db.record_answer(checker, item, label)
                driver.run_until_idle()
        server = make_server(app, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/?token={TOKEN}")
            shown = "document.getElementById('item-image').naturalWidth > 0"
            keys = key_map(state.classes)
            page.wait_for_function(shown)
            for _ in range(3):  # a few answers for the recent list
                item = page.get_attribute("#item-image", "data-item-id")
                page.keyboard.press(keys[int(truth[int(item)])])
                page.wait_for_function(f"document.getElementById('item-image').dataset.itemId !== '{item}' && {shown}")
            page.wait_for_function("document.querySelectorAll('#recent img').length >= 3"
                                   " && [...document.querySelectorAll('#recent img')].every(i => i.naturalWidth > 0)")
            page.wait_for_selector("#engine-status")
            page.screenshot(path=str(out / "labeling.png"))
            phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                        has_touch=True)
            phone_page = phone.new_page()
            phone_page.goto(f"{base}/?token={TOKEN}")
            phone_page.wait_for_function(shown)
            phone_page.screenshot(path=str(out / "labeling-phone.png"))
            phone.close()
            dark = browser.new_page(viewport={"width": 1280, "height": 800}, color_scheme="dark")
            dark.goto(f"{base}/?token={TOKEN}")
            dark.wait_for_function(shown)
            dark.screenshot(path=str(out / "labeling-dark.png"))
            dark.close()
            page.goto(f"{base}/review?queue=disagreements")
            page.wait_for_function("[...document.querySelectorAll('.review-card img')].every(i => i.naturalWidth > 0)")
            page.screenshot(path=str(out / "review.png"))
            page.goto(f"{base}/grid")
            page.wait_for_function("document.querySelectorAll('#grid img').length > 0 && "
                                   "[...document.querySelectorAll('#grid img')].every(i => i.naturalWidth > 0)")
            for cell in page.query_selector_all(".grid-cell")[:5]:
                cell.click()
            page.screenshot(path=str(out / "grid.png"))
            page.goto(f"{base}/dashboard")
            response = page.goto(f"{base}/dashboard")
            if response.status != 200:
                raise SystemExit(f"dashboard: {response.status} {page.content()[:2000]}")
            page.wait_for_selector("svg.curve")
            page.screenshot(path=str(out / "dashboard.png"), full_page=True)
            browser.close()
        server.shutdown()
    print(f"wrote {out}/labeling.png, labeling-phone.png, labeling-dark.png, grid.png, review.png, dashboard.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
