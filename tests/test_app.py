"""The command line end to end: a run on digits, the strategy list, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_app(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_simulated_run_on_digits(tmp_path):
    out = tmp_path / "run"
    result = run_app("--oracle", "simulated", "--strategy", "entropy", "--initial", "40", "--query-size", "30",
                     "--rounds", "2", "--epochs", "20", "--seed", "1", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["labeled"] for m in metrics] == [40, 70, 100]
    assert metrics[-1]["accuracy"] > 0.5
    assert json.loads((out / "config.json").read_text())["settings"]["seed"] == 1


def test_strategies_lists_each_with_help():
    result = run_app("strategies")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"random", "entropy", "margin", "least-confidence"} <= set(names)
    assert all(len(line.split()) > 2 for line in lines)


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "invalid choice"),
    (["--strategy", "psychic"], "invalid choice"),
    (["--query-size", "0"], "query-size"),
    (["--initial", "999999"], "larger than the pool"),
    (["--dataset", "mnist", "--data-dir", "no/such/folder"], "does not exist"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--rounds", "many"], "invalid int"),
    (["--strategy-option", "noequals"], "key=value"),
    (["--strategy-option", "depth=3"], "unknown option"),
    (["--oracle-noise", "2"], "oracle-noise"),
    (["--device", "toaster"], "unknown device"),
    (["--train-preset", "nope"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_status_2(tmp_path, args, needle):
    result = run_app("--oracle", "simulated", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_simulated_run_without_out_is_a_clear_error():
    result = run_app("--oracle", "simulated")
    assert result.returncode == 2
    assert "--out" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_simulated_run_on_an_image_folder_with_a_frozen_local_backbone(tmp_path):
    """`--model resnet18 --weights FILE`: features computed once and cached, a head trained per round;
    the second run of the same folder decodes nothing and computes no feature again."""
    import torch
    import torchvision
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label, shade in (("dark", 40), ("light", 210)):
            folder = tmp_path / "photos" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(30, 90)), int(rng.integers(30, 90)))  # mixed sizes, never square-forced
                Image.new("RGB", size, (shade, shade, shade)).save(folder / f"{label}{i}.jpg")
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # "local weights": no download here
    args = ("--oracle", "simulated", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "photos"),
            "--model", "resnet18", "--weights", str(weights), "--image-size", "64", "--strategy", "margin",
            "--initial", "8", "--query-size", "8", "--rounds", "2", "--epochs", "5", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    first = run_app(*args, "--out", str(tmp_path / "run1"))
    assert first.returncode == 0, first.stderr
    config = json.loads((tmp_path / "run1" / "config.json").read_text())
    assert config["dataset"]["kind"] == "features" and config["dataset"]["image_shape"] == [512, 1, 1]
    metrics = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["labeled"] for m in metrics] == [8, 16, 24] and all(m["accuracy"] is not None for m in metrics)
    stores = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert "pixels" in stores and any("feature" in name for name in stores)
    files_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    second = run_app(*args, "--out", str(tmp_path / "run2"))
    assert second.returncode == 0, second.stderr
    files_after = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert files_after == files_before  # both caches reused as they were: nothing decoded or computed again
    assert (tmp_path / "run2" / "queries.jsonl").read_text() == (tmp_path / "run1" / "queries.jsonl").read_text()
