"""Annotator latency on loopback: next-item + answer with concurrent annotators, and time to first image.

Prints JSON lines:
  {"bench": "time_to_first_image", ...}   `python app.py --dataset fashion-mnist` from process start
                                          until the first image of the first batch has been served
  {"bench": "next_plus_answer", "phase": "engine idle" | "engine training", "think_ms": 0 | 500, ...}
                                          p50/p95/p99 of GET /api/tasks/next followed by POST /api/annotations,
                                          per annotator thread, with N annotators at once: back to back
                                          (think_ms 0, a stress test) and paced like fast people (think_ms)

The server runs in this process exactly as `app.py` runs it (werkzeug, threaded, engine worker thread).
The product trains only between batches, when nobody can answer; to measure answers *while* a model
trains in the server process, the "engine training" phase runs the engine's own training loop
(`Engine.train`, Fashion-MNIST, the run's preset) in another thread of the server process.
The annotators are threads of a separate client process, so they do not compete for the server's GIL.

Bounded: loopback only (127.0.0.1), at most --pairs answers per annotator and --phase-seconds per phase.
    python benchmarks/annotator_latency.py [--annotators 8] [--pairs 40] [--phase-seconds 40]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import free_port, percentiles  # noqa: E402  (the tests' helpers for servers on 127.0.0.1)


def request(url: str, token: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"},
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# --------------------------------------------------------------------------------------------
# Client process: N annotator threads, each: next item, then answer it; latency of the pair.


def run_clients(base: str, tokens: list[str], pairs: int, seconds: float, think_ms: float = 0.0) -> dict:
    pair_ms, next_ms, answer_ms, errors = [], [], [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def annotator(token: str) -> None:
        for _ in range(pairs):
            if time.perf_counter() > deadline:
                return
            time.sleep(think_ms / 1000 * (0.5 + random.random()))  # a person looks at the image
            start = time.perf_counter()
            status, body = request(f"{base}/api/tasks/next", token)
            got = time.perf_counter()
            if status != 200:
                with lock:
                    errors.append(f"next {status}")
                return
            item = json.loads(body)["item_id"]
            status, _ = request(f"{base}/api/annotations", token, {"item_id": item, "label": item % 10})
            done = time.perf_counter()
            with lock:
                if status != 201:
                    errors.append(f"answer {status}")
                pair_ms.append((done - start) * 1000)
                next_ms.append((got - start) * 1000)
                answer_ms.append((done - got) * 1000)

    threads = [threading.Thread(target=annotator, args=(token,)) for token in tokens]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"pair": percentiles(pair_ms, 2), "next": percentiles(next_ms, 2), "answer": percentiles(answer_ms, 2),
            "answers_per_s": round(len(pair_ms) / elapsed, 1), "errors": errors[:5], "error_count": len(errors)}


# --------------------------------------------------------------------------------------------
# Time to first image: the real command line, from process start.


def time_to_first_image(db_dir: str, timeout: float = 120.0) -> dict:
    port, token = free_port(), "bench-token"
    command = [sys.executable, "app.py", "--dataset", "fashion-mnist", "--db", str(Path(db_dir) / "first.db"),
               "--token", token, "--port", str(port), "--initial", "100", "--query-size", "100", "--device", "cpu"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    result = {"bench": "time_to_first_image", "dataset": "fashion-mnist"}
    try:
        while time.perf_counter() - start < timeout:
            try:
                status, body = request(f"{base}/api/tasks/next", token, timeout=5)
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
                continue
            if status == 200:
                image_status, image = request(base + json.loads(body)["image_url"], token)
                result.update(seconds=round(time.perf_counter() - start, 2), image_status=image_status,
                              image_bytes=len(image))
                break
            time.sleep(0.05)
        else:
            result["error"] = "no image before the timeout"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    ready = [line for line in output.splitlines() if "ready in" in line]
    if ready:
        result["server_says"] = ready[0].split("(", 1)[-1].rstrip(")")
    return result


# --------------------------------------------------------------------------------------------
# Latency phases: the server in this process, clients in a child process.


def training_load(engine, stop: threading.Event, rounds_done: list) -> None:
    while not stop.is_set():
        engine.train(len(rounds_done))
        rounds_done.append(1)


def latency_phases(args, db_dir: str) -> list[dict]:
    import numpy as np

    from al_engine.data import load_dataset
    from al_engine.config import RunConfig
    from al_engine.engine import Engine
    from annotator import create_app
    from annotator.cli import make_server
    from annotator.db import AnnotationDB

    config = RunConfig(dataset="fashion-mnist", initial=args.annotators * args.pairs * 4 + 50, query_size=100,
                       rounds=1, device="cpu", epochs=args.train_epochs)
    dataset = load_dataset(config.dataset, config.load_options())
    db_path = str(Path(db_dir) / "latency.db")
    app = create_app({"DATABASE": db_path, "RUN_CONFIG": config, "DATASET": dataset, "ADMIN_TOKEN": "owner-token",
                      "START_ENGINE": True})
    db = AnnotationDB(db_path)
    tokens = [db.add_user(f"annotator{i}") for i in range(args.annotators)]
    db.close()
    server = make_server(app, "127.0.0.1", free_port())  # exactly as `app.py` serves
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    # The training load: the engine's own loop on 1000 labeled Fashion-MNIST images.
    load_engine = Engine(config, dataset=dataset)
    rng = np.random.default_rng(0)
    labeled = rng.choice(len(dataset.train_labels), size=1000, replace=False)
    load_engine.pool.add_labels(labeled, dataset.train_labels.numpy()[labeled], -1)

    results = []
    phases = [(engine, think) for engine in ("engine idle", "engine training") for think in (0.0, args.think_ms)]
    for phase, think_ms in phases:
        stop, rounds_done = threading.Event(), []
        trainer = None
        if phase == "engine training":
            trainer = threading.Thread(target=training_load, args=(load_engine, stop, rounds_done), daemon=True)
            trainer.start()
            time.sleep(2.0)  # let the first epochs start
        client = subprocess.run(
            [sys.executable, __file__, "--client", base, "--tokens", ",".join(tokens), "--pairs", str(args.pairs),
             "--phase-seconds", str(args.phase_seconds), "--think-ms", str(think_ms)],
            capture_output=True, text=True, timeout=args.phase_seconds + 120)
        stop.set()
        if trainer is not None:
            trainer.join(300)
        if client.returncode != 0:
            raise RuntimeError(f"client failed: {client.stderr[-2000:]}")
        measured = json.loads(client.stdout.strip().splitlines()[-1])
        results.append({"bench": "next_plus_answer", "phase": phase, "think_ms": think_ms,
                        "annotators": args.annotators,
                        "target_p95_ms": 50, **measured,
                        "trainings_during_phase": len(rounds_done) if trainer else 0,
                        "engine_state": app.extensions["annotator"].status.snapshot()["state"]})
    server.shutdown()
    app.extensions["annotator"].worker.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=40, help="next+answer pairs per annotator per phase")
    parser.add_argument("--phase-seconds", type=float, default=40.0, help="time limit per phase")
    parser.add_argument("--train-epochs", type=int, default=20, help="epoch cap of the background training")
    parser.add_argument("--think-ms", type=float, default=500.0,
                        help="mean pause per annotator between answers in the paced phases (0-phases have none)")
    parser.add_argument("--skip-first-image", action="store_true")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(run_clients(args.client, args.tokens.split(","), args.pairs, args.phase_seconds,
                                     args.think_ms)))
        return 0
    common = {"cpu_count": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
              "note": "CPU shared with other engineers' jobs during this run; timings are noisy"}
    with tempfile.TemporaryDirectory() as db_dir:
        if not args.skip_first_image:
            print(json.dumps({**time_to_first_image(db_dir), **common}), flush=True)
        for line in latency_phases(args, db_dir):
            print(json.dumps({**line, **common, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
