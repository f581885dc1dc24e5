"""The annotator's commands: `python app.py` (serve), `app.py export`, `app.py import`, `app.py users`."""
from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from al_engine.data import load_dataset
from al_engine.errors import DatasetError, UserError
from al_engine.config import RunConfig

from .db import AnnotationDB, ServerLock, make_private
from .export import write_imagefolder, write_stream_export

# The production server (waitress): its limits, chosen for one annotator process with the engine beside it.
CHANNEL_TIMEOUT_S = 30  # an idle or half-sent connection is closed after this many seconds (waitress: 120)
CLEANUP_INTERVAL_S = 5  # how often idle connections are looked for
MAX_CONNECTIONS = 4096  # open connections at most (also kept under the process's file-descriptor limit)
RESERVED_FDS = 64  # descriptors kept for the database, its WAL, images and exports
BACKLOG = 2048  # connections the kernel queues while the server is at its limit
MAX_BODY_BYTES = 8 * 1024 * 1024  # waitress refuses larger bodies outright; Flask's own 1 MiB gives the JSON 413


def sign_in_url(host: str, port: int, token: str) -> str:
    """The link that signs a browser in; the token is URL-encoded (`--token 'a&b#c'` must survive)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"  # an IPv6 literal
    return f"http://{shown}:{port}/?token={quote(token, safe='')}"


def server_threads() -> int:
    """Request threads: requests mostly wait on SQLite's one writer and its fsync, so a few threads keep
    the queue moving; more would only take the GIL from the engine training in a thread beside them."""
    return min(8, max(4, 2 * (os.cpu_count() or 1)))


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted` (within the hard limit); returns the new soft limit.
    The usual default of 1,024 is exhausted by a thousand idle connections."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


class Server:
    """The annotator's HTTP server: waitress (a production WSGI server, pure Python, every platform), with a
    connection limit, a timeout for idle and half-sent connections, and a fixed pool of request threads.
    `serve_forever()` runs it (in any thread), `shutdown()` stops it from another."""

    def __init__(self, app, host: str, port: int, threads: int | None = None):
        import waitress.server

        descriptors = raise_fd_limit(MAX_CONNECTIONS + RESERVED_FDS)
        self.connection_limit = max(16, min(MAX_CONNECTIONS, descriptors - RESERVED_FDS))
        self.threads = threads or server_threads()
        self._map: dict = {}
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._server = waitress.server.create_server(
            app, map=self._map, host=host, port=port, threads=self.threads,
            connection_limit=self.connection_limit, channel_timeout=CHANNEL_TIMEOUT_S,
            cleanup_interval=CLEANUP_INTERVAL_S, backlog=BACKLOG, max_request_body_size=MAX_BODY_BYTES,
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1,024
            ident="", expose_tracebacks=False)
        listening = getattr(self._server, "effective_listen", None) or [
            (self._server.effective_host, self._server.effective_port)]
        self.server_port = int(listening[0][1])

    def serve_forever(self) -> None:
        from waitress import wasyncore

        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=self._map, use_poll=True, count=1)
        finally:
            self._close()
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        pulled = getattr(self._server, "pull_trigger", None)
        if pulled is not None:
            pulled()  # wake the loop now instead of at its next second
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self._stopping.set()
        if not self._stopped.is_set():
            self._close()

    def _close(self) -> None:
        for channel in list(self._map.values()):
            try:
                channel.close()
            except OSError:
                pass
        self._map.clear()
        dispatcher = getattr(self._server, "task_dispatcher", None)
        if dispatcher is not None:
            dispatcher.shutdown(cancel_pending=True, timeout=5)


def make_server(app, host: str, port: int, threads: int | None = None) -> Server:
    """The server the annotator runs on (also used by the benchmarks and the browser test).

    The engine trains in a thread of this process; a short GIL switch interval (1 ms instead of 5 ms)
    lets request threads take the GIL back quickly between the training loop's Python steps."""
    sys.setswitchinterval(0.001)
    logging.getLogger("waitress").setLevel(logging.ERROR)  # no line per start, queue depth or connection limit
    return Server(app, host, port, threads)


def check_port(host: str, port: int) -> None:
    """Raise OSError now if (host, port) cannot be bound: before the dataset loads."""
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
          db_path: str = "annotations.db", threads: int | None = None, team: dict | None = None) -> int:
    """Start the annotator with the engine in a background worker; runs until interrupted."""
    from . import create_app, load_pool

    if token is not None and not token.strip():
        raise UserError("--token must not be empty")
    if not 0 < port < 65536:
        raise UserError(f"--port must lie in 1..65535, got {port}")
    if threads is not None and not 1 <= threads <= 256:
        raise UserError(f"--threads must lie in 1..256, got {threads}")
    token = token or secrets.token_urlsafe(24)
    try:
        check_port(host, port)  # before the dataset loads: a busy port is reported at once
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or --host") from None
    lock = ServerLock(db_path)  # one server per database: a second one stops here
    try:
        lock.check_not_deleted()
        if make_private(db_path):
            print(f"annotator: {db_path} was readable by other users; it is now readable by its owner only")
        started = time.perf_counter()
        dataset = load_pool(config, db_path)  # a project that grows: known files keep their positions
        app = create_app({"DATABASE": db_path, "RUN_CONFIG": config, "DATASET": dataset, "ADMIN_TOKEN": token,
                          "START_ENGINE": True,
                          # cookies are not kept apart by port: two servers on one host must not share a name
                          "SESSION_COOKIE_NAME": f"annotator_session_{port}", **(team or {})})
        worker = app.extensions["annotator"].worker
        try:
            server = make_server(app, host, port, threads)
        except OSError as error:
            worker.stop()
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                            "choose another --port or --host") from None
        database = AnnotationDB(db_path, setup=False)
        try:
            database.record_server(host, port)
        finally:
            database.close()
        lock.mark_served(host=host, port=port)
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
            worker.stop()
    finally:
        lock.release()
    return 0


def _existing_db(path: str) -> str:
    if not Path(path).is_file():
        raise UserError(f"no annotator database at {path!r} (start the server first, or give --db)")
    return path


def export_command(args) -> int:
    """`app.py export --format csv|jsonl|imagefolder --out PATH [--db DB]`; a place that cannot be written
    (a file where a folder should be, a read-only filesystem, no permission) is one error line."""
    try:
        return _export(args)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {args.out!r}: a part of that path is a file, not a folder") from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename and str(error.filename) != args.out else ""
        raise UserError(f"cannot write {args.out!r}{where}: {error.strerror or error}") from None


def _export(args) -> int:
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
    """`app.py users add NAME [--role annotator|admin]`, `app.py users remove NAME`, `app.py users list`."""
    if args.action == "list":
        db = AnnotationDB(_existing_db(args.db))
        try:
            users = db.list_users()
        finally:
            db.close()
        width = max([len(u["name"]) for u in users] + [4])
        print(f"{'name':<{width}}  {'role':<9}  {'answers':>7}  access")
        for user in users:
            access = "removed" if user.get("removed") else "active"
            print(f"{user['name']:<{width}}  {user['role']:<9}  {user['answers']:>7}  {access}")
        return 0
    if args.action == "remove":
        db = AnnotationDB(_existing_db(args.db))
        try:
            ended = db.remove_user(args.name)
        finally:
            db.close()
        print(f"removed {args.name!r}: their token no longer works, {ended} signed-in session(s) ended; "
              "their answers are kept")
        return 0
    db = AnnotationDB(args.db)
    try:
        token = db.add_user(args.name, args.role)
        address = db.server_address()
    finally:
        db.close()
    print(f"added {args.role} {args.name!r}; their token (shown once): {token}")
    if address is None:
        print(f"sign-in link: {sign_in_url('127.0.0.1', 5000, token)}  (no server has run on this database yet: "
              "use its --host and --port)")
    else:
        print(f"sign-in link: {sign_in_url(*address, token)}")
    return 0
