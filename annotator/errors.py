"""Every error the annotator answers, mapped once: JSON `{"error", "status"}` under /api/, the error
page elsewhere. Views raise (or let the database raise) and never translate errors themselves."""
from __future__ import annotations

import sqlite3

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from al_engine.errors import UserError

from .db import AnnotatorDBError, Conflict, NotFound


def wants_json() -> bool:
    return request.path.startswith("/api/")


def error_response(code: int, title: str, message: str):
    if wants_json():
        return jsonify(error=message, status=code), code
    return render_template("error.html", code=code, title=title, message=message), code


def init_app(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return error_response(error.code, error.name, error.description)

    @app.errorhandler(NotFound)  # an unknown item or answer
    def not_found(error: NotFound):
        return error_response(404, "Not Found", str(error))

    @app.errorhandler(Conflict)  # the request contradicts the round's state
    def conflict(error: Conflict):
        return error_response(409, "Conflict", str(error))

    @app.errorhandler(sqlite3.Error)  # a read outside db.py's transactions failed the same way
    @app.errorhandler(AnnotatorDBError)
    def database_error(error: Exception):  # busy or failing storage: retry later, nothing was stored
        return error_response(503, "Database unavailable", str(error))

    @app.errorhandler(UserError)
    def user_error(error: UserError):
        return error_response(400, "Bad request", str(error))
