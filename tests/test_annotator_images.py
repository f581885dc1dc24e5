"""What people see (annotator/images.py): the original file upright with its aspect ratio, its name
and size; a crisp upscale for benchmark datasets; a cache bounded in bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from al_engine.config import RunConfig
from annotator import create_app
from annotator.images import MAX_SIDE, Picture, PictureCache

TOKEN = "images-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def exif_rotated_jpeg(path, width=60, height=40):
    """A JPEG stored `width` x `height` whose EXIF says: turn 90 degrees clockwise (orientation 6).
    Its stored top-left quarter is red, so upright the red corner is the top right."""
    picture = Image.new("RGB", (width, height), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(path, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture
def photo_app(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (800, 200), (200, 30, 30)).save(folder / "wide.jpg", quality=90)
    Image.new("RGB", (37, 53), (10, 200, 10)).save(folder / "tiny é #1.png")
    Image.new("RGB", (3000, 1000), (5, 5, 120)).save(folder / "huge.png")
    exif_rotated_jpeg(folder / "rotated.jpg")
    config = RunConfig(dataset="imagefolder", data_dir=str(folder), classes=["a", "b"],
                       image_size=16, initial=4, query_size=2, rounds=1, epochs=1, device="cpu")
    app = create_app({"DATABASE": str(tmp_path / "p.db"), "RUN_CONFIG": config, "ADMIN_TOKEN": TOKEN})
    return app


def leased_tasks(client) -> dict[str, dict]:
    tasks = client.get("/api/tasks?count=4", headers=ADMIN).get_json()["tasks"]
    return {task["name"]: task for task in tasks}


def served(client, task) -> Image.Image:
    response = client.get(task["image_url"], headers=ADMIN)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.data))


def test_the_original_is_served_with_its_aspect_ratio_name_and_size(photo_app):
    client = photo_app.test_client()
    tasks = leased_tasks(client)
    assert set(tasks) == {"wide.jpg", "huge.png", "rotated.jpg", "tiny é #1.png"}  # the initial 4: every file
    wide = tasks["wide.jpg"]
    assert (wide["width"], wide["height"]) == (800, 200)
    picture = served(client, wide)
    assert picture.format == "JPEG" and picture.size == (800, 200)  # not a 32x32 square blown up


def test_exif_orientation_is_applied_to_the_served_picture_and_its_size(photo_app):
    client = photo_app.test_client()
    task = leased_tasks(client)["rotated.jpg"]
    assert (task["width"], task["height"]) == (40, 60)  # upright: stored 60x40, turned by 90 degrees
    picture = served(client, task).convert("RGB")
    assert picture.size == (40, 60)
    red_corner, blue_corner = picture.getpixel((35, 5)), picture.getpixel((5, 55))
    assert red_corner[0] > 200 and red_corner[2] < 60  # the stored top-left quarter is now the top right
    assert blue_corner[2] > 200 and blue_corner[0] < 60


def test_an_original_larger_than_the_limit_is_downscaled_keeping_its_aspect(photo_app):
    client = photo_app.test_client()
    task = leased_tasks(client)["huge.png"]
    assert (task["width"], task["height"]) == (3000, 1000)  # the file's own size is what the page says
    picture = served(client, task)
    assert picture.format == "PNG" and picture.size == (MAX_SIDE, round(1000 * MAX_SIDE / 3000))


def test_a_file_damaged_after_start_falls_back_to_its_cached_pixels(photo_app, tmp_path):
    client = photo_app.test_client()
    task = leased_tasks(client)["wide.jpg"]
    (tmp_path / "photos" / "wide.jpg").write_bytes(b"gone bad")
    picture = served(client, task)  # never a 500: the model-size pixels of the pixel cache
    assert picture.size[0] == picture.size[1]


def test_benchmark_images_keep_their_crisp_upscale(make_annotator_app):
    app = make_annotator_app(TOKEN)
    client = app.test_client()
    task = client.get("/api/tasks/next", headers=ADMIN).get_json()
    side = task["width"]
    assert task["name"] is None and task["height"] == side == 28  # the pool's 28x28 digits
    picture = served(client, task)
    assert picture.format == "PNG" and picture.size[0] >= 256 and picture.size[0] % side == 0
    values = np.asarray(picture.convert("L"))
    block = picture.size[0] // side
    assert (values[:block, :block] == values[0, 0]).all()  # nearest neighbour: each pixel a solid block


def test_the_picture_cache_is_bounded_in_bytes_least_recently_used_first():
    cache = PictureCache(max_bytes=1000)
    for item in range(5):
        cache.put(item, Picture(b"x" * 300, "image/png", 1, 1, None))
        cache.get(0)  # item 0 stays in use
    assert cache.size <= 1000
    assert cache.get(0) is not None and cache.get(4) is not None and cache.get(1) is None
    cache.put(9, Picture(b"x" * 5000, "image/png", 1, 1, None))  # larger than the whole cache: not kept
    assert cache.get(9) is None and cache.size <= 1000
