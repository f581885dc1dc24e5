"""The one entry point: parse the command line, build what it asks for, call it.

    python app.py                                  serve the annotator (human oracle)
    python app.py --oracle simulated --out DIR     run a benchmark unattended
    python app.py bench --strategies a,b --seeds 0,1,2 --out DIR
    python app.py export --format csv|jsonl|imagefolder --out PATH
    python app.py users add NAME [--role annotator|admin]
    python app.py strategies

Every user error is one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from al_engine.arguments import comma_list, key_value

SUBCOMMANDS = ("bench", "export", "strategies", "users")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (`app.py: error: ...`) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"app.py: error: {message}\n")
        raise SystemExit(2)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from al_engine.data import dataset_names

    parser.add_argument("--dataset", default="digits", choices=dataset_names(), metavar="NAME",
                        help=f"one of {', '.join(dataset_names())} (default: digits, embedded)")
    parser.add_argument("--data-dir", help="folder holding the dataset's files")
    parser.add_argument("--download", action="store_true", help="fetch the dataset first (needs internet)")
    parser.add_argument("--subset", type=int, help="keep a seeded random N items of the pool")
    parser.add_argument("--classes", type=comma_list, help="class names for a flat folder of images: a,b,c")
    parser.add_argument("--image-size", type=int, default=32, help="side in pixels for image folders")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from al_engine.models import model_names
    from al_engine.train import TRAIN_PRESETS

    parser.add_argument("--model", default="auto", choices=model_names(), metavar="NAME",
                        help=f"one of {', '.join(model_names())}")
    parser.add_argument("--embed-dim", type=int, default=50, help="width of the penultimate feature")
    parser.add_argument("--initial", type=int, default=100, help="size of the random initial labeled set")
    parser.add_argument("--query-size", type=int, default=100, help="items per queried batch")
    parser.add_argument("--rounds", type=int, default=10, help="number of queried batches")
    parser.add_argument("--train-preset", default="saturate", choices=sorted(TRAIN_PRESETS), metavar="NAME",
                        help=f"one of {', '.join(sorted(TRAIN_PRESETS))}")
    parser.add_argument("--epochs", type=int, help="cap on training epochs (overrides the preset)")
    parser.add_argument("--lr", type=float, help="training step size (overrides the preset)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random shifts/flips during training (default: the preset's)")
    parser.add_argument("--warm-start", action="store_true", help="continue from last round's weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--strategy-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the strategy (repeatable); see `app.py strategies`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="annotations.db", help="SQLite database of the annotator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--token", help="sign-in token (default: a random one, printed at start)")


def build_run_parser() -> argparse.ArgumentParser:
    from al_engine.strategies import strategy_names

    parser = OneLineParser(prog="app.py", description="Active-learning annotation tool.",
                           epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (app.py SUBCOMMAND --help)")
    add_data_arguments(parser)
    add_engine_arguments(parser)
    add_server_arguments(parser)
    parser.add_argument("--strategy", default="random", choices=strategy_names(), metavar="NAME",
                        help="query strategy; `app.py strategies` lists them")
    parser.add_argument("--oracle", default="human", choices=["human", "simulated"],
                        help="who answers: people in the browser, or the ground truth")
    parser.add_argument("--oracle-noise", type=float, default=0.0,
                        help="simulated oracle: probability of a wrong answer")
    parser.add_argument("--out", help="folder for a simulated run's files")
    return parser


def run_config_from_args(args: argparse.Namespace, strategy: str | None = None, seed: int | None = None,
                         out: str | None = None):
    from al_engine.loop import RunConfig

    return RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download, subset=args.subset,
        classes=args.classes, image_size=args.image_size, model=args.model, embed_dim=args.embed_dim,
        strategy=strategy or getattr(args, "strategy", "random"), strategy_options=dict(args.strategy_option),
        initial=args.initial, query_size=args.query_size, rounds=args.rounds,
        seed=args.seed if seed is None else seed, train_preset=args.train_preset, epochs=args.epochs,
        lr=args.lr, augment=args.augment, warm_start=args.warm_start, device=args.device,
        oracle_noise=getattr(args, "oracle_noise", 0.0), out=out or getattr(args, "out", None),
    )


def command_run(argv: list[str]) -> int:
    args = build_run_parser().parse_args(argv)
    config = run_config_from_args(args)
    if args.oracle == "simulated":
        from al_engine.distributed import run_simulation_distributed  # plain run_simulation without torchrun
        from oracle.simulated import SimulatedOracle

        metrics = run_simulation_distributed(config, SimulatedOracle.for_run, progress=not args.no_progress)
        last = metrics[-1] if metrics else None
        if last is not None:
            accuracy = "n/a" if last["accuracy"] is None else f"{last['accuracy']:.4f}"
            print(f"done: round {last['round']}, {last['labeled']} labeled, test accuracy {accuracy}; "
                  f"files in {config.out}")
        return 0
    from annotator.cli import serve

    return serve(config, host=args.host, port=args.port, token=args.token, db_path=args.db)


def command_strategies(argv: list[str]) -> int:
    OneLineParser(prog="app.py strategies", description="List the query strategies.").parse_args(argv)
    from al_engine.strategies import describe_strategies

    rows = describe_strategies()
    width = max(len(name) for name, _, _ in rows)
    for name, help_text, options in rows:
        print(f"{name:<{width}}  {help_text}" + (f"  [options: {options}]" if options else ""))
    return 0


def command_bench(argv: list[str]) -> int:
    from al_engine.bench import add_bench_arguments, run_bench_from_args

    parser = OneLineParser(prog="app.py bench", description="Run strategies x seeds and summarise them.")
    add_data_arguments(parser)
    add_engine_arguments(parser)
    add_bench_arguments(parser)
    from oracle.simulated import SimulatedOracle

    return run_bench_from_args(parser.parse_args(argv), SimulatedOracle.for_run)


def command_export(argv: list[str]) -> int:
    from annotator.cli import export_command

    parser = OneLineParser(prog="app.py export", description="Export the labeled set.")
    parser.add_argument("--format", required=True, choices=["csv", "jsonl", "imagefolder"])
    parser.add_argument("--out", required=True, help="file (csv, jsonl) or folder (imagefolder) to write")
    parser.add_argument("--db", default="annotations.db", help="SQLite database of the annotator")
    return export_command(parser.parse_args(argv))


def command_users(argv: list[str]) -> int:
    from annotator.cli import users_command

    parser = OneLineParser(prog="app.py users", description="Manage named annotators.")
    parser.add_argument("--db", default="annotations.db", help="SQLite database of the annotator")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    add = sub.add_parser("add", help="add an annotator and print their token")
    add.add_argument("name")
    add.add_argument("--role", default="annotator", choices=["annotator", "admin"])
    add.add_argument("--db", default=argparse.SUPPRESS, help="SQLite database of the annotator")
    listing = sub.add_parser("list", help="list annotators")
    listing.add_argument("--db", default=argparse.SUPPRESS, help="SQLite database of the annotator")
    return users_command(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    from al_engine.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    handlers = {"bench": command_bench, "export": command_export,
                "strategies": command_strategies, "users": command_users}
    try:
        if argv and argv[0] in handlers:
            return handlers[argv[0]](argv[1:])
        return command_run(argv)
    except UserError as error:
        sys.stderr.write(f"app.py: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("app.py: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
