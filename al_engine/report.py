"""What a bench's runs add up to: the area under each learning curve, its spread over seeds, a
paired test against random, and the pictures.

The area is the DeepAL+ survey's AUBC ("area under the budget curve"): trapezoids of test accuracy
over the number of labels, divided by the labels queried, so a run that is perfect from its first
round scores 1.0 and the numbers sit beside the survey's tables. Spreads are the population
standard deviation over seeds (numpy's default, as the survey reports them).

Plots use matplotlib's Agg canvas directly, so no display and no global backend switch are needed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BASELINE = "random"  # the strategy every other one is tested against
SIGNIFICANCE = 0.05  # a paired p-value below this counts as "beyond the seeds' noise"
PAIRED_TEST = "paired t-test on AULC over shared seeds (two-sided, scipy.stats.ttest_rel)"


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class RunCurve:
    """One run's learning curve, read from its metrics.jsonl."""

    label: str  # the strategy as the bench names it, e.g. "lookahead:mode=last-layer"
    seed: int
    labeled: np.ndarray  # (R+1,) label counts, increasing
    accuracy: np.ndarray  # (R+1,) test accuracy after training on `labeled` labels
    query_s: np.ndarray  # (R+1,) seconds the strategy took each round (0 in the last round)
    train_s: np.ndarray  # (R+1,) seconds of training each round

    @classmethod
    def from_metrics(cls, label: str, seed: int, metrics: list[dict]) -> "RunCurve":
        rows = sorted(metrics, key=lambda row: row["round"])
        rows = [row for row in rows if row.get("accuracy") is not None]
        return cls(label, seed,
                   labeled=np.array([row["labeled"] for row in rows], dtype=np.float64),
                   accuracy=np.array([row["accuracy"] for row in rows], dtype=np.float64),
                   query_s=np.array([row.get("query_s", 0.0) for row in rows], dtype=np.float64),
                   train_s=np.array([row.get("train_s", 0.0) for row in rows], dtype=np.float64))

    @property
    def aulc(self) -> float:
        return aulc(self.labeled, self.accuracy)


def aulc(labeled, accuracy) -> float:
    """Area under the learning curve over the label budget, in [0, 1] when accuracy is.

    sum of trapezoids (labeled[i+1] - labeled[i]) * (acc[i] + acc[i+1]) / 2, divided by the
    budget labeled[-1] - labeled[0] (the labels queried after the initial set), as the DeepAL+
    survey's AUBC. A curve of one point (no labels queried) has no width: its area is that accuracy.
    """
    labeled = np.asarray(labeled, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if labeled.shape != accuracy.shape or labeled.ndim != 1 or len(labeled) == 0:
        raise ValueError("aulc needs two 1-d arrays of the same, non-zero length")
    if np.any(np.diff(labeled) < 0):
        raise ValueError("label counts must not decrease along the curve")
    budget = labeled[-1] - labeled[0]
    if budget == 0:
        return float(accuracy.mean())
    widths = np.diff(labeled)
    heights = (accuracy[1:] + accuracy[:-1]) / 2.0
    return float((widths * heights).sum() / budget)


# --------------------------------------------------------------------------------------------
# Many runs


def paired_test(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """Paired t-test of `values` against `baseline` over the seeds both have.

    Returns the test's name, the number of pairs, the mean difference, the p-value (None when fewer
    than two pairs), and a verdict: "better", "worse" or "no difference beyond seed noise".
    """
    seeds = sorted(set(values) & set(baseline))
    differences = np.array([values[s] - baseline[s] for s in seeds], dtype=np.float64)
    result = {"test": PAIRED_TEST, "pairs": len(seeds), "seeds": seeds,
              "mean_difference": float(differences.mean()) if len(seeds) else None, "p_value": None,
              "verdict": "not tested (needs at least 2 seeds shared with random)"}
    if len(seeds) < 2:
        return result
    if np.allclose(differences, differences[0], rtol=0.0, atol=1e-12):
        # No spread: the t statistic is undefined. Equal runs differ by nothing; a constant
        # non-zero gap is as consistent as a difference can be.
        p_value = 1.0 if abs(differences[0]) <= 1e-12 else 0.0
    else:
        from scipy.stats import ttest_rel

        p_value = float(ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    result["p_value"] = p_value
    if p_value < SIGNIFICANCE:
        result["verdict"] = "better" if differences.mean() > 0 else "worse"
    else:
        result["verdict"] = "no difference beyond seed noise"
    return result


def holm_adjust(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values: a guard when many strategies are tested against random."""
    tested = sorted((p, name) for name, p in p_values.items() if p is not None)
    adjusted: dict[str, float | None] = {name: None for name, p in p_values.items() if p is None}
    running = 0.0
    for rank, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[name] = running
    return adjusted


def mean_curve(curves: list[RunCurve]) -> dict:
    """Mean and std of accuracy per round over seeds (rounds that every seed reached)."""
    length = min(len(curve.labeled) for curve in curves)
    accuracy = np.stack([curve.accuracy[:length] for curve in curves])  # (S, R+1)
    labeled = np.stack([curve.labeled[:length] for curve in curves])
    query_s = np.stack([curve.query_s[:length] for curve in curves])
    return {"labeled": labeled.mean(axis=0).tolist(), "accuracy_mean": accuracy.mean(axis=0).tolist(),
            "accuracy_std": accuracy.std(axis=0).tolist(), "query_s_mean": query_s.mean(axis=0).tolist()}


def summarise(curves: list[RunCurve], order: list[str] | None = None) -> dict:
    """summary.json's content: one entry per strategy label, in `order` (default: first seen)."""
    by_label: dict[str, list[RunCurve]] = {}
    for curve in curves:
        by_label.setdefault(curve.label, []).append(curve)
    labels = [label for label in (order or list(by_label)) if label in by_label]
    baseline = {c.seed: c.aulc for c in by_label.get(BASELINE, [])}
    summary: dict[str, dict] = {}
    for label in labels:
        runs = sorted(by_label[label], key=lambda c: c.seed)
        aulcs = np.array([c.aulc for c in runs])
        finals = np.array([c.accuracy[-1] for c in runs])
        query_totals = np.array([c.query_s.sum() for c in runs])
        queried_rounds = np.array([max(1, len(c.query_s) - 1) for c in runs])
        entry = {
            "aulc_mean": float(aulcs.mean()), "aulc_std": float(aulcs.std()),
            "final_accuracy_mean": float(finals.mean()), "final_accuracy_std": float(finals.std()),
            "runs": len(runs), "seeds": [c.seed for c in runs],
            "aulc_per_seed": {str(c.seed): c.aulc for c in runs},
            "final_labeled": float(np.mean([c.labeled[-1] for c in runs])),
            "query_s_total_mean": float(query_totals.mean()),
            "query_s_per_round_mean": float((query_totals / queried_rounds).mean()),
            "train_s_total_mean": float(np.mean([c.train_s.sum() for c in runs])),
            "curve": mean_curve(runs),
        }
        if label != BASELINE and baseline:
            entry["vs_random"] = paired_test({c.seed: c.aulc for c in runs}, baseline)
        summary[label] = entry
    adjusted = holm_adjust({label: entry["vs_random"]["p_value"]
                            for label, entry in summary.items() if "vs_random" in entry})
    for label, p_value in adjusted.items():
        summary[label]["vs_random"]["p_value_holm"] = p_value
    return summary


# --------------------------------------------------------------------------------------------
# Writing


def _format_p(p_value: float | None) -> str:
    if p_value is None:
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def summary_markdown(summary: dict, title: str = "Benchmark summary", notes: list[str] | None = None) -> str:
    """summary.md: one row per strategy, sorted by mean AULC (best first)."""
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes or []]
    if notes:
        lines.append("")
    lines += [
        "| strategy | runs | AULC mean ± std | final accuracy mean ± std | query s / round | "
        "Δ AULC vs random | p (paired t) | p (Holm) | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, entry in sorted(summary.items(), key=lambda item: -item[1]["aulc_mean"]):
        test = entry.get("vs_random")
        delta = "—" if not test or test["mean_difference"] is None else f"{test['mean_difference']:+.4f}"
        lines.append(
            f"| `{label}` | {entry['runs']} | {entry['aulc_mean']:.4f} ± {entry['aulc_std']:.4f} | "
            f"{entry['final_accuracy_mean']:.4f} ± {entry['final_accuracy_std']:.4f} | "
            f"{entry['query_s_per_round_mean']:.2f} | {delta} | "
            f"{_format_p(test['p_value']) if test else '—'} | "
            f"{_format_p(test.get('p_value_holm')) if test else '—'} | "
            f"{test['verdict'] if test else 'baseline' if label == BASELINE else '—'} |")
    lines += ["", f"AULC: area under accuracy-vs-labels, trapezoids divided by the labels queried (the DeepAL+ "
                  f"survey's AUBC). ± is the standard deviation over seeds. Test: {PAIRED_TEST}; "
                  f"verdicts at p < {SIGNIFICANCE} on the unadjusted p; the Holm column corrects for "
                  f"testing several strategies at once.", ""]
    return "\n".join(lines)


def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def plot_curves(summary: dict, path: Path, title: str = "") -> None:
    """curves.png: mean test accuracy per label count, a band of ±1 std over seeds, one line per strategy."""
    figure, axes = _new_figure()
    for label, entry in summary.items():
        curve = entry["curve"]
        x = np.array(curve["labeled"])
        mean, std = np.array(curve["accuracy_mean"]), np.array(curve["accuracy_std"])
        line, = axes.plot(x, mean, marker="o", markersize=3, label=f"{label} ({entry['aulc_mean']:.3f})")
        axes.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
    axes.set_xlabel("labeled examples")
    axes.set_ylabel("test accuracy")
    axes.set_title(title or "Learning curves (mean ± 1 std over seeds; AULC in brackets)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def plot_query_time(summary: dict, path: Path) -> None:
    """query_time.png: mean seconds each strategy spent choosing its batch, per round (log scale)."""
    figure, axes = _new_figure()
    for label, entry in summary.items():
        seconds = np.array(entry["curve"]["query_s_mean"][:-1])  # the last round queries nothing
        if len(seconds):
            axes.plot(np.arange(len(seconds)), np.maximum(seconds, 1e-3), marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("query seconds per round (mean over seeds; floor 1 ms)")
    axes.set_title("Cost of choosing each batch")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


@dataclass
class ReportFiles:
    summary_json: Path
    summary_md: Path
    curves_png: Path
    query_time_png: Path
    extra: dict = field(default_factory=dict)


def write_report(curves: list[RunCurve], out: str | Path, order: list[str] | None = None,
                 title: str = "Benchmark summary", notes: list[str] | None = None) -> ReportFiles:
    """Write summary.json, summary.md, curves.png and query_time.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(curves, order)
    files = ReportFiles(out / "summary.json", out / "summary.md", out / "curves.png", out / "query_time.png")
    files.summary_json.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    files.summary_md.write_text(summary_markdown(summary, title, notes))
    if summary:
        plot_curves(summary, files.curves_png)
        plot_query_time(summary, files.query_time_png)
    return files


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
