"""Export of the answers: CSV and JSONL streamed row by row, and an image-folder tree.

The web view streams straight from a database cursor; the CLI writes to a temporary file next to
the target and renames it into place, so a reader never sees half a file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from al_engine.errors import UserError

from .db import AnnotationDB
from .images import upscaled_png

FORMATS = ("csv", "jsonl", "imagefolder")
STREAM_FORMATS = ("csv", "jsonl")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def export_lines(db_path: str, fmt: str, chunk: int = 1000) -> Iterator[str]:
    """Lines of a CSV or JSONL export, read through a connection of its own (the stream outlives
    the request that started it)."""
    if fmt not in STREAM_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from: {', '.join(STREAM_FORMATS)}")
    db = AnnotationDB(db_path, setup=False)
    try:
        classes = (db.run_settings() or {}).get("classes", [])
        if fmt == "csv":
            yield _csv_line(AnnotationDB.EXPORT_FIELDS)
        for row in db.iter_export(classes, chunk=chunk):
            if fmt == "csv":
                yield _csv_line(["" if row[k] is None else row[k] for k in AnnotationDB.EXPORT_FIELDS])
            else:
                yield json.dumps(row) + "\n"
    finally:
        db.close()


def write_stream_export(db_path: str, fmt: str, out: Path) -> int:
    """Write CSV/JSONL atomically (temporary file, fsync, rename); returns the number of answers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    count = -1 if fmt == "csv" else 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            for line in export_lines(db_path, fmt):
                handle.write(line)
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return count


def _safe_folder_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(" .")
    return cleaned or "class"


def _source_file(data_dir: str | None, file_name: str | None) -> Path | None:
    """The item's original file, only if it lies inside the dataset folder (the database's file names
    are never trusted to point elsewhere: `../../secret` is not copied)."""
    if not file_name or not data_dir:
        return None
    root = Path(data_dir).resolve()
    source = (root / file_name).resolve()
    return source if source.is_relative_to(root) and source.is_file() else None


def write_imagefolder(db_path: str, out: Path, dataset=None, data_dir: str | None = None) -> int:
    """One folder per class holding each labeled item once (its latest answer). Original files are
    copied when the dataset came from an image folder, otherwise PNGs are encoded from the pool.
    Built in a temporary folder and renamed into place; refuses to overwrite a non-empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{str(out)!r} exists and is not an empty folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    db = AnnotationDB(db_path, setup=False)
    count = 0
    missing: list[str] = []
    try:
        classes = (db.run_settings() or {}).get("classes", [])
        folders = {}
        for index, name in enumerate(classes):
            folder = _safe_folder_name(name)
            while folder in folders.values():
                folder += "_"
            folders[index] = folder
            (tmp / folder).mkdir()
        for row in db.iter_export(classes, latest_only=True):
            target_dir = tmp / folders[row["label_index"]]
            source = _source_file(data_dir, row["file_name"])
            if source is not None:
                shutil.copyfile(source, target_dir / f"{row['item']}_{_safe_folder_name(source.name)}")
            elif row["file_name"] is not None and dataset is None:  # an image folder's file that vanished
                missing.append(row["file_name"])
                continue
            elif dataset is not None:
                (target_dir / f"{row['item']}.png").write_bytes(upscaled_png(dataset.train_images[row["item"]], display_side=0))
            else:
                raise UserError("the images are not available: the run's dataset could not be loaded")
            count += 1
        db.close()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        if missing:
            print(f"export: {len(missing)} labeled file(s) are gone from the data folder and were left out: "
                  f"{', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""), file=sys.stderr)
    except BaseException:
        db.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count
