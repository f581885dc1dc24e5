"""The README opens with the two set-up commands, and CI runs the second one word for word."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_opens_with_run_and_test_commands():
    run, test = readme_commands()
    assert "app.py --oracle simulated --dataset digits" in run
    assert test.endswith("-m pytest")
    assert run.split("&&")[:2] == test.split("&&")[:2]  # the same set-up in both


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()
