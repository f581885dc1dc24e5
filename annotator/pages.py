"""The labeling page, grid mode and the dashboard (full pages, or htmx partials on HX-Request)."""
from __future__ import annotations

from flask import Blueprint, render_template, request

from .connection import get_db
from .state import annotator_state
from .api import status_payload
from .auth import current_user, require_user, sign_in_page

bp = Blueprint("pages", __name__)

# Keys with another meaning on the labeling pages: skip, grid, select all, help, zoom, review moves (j, k),
# space (a focused
# button's own key, never an answer).
RESERVED_KEYS = {"s", "g", "a", "h", "z", "j", "k", "?", " "}
# Position keys in order: 1-9 and 0 for the first ten classes, then Shift+1 ... Shift+0, then letters.
POSITION_KEYS = ([*"1234567890"] + [f"shift+{d}" for d in "1234567890"]
                 + [c for c in "bcdefilmnopqrtuvwxy" if c not in RESERVED_KEYS])
GRID_SIZE = 24  # images per grid page
BUSY_STATES = {"starting", "training", "querying"}


def key_map(classes: list[str]) -> list[str]:
    """The key of each class: a class whose name is a single key answers to that key (on digits,
    "3" is 3); the others get the key of their position (1-9, 0), or the next free one (Shift+digit,
    then letters). Keys are lower case; "shift+1" means Shift with the digit 1 of the top row."""
    keys: list[str | None] = [None] * len(classes)
    taken: set[str] = set()
    for index, name in enumerate(classes):
        key = name.strip().lower()
        if len(key) == 1 and key.isprintable() and key not in RESERVED_KEYS and key not in taken:
            keys[index] = key
            taken.add(key)
    for index in range(len(classes)):
        if keys[index] is not None:
            continue
        preferred = POSITION_KEYS[index] if index < len(POSITION_KEYS) else None
        key = preferred if preferred and preferred not in taken else next(
            (k for k in POSITION_KEYS if k not in taken), None)
        if key is None:
            keys[index] = ""  # more classes than keys: the button still answers
            continue
        keys[index] = key
        taken.add(key)
    return [k or "" for k in keys]


def key_label(key: str) -> str:
    """How a key is shown on its button: Shift+1 as ⇧1."""
    return "⇧" + key[len("shift+"):] if key.startswith("shift+") else key


def class_buttons() -> list[dict]:
    classes = annotator_state().classes
    return [{"index": i, "name": name, "key": key, "key_label": key_label(key)}
            for i, (name, key) in enumerate(zip(classes, key_map(classes)))]


def page_config(mode: str, prefetch: int) -> dict:
    """What label.js needs: the CSRF token, the mode, the classes and their keys, the guidelines' version."""
    from .auth import csrf_token
    from .instructions import instructions_version

    state, user = annotator_state(), current_user()
    buttons = class_buttons()
    text = state.instructions
    version = instructions_version(text) if text else None
    return {"csrf": csrf_token(), "mode": mode, "classes": [b["name"] for b in buttons],
            "keys": [b["key"] for b in buttons], "prefetch": prefetch,
            "instructions": version, "show_instructions": bool(version) and get_db().instructions_seen(user.id) != version}


def instructions_html():
    from .instructions import render_markdown

    return render_markdown(annotator_state().instructions) if annotator_state().instructions else None


@bp.get("/")
def index():
    token = request.args.get("token")
    if token is not None:
        return sign_in_page(token)
    return label_page()


@require_user()
def label_page():
    return render_template("label.html", classes=class_buttons(), status=status_payload(),
                           config=page_config("single", 4), instructions=instructions_html())


@bp.get("/grid")
@require_user()
def grid():
    return render_template("grid.html", classes=class_buttons(), status=status_payload(), grid_size=GRID_SIZE,
                           config=page_config("grid", GRID_SIZE), instructions=instructions_html())


def poll_delay(engine_state: str, finished: bool) -> str | None:
    """How soon the live panel asks again: quickly while the engine works, slowly while it waits
    for people, never once the run is finished."""
    if finished or engine_state in ("finished", "stopped"):
        return None
    return "1s" if engine_state in BUSY_STATES else "3s"


def learning_curve(rounds: list[dict], width: int = 560, height: int = 240, pad: int = 44) -> dict:
    """Server-side SVG geometry of accuracy (held-out split) against labeled items, per round."""
    points = [r for r in rounds if r["accuracy"] is not None and r["labeled"]]
    if not points:
        return {"points": [], "width": width, "height": height}
    xs = [r["labeled"] for r in points]
    x_min, x_max = min(xs), max(xs)
    y_min = min(0.0, min(r.get("low", r["accuracy"]) for r in points))

    def x_of(value: float) -> float:
        return pad + (value - x_min) / max(x_max - x_min, 1) * (width - 2 * pad) if x_max > x_min else width / 2

    def y_of(value: float) -> float:
        return height - pad + (y_min - value) / (1.0 - y_min) * (height - 2 * pad) if y_min < 1 else pad

    coords = [{"x": round(x_of(r["labeled"]), 1), "y": round(y_of(r["accuracy"]), 1), "round": r["round"],
               "labeled": r["labeled"], "accuracy": r["accuracy"]} for r in points]
    for coord, r in zip(coords, points):  # an interval (the audit estimate's), drawn as an error bar
        if r.get("low") is not None:
            coord.update(low=r["low"], high=r["high"], n=r.get("n"), y_low=round(y_of(r["low"]), 1),
                         y_high=round(y_of(r["high"]), 1))
    return {
        "points": coords, "width": width, "height": height, "pad": pad,
        "polyline": " ".join(f"{p['x']},{p['y']}" for p in coords),
        "y_ticks": [{"y": round(y_of(v), 1), "label": f"{v:.0%}"} for v in (0.25, 0.5, 0.75, 1.0) if v >= y_min],
        "x_ticks": [{"x": round(x_of(v), 1), "label": str(v)} for v in sorted({x_min, x_max})],
    }


def dashboard_context() -> dict:
    state = annotator_state()
    db = get_db()
    status = status_payload()
    counts = db.class_counts()
    total = max(sum(counts.values()), 1)
    classes = [{"name": name, "count": counts.get(i, 0), "share": counts.get(i, 0) / total}
               for i, name in enumerate(state.classes)]
    rounds = db.rounds()
    has_test_split = state.dataset.test_images is not None
    audit = db.audit_estimates()  # --audit-fraction: accuracy estimates without a test split
    curve_rounds = rounds if has_test_split or not audit else [
        {**estimate, "labeled": estimate["labeled"] or 0} for estimate in audit]
    stopping = next((r for r in reversed(rounds) if r.get("kappa") is not None), None)
    return {"status": status, "class_counts": classes, "rounds": rounds, "curve": learning_curve(curve_rounds),
            "agreement": db.agreement(state.classes), "overlap": db.overlap(), "label_model": db.label_model(),
            "has_test_split": has_test_split, "audit": {e["round"]: e for e in audit},
            "curve_is_audit": not has_test_split and bool(audit), "stopping": stopping,
            "poll": poll_delay(status["engine"], status["finished"]), "run": state.run_config,
            "folder": state.folder}


@bp.get("/dashboard")
@require_user()
def dashboard():
    context = dashboard_context()
    if request.headers.get("HX-Request"):
        return render_template("_dashboard_live.html", **context)
    return render_template("dashboard.html", **context)


@bp.get("/partials/engine")
@require_user()
def engine_partial():
    """The engine's state and progress; re-requests itself while the engine is busy (labeling page)."""
    status = status_payload()
    return render_template("_engine.html", status=status, poll=poll_delay(status["engine"], status["finished"]))


@bp.get("/whoami")
@require_user()
def whoami():
    user = current_user()
    return {"name": user.name, "role": user.role}
