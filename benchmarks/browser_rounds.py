"""Labeling in real browsers while the engine trains: key press to next image, and time with nothing to label.

8 annotators (8 headless Chromium pages, one browser context each, signed in as 8 users) label whole
rounds of a real run served exactly as `python app.py` serves it (werkzeug, engine worker thread):
each page waits for its image, "looks" at it for --think-ms (uniform 0.5x-1.5x), presses the class's
key, and so on until --rounds batches are answered. Measured in the page:

  key_to_next_image   from the keydown (a capture listener, before the page's own) to the next image
                      decoded and painted (load event + the next animation frame); split by whether the
                      engine was training/querying at that moment (the server's /api/status, polled)
  nothing_to_label    per round, seconds each page showed the "nothing to label" panel (mean, max over pages)

Two phases on the same build: "before" (second opinions off: the page's task requests are rewritten to
checks=0, and no close grace: what main served) and "after" (second opinions while the engine trains, the
5 s grace for undoing a batch's last answer). Prints one JSON line per phase; `--out` also writes them.

    python benchmarks/browser_rounds.py [--annotators 8] [--rounds 3] [--query-size 160] --out docs/results/workflow/browser_rounds.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import percentiles  # noqa: E402

CHROMIUM = os.environ.get("ANNOTATOR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# In every page: time from a key press to the next image on screen, and when "nothing to label" shows.
PROBE = """
(() => {
  window.__lat = []; window.__wait = []; let pressed = null; let waitingSince = null;
  document.addEventListener('keydown', () => { pressed = performance.now(); }, true);
  const watch = () => {
    const image = document.getElementById('item-image');
    if (!image) return setTimeout(watch, 50);
    image.addEventListener('load', () => {
      if (pressed === null) return;
      const start = pressed; pressed = null;
      requestAnimationFrame(() => window.__lat.push([performance.timeOrigin + start, performance.now() - start]));
    });
    setInterval(() => {
      const panel = document.getElementById('waiting');
      const waiting = panel && !panel.hidden;
      const round = (document.getElementById('progress-round') || {}).textContent;
      if (waiting && waitingSince === null) waitingSince = [performance.now(), round];
      if (!waiting && waitingSince !== null) {
        window.__wait.push([waitingSince[1], (performance.now() - waitingSince[0]) / 1000]);
        waitingSince = null;
      }
      window.__waitingNow = waitingSince ? [waitingSince[1], (performance.now() - waitingSince[0]) / 1000] : null;
    }, 25);
  };
  document.addEventListener('DOMContentLoaded', watch);
})();
"""


def status_of(base: str, token: str) -> dict:
    request = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def poll_engine(base: str, token: str, timeline: list, stop: threading.Event) -> None:
    """(epoch seconds, engine state, round) every 0.2 s: when was the engine busy."""
    while not stop.is_set():
        try:
            status = status_of(base, token)
            timeline.append((time.time(), status["engine"], status["round"], status["finished"]))
        except OSError:
            pass
        stop.wait(0.2)


def busy_at(timeline: list, when: float) -> bool:
    previous = None
    for entry in timeline:
        if entry[0] > when:
            break
        previous = entry
    return previous is not None and previous[1] in ("training", "querying")


async def annotate(browser, base: str, token: str, think_ms: float, checks: bool, deadline: float, seed: int) -> dict:
    rng = random.Random(seed)
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    await context.add_init_script(PROBE)
    if not checks:  # "before": the task API as main served it, no second opinions
        async def without_checks(route):
            await route.continue_(url=route.request.url.replace("checks=1", "checks=0"))
        await context.route("**/api/tasks?*", without_checks)
    page = await context.new_page()
    await page.goto(f"{base}/?token={token}")
    pressed = 0
    last = None
    while time.time() < deadline:
        try:
            await page.wait_for_function(
                "(last) => { const i = document.getElementById('item-image');"
                " return (!document.getElementById('image-frame').hidden && i.naturalWidth > 0 && i.dataset.itemId !== last)"
                " || document.getElementById('waiting-title').textContent.startsWith('All batches'); }",
                arg=last, timeout=max(1000, (deadline - time.time()) * 1000), polling=20)
        except Exception:  # noqa: BLE001 - the deadline passed while waiting
            break
        if (await page.text_content("#waiting-title")).startswith("All batches") and not await page.is_visible("#image-frame"):
            break
        last = await page.get_attribute("#item-image", "data-item-id")
        await asyncio.sleep(think_ms / 1000 * (0.5 + rng.random()))
        await page.keyboard.press(str(int(last) % 10))
        pressed += 1
    await asyncio.sleep(0.3)
    latencies = await page.evaluate("window.__lat")
    waits = await page.evaluate("window.__wait.concat(window.__waitingNow ? [window.__waitingNow] : [])")
    await context.close()
    return {"pressed": pressed, "latencies": latencies, "waits": waits}


async def run_pages(base: str, tokens: list[str], think_ms: float, checks: bool, seconds: float) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        deadline = time.time() + seconds
        results = await asyncio.gather(*[annotate(browser, base, token, think_ms, checks, deadline, seed)
                                         for seed, token in enumerate(tokens)])
        await browser.close()
    return results


def phase(args, name: str, checks: bool, grace: float, db_dir: str) -> dict:
    from al_engine.config import RunConfig
    from annotator import create_app
    from annotator.cli import make_server
    from annotator.db import AnnotationDB

    config = RunConfig(dataset=args.dataset, strategy="margin", initial=args.query_size, query_size=args.query_size,
                       rounds=args.rounds - 1, device="cpu", epochs=args.epochs, seed=0)
    db_path = str(Path(db_dir) / f"{name}.db")
    owner = "owner-token"
    app = create_app({"DATABASE": db_path, "RUN_CONFIG": config, "ADMIN_TOKEN": owner, "START_ENGINE": True,
                      "CLOSE_GRACE_S": grace})
    db = AnnotationDB(db_path)
    tokens = [db.add_user(f"annotator{i}") for i in range(args.annotators)]
    db.close()
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    timeline, stop = [], threading.Event()
    poller = threading.Thread(target=poll_engine, args=(base, owner, timeline, stop), daemon=True)
    poller.start()
    started = time.time()
    pages = asyncio.run(run_pages(base, tokens, args.think_ms, checks, args.max_seconds))
    elapsed = time.time() - started
    stop.set()
    poller.join(5)
    final = status_of(base, owner)
    server.shutdown()
    app.extensions["annotator"].worker.stop()
    db = AnnotationDB(db_path)
    rounds = db.rounds()
    by_source = dict(db.db.execute("select source, count(*) from answers group by source").fetchall())
    db.close()

    latencies = [(when / 1000, ms) for page in pages for when, ms in page["latencies"]]
    busy = [ms for when, ms in latencies if busy_at(timeline, when)]
    idle = [ms for when, ms in latencies if not busy_at(timeline, when)]
    per_round: dict[str, list[float]] = {}
    for index, page in enumerate(pages):
        totals: dict[str, float] = {}
        for round_label, seconds in page["waits"]:
            totals[round_label] = totals.get(round_label, 0.0) + seconds
        for round_label, seconds in totals.items():
            per_round.setdefault(round_label, [0.0] * len(pages))[index] = seconds
    busy_seconds = sum(b[0] - a[0] for a, b in zip(timeline, timeline[1:]) if a[1] in ("training", "querying"))
    return {
        "bench": "browser_rounds", "phase": name, "second_opinions": checks, "close_grace_s": grace,
        "dataset": args.dataset, "annotators": args.annotators, "query_size": args.query_size,
        "rounds_answered": sum(r["state"] != "labeling" for r in rounds), "finished": final["finished"],
        "think_ms": args.think_ms, "seconds": round(elapsed, 1), "engine_busy_s": round(busy_seconds, 1),
        "train_s": [r["train_s"] for r in rounds], "query_s": [r["query_s"] for r in rounds],
        "key_to_next_image_ms": percentiles([ms for _, ms in latencies], 1),
        "key_to_next_image_ms_while_engine_busy": percentiles(busy, 1),
        "key_to_next_image_ms_while_engine_waits": percentiles(idle, 1),
        "key_presses": sum(p["pressed"] for p in pages),
        "nothing_to_label_s_per_round": {r: {"mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)}
                                         for r, v in sorted(per_round.items())},
        "nothing_to_label_s_total_mean": round(sum(sum(v) for v in per_round.values()) / len(pages), 2),
        "answers_by_source": by_source,
        "cpu_count": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="batches to answer (the initial one included)")
    parser.add_argument("--query-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=30, help="training epoch cap per round")
    parser.add_argument("--think-ms", type=float, default=500.0, help="mean time a person looks at an image")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="time limit per phase")
    parser.add_argument("--phases", default="before,after")
    parser.add_argument("--out", help="JSON file for the results (a list of the phases)")
    args = parser.parse_args()
    settings = {"before": (False, 0.0), "after": (True, 5.0)}
    results = []
    with tempfile.TemporaryDirectory() as db_dir:
        for name in args.phases.split(","):
            checks, grace = settings[name]
            result = phase(args, name, checks, grace, db_dir)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
