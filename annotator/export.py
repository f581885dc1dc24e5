"""Export of the answers: CSV and JSONL streamed row by row, and an image-folder tree.

The web view streams straight from a database cursor; the CLI writes to a temporary file next to
the target and renames it into place, so a reader never sees half a file. A target that is a symbolic
link is written through (the link stays, its file is replaced the same way); a FIFO, a terminal or another
special file is written to directly. New files get the user's usual permissions (umask), a replaced file
keeps its own. Temporary files that a killed export left behind are removed by the next export.

CSV cells that a spreadsheet would run as a formula (text starting with = + - @, a tab or a carriage
return) get a leading apostrophe, as OWASP recommends; JSONL keeps every value as it is.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator

from al_engine.errors import UserError

from .db import AnnotationDB
from .images import upscaled_png

FORMATS = ("csv", "jsonl", "imagefolder")
STREAM_FORMATS = ("csv", "jsonl")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula


def neutralise(value):
    """A text cell that a spreadsheet would evaluate, made inert with a leading apostrophe (numbers, which
    are written as numbers, are left alone: -0.5 is a score, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([neutralise(value) for value in values])
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


TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _temp_path(target: Path) -> Path:
    """A hidden temporary name beside the target that records the writing process's id."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never take another's file for dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str) -> int:
    """Delete the temporary files (or folders) of earlier exports to `name` whose process is gone (killed
    mid-export); the ones of an export still running are left alone. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if not match or match["name"] != name or _process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def _write_lines(handle, lines) -> int:
    count = 0
    for line in lines:
        handle.write(line)
        count += 1
    return count


def write_stream_export(db_path: str, fmt: str, out: Path) -> int:
    """Write CSV/JSONL atomically (temporary file, fsync, rename); returns the number of answers.
    Through a symbolic link the linked file is replaced; a FIFO or device is written directly."""
    header = 1 if fmt == "csv" else 0
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{str(out)!r} is a folder; --format {fmt} writes a file")
    if mode is not None and not stat.S_ISREG(mode):  # a FIFO, /dev/stdout, a terminal: no rename possible
        with open(target, "w", encoding="utf-8", newline="") as handle:
            return _write_lines(handle, export_lines(db_path, fmt)) - header
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = _temp_path(target)
    # a new file gets the usual permissions (0666 less the umask), a replaced one keeps its own
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else stat.S_IMODE(mode))
    try:
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            count = _write_lines(handle, export_lines(db_path, fmt)) - header
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    Built in a temporary folder and renamed into place; refuses to overwrite a non-empty folder, and a
    symbolic link (the rename would replace the link, not fill the folder it points to)."""
    if out.is_symlink():
        raise UserError(f"{str(out)!r} is a symbolic link; give the folder itself as --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{str(out)!r} exists and is not an empty folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    tmp = _temp_path(out)
    tmp.mkdir(0o777)  # the user's usual permissions (umask), as `mkdir` gives
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
        for row in db.iter_export(classes, training_labels=True):  # each item's training label
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
