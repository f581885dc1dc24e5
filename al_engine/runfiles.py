"""The files a simulated run writes to --out, and how a run resumes from them.

    config.json     the run's record (Engine.describe: settings, training, model, dataset, versions)
    metrics.jsonl   one line per trained round (accuracy after training on `labeled` items)
    queries.jsonl   one line per queried round (pool indices in pick order, scores, diagnostics)
    state.json      the resume point: rounds completed, and the engine's state_dict after them

Every write is flushed and fsynced; config.json and state.json are replaced atomically, so a run
killed at any moment resumes from its last saved state: lines written after it are dropped and the
round is replayed (every random choice is seeded per round, so the replay is exact).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError

# Settings that may change between a run and its resume: more rounds, where it runs and caches.
RESUMABLE_CHANGES = ("rounds", "device", "out", "cache_dir")


def comparable(settings: dict, defaults: dict | None = None) -> dict:
    """The settings that must be equal for a folder's run to be resumed (or reused) by another.

    A setting the record lacks (it was written before the setting existed) counts as its default,
    so adding a setting never orphans the runs already recorded."""
    merged = {**(defaults or {}), **settings}
    return {key: value for key, value in merged.items() if key not in RESUMABLE_CHANGES}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def keep_lines(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop lines a killed run wrote after its last saved state, so a resume never writes them twice."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if keep(record):
            lines.append(json.dumps(record))
    atomic_write(path, "".join(line + "\n" for line in lines))


def json_safe(value):
    """`value` with NaN and infinities as None and numpy scalars as Python numbers: strict JSON."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunFiles:
    """config.json, metrics.jsonl, queries.jsonl and state.json of one run folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.config = self.out / "config.json"
        self.metrics = self.out / "metrics.jsonl"
        self.queries = self.out / "queries.jsonl"
        self.state = self.out / "state.json"

    def finished_rounds(self) -> int:
        """How many rounds (0-based count) a previous run on this folder completed."""
        if not self.state.exists():
            return 0
        return int(json.loads(self.state.read_text())["completed_rounds"])

    def check_comparable(self, settings: dict, defaults: dict | None = None) -> None:
        """Refuse a folder that holds a run with other settings (more rounds or another device are fine);
        `defaults` stand in for settings an older record lacks."""
        previous = json.loads(self.config.read_text()).get("settings", {}) if self.config.exists() else {}
        if comparable(previous, defaults) != comparable(settings, defaults):
            raise ConfigError(f"{self.out} holds a run with other settings; choose another --out")

    def resume(self, settings: dict, rounds: int, defaults: dict | None = None) -> tuple[int, dict | None]:
        """(first round to run, the engine state to load): (0, None) for a new run, whose old lines
        are removed. A run of `rounds` resuming a finished shorter one redoes its last round, which
        queried nothing, so that it queries this time (training is seeded per round: an exact replay)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.state.exists():
            for path in (self.metrics, self.queries):
                path.unlink(missing_ok=True)
            return 0, None
        self.check_comparable(settings, defaults)
        saved = json.loads(self.state.read_text())
        start_round = int(saved["completed_rounds"])
        if not saved.get("queried", True) and start_round <= rounds:
            start_round -= 1
        keep_lines(self.metrics, lambda record: record["round"] < start_round)
        keep_lines(self.queries, lambda record: record["round"] < start_round)
        return start_round, saved

    def write_config(self, record: dict) -> None:
        atomic_write(self.config, json.dumps(record, indent=2))

    def append_round(self, metrics: dict, query: dict | None) -> None:
        """One trained round's metrics line, and its query line when it queried."""
        if query is not None:
            append_line(self.queries, query)
        append_line(self.metrics, metrics)

    def save_state(self, completed_rounds: int, queried: bool, engine_state: dict) -> None:
        """The resume point after `completed_rounds` rounds; `queried` False: the last round was the
        final one and a longer run resuming here must still query it."""
        atomic_write(self.state, json.dumps({"completed_rounds": completed_rounds, "queried": queried, **engine_state}))
