"""The bench grid: strategy specs, presets, resume, skip, failures and the files it writes."""
import json
import time

import pytest
import torch

import app
from al_engine import bench as bench_module
from al_engine.bench import BenchConfig, StrategySpec, clock_seconds, run_bench
from al_engine.config import RunConfig
from al_engine.data import load_dataset, take_subset
from al_engine.errors import ConfigError
from al_engine.presets import PRESETS, get_preset
from al_engine.runfiles import read_jsonl
from oracle.simulated import SimulatedOracle


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores shared by many processes: one thread per process avoids spinning on each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_digits():
    return take_subset(load_dataset("digits"), 160, seed=3)


def tiny_bench(out, strategies=("random", "entropy"), seeds=(0, 1), rounds=1, **overrides) -> BenchConfig:
    base = RunConfig(dataset="digits", model="small-cnn", initial=20, query_size=10, rounds=rounds, epochs=2,
                     train_preset="dal", device="cpu", **overrides)
    return BenchConfig(base=base, strategies=[StrategySpec.parse(s) for s in strategies], out=out, seeds=list(seeds))


bench_parser = app.build_bench_parser
bench_config_from_args = app.bench_config_from_args


# --------------------------------------------------------------------------------------------
# Strategy specs


def test_spec_parses_options_in_sorted_order():
    spec = StrategySpec.parse(" lookahead:steps=2:mode=last-layer ")
    assert spec.name == "lookahead"
    assert spec.options == (("mode", "last-layer"), ("steps", "2"))
    assert spec.label == "lookahead:mode=last-layer:steps=2"
    assert spec.folder == "lookahead+mode=last-layer+steps=2"
    assert StrategySpec.parse("entropy").folder == "entropy"


def test_spec_folders_are_safe_and_distinct():
    odd = StrategySpec.parse("x:path=a/b c")
    other = StrategySpec.parse("x:path=a_b_c")
    assert "/" not in odd.folder and " " not in odd.folder
    assert odd.folder != other.folder


@pytest.mark.parametrize("text", ["", ":mode=x", "lookahead:mode", "lookahead:=x", "a:k=1:k=2"])
def test_bad_specs_are_config_errors(text):
    with pytest.raises(ConfigError):
        StrategySpec.parse(text)


def test_unknown_strategy_or_option_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy"):
        tiny_bench(tmp_path, strategies=("random", "no-such")).validate()
    with pytest.raises(ConfigError, match="unknown option"):
        tiny_bench(tmp_path, strategies=("entropy:bogus=1",)).validate()
    with pytest.raises(ConfigError, match="twice"):
        tiny_bench(tmp_path, strategies=("entropy", "entropy")).validate()
    with pytest.raises(ConfigError, match="twice"):
        tiny_bench(tmp_path, seeds=(0, 0)).validate()
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Presets and the command line


def test_preset_fills_only_what_the_command_line_leaves_unsaid():
    args = bench_parser().parse_args(["--preset", "dal-fashion-mnist", "--rounds", "3", "--strategies",
                                      "random,entropy", "--out", "x"])
    config = bench_config_from_args(args)
    assert config.base.dataset == "fashion-mnist" and config.base.initial == 10000
    assert config.base.query_size == 1000 and config.base.train_preset == "dal"
    assert config.base.rounds == 3  # the flag beats the preset
    assert config.seeds == [0, 1, 2, 3, 4]  # the preset says nothing: the default
    assert [s.label for s in config.strategies] == ["random", "entropy"]


def test_without_preset_the_defaults_apply():
    config = bench_config_from_args(bench_parser().parse_args(["--strategies", "random", "--out", "x"]))
    assert config.base.dataset == "digits" and config.base.initial == 100 and config.base.rounds == 10
    assert config.seeds == [0, 1, 2, 3, 4]


def test_quick_preset_names_strategies_and_seeds():
    config = bench_config_from_args(bench_parser().parse_args(["--preset", "quick", "--out", "x"]))
    assert [s.name for s in config.strategies] == list(PRESETS["quick"].strategies)
    assert config.seeds == [0, 1, 2]
    assert config.base.dataset == "digits"


def test_published_presets_hold_the_published_numbers():
    seed_setup = get_preset("cifar10-resnet18")
    assert (seed_setup.dataset, seed_setup.model, seed_setup.initial, seed_setup.query_size) == \
        ("cifar10", "resnet18", 5000, 100)
    with pytest.raises(ConfigError, match="choose from"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_things_that_exist(name):
    from al_engine.data import dataset_names
    from al_engine.models import model_names
    from al_engine.train import TRAIN_PRESETS

    settings = get_preset(name).settings()
    assert set(settings) <= set(app.preset_keys())
    assert settings["dataset"] in dataset_names() and settings["model"] in model_names()
    assert settings["train_preset"] in TRAIN_PRESETS
    for text in settings.get("strategies", []):
        StrategySpec.parse(text)  # well-formed; whether each is registered is checked when a bench starts
    config = bench_config_from_args(bench_parser().parse_args(["--preset", name, "--strategies", "random",
                                                               "--out", "x"]))
    config.base.validate()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--strategies", "random,nope", "--out", "{tmp}"], "unknown strategy 'nope'"),
    (["bench", "--preset", "nope", "--out", "{tmp}"], "unknown preset 'nope'"),
    (["bench", "--out", "{tmp}"], "needs --strategies"),
    (["bench", "--strategies", "random", "--seeds", "a,b", "--out", "{tmp}"], "expected comma-separated integers"),
    (["bench", "--strategies", "entropy", "--strategy-option", "k=v", "--out", "{tmp}"], "per strategy"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [part.replace("{tmp}", str(tmp_path / "b")) for part in argv]
    try:
        status = app.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Running the grid


def test_bench_runs_the_grid_and_writes_the_report(tmp_path, small_digits):
    bench = tiny_bench(tmp_path / "b")
    result = run_bench(bench, SimulatedOracle.for_run, progress=False, dataset=small_digits)
    assert (result.finished, result.skipped, result.failures) == (4, 0, [])
    for strategy in ("random", "entropy"):
        for seed in (0, 1):
            metrics = read_jsonl(tmp_path / "b" / strategy / f"seed-{seed}" / "metrics.jsonl")
            assert [row["labeled"] for row in metrics] == [20, 30]
            assert {row["seed"] for row in metrics} == {seed}
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert list(summary) == ["random", "entropy"]
    assert summary["entropy"]["runs"] == 2 and 0.0 <= summary["entropy"]["aulc_mean"] <= 1.0
    assert summary["entropy"]["vs_random"]["pairs"] == 2
    for name in ("summary.md", "curves.png", "query_time.png", "bench.json"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    picks = [read_jsonl(tmp_path / "b" / s / "seed-1" / "queries.jsonl")[0]["indices"] for s in ("random", "entropy")]
    assert picks[0] != picks[1]  # the strategies did choose differently


def test_finished_runs_are_skipped_and_half_finished_runs_resume(tmp_path, small_digits, monkeypatch):
    out = tmp_path / "b"
    run_bench(tiny_bench(out, strategies=("entropy",), seeds=(0,), rounds=1), SimulatedOracle.for_run,
              progress=False, dataset=small_digits)
    before = read_jsonl(out / "entropy" / "seed-0" / "metrics.jsonl")

    # Same grid again: nothing runs.
    def no_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(bench_module, "run_or_serve", no_run)
    again = run_bench(tiny_bench(out, strategies=("entropy",), seeds=(0,), rounds=1), SimulatedOracle.for_run,
                      progress=False, dataset=small_digits)
    assert (again.skipped, again.finished) == (1, 1)
    monkeypatch.undo()

    # One more round asked for: the run resumes from its state, keeping the rounds it had.
    longer = run_bench(tiny_bench(out, strategies=("entropy",), seeds=(0,), rounds=2), SimulatedOracle.for_run,
                       progress=False, dataset=small_digits)
    after = read_jsonl(out / "entropy" / "seed-0" / "metrics.jsonl")
    assert longer.skipped == 0 and [row["round"] for row in after] == [0, 1, 2]
    assert after[0] == before[0]
    assert after[1]["accuracy"] == before[1]["accuracy"]  # round 1 retrained (now it queries), same model
    log = json.loads((out / "bench.json").read_text())
    assert len(log["invocations"]) == 3
    # one after another: the clock time is the sum
    assert log["wall_s_total"] == pytest.approx(sum(i["wall_s"] for i in log["invocations"]), abs=0.01)
    assert log["wall_s_summed"] == pytest.approx(log["wall_s_total"], abs=0.01)


def test_bench_wall_time_counts_invocations_that_ran_at_once_one_time():
    def invocation(finished, wall):
        return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)), "wall_s": wall}

    # 10:00-11:00 and 10:30-11:30 at once, then 12:00-12:10 alone: 1.5 h + 10 min of clock time.
    ten = 1_700_000_000 - 1_700_000_000 % 3600 + 10 * 3600
    spans = [invocation(ten + 3600, 3600.0), invocation(ten + 5400, 3600.0), invocation(ten + 7800, 600.0)]
    assert clock_seconds(spans) == pytest.approx(5400 + 600)
    assert clock_seconds([{**spans[0], "finished_unix": ten + 3600.5}]) == pytest.approx(3600.0)
    assert clock_seconds([]) == 0.0
    # the recorded hours of one invocation inside another's add nothing
    assert clock_seconds([invocation(ten + 3600, 3600.0), invocation(ten + 1800, 600.0)]) == pytest.approx(3600)


class DiesInRound:
    """An oracle that is 'killed' when asked in a given round, the first time only."""

    def __init__(self, round_index):
        self.round_index, self.died = round_index, False

    def __call__(self, dataset, config):
        inner, outer = SimulatedOracle.for_run(dataset, config), self

        class Oracle:
            def answer(self, indices, round_index):
                if round_index == outer.round_index and not outer.died:
                    outer.died = True
                    raise KeyboardInterrupt  # what a Ctrl-C in the middle of a bench looks like
                return inner.answer(indices, round_index)

        return Oracle()


def test_a_killed_run_resumes_from_its_last_round(tmp_path, small_digits):
    out = tmp_path / "b"
    oracle = DiesInRound(1)
    bench = tiny_bench(out, strategies=("margin",), seeds=(0,), rounds=3)
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench, oracle, progress=False, dataset=small_digits)
    killed = read_jsonl(out / "margin" / "seed-0" / "metrics.jsonl")
    assert [row["round"] for row in killed] == [0]
    result = run_bench(bench, oracle, progress=False, dataset=small_digits)
    resumed = read_jsonl(out / "margin" / "seed-0" / "metrics.jsonl")
    assert [row["round"] for row in resumed] == [0, 1, 2, 3] and resumed[0] == killed[0]
    assert result.finished == 1
    # The resumed run equals one that was never killed.
    fresh = tiny_bench(tmp_path / "c", strategies=("margin",), seeds=(0,), rounds=3)
    run_bench(fresh, SimulatedOracle.for_run, progress=False, dataset=small_digits)
    uninterrupted = read_jsonl(tmp_path / "c" / "margin" / "seed-0" / "queries.jsonl")
    resumed_queries = read_jsonl(out / "margin" / "seed-0" / "queries.jsonl")
    assert [q["indices"] for q in resumed_queries] == [q["indices"] for q in uninterrupted]


def test_a_run_with_other_settings_in_the_folder_is_refused(tmp_path, small_digits):
    out = tmp_path / "b"
    run_bench(tiny_bench(out, strategies=("random",), seeds=(0,)), SimulatedOracle.for_run, progress=False,
              dataset=small_digits)
    changed = tiny_bench(out, strategies=("random",), seeds=(0,))
    changed.base.initial = 30
    with pytest.raises(ConfigError, match="other settings"):
        run_bench(changed, SimulatedOracle.for_run, progress=False, dataset=small_digits)


def test_keep_going_records_a_crashed_run_and_reports_the_rest(tmp_path, small_digits):
    def flaky_oracle(dataset, config):
        if config.seed == 1:
            raise RuntimeError("oracle fell over")
        return SimulatedOracle.for_run(dataset, config)

    bench = tiny_bench(tmp_path / "b", strategies=("random",), seeds=(0, 1))
    with pytest.raises(RuntimeError):
        run_bench(bench, flaky_oracle, progress=False, dataset=small_digits)
    bench.keep_going = True
    result = run_bench(bench, flaky_oracle, progress=False, dataset=small_digits)
    assert result.failures == [{"strategy": "random", "seed": 1, "error": "RuntimeError: oracle fell over"}]
    assert result.summary["random"]["runs"] == 1 and result.summary["random"]["seeds"] == [0]


def test_subset_is_drawn_per_seed_as_a_single_run_draws_it(tmp_path):
    bench = tiny_bench(tmp_path, subset=100)
    cache = bench_module._DatasetCache(bench.base, None)
    for seed in (0, 1):
        expected = load_dataset("digits", RunConfig(dataset="digits", subset=100, seed=seed).load_options())
        assert torch.equal(cache.for_seed(seed).train_labels, expected.train_labels)
    assert not torch.equal(cache.for_seed(0).train_images, cache.for_seed(1).train_images)


def test_cli_bench_end_to_end_on_the_quick_preset(tmp_path, capsys):
    out = tmp_path / "q"
    status = app.main(["bench", "--preset", "quick", "--strategies", "random,margin", "--seeds", "0",
                       "--rounds", "1", "--epochs", "2", "--subset", "200", "--device", "cpu", "--no-progress",
                       "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "2 of 2 runs finished" in printed and "margin: AULC" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"random", "margin"}
    assert app.main(["bench", "--preset", "quick", "--strategies", "random,margin", "--seeds", "0",
                     "--rounds", "1", "--epochs", "2", "--subset", "200", "--device", "cpu", "--no-progress",
                     "--report-only", "--out", str(out)]) == 0
    assert "report of 2 finished runs" in capsys.readouterr().out


def test_parallel_workers_give_the_runs_a_sequential_bench_gives(tmp_path, small_digits):
    sequential = tiny_bench(tmp_path / "one", strategies=("random", "entropy"), seeds=(0, 1))
    run_bench(sequential, SimulatedOracle.for_run, progress=False, dataset=small_digits)
    parallel = tiny_bench(tmp_path / "two", strategies=("random", "entropy"), seeds=(0, 1))
    parallel.workers, parallel.worker_threads = 2, 1  # one thread each, as this process uses
    result = run_bench(parallel, SimulatedOracle.for_run, progress=False, dataset=small_digits)
    assert result.finished == 4 and result.failures == []
    for strategy in ("random", "entropy"):
        for seed in (0, 1):
            one = sequential.run_dir(StrategySpec.parse(strategy), seed)
            two = parallel.run_dir(StrategySpec.parse(strategy), seed)
            assert read_jsonl(one / "queries.jsonl") == read_jsonl(two / "queries.jsonl")
            assert ([m["accuracy"] for m in read_jsonl(one / "metrics.jsonl")]
                    == [m["accuracy"] for m in read_jsonl(two / "metrics.jsonl")])
    # Resuming a parallel bench skips what is done, as a sequential one does.
    again = run_bench(parallel, SimulatedOracle.for_run, progress=False, dataset=small_digits)
    assert again.skipped == 4


def test_workers_must_be_at_least_one(tmp_path):
    args = bench_parser().parse_args(["--strategies", "random", "--out", str(tmp_path), "--workers", "0"])
    with pytest.raises(ConfigError, match="--workers"):
        bench_config_from_args(args).validate()


def test_grid_runs_seed_by_seed_so_a_stopped_bench_holds_whole_seeds(tmp_path, small_digits):
    def fails_on_seed_1(dataset, config):
        if config.seed == 1:
            raise RuntimeError("stopped")
        return SimulatedOracle.for_run(dataset, config)

    bench = tiny_bench(tmp_path / "b", strategies=("random", "entropy"), seeds=(0, 1))
    with pytest.raises(RuntimeError):
        run_bench(bench, fails_on_seed_1, progress=False, dataset=small_digits)
    for strategy in ("random", "entropy"):  # strategy by strategy, entropy seed 0 would never have run
        assert bench_module.is_finished(bench.run_config(StrategySpec.parse(strategy), 0))
