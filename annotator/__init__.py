"""The annotator: a Flask app where people answer the engine's batches in the browser.

`create_app(config)` builds the app. Settings (a mapping, all optional except DATABASE):

    DATABASE      path of the SQLite database (answers, rounds, users)
    RUN_CONFIG    al_engine.config.RunConfig of the run (default: RunConfig())
    DATASET       an already loaded al_engine.data.Dataset (default: loaded from RUN_CONFIG)
    ADMIN_TOKEN   the start-up sign-in token of the built-in admin (default: a random one)
    START_ENGINE  True: run the engine in a background thread (the server); False: tests call
                  `app.extensions["annotator"].driver.step()` themselves
    OVERLAP       answers (by different annotators) each item needs before it counts as done (default 1)
    LABEL_MODEL   "majority" (default) or "dawid-skene": how several answers become the training label
    INSTRUCTIONS  the project's guidelines (Markdown text) shown in a panel and on first sign-in
    CLOSE_GRACE_S seconds a complete batch waits before it closes, so its last answer can be undone
                  (default 5 with START_ENGINE, else 0)
    ALLOW_STRATEGY_CHANGE  True: a database started with another --strategy continues with this one

The first batch is posted synchronously at start-up (it is random: there is no model yet), so
the first image can be served at once.

Layout: state.py (what the app holds), connection.py (the per-request database handle), errors.py
(every error mapped once), worker.py (the engine in the background), one blueprint per area
(auth, pages, api, admin), db.py (the only module that speaks SQL), export.py, images.py, cli.py.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask

from al_engine.config import RunConfig
from al_engine.data import Dataset, describe_skipped, load_dataset
from al_engine.engine import Engine
from al_engine.errors import UserError

from . import admin, api, auth, connection, errors, pages, review
from oracle.human import ItemIds

from .db import LABEL_MODELS, AnnotationDB, AnnotatorDBError
from .state import AnnotatorState
from .worker import EngineDriver, EngineWorker

ROOT = Path(__file__).resolve().parent.parent


def run_settings(config: RunConfig, dataset: Dataset) -> dict:
    """What ties a database to one run: the same pool, the same item ids."""
    return {"dataset": config.dataset, "data_dir": config.data_dir, "data_root": dataset.data_root,
            "subset": config.subset,
            "classes": dataset.classes, "class_option": config.classes, "image_size": config.image_size, "seed": config.seed,
            "pool_size": int(dataset.train_images.shape[0]), "strategy": config.strategy,
            "query_size": config.query_size, "initial": config.initial, "rounds": config.rounds}


@dataclass
class FolderReport:
    """What a start found in the data folder, said once in the log and shown on the dashboard."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files: (name, reason)
    added: list[str] = field(default_factory=list)  # files that joined the pool since the last start
    vanished: list[str] = field(default_factory=list)  # files the database knows that are gone
    plan: str | None = None  # the plan asks for more items than the pool holds

    def lines(self) -> list[str]:
        said = [describe_skipped(self.skipped)] if self.skipped else []
        if self.added:
            said.append(f"{len(self.added)} new file(s) joined the pool: {', '.join(self.added[:3])}"
                        + (" ..." if len(self.added) > 3 else ""))
        if self.vanished:
            said.append(f"{len(self.vanished)} file(s) the database knows are gone from the folder (their answers "
                        f"are kept, they leave the batches): {', '.join(self.vanished[:3])}"
                        + (" ..." if len(self.vanished) > 3 else ""))
        if self.plan:
            said.append(self.plan)
        return said


def load_pool(config: RunConfig, database: str) -> Dataset:
    """The run's dataset; an image folder is listed with the files the database knows first, in their
    order, so that a folder that grew keeps its earlier items' pool positions (the pixel cache appends)."""
    options = config.load_options()
    if Path(database).is_file():
        known = AnnotationDB(database)
        try:
            options.file_order = known.known_files() or None
        finally:
            known.close()
    return load_dataset(config.dataset, options)


def item_ids_for(db: AnnotationDB, dataset: Dataset) -> tuple[ItemIds, FolderReport]:
    """Stable item ids for the pool (an image folder's manifest, reconciled with the folder now)."""
    pool_size = int(dataset.train_images.shape[0])
    report = FolderReport(skipped=list(dataset.skipped))
    if dataset.file_names is None:
        return ItemIds(pool_size), report
    changes = db.reconcile_files(list(dataset.file_names))
    report.added, report.vanished = changes.added, changes.vanished
    return ItemIds(pool_size, changes.item_ids), report


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no other site may frame the labeling page and steer clicks into answers
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",  # a PNG or CSV is never run as a script
    "Referrer-Policy": "same-origin",
}


def security_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def create_app(config: dict | None = None) -> Flask:
    settings = dict(config or {})
    if "DATABASE" not in settings:
        raise UserError("create_app needs a DATABASE path")
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    run_config = settings.get("RUN_CONFIG") or RunConfig()
    database = str(settings["DATABASE"])
    dataset = settings.get("DATASET") or load_pool(run_config, database)

    overlap = settings.get("OVERLAP", 1)
    label_model = settings.get("LABEL_MODEL", "majority")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
        raise UserError(f"--overlap must be a whole number of at least 1, got {overlap!r}")
    if label_model not in LABEL_MODELS:
        raise UserError(f"unknown --label-model {label_model!r}; choose from: {', '.join(LABEL_MODELS)}")
    setup_db = AnnotationDB(database)  # creates/migrates the schema once
    try:
        stored = setup_db.bind_run(run_settings(run_config, dataset))
        try:
            ids, changes = item_ids_for(setup_db, dataset)
            changes.plan = run_config.plan_note(int(dataset.train_images.shape[0]))
        except Exception:
            setup_db.unbind_run()  # a failed first start leaves the database free for the corrected command
            raise
        if stored.get("strategy") not in (None, run_config.strategy):
            if not settings.get("ALLOW_STRATEGY_CHANGE"):
                raise AnnotatorDBError(
                    f"database {database!r} was started with --strategy {stored['strategy']}, not "
                    f"{run_config.strategy}; add --allow-strategy-change to query the next batches with "
                    f"{run_config.strategy}, or choose another --db")
            setup_db.set_run_setting("strategy", run_config.strategy)
        setup_db.set_meta("overlap", str(overlap))
        setup_db.set_meta("label_model", label_model)
        admin_token = settings.get("ADMIN_TOKEN") or secrets.token_urlsafe(24)
        setup_db.ensure_owner(admin_token)
        secret_key = setup_db.secret_key()
    finally:
        setup_db.close()

    app.config.update(
        SECRET_KEY=secret_key,
        ADMIN_TOKEN=admin_token,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="annotator_session",
        MAX_CONTENT_LENGTH=1024 * 1024,  # bytes: no request body needs more
        JSON_SORT_KEYS=False,
    )
    app.config.update({k: v for k, v in settings.items() if k.isupper() and k not in ("DATASET", "RUN_CONFIG")})
    app.add_url_rule("/favicon.ico", "favicon", lambda: app.send_static_file("favicon.svg"))

    grace = settings.get("CLOSE_GRACE_S", 5.0 if settings.get("START_ENGINE") else 0.0)
    driver = None
    try:
        driver = EngineDriver(Engine(run_config, dataset=dataset), database, ids=ids, close_grace_s=float(grace))
        if driver.db.current_round() is None:
            driver.step()  # post the first (random) batch now: the first image is available at once
    except Exception:
        if driver is not None:
            driver.close()
        unbind = AnnotationDB(database)
        try:
            unbind.unbind_run()  # nothing was posted: the corrected command must not be refused
        finally:
            unbind.close()
        raise
    state = AnnotatorState(database=database, run_config=run_config, dataset=dataset, driver=driver,
                           ids=ids, folder=changes, instructions=settings.get("INSTRUCTIONS") or "")
    if settings.get("START_ENGINE"):
        state.worker = EngineWorker(driver)
        state.worker.start()
    app.extensions["annotator"] = state

    connection.init_app(app)
    errors.init_app(app)
    app.after_request(security_headers)

    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(review.bp)
    return app
