"""AULC, paired tests and the report files, on curves whose answers are known by hand."""
import json

import numpy as np
import pytest

from al_engine.report import (PAIRED_TEST, RunCurve, aulc, holm_adjust, paired_test, summarise,
                              summary_markdown, write_report)


def curve(label, seed, accuracies, start=100, step=100, query_s=0.5):
    labeled = [start + step * i for i in range(len(accuracies))]
    metrics = [{"round": i, "labeled": n, "accuracy": a, "train_s": 1.0,
                "query_s": query_s if i < len(accuracies) - 1 else 0.0, "strategy": label, "seed": seed}
               for i, (n, a) in enumerate(zip(labeled, accuracies))]
    return RunCurve.from_metrics(label, seed, metrics)


def test_aulc_of_a_flat_curve_is_its_height():
    assert aulc([100, 200, 300], [0.7, 0.7, 0.7]) == pytest.approx(0.7)


def test_aulc_of_a_ramp_is_the_trapezoid_by_hand():
    # From 0.5 to 0.9 over 200 queried labels: area 200 * 0.7, divided by the budget 200.
    assert aulc([1000, 1100, 1200], [0.5, 0.7, 0.9]) == pytest.approx(0.7)
    # Uneven steps: (0.6+0.8)/2 * 100 + (0.8+1.0)/2 * 300 = 70 + 270 = 340, over 400 labels.
    assert aulc([0, 100, 400], [0.6, 0.8, 1.0]) == pytest.approx(340 / 400)


def test_aulc_matches_the_survey_formula_with_a_short_last_step():
    # DeepAL+'s AUBC for quota 250, batch 100: two full trapezoids of width 100 and a last one of 50.
    accuracy = [0.2, 0.4, 0.5, 0.9]
    by_hand = ((0.2 + 0.4) * 100 / 2 + (0.4 + 0.5) * 100 / 2 + (0.5 + 0.9) * 50 / 2) / 250
    assert aulc([0, 100, 200, 250], accuracy) == pytest.approx(by_hand)


def test_aulc_of_a_single_point_is_that_accuracy_and_bad_curves_are_rejected():
    assert aulc([100], [0.42]) == pytest.approx(0.42)
    with pytest.raises(ValueError):
        aulc([100, 50], [0.1, 0.2])
    with pytest.raises(ValueError):
        aulc([], [])


def test_run_curve_skips_rounds_without_accuracy_and_sorts_rounds():
    metrics = [{"round": 1, "labeled": 20, "accuracy": 0.8}, {"round": 0, "labeled": 10, "accuracy": 0.6},
               {"round": 2, "labeled": 30, "accuracy": None}]
    run = RunCurve.from_metrics("entropy", 0, metrics)
    assert run.labeled.tolist() == [10, 20]
    assert run.aulc == pytest.approx(0.7)


def test_paired_test_finds_a_consistent_gain_and_names_itself():
    base = {0: 0.60, 1: 0.62, 2: 0.61, 3: 0.63, 4: 0.60}
    better = {0: 0.65, 1: 0.66, 2: 0.67, 3: 0.67, 4: 0.66}
    result = paired_test(better, base)
    assert result["test"] == PAIRED_TEST and result["pairs"] == 5
    assert result["mean_difference"] == pytest.approx(0.05)
    assert result["p_value"] < 0.001 and result["verdict"] == "better"
    worse = paired_test(base, better)
    assert worse["verdict"] == "worse" and worse["p_value"] == pytest.approx(result["p_value"])


def test_paired_test_calls_noise_noise():
    base = {0: 0.60, 1: 0.70, 2: 0.50, 3: 0.65}
    noisy = {0: 0.62, 1: 0.67, 2: 0.53, 3: 0.63}  # differences +.02 -.03 +.03 -.02: mean 0
    result = paired_test(noisy, base)
    assert result["p_value"] > 0.5
    assert result["verdict"] == "no difference beyond seed noise"


def test_paired_test_with_one_shared_seed_or_no_spread():
    assert paired_test({0: 0.7, 1: 0.8}, {1: 0.6})["p_value"] is None
    assert paired_test({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8})["p_value"] == 1.0
    constant = paired_test({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})
    assert constant["p_value"] == 0.0 and constant["verdict"] == "better"


def test_holm_adjustment_by_hand():
    adjusted = holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, then max(0.06, 0.04) = 0.06
    assert adjusted == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06), "d": None}


def test_summary_numbers_by_hand():
    runs = [curve("random", 0, [0.5, 0.6, 0.7]), curve("random", 1, [0.5, 0.7, 0.7]),
            curve("entropy", 0, [0.5, 0.8, 0.9]), curve("entropy", 1, [0.5, 0.8, 0.8])]
    summary = summarise(runs)
    assert list(summary) == ["random", "entropy"]
    # random: aulc (0.55+0.65)/2 = 0.6 and (0.6+0.7)/2 = 0.65
    assert summary["random"]["aulc_mean"] == pytest.approx(0.625)
    assert summary["random"]["aulc_std"] == pytest.approx(0.025)
    assert summary["entropy"]["final_accuracy_mean"] == pytest.approx(0.85)
    assert summary["entropy"]["final_accuracy_std"] == pytest.approx(0.05)
    assert summary["entropy"]["runs"] == 2
    assert summary["entropy"]["query_s_total_mean"] == pytest.approx(1.0)
    assert summary["entropy"]["query_s_per_round_mean"] == pytest.approx(0.5)
    assert summary["entropy"]["curve"]["accuracy_mean"] == pytest.approx([0.5, 0.8, 0.85])
    # entropy: aulc (0.65+0.85)/2 = 0.75 and (0.65+0.8)/2 = 0.725, mean 0.7375
    assert summary["entropy"]["vs_random"]["mean_difference"] == pytest.approx(0.7375 - 0.625)
    assert "vs_random" not in summary["random"]


def test_summary_without_random_has_no_test():
    summary = summarise([curve("entropy", 0, [0.5, 0.6]), curve("margin", 0, [0.5, 0.7])])
    assert all("vs_random" not in entry for entry in summary.values())


def test_markdown_ranks_by_aulc_and_states_the_test():
    runs = [curve("random", s, [0.5, 0.6]) for s in range(3)] + \
           [curve("entropy", s, [0.5, 0.7 + 0.01 * s]) for s in range(3)]
    text = summary_markdown(summarise(runs))
    entropy_row = next(line for line in text.splitlines() if line.startswith("| `entropy`"))
    random_row = next(line for line in text.splitlines() if line.startswith("| `random`"))
    assert text.index(entropy_row) < text.index(random_row)
    assert "better" in entropy_row and "baseline" in random_row
    assert "paired t-test" in text


def test_write_report_writes_all_four_files(tmp_path):
    runs = [curve("random", s, [0.5, 0.6, 0.65]) for s in range(2)] + \
           [curve("lookahead:mode=last-layer", s, [0.5, 0.7, 0.75]) for s in range(2)]
    files = write_report(runs, tmp_path, order=["lookahead:mode=last-layer", "random"])
    summary = json.loads(files.summary_json.read_text())
    assert list(summary) == ["lookahead:mode=last-layer", "random"]
    for key in ("aulc_mean", "aulc_std", "final_accuracy_mean", "final_accuracy_std", "runs"):
        assert key in summary["random"]
    for png in (files.curves_png, files.query_time_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "lookahead:mode=last-layer" in files.summary_md.read_text()
    assert not np.isnan(summary["random"]["aulc_mean"])
