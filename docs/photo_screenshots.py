"""Screenshots of the labeling page on one's own photos (docs/img/photo-labeling*.png).

Generates a folder of photo-like scenes (sky, ground, buildings or trees or sea, a sign with text on
it) of mixed sizes and orientations, one EXIF-rotated, with odd file names; starts the annotator on
it (`--dataset imagefolder --classes street,beach,forest`), answers a few as a first annotator, and
photographs what a second annotator sees, on a desktop and on a phone, in headless Chromium.
    python docs/photo_screenshots.py [--chromium /usr/bin/chromium]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from screenshots import ARGS  # docs/screenshots.py: the Chromium flags every screenshot uses  # noqa: E402


TOKEN = "photo-screenshot-token"
SCENES = [  # (file name, class, width, height, sign text)
    ("IMG_2041 street.jpg", "street", 1600, 1067, "CAFE - OPEN 7-23"),
    ("beach (2).jpg", "beach", 1200, 800, "LIFEGUARD ON DUTY"),
    ("forest_walk.png", "forest", 900, 1200, "TRAIL 3 - 4.2 km"),
    ("street-night.jpg", "street", 1024, 683, "BUS 42 TO CENTRAL"),
    ("beach_sunset.jpg", "beach", 1500, 700, "NO SWIMMING AFTER DARK"),
    ("Forest, misty.jpg", "forest", 800, 800, "PRIVATE ROAD"),
    ("tram stop.jpg", "street", 640, 960, "STOP 17"),
    ("dunes.jpg", "beach", 1280, 853, "DUNE RESTORATION AREA"),
]


def _gradient(width, height, top, bottom):
    t = np.linspace(0, 1, height)[:, None, None]
    colours = (1 - t) * np.array(top) + t * np.array(bottom)
    return np.repeat(colours, width, axis=1).astype(np.uint8)


def scene(kind: str, width: int, height: int, text: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    horizon = int(height * rng.uniform(0.45, 0.62))
    sky = {"street": ((120, 160, 210), (210, 220, 235)), "beach": ((70, 140, 225), (200, 225, 245)),
           "forest": ((170, 190, 200), (225, 230, 225))}[kind]
    ground = {"street": ((90, 90, 95), (60, 60, 65)), "beach": ((235, 215, 160), (205, 180, 120)),
              "forest": ((60, 95, 50), (35, 60, 30))}[kind]
    pixels = np.concatenate([_gradient(width, horizon, *sky), _gradient(width, height - horizon, *ground)])
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    if kind == "beach":
        draw.rectangle([0, horizon - height // 12, width, horizon], fill=(40, 110, 170))
        sun = int(min(width, height) * 0.08)
        x = int(width * rng.uniform(0.6, 0.85))
        draw.ellipse([x - sun, horizon // 3 - sun, x + sun, horizon // 3 + sun], fill=(255, 236, 170))
    elif kind == "street":
        for _ in range(5):
            left = int(rng.uniform(0, width * 0.9))
            w, h = int(width * rng.uniform(0.12, 0.25)), int(horizon * rng.uniform(0.4, 0.9))
            shade = int(rng.uniform(110, 190))
            draw.rectangle([left, horizon - h, left + w, horizon], fill=(shade, shade - 15, shade - 30))
            for wy in range(horizon - h + 12, horizon - 20, 34):
                for wx in range(left + 10, left + w - 20, 30):
                    draw.rectangle([wx, wy, wx + 14, wy + 18], fill=(250, 225, 140) if rng.random() < 0.4 else (60, 70, 90))
        draw.line([0, height - height // 6, width, height - height // 6], fill=(230, 230, 230), width=6)
    else:
        for _ in range(26):
            x = int(rng.uniform(0, width))
            h = int(height * rng.uniform(0.25, 0.5))
            w = int(h * 0.35)
            green = (int(rng.uniform(20, 60)), int(rng.uniform(80, 130)), int(rng.uniform(30, 60)))
            draw.polygon([(x, horizon - h), (x - w // 2, horizon + 10), (x + w // 2, horizon + 10)], fill=green)
            draw.rectangle([x - 4, horizon + 5, x + 4, horizon + 25], fill=(80, 55, 30))
    picture = picture.filter(ImageFilter.GaussianBlur(1.2))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(18, width // 28))
    box = draw.textbbox((0, 0), text, font=font)
    pad = 14
    sign_w, sign_h = box[2] - box[0] + 2 * pad, box[3] - box[1] + 2 * pad
    sx, sy = int(width * 0.08), int(horizon + (height - horizon) * 0.25)
    draw.rectangle([sx + sign_w // 2 - 5, sy + sign_h, sx + sign_w // 2 + 5, sy + sign_h + height // 8], fill=(70, 70, 70))
    draw.rectangle([sx, sy, sx + sign_w, sy + sign_h], fill=(250, 250, 245), outline=(30, 30, 30), width=4)
    draw.text((sx + pad - box[0], sy + pad - box[1]), text, fill=(20, 20, 20), font=font)
    noise = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(picture, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_photos(folder: Path) -> None:
    for seed, (name, kind, width, height, text) in enumerate(SCENES):
        picture = scene(kind, width, height, text, seed)
        if name == "tram stop.jpg":  # stored sideways, with an EXIF orientation that turns it upright
            exif = Image.Exif()
            exif[0x0112] = 6
            picture.transpose(Image.Transpose.ROTATE_90).save(folder / name, quality=88, exif=exif.tobytes())
        elif name.endswith(".png"):
            picture.save(folder / name)
        else:
            picture.save(folder / name, quality=88)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from al_engine.config import RunConfig
    from annotator import create_app
    from annotator.cli import make_server

    with tempfile.TemporaryDirectory() as work:
        photos = Path(work) / "photos"
        photos.mkdir()
        write_photos(photos)
        config = RunConfig(dataset="imagefolder", data_dir=str(photos), classes=["street", "beach", "forest"],
                           strategy="margin", initial=len(SCENES), query_size=4, rounds=2, epochs=5,
                           device="cpu", cache_dir=str(Path(work) / "cache"))
        app = create_app({"DATABASE": str(Path(work) / "photos.db"), "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN})
        db = app.extensions["annotator"].driver.db
        first = db.user_for_token(TOKEN).id
        items = db.lease_tasks(first, 2)
        names = dict(db.db.execute("select id, name from files").fetchall())
        for item in items:
            kind = next(k for n, k, *_ in SCENES if n == names[item])
            db.record_answer(first, item, ["street", "beach", "forest"].index(kind), time_taken_ms=1800)
        second = db.add_user("mia")
        server = make_server(app, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            for file_name, viewport in (("photo-labeling.png", {"width": 1280, "height": 800}),
                                        ("photo-labeling-phone.png", {"width": 390, "height": 844})):
                context = browser.new_context(viewport=viewport, device_scale_factor=1)
                page = context.new_page()
                page.goto(f"{base}/?token={second}")
                if page.query_selector("#instructions-dialog[open]"):
                    page.keyboard.press("Escape")
                page.wait_for_function("document.getElementById('item-image').naturalWidth > 0")
                page.wait_for_timeout(300)
                page.screenshot(path=str(out / file_name))
                context.close()
            browser.close()
        server.shutdown()
    print(f"wrote {out}/photo-labeling.png and photo-labeling-phone.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
