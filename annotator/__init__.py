"""The annotator: a Flask app where people answer the engine's batches in the browser.

`create_app(config)` builds the app. Settings (a mapping, all optional except DATABASE):

    DATABASE      path of the SQLite database (answers, rounds, users)
    RUN_CONFIG    al_engine.loop.RunConfig of the run (default: RunConfig())
    DATASET       an already loaded al_engine.data.Dataset (default: loaded from RUN_CONFIG)
    ADMIN_TOKEN   the start-up sign-in token of the built-in admin (default: a random one)
    START_ENGINE  True: run the engine in a background thread (the server); False: tests call
                  `app.extensions["annotator"].driver.step()` themselves

The first batch is posted synchronously at start-up (it is random: there is no model yet), so
the first image can be served at once.
"""
from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from al_engine.data import Dataset, load_dataset
from al_engine.errors import UserError
from al_engine.loop import Engine, RunConfig

from .db import AnnotationDB, AnnotatorDBError

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class AnnotatorState:
    """What the app holds besides per-request database handles (kept in app.extensions)."""

    database: str
    run_config: RunConfig
    dataset: Dataset
    driver: object  # oracle.human.EngineDriver
    worker: object | None = None  # oracle.human.EngineWorker when START_ENGINE
    image_cache: dict = field(default_factory=dict)  # item id -> PNG bytes

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def status(self):
        return self.driver.status

    def notify_engine(self) -> None:
        if self.worker is not None:
            self.worker.notify()


def run_settings(config: RunConfig, dataset: Dataset) -> dict:
    """What ties a database to one run: the same pool, the same item ids."""
    return {"dataset": config.dataset, "data_dir": config.data_dir, "subset": config.subset,
            "classes": dataset.classes, "class_option": config.classes, "image_size": config.image_size, "seed": config.seed,
            "pool_size": int(dataset.train_images.shape[0]), "strategy": config.strategy,
            "query_size": config.query_size, "initial": config.initial, "rounds": config.rounds}


def create_app(config: dict | None = None) -> Flask:
    from oracle.human import EngineDriver, EngineWorker

    settings = dict(config or {})
    if "DATABASE" not in settings:
        raise UserError("create_app needs a DATABASE path")
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    run_config = settings.get("RUN_CONFIG") or RunConfig()
    dataset = settings.get("DATASET") or load_dataset(run_config.dataset, run_config.load_options())
    database = str(settings["DATABASE"])

    setup_db = AnnotationDB(database)  # creates/migrates the schema once
    try:
        setup_db.bind_run(run_settings(run_config, dataset))
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

    engine = Engine(run_config, dataset=dataset)
    driver = EngineDriver(engine, database)
    state = AnnotatorState(database=database, run_config=run_config, dataset=dataset, driver=driver)
    if driver.db.current_round() is None:
        driver.step()  # post the first (random) batch now: the first image is available at once
    if settings.get("START_ENGINE"):
        state.worker = EngineWorker(driver)
        state.worker.start()
    app.extensions["annotator"] = state

    app.teardown_appcontext(close_db)
    app.after_request(security_headers)
    register_error_handlers(app)

    from . import admin, api, auth, pages

    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    return app


def annotator_state() -> AnnotatorState:
    from flask import current_app

    return current_app.extensions["annotator"]


def get_db() -> AnnotationDB:
    """This request's database connection, opened on first use and closed in teardown."""
    if "db" not in g:
        g.db = AnnotationDB(annotator_state().database, setup=False)
    return g.db


def close_db(_error=None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


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


def wants_json() -> bool:
    return request.path.startswith("/api/")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if wants_json():
            return jsonify(error=error.description, status=error.code), error.code
        return render_template("error.html", code=error.code, title=error.name,
                               message=error.description), error.code

    @app.errorhandler(sqlite3.Error)  # a read outside db.py's transactions failed the same way
    @app.errorhandler(AnnotatorDBError)
    def database_error(error: Exception):  # busy or failing storage: retry later, nothing was stored
        if wants_json():
            return jsonify(error=str(error), status=503), 503
        return render_template("error.html", code=503, title="Database unavailable", message=str(error)), 503

    @app.errorhandler(UserError)
    def user_error(error: UserError):
        if wants_json():
            return jsonify(error=str(error), status=400), 400
        return render_template("error.html", code=400, title="Bad request", message=str(error)), 400
