"""This request's database connection, as Flask's tutorial keeps it: opened on first use, kept on
`flask.g`, closed when the request's app context ends."""
from __future__ import annotations

from flask import Flask, g

from .db import AnnotationDB
from .state import annotator_state


def get_db() -> AnnotationDB:
    """This request's database connection, opened on first use and closed in teardown. A database deleted
    or replaced since the start is an error (503), never a new empty database or someone else's."""
    if "db" not in g:
        state = annotator_state()
        state.check_database()
        g.db = AnnotationDB(state.database, setup=False)
    return g.db


def close_db(_error=None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_app(app: Flask) -> None:
    """Close each request's connection when its app context ends."""
    app.teardown_appcontext(close_db)
