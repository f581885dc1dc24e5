"""A simulated run killed with SIGKILL mid-round resumes to exactly the results of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--oracle", "simulated", "--strategy", "margin", "--initial", "30", "--query-size", "25",
        "--rounds", "4", "--epochs", "25", "--seed", "3", "--no-progress", "--device", "cpu"]


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    out = tmp_path / "killed"
    kills = 0
    for wanted_lines, delay in ((1, 0.05), (2, 0.3)):  # kill once early in a round, once later
        process = start(out)
        deadline = time.monotonic() + 120
        while len(lines(out / "metrics.jsonl")) < wanted_lines and process.poll() is None:
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.02)
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            kills += 1
    assert kills >= 1
    final = start(out)
    assert final.wait(timeout=300) == 0, final.stderr.read()

    expected, got = lines(tmp_path / "reference" / "metrics.jsonl"), lines(out / "metrics.jsonl")
    assert [m["round"] for m in got] == [0, 1, 2, 3, 4]
    assert [(m["labeled"], m["accuracy"]) for m in got] == [(m["labeled"], m["accuracy"]) for m in expected]
    assert lines(out / "queries.jsonl") == lines(tmp_path / "reference" / "queries.jsonl")
