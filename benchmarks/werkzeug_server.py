"""`python app.py ARGS`, served by werkzeug's threaded development server as before issue 18: for the
before/after figures of benchmarks/reliability.py only (`--compare-werkzeug`). Not for use.

    python benchmarks/werkzeug_server.py --db DB --port PORT ...   (app.py's own arguments)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import app  # noqa: E402
import annotator.cli  # noqa: E402


def werkzeug_server(flask_app, host: str, port: int, threads: int | None = None):
    """The server `annotator.cli.make_server` returned before: one thread per connection, no limits."""
    from werkzeug.serving import make_server

    sys.setswitchinterval(0.001)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return make_server(host, port, flask_app, threaded=True)


if __name__ == "__main__":
    annotator.cli.make_server = werkzeug_server
    sys.exit(app.main())
