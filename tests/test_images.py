"""The picture cache (annotator/images.py): bounded in bytes, not in count."""
from __future__ import annotations

from annotator.images import Picture, PictureCache


def picture(size: int) -> Picture:
    return Picture(data=b"x" * size, mimetype="image/png", width=1, height=1, name=None)


def test_the_picture_cache_is_bounded_in_bytes_and_drops_the_least_recently_used():
    cache = PictureCache(max_bytes=1000)
    for item in range(10):
        cache.put(item, picture(300))
        assert cache.size <= 1000
    assert len(cache) == 3 and cache.size == 900  # ten 300-byte pictures: three fit
    assert cache.get(7) is not None  # touched: now the most recent
    cache.put(10, picture(300))
    assert cache.get(8) is None and cache.get(7) is not None  # 8 was the least recently used
    many_small = PictureCache(max_bytes=1000)
    for item in range(5000):  # a count bound (4,096) would keep 4,096 of these whatever their size
        many_small.put(item, picture(1))
    assert len(many_small) == 1000 and many_small.size == 1000
    cache.put(99, picture(5000))  # larger than the whole cache: not kept, nothing else dropped for it
    assert cache.get(99) is None and cache.size == 900
