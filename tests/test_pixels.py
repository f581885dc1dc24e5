"""The pixel cache: aspect-keeping decode, EXIF, skips, and a disk cache reused, grown and repaired."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from al_engine import pixels
from al_engine.data import DatasetError, LoadOptions, channel_stats, load_dataset
from al_engine.errors import ConfigError
from al_engine.pixels import decode_image, default_cache_dir, load_pixels


def disc_image(path, width, height, radius):
    """A black disc centred on a white background: its shape shows whether the aspect was kept."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    cx, cy = width // 2, height // 2
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(0, 0, 0))
    image.save(path)


def dark_box(pixels_chw: np.ndarray) -> tuple[int, int]:
    """(width, height) of the bounding box of dark pixels in a (3, H, W) image."""
    dark = pixels_chw.astype(int).sum(0) < 3 * 128
    rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
    return cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1


@pytest.mark.parametrize("width,height", [(800, 200), (200, 800)])
def test_shorter_side_is_resized_and_the_centre_cropped_never_squashed(tmp_path, width, height):
    disc_image(tmp_path / "wide.png", width, height, radius=80)
    out = decode_image(tmp_path / "wide.png", 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    box_w, box_h = dark_box(out)
    # Scale 32/200: the disc is ~26 px across both ways; a squash to 32x32 would make it ~6 px wide.
    assert 23 <= box_w <= 28 and 23 <= box_h <= 28
    assert abs(box_w - box_h) <= 1


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 20, 60, 40))  # stored: red top half, blue bottom half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored top becomes the right side
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg", 16).astype(int)
    left, right = out[:, :, :6].mean((1, 2)), out[:, :, -6:].mean((1, 2))
    assert left[2] > 200 and left[0] < 60  # blue on the left
    assert right[0] > 200 and right[2] < 60  # red on the right


def write_folder(folder, count=6, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (i * 40, 255 - i * 40, 7 * i)).save(folder / f"img{i:02d}.png")


def unreadable_files(folder):
    """Four kinds of bad file, by name -> a word its reason must contain."""
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a picture")
    buffer = folder / "whole.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, quality=90)
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (30, 30), (1, 2, 3)).save(folder / "huge.png")  # 900 px: a bomb once the limit is 600
    return {"empty.png": "empty", "notes.jpg": "not an image", "truncated.jpg": "truncat",
            "huge.png": "decompression-bomb"}


def test_unreadable_files_are_skipped_with_reasons_and_strict_refuses_them(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    write_folder(folder, count=3, size=(20, 20))  # 400 px: under the limit set below
    expected = unreadable_files(folder)
    # Over MAX_IMAGE_PIXELS (but under twice it) Pillow only warns: the warning must count as an error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    options = LoadOptions(data_dir=str(folder), classes=["a", "b"], progress=False, cache_dir=str(tmp_path / "c"))
    dataset = load_dataset("imagefolder", options)
    assert dataset.file_names == ["img00.png", "img01.png", "img02.png"]
    reasons = dict(dataset.skipped)
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    options.strict = True
    with pytest.raises(DatasetError) as error:
        load_dataset("imagefolder", options)
    message = str(error.value)
    assert "\n" not in message and "4 unreadable" in message
    assert all(name in message for name in expected)


def count_decodes(monkeypatch) -> list:
    calls = []
    real = pixels.decode_image

    def counting(path, size):
        calls.append(os.path.basename(path))
        return real(path, size)

    monkeypatch.setattr(pixels, "decode_image", counting)
    return calls


def test_a_second_load_decodes_nothing_and_gives_the_same_pixels(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    write_folder(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    calls = count_decodes(monkeypatch)
    options = LoadOptions(data_dir=str(folder), classes=["a", "b"], progress=False, workers=0,
                          cache_dir=str(tmp_path / "cache"), image_size=24)
    first = load_dataset("imagefolder", options)
    assert len(calls) == 7
    second = load_dataset("imagefolder", options)
    assert len(calls) == 7  # nothing decoded again, not even the broken file (its failure is cached)
    assert torch.equal(first.train_images, second.train_images)
    assert second.skipped == first.skipped == [("broken.png", second.skipped[0][1])]
    assert second.mean == first.mean
    options.image_size = 16  # another size is another store
    load_dataset("imagefolder", options)
    assert len(calls) == 14


def test_worker_processes_decode_the_same_pixels_as_this_process(tmp_path):
    folder = tmp_path / "photos"
    write_folder(folder, count=40)
    files = sorted(folder.iterdir())
    inline = load_pixels(folder, files, 20, tmp_path / "a", workers=0, progress=False)
    pooled = load_pixels(folder, files, 20, tmp_path / "b", workers=2, progress=False)
    assert inline.decoded == pooled.decoded == 40
    assert torch.equal(inline.images, pooled.images)
    again = load_pixels(folder, files, 20, tmp_path / "b", workers=2, progress=False)
    assert again.decoded == 0 and again.reused == 40


def store_files(cache_root):
    (store,) = (cache_root / "pixels").iterdir()
    return store, sorted(p.name for p in store.iterdir())


def test_added_changed_and_vanished_files_update_the_cache_and_nothing_more(tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    write_folder(folder, count=4)
    row_bytes = 3 * 16 * 16

    def load():
        return load_pixels(folder, sorted(folder.iterdir()), 16, cache, workers=0, progress=False)

    first = load()
    store, names = store_files(cache)
    (data_name,) = [n for n in names if n.startswith("pixels-")]
    # A file sorting after the others is appended: same data file, one decode.
    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "img99.png")
    grown = load()
    assert (grown.decoded, grown.reused, grown.dropped) == (1, 4, 0)
    assert [n for n in store_files(cache)[1] if n.startswith("pixels-")] == [data_name]
    assert torch.equal(grown.images[:4], first.images)
    assert (store / data_name).stat().st_size == 5 * row_bytes
    # A file sorting in the middle: rows rewritten in order, still only that file decoded.
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / "img01b.png")
    middle = load()
    assert (middle.decoded, middle.reused) == (1, 5)
    assert int(middle.images[2, 0].float().mean()) == 200
    # A changed file (new content, new mtime) is decoded again; the others are not.
    Image.new("RGB", (40, 30), (0, 0, 250)).save(folder / "img00.png")
    stat = (folder / "img00.png").stat()
    os.utime(folder / "img00.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = load()
    assert (changed.decoded, changed.reused, changed.dropped) == (1, 5, 1)
    assert int(changed.images[0, 2].float().mean()) == 250
    # A vanished file is dropped: the cache holds exactly the remaining rows, in one data file.
    (folder / "img02.png").unlink()
    shrunk = load()
    assert (shrunk.decoded, shrunk.reused, shrunk.dropped) == (0, 5, 1)
    store, names = store_files(cache)
    data = [n for n in names if n.startswith("pixels-")]
    assert len(data) == 1 and not [n for n in names if n.endswith(".tmp")]
    assert (store / data[0]).stat().st_size == 5 * row_bytes
    fresh = load_pixels(folder, sorted(folder.iterdir()), 16, tmp_path / "fresh", workers=0, progress=False)
    assert torch.equal(shrunk.images, fresh.images)


def test_a_half_written_cache_is_not_trusted(tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    write_folder(folder, count=5)
    files = sorted(folder.iterdir())
    reference = load_pixels(folder, files, 16, cache, workers=0, progress=False)
    expected = reference.images.clone()
    store, names = store_files(cache)
    data = store / next(n for n in names if n.startswith("pixels-"))
    # Bytes past the index's rows (an append that crashed before its index): cut off, rows reused.
    with open(data, "ab") as handle:
        handle.write(b"\x07" * 1000)
    (store / "staging-dead.u8.tmp").write_bytes(b"\x00" * 99)  # a crashed build's temp file
    repaired = load_pixels(folder, files, 16, cache, workers=0, progress=False)
    assert repaired.decoded == 0 and torch.equal(repaired.images, expected)
    assert data.stat().st_size == 5 * 3 * 16 * 16
    assert not (store / "staging-dead.u8.tmp").exists()
    # A data file shorter than its index: rebuilt from the images, never read.
    os.truncate(data, 3 * 16 * 16 * 2 + 10)
    rebuilt = load_pixels(folder, files, 16, cache, workers=0, progress=False)
    assert rebuilt.decoded == 5 and torch.equal(rebuilt.images, expected)
    assert rebuilt.notes and "half-written" in rebuilt.notes[0]
    # A damaged index: rebuilt.
    (store / "index.json").write_text('{"format": 1, "entr')
    assert load_pixels(folder, files, 16, cache, workers=0, progress=False).decoded == 5


def test_pool_tensor_is_a_copy_on_write_view_of_the_memory_map(tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    write_folder(folder, count=3)
    files = sorted(folder.iterdir())
    cached = load_pixels(folder, files, 16, cache, workers=0, progress=False)
    assert isinstance(cached.mapped, np.memmap)
    assert cached.images.data_ptr() == cached.mapped.ctypes.data  # no copy in memory
    before = cached.images[0].clone()
    cached.images[0] = 0  # writable (no read-only warning), but never written back to the cache
    assert torch.equal(load_pixels(folder, files, 16, cache, workers=0, progress=False).images[0], before)


def test_trees_keep_relative_names_and_the_resolved_root(tmp_path):
    root = tmp_path / "tree"
    for name in ("cat", "dog"):
        write_folder(root / "train" / name, count=2)
        write_folder(root / "test" / name, count=1)
    odd = root / "train" / "dog" / "Ünï cödé #1 (copy).JPG"
    Image.new("RGB", (53, 37), (3, 3, 3)).save(odd, format="JPEG")
    (root / "train" / "cat" / "bad.png").write_bytes(b"junk")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")  # hidden files are not images
    link = tmp_path / "link"
    link.symlink_to(root)
    dataset = load_dataset("imagefolder", LoadOptions(data_dir=str(link), image_size=16, progress=False))
    assert dataset.data_root == str(root.resolve())
    assert dataset.file_names == ["train/cat/img00.png", "train/cat/img01.png", "train/dog/img00.png",
                                  "train/dog/img01.png", "train/dog/Ünï cödé #1 (copy).JPG"]
    assert dataset.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert dataset.skipped == [("train/cat/bad.png", dataset.skipped[0][1])]
    assert dataset.test_images.shape == (2, 3, 16, 16) and dataset.test_labels.tolist() == [0, 1]
    assert set(dataset.sources) == {"train", "test"}
    # The mean and std come from the cache's per-row sums, and equal a pass over the pixels.
    mean, std = channel_stats(dataset.train_images)
    assert np.allclose(dataset.mean, mean, atol=1e-6) and np.allclose(dataset.std, std, rtol=0.02)


def test_cache_folder_default_and_a_clear_error_when_unusable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "al-annotator"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "al-annotator"
    write_folder(tmp_path / "photos", count=1)
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(ConfigError, match="--cache-dir") as error:
        load_pixels(tmp_path / "photos", sorted((tmp_path / "photos").iterdir()), 8,
                    tmp_path / "plain-file" / "cache", progress=False)
    assert "\n" not in str(error.value)


def test_progress_bar_can_be_disabled(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pixels, "PROGRESS_MIN_FILES", 2)  # a bar from 2 files on (100 by default)
    write_folder(tmp_path / "photos", count=2)
    files = sorted((tmp_path / "photos").iterdir())
    load_pixels(tmp_path / "photos", files, 8, tmp_path / "a", workers=0, progress=False)
    assert capsys.readouterr().err == ""
    load_pixels(tmp_path / "photos", files, 8, tmp_path / "b", workers=0, progress=True)
    assert "decoding images" in capsys.readouterr().err
    load_pixels(tmp_path / "photos", files[:1], 8, tmp_path / "c", workers=0, progress=True)
    assert capsys.readouterr().err == ""  # a single file is not worth a bar
