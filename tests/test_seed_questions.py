"""benchmarks/seed_questions.py: its statistics and its resumable files (the bench itself is long)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_questions  # noqa: E402


def test_class_entropy_is_one_for_a_balanced_batch_and_zero_for_one_class():
    assert seed_questions.class_entropy(np.arange(100) % 10, 10) == pytest.approx(1.0)
    assert seed_questions.class_entropy(np.zeros(100, dtype=int), 10) == 0.0


def test_mean_interval_is_a_t_interval():
    mean, low, high = seed_questions.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)


def test_summary_reads_the_run_files_and_correlates_scores_with_gains(tmp_path):
    lines = [{"candidate": "baseline", "seed": 0, "accuracy": [0.8, 0.8]}]
    for position, (score, gain) in enumerate([(5.0, 0.01), (4.0, 0.02), (3.0, 0.03), (2.0, 0.04), (1.0, 0.05)]):
        lines.append({"candidate": f"random-{position}", "seed": 0, "strategy": "random-batch", "gain": [gain, gain],
                      "score_default": score, "class_entropy": 0.9, "pick_s": 0.0, "retrain_s": 1.0,
                      "picks": [position]})
    (tmp_path / "seed0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = seed_questions.summary(tmp_path)
    assert result["spearman_score_vs_gain"]["seed0"]["default"]["rho"] == -1.0
    assert result["gains"]["random (all batches)"]["gain_mean"] == pytest.approx(0.03)
    assert result["gains"]["random-0"]["n"] == 2


def test_unknown_candidates_are_one_error_line(tmp_path, capsys):
    assert seed_questions.main(["--out", str(tmp_path), "--only", "bogus"]) == 2
    assert "unknown candidates bogus" in capsys.readouterr().err


def test_paired_aulc_intervals_pair_by_seed_and_refuse_a_folder_without_summary(tmp_path, capsys):
    import paired_aulc
    per_seed = {"random": {"0": 0.80, "1": 0.81, "2": 0.82}, "margin": {"0": 0.81, "1": 0.83, "2": 0.83},
                "lookahead": {"0": 0.80, "1": 0.80}}
    summary = {name: {"aulc_per_seed": values, "aulc_mean": float(np.mean(list(values.values()))), "aulc_std": 0.0}
               for name, values in per_seed.items()}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    _, record = paired_aulc.table(tmp_path, ["random", "margin"])
    margin = record["margin"]["vs_random"]  # differences 0.01, 0.02, 0.01: mean 0.0133, sd 0.00577
    assert margin["mean"] == pytest.approx(0.04 / 3) and margin["ahead"] == 3
    assert margin["high"] - margin["mean"] == pytest.approx(4.303 * 0.005774 / np.sqrt(3), rel=1e-3)
    assert record["lookahead"]["vs_margin"]["seeds"] == 2  # only the seeds both ran
    assert record["random"]["vs_random"] is None
    assert paired_aulc.main([str(tmp_path / "missing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
