"""Labels one already has, brought into a project: `python app.py import FILE --db DB`.

FILE is a CSV with a header naming the columns `file` (or `file_name`, as the CSV export writes it)
and `label` (a class name), or a class-per-folder tree (`FILE/<class>/.../<image>`). A file is found
in the project's manifest by its name relative to the data folder, else by its base name when that
is unique in the folder. Imported labels are answers of the `import` annotator: they count as
labeled from the next training on, appear in exports, and are never queried.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from al_engine.data import IMAGE_SUFFIXES
from al_engine.errors import UserError

FORMULA_PREFIXES = ("=", "+", "-", "@")  # the CSV export writes these cells as '=..., so a round trip strips it


@dataclass
class ImportPlan:
    """What an import file says, matched against the project's files."""

    labels: list[tuple[int, int]] = field(default_factory=list)  # (item id, class index), one per item
    unmatched: list[str] = field(default_factory=list)  # names found in no file of the project
    repeated: int = 0  # rows naming an item already given (the last row wins)


class FileMatcher:
    """Finds a name from an import file among the project's files."""

    def __init__(self, file_ids: dict[str, int]):
        self.file_ids = file_ids
        by_base: dict[str, list[int]] = {}
        for name, item_id in file_ids.items():
            by_base.setdefault(PurePosixPath(name).name, []).append(item_id)
        self.unique_base = {base: ids[0] for base, ids in by_base.items() if len(ids) == 1}

    def find(self, name: str) -> int | None:
        name = name.strip().replace("\\", "/")
        while name.startswith("./"):
            name = name[2:]
        if name in self.file_ids:
            return self.file_ids[name]
        return self.unique_base.get(PurePosixPath(name).name)


def _cell(text: str | None) -> str:
    text = (text or "").strip()
    if len(text) > 1 and text[0] == "'" and text[1] in FORMULA_PREFIXES:
        return text[1:]
    return text


def _add(plan: ImportPlan, chosen: dict[int, int], item_id: int | None, name: str, label: int) -> None:
    if item_id is None:
        plan.unmatched.append(name)
        return
    if item_id in chosen:
        plan.repeated += 1
    chosen[item_id] = label


def read_csv_labels(path: Path, classes: list[str], matcher: FileMatcher) -> ImportPlan:
    plan, chosen = ImportPlan(), {}
    class_index = {name: i for i, name in enumerate(classes)}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            file_column = next((c for c in ("file", "file_name") if c in columns), None)
            if file_column is None or "label" not in columns:
                raise UserError(f"{str(path)!r} needs a header with the columns file (or file_name) and label; "
                                f"it has: {', '.join(columns) or 'none'}")
            reader.fieldnames = columns
            for line, row in enumerate(reader, start=2):
                name, label = _cell(row.get(file_column)), _cell(row.get("label"))
                if not name:
                    raise UserError(f"{str(path)!r} line {line}: the file column is empty")
                if label not in class_index:
                    raise UserError(f"{str(path)!r} line {line}: unknown class {label!r}; the project's classes "
                                    f"are: {', '.join(classes)}")
                _add(plan, chosen, matcher.find(name), name, class_index[label])
    except UnicodeDecodeError:
        raise UserError(f"{str(path)!r} is not a UTF-8 CSV file") from None
    except csv.Error as error:
        raise UserError(f"{str(path)!r} is not a readable CSV file: {error}") from None
    plan.labels = sorted(chosen.items())
    return plan


def read_tree_labels(root: Path, classes: list[str], matcher: FileMatcher) -> ImportPlan:
    plan, chosen = ImportPlan(), {}
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise UserError(f"{str(root)!r} has folders that are no class of the project: {', '.join(unknown[:5])}; "
                        f"the classes are: {', '.join(classes)}")
    if not folders:
        raise UserError(f"{str(root)!r} has no class folders (expected {root}/<class>/<image>)")
    for label, class_name in enumerate(classes):
        class_dir = root / class_name
        if not class_dir.is_dir():
            continue
        for folder, subdirs, files in os.walk(class_dir):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file_name in sorted(files):
                if file_name.startswith(".") or os.path.splitext(file_name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                relative = (Path(folder) / file_name).relative_to(class_dir).as_posix()
                _add(plan, chosen, matcher.find(relative), f"{class_name}/{relative}", label)
    plan.labels = sorted(chosen.items())
    return plan


def read_import(source: Path, classes: list[str], file_ids: dict[str, int]) -> ImportPlan:
    """The (item id, class index) pairs that `source` (a CSV file or a class-per-folder tree) gives."""
    if not file_ids:
        raise UserError("this database has no file list: labels are imported into image-folder projects "
                        "(start the annotator once on the folder, then import)")
    matcher = FileMatcher(file_ids)
    if source.is_dir():
        return read_tree_labels(source, classes, matcher)
    if not source.is_file():
        raise UserError(f"no file or folder at {str(source)!r}")
    return read_csv_labels(source, classes, matcher)
