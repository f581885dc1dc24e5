"""The annotator's commands: `python app.py` (serve), `app.py export`, `app.py import`, `app.py users`."""
from __future__ import annotations

import logging
import secrets
import socket
import sys
import time
from pathlib import Path

from al_engine.data import load_dataset
from al_engine.errors import DatasetError, UserError
from al_engine.config import RunConfig

from .db import AnnotationDB
from .export import write_imagefolder, write_stream_export


def sign_in_url(host: str, port: int, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"  # an IPv6 literal
    return f"http://{shown}:{port}/?token={token}"


def make_server(app, host: str, port: int):
    """The threaded werkzeug server the annotator runs on (also used by the benchmark and the browser test).

    The engine trains in a thread of this process; a short GIL switch interval (1 ms instead of 5 ms)
    lets request threads take the GIL back quickly between the training loop's Python steps."""
    from werkzeug.serving import make_server as werkzeug_server

    sys.setswitchinterval(0.001)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    return werkzeug_server(host, port, app, threaded=True)


def check_port(host: str, port: int) -> None:
    """Raise OSError now if (host, port) cannot be bound, before werkzeug prints its own message and exits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def read_instructions(path: str | None) -> str:
    """The guidelines file of --instructions (Markdown), read once at start; '' without one."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"cannot read --instructions {path!r}: {reason}") from None
    if len(text) > 200_000:
        raise UserError(f"--instructions {path!r} is over 200,000 characters; keep the guidelines short")
    return text


def serve(config: RunConfig, host: str = "127.0.0.1", port: int = 5000, token: str | None = None,
          db_path: str = "annotations.db", team: dict | None = None) -> int:
    """Start the annotator with the engine in a background worker; runs until interrupted."""
    from . import create_app, load_pool

    if token is not None and not token.strip():
        raise UserError("--token must not be empty")
    if not 0 < port < 65536:
        raise UserError(f"--port must lie in 1..65535, got {port}")
    token = token or secrets.token_urlsafe(24)
    try:
        check_port(host, port)  # before the dataset loads: a busy port is reported at once
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or --host") from None
    started = time.perf_counter()
    dataset = load_pool(config, db_path)  # a project that grows: known files keep their positions
    app = create_app({"DATABASE": db_path, "RUN_CONFIG": config, "DATASET": dataset, "ADMIN_TOKEN": token,
                      "START_ENGINE": True, **(team or {})})
    try:
        server = make_server(app, host, port)
    except (OSError, SystemExit) as error:  # werkzeug itself exits when the port is taken
        app.extensions["annotator"].worker.stop()
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "the address is in use"
        raise UserError(f"cannot listen on {host}:{port}: {reason}; choose another --port or --host") from None
    try:  # from here on, Ctrl-C stops the worker and exits 0
        print(f"annotator: {dataset.name}, {dataset.train_images.shape[0]} items, {len(dataset.classes)} classes, "
              f"strategy {config.strategy}, database {db_path} (ready in {time.perf_counter() - started:.1f} s)")
        for line in app.extensions["annotator"].folder.lines():  # said once per start
            print(f"annotator: {line}")
        print(f"annotator: sign in at {sign_in_url(host, port, token)}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.extensions["annotator"].worker.stop()
    return 0


def _existing_db(path: str) -> str:
    if not Path(path).is_file():
        raise UserError(f"no annotator database at {path!r} (start the server first, or give --db)")
    return path


def export_command(args) -> int:
    """`app.py export --format csv|jsonl|imagefolder --out PATH [--db DB]`."""
    db_path = _existing_db(args.db)
    out = Path(args.out)
    if args.format in ("csv", "jsonl"):
        if out.is_dir():
            raise UserError(f"{args.out!r} is a folder; --format {args.format} writes a file")
        count = write_stream_export(db_path, args.format, out)
        print(f"exported {count} answers to {out}")
        return 0
    if args.format != "imagefolder":
        raise UserError(f"unknown export format {args.format!r}; choose from: csv, jsonl, imagefolder")
    db = AnnotationDB(db_path)
    settings = db.run_settings() or {}
    db.close()
    dataset = None
    if settings and settings.get("data_root") is None:  # an image folder's originals need no loading
        run = RunConfig(dataset=settings["dataset"], data_dir=settings.get("data_dir"), subset=settings.get("subset"),
                        classes=settings.get("class_option"), image_size=settings.get("image_size", 32),
                        seed=settings.get("seed", 0))
        try:
            dataset = load_dataset(run.dataset, run.load_options())
        except DatasetError as error:
            print(f"export: the dataset cannot be loaded ({error}); copying original files only", file=sys.stderr)
    # the folder as the server resolved it: not the --data-dir text, read from another working directory
    count = write_imagefolder(db_path, out, dataset=dataset, data_dir=settings.get("data_root") or settings.get("data_dir"))
    print(f"exported {count} labeled images to {out}/<class>/")
    return 0


def import_command(args) -> int:
    """`app.py import FILE --db DB`: labels one already has, as answers of the `import` annotator."""
    from .imports import read_import

    db = AnnotationDB(_existing_db(args.db))
    try:
        classes = (db.run_settings() or {}).get("classes") or []
        plan = read_import(Path(args.source), classes, db.file_ids())
        if not plan.labels:
            shown = ", ".join(plan.unmatched[:3])
            raise UserError(f"none of the {len(plan.unmatched)} file(s) in {args.source!r} is in the project"
                            + (f" (e.g. {shown})" if shown else ""))
        count = db.import_labels(plan.labels)
    finally:
        db.close()
    print(f"imported {count} labels into {args.db} (annotator 'import'; used from the next training on)")
    if plan.repeated:
        print(f"import: {plan.repeated} row(s) named a file already given; the last one counts")
    if plan.unmatched:
        print(f"import: {len(plan.unmatched)} file(s) are not in the project and were left out: "
              f"{', '.join(plan.unmatched[:3])}" + (" ..." if len(plan.unmatched) > 3 else ""), file=sys.stderr)
    return 0


def users_command(args) -> int:
    """`app.py users add NAME [--role annotator|admin]` and `app.py users list`."""
    if args.action == "list":
        db = AnnotationDB(_existing_db(args.db))
        try:
            users = db.list_users()
        finally:
            db.close()
        width = max([len(u["name"]) for u in users] + [4])
        print(f"{'name':<{width}}  {'role':<9}  answers")
        for user in users:
            print(f"{user['name']:<{width}}  {user['role']:<9}  {user['answers']}")
        return 0
    db = AnnotationDB(args.db)
    try:
        token = db.add_user(args.name, args.role)
    finally:
        db.close()
    print(f"added {args.role} {args.name!r}; their token (shown once): {token}")
    print(f"sign-in link: http://127.0.0.1:5000/?token={token}  (use the server's host and port)")
    return 0
