"""The labeling page, grid mode and the dashboard (full pages, or htmx partials on HX-Request)."""
from __future__ import annotations

from flask import Blueprint, render_template, request

from .connection import get_db
from .state import annotator_state
from .api import status_payload
from .auth import current_user, require_user, sign_in_page

bp = Blueprint("pages", __name__)

KEYS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]  # key i answers class i (0 = the tenth)
GRID_SIZE = 24  # images per grid page
BUSY_STATES = {"starting", "training", "querying"}


def class_buttons() -> list[dict]:
    return [{"index": i, "name": name, "key": KEYS[i] if i < len(KEYS) else ""}
            for i, name in enumerate(annotator_state().classes)]


@bp.get("/")
def index():
    token = request.args.get("token")
    if token is not None:
        return sign_in_page(token)
    return label_page()


@require_user()
def label_page():
    return render_template("label.html", classes=class_buttons(), status=status_payload())


@bp.get("/grid")
@require_user()
def grid():
    return render_template("grid.html", classes=class_buttons(), status=status_payload(), grid_size=GRID_SIZE)


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
