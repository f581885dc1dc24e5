"""Real annotator servers on 127.0.0.1 for the crash and load tests (and benchmarks/reliability.py).

Each server is `app.main(ARGS)`, the code `python app.py ARGS` runs, in a process of its own that the
tests kill with SIGKILL. Starting Python and importing torch is most of a start (about 3 of 5 s on two
busy cores), so by default a *launcher* process imports app.py's modules once and forks one child per
server; `mode="exec"` starts a fresh `python app.py` each time instead. Either way the server is a
separate process holding the database, exactly as in production.

Scenarios (they return a report dict; the tests assert on it, the benchmark prints it):
  crash_cycles   annotator threads keep answering while the server is SIGKILLed and restarted
  load_rounds    N concurrent annotators answer a whole batch; leases, answers and latency
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "harness-owner-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, path: str, token: str, body=None, method: str | None = None,
         timeout: float = 20.0) -> tuple[int, object]:
    """One HTTP request; (status, parsed JSON or None). Connection failures raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method or ("GET" if body is None else "POST"),
                                     headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    except urllib.error.URLError as error:  # refused, reset: the server is gone
        raise ConnectionError(str(error.reason)) from None
    except http.client.HTTPException as error:  # killed in the middle of a response
        raise ConnectionError(f"{type(error).__name__}: {error}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def percentiles(values: list[float], digits: int = 1) -> dict:
    """Nearest-rank percentiles and the mean of latencies in ms, rounded to `digits` decimals."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits)

    return {"n": len(ordered), "p50_ms": pick(0.5), "p95_ms": pick(0.95), "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1], digits), "mean_ms": round(sum(ordered) / len(ordered), digits)}


# --------------------------------------------------------------------------------------------
# Starting and killing servers


def launcher_loop() -> None:
    """The launcher process: import once, then fork a server per JSON line on stdin; print its pid."""
    sys.path.insert(0, str(ROOT))
    import app  # noqa: F401  (and through it, what a server start imports)
    import annotator.cli  # noqa: F401
    import annotator.worker  # noqa: F401
    from al_engine.data import dataset_names
    from al_engine.strategies import strategy_names

    dataset_names(), strategy_names()  # registries discovered once, before forking
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: about 2 s per server otherwise)
    import waitress.server  # noqa: F401
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(order["env"])
                if order.get("fd_limit"):
                    set_fd_limit(order["fd_limit"])
                code = app.main(order["argv"])
            except BaseException:  # noqa: BLE001 - the child must never return into the loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        print(pid, flush=True)


def set_fd_limit(soft: int) -> None:
    """This process's soft limit on open files (the usual default is 1,024; the server may raise it)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))


class Launcher:
    """Starts servers: forked from a warm launcher (mode "fork") or as fresh `python app.py` ("exec").
    `program` (exec mode) runs another script with app.py's arguments (benchmarks: the old server)."""

    def __init__(self, mode: str = "fork", program: str = "app.py"):
        self.mode = mode
        self.program = program
        if program != "app.py" and mode != "exec":
            raise ValueError("another program runs only in exec mode")
        self.process = None
        self.started: list[ServerProcess] = []  # killed on close, so a failing test leaves no server behind
        if mode == "fork":
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--launcher"], cwd=ROOT,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if self.process.stdout.readline().strip() != "ready":
                raise RuntimeError("the server launcher did not start")

    def start(self, argv: list[str], log: Path, env: dict | None = None, fd_limit: int | None = None) -> "ServerProcess":
        """Start a server; `fd_limit` sets its soft limit on open files first (as a shell's `ulimit -n`)."""
        if self.mode == "fork":
            self.process.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(log),
                                                 "fd_limit": fd_limit}) + "\n")
            self.process.stdin.flush()
            server = ServerProcess(pid=int(self.process.stdout.readline()), log=log)
            self.started.append(server)
            return server
        handle = open(log, "ab")
        popen = subprocess.Popen([sys.executable, self.program, *argv], cwd=ROOT, stdout=handle, stderr=handle,
                                 stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                 preexec_fn=(lambda: set_fd_limit(fd_limit)) if fd_limit else None)
        handle.close()
        self.started.append(ServerProcess(pid=popen.pid, log=log, popen=popen))
        return self.started[-1]

    def close(self) -> None:
        for server in self.started:
            server.kill()
        self.started.clear()
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
            self.process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ServerProcess:
    pid: int
    log: Path
    popen: subprocess.Popen | None = None
    gone: bool = False  # seen dead: never signal this pid again (it could be reused by another process)

    def alive(self) -> bool:
        if self.gone:
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL, then wait until the process is gone."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.wait_dead(timeout)

    def wait_dead(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=0.05)
                    self.gone = True
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not self.alive():
                self.gone = True
                return True
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Server:
    """A started server: its process, address and owner token."""

    process: ServerProcess
    base: str
    token: str = TOKEN

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"the server exited during start-up:\n{self.process.log_tail()}")
            try:
                status, body = call(self.base, "/api/status", self.token, timeout=5)
                if status == 200:
                    return body
            except (ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.process.log_tail()}")

    def status(self) -> dict:
        return call(self.base, "/api/status", self.token)[1]


def server_args(db: Path, port: int, **settings) -> list[str]:
    """app.py arguments of a small, fast run on digits (the embedded dataset)."""
    options = {"dataset": "digits", "initial": 40, "query-size": 30, "rounds": 100, "epochs": 1,
               "strategy": "entropy", "seed": 0, "device": "cpu", "close-grace": 0}
    options.update({key.replace("_", "-"): value for key, value in settings.items()})
    argv = ["--db", str(db), "--port", str(port), "--token", TOKEN]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def start_server(launcher: Launcher, db: Path, log_dir: Path, env: dict | None = None, fd_limit: int | None = None,
                 **settings) -> Server:
    port = free_port()
    process = launcher.start(server_args(db, port, **settings), log_dir / f"server-{port}.log", env, fd_limit)
    return Server(process=process, base=f"http://127.0.0.1:{port}")


def add_annotators(db: Path, count: int, prefix: str = "annotator") -> list[tuple[int, str]]:
    """(user id, token) of `count` new annotators, added the way `app.py users add` adds them."""
    from annotator.db import AnnotationDB

    database = AnnotationDB(db)
    try:
        tokens = [database.add_user(f"{prefix}-{i}") for i in range(count)]
        return [(database.user_for_token(token).id, token) for token in tokens]
    finally:
        database.close()


# --------------------------------------------------------------------------------------------
# Reading the database behind the server's back (read-only, like an auditor)


def read_db(db: Path) -> dict:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rounds = connection.execute("select round, state, query_size from rounds order by round").fetchall()
        batches = connection.execute("select round, item_id, position from batch_items order by round, position").fetchall()
        answers = connection.execute("select annotator_id, item_id, round, label from answers order by id").fetchall()
        integrity = connection.execute("pragma integrity_check").fetchone()[0]
    finally:
        connection.close()
    return {"rounds": rounds, "batches": batches, "answers": answers, "integrity": integrity}


def round_invariants(snapshot: dict, initial: int, query_size: int) -> list[str]:
    """What must hold after any crash: consecutive rounds, each batch stored once and whole, at most the
    last round open, no item queried again once labeled, no item answered twice in a round."""
    problems = []
    rounds = snapshot["rounds"]
    if [r[0] for r in rounds] != list(range(len(rounds))):
        problems.append(f"rounds are not consecutive: {[r[0] for r in rounds]}")
    items_of = {}
    for round_index, item_id, position in snapshot["batches"]:
        items_of.setdefault(round_index, []).append(item_id)
    for round_index, state, batch_size in rounds:
        items = items_of.get(round_index, [])
        expected = initial if round_index == 0 else query_size
        if len(items) != batch_size or batch_size != expected or len(set(items)) != len(items):
            problems.append(f"round {round_index}: {len(items)} stored items for a batch of {batch_size} "
                            f"(expected {expected})")
        if state == "labeling" and round_index != rounds[-1][0]:
            problems.append(f"round {round_index} is still open but not the last")
    labeled_before: set[int] = set()
    answers_by_round: dict[int, list] = {}
    for annotator_id, item_id, round_index, label in snapshot["answers"]:
        answers_by_round.setdefault(round_index, []).append((item_id, label))
    for round_index, _, _ in rounds:
        requeried = labeled_before & set(items_of.get(round_index, []))
        if requeried:
            problems.append(f"round {round_index} queried already labeled items {sorted(requeried)[:5]}")
        answered = [item for item, _ in answers_by_round.get(round_index, [])]
        twice = [item for item, n in Counter(answered).items() if n > 1]
        if twice:
            problems.append(f"round {round_index}: items answered twice {twice[:5]}")
        labeled_before |= {item for item, label in answers_by_round.get(round_index, []) if label >= 0}
    if snapshot["integrity"] != "ok":
        problems.append(f"integrity_check: {snapshot['integrity']}")
    return problems


# --------------------------------------------------------------------------------------------
# Annotators


def label_for(item_id: int) -> int:
    return (item_id * 7) % 10  # any fixed rule: the checks compare stored labels with sent ones


@dataclass
class Tally:
    """What the clients saw: acknowledged answers, leases granted, unexpected statuses, latencies."""

    acked: list = field(default_factory=list)  # (user id, item id, label) that got a 201
    leases: list = field(default_factory=list)  # (user id, item id) of each 200 from /api/tasks/next
    unexpected: list = field(default_factory=list)  # (request, status)
    pair_ms: list = field(default_factory=list)  # next + answer, per answered item
    lock: threading.Lock = field(default_factory=threading.Lock)


def annotate(base: str, user_id: int, token: str, tally: Tally, stop: threading.Event,
             until_empty: bool = True, think_s: float = 0.0) -> None:
    """Lease the next item and answer it, over and over; returns when the server is gone, `stop` is
    set, or (until_empty) nothing is left for this annotator."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            status, body = call(base, "/api/tasks/next", token)
        except (ConnectionError, OSError):
            return
        if status == 204:
            if until_empty:
                return
            time.sleep(0.05)  # the engine is training; the next batch comes soon
            continue
        if status != 200:
            with tally.lock:
                tally.unexpected.append(("next", status, body))
            return
        item_id = body["item_id"]
        with tally.lock:
            tally.leases.append((user_id, item_id))
        if think_s:
            time.sleep(think_s)
        label = label_for(item_id)
        try:
            status, body = call(base, "/api/annotations", token, {"item_id": item_id, "label": label})
        except (ConnectionError, OSError):
            return  # not acknowledged: it may or may not be stored
        with tally.lock:
            if status == 201:
                tally.acked.append((user_id, item_id, label))
                tally.pair_ms.append((time.perf_counter() - start) * 1000)
            else:
                tally.unexpected.append(("answer", status, body))
                return


def run_annotators(base: str, users: list[tuple[int, str]], tally: Tally, stop: threading.Event,
                   until_empty: bool = True, think_s: float = 0.0) -> list[threading.Thread]:
    threads = [threading.Thread(target=annotate, args=(base, user_id, token, tally, stop, until_empty, think_s),
                                daemon=True)
               for user_id, token in users]
    for thread in threads:
        thread.start()
    return threads


def acknowledged_problems(tally: Tally, snapshot: dict) -> list[str]:
    """Every 201 is stored with the label sent, and no (annotator, item) pair is stored twice."""
    stored = Counter((a, i) for a, i, _, _ in snapshot["answers"])
    labels = {(a, i): label for a, i, _, label in snapshot["answers"]}
    problems = [f"stored twice: {pair}" for pair, n in stored.items() if n > 1]
    for user_id, item_id, label in tally.acked:
        if labels.get((user_id, item_id)) != label:
            problems.append(f"acknowledged answer lost or changed: annotator {user_id}, item {item_id}, "
                            f"label {label}, stored {labels.get((user_id, item_id))}")
    return problems


# --------------------------------------------------------------------------------------------
# Scenarios


def crash_cycles(work_dir: Path, cycles: int = 20, annotators: int = 4, mode: str = "fork", seed: int = 0,
                 kill_after_s: tuple[float, float] = (0.2, 3.0), think_s: float = 0.0, program: str = "app.py",
                 **settings) -> dict:
    """Start the server, let annotators answer, SIGKILL it after a random delay, check, restart on the
    same database; `cycles` times. Returns a report with every problem found. `think_s` (seconds between
    seeing an item and answering it) stretches the labeling phase so kills land in it as well as in training."""
    rng = random.Random(seed)
    db = work_dir / "crash.db"
    users = add_annotators(db, annotators)
    settings = {"initial": 20, "query_size": 15, **settings}
    initial, query_size = int(settings["initial"]), int(settings["query_size"])
    tally, problems, kills = Tally(), [], []
    with Launcher(mode, program) as launcher:
        for cycle in range(cycles):
            server = start_server(launcher, db, work_dir, **settings)
            status = server.wait_ready()
            if kills and (status["round"] < kills[-1]["round"]
                          or (kills[-1]["unanswered"] and status["round"] != kills[-1]["round"])):
                problems.append(f"cycle {cycle}: killed in round {kills[-1]['round']} ({kills[-1]['state']}, "
                                f"{kills[-1]['unanswered']} unanswered), resumed in round {status['round']}")
            stop = threading.Event()
            threads = run_annotators(server.base, users, tally, stop, until_empty=False, think_s=think_s)
            time.sleep(rng.uniform(*kill_after_s))
            server.process.kill()
            stop.set()
            for thread in threads:
                thread.join(30)
            snapshot = read_db(db)
            current = snapshot["rounds"][-1]
            answered = {i for _, i, r, _ in snapshot["answers"] if r == current[0]}
            kills.append({"cycle": cycle, "round": current[0], "state": current[1],
                          "unanswered": current[2] - len(answered) if current[1] == "labeling" else 0})
            problems += [f"cycle {cycle}: {p}" for p in round_invariants(snapshot, initial, query_size)]
            problems += [f"cycle {cycle}: {p}" for p in acknowledged_problems(tally, snapshot)]
        # one last start: the engine picks up where the last kill left it
        server = start_server(launcher, db, work_dir, **settings)
        final_status = server.wait_ready()
        server.process.kill()
    snapshot = read_db(db)
    problems += round_invariants(snapshot, initial, query_size) + acknowledged_problems(tally, snapshot)
    stored_pairs = {(a, i) for a, i, _, _ in snapshot["answers"]}
    return {
        "cycles": cycles, "mode": mode, "annotators": annotators, "think_s": think_s,
        "acknowledged": len(tally.acked), "stored": len(snapshot["answers"]),
        "stored_without_ack": len(stored_pairs - {(a, i) for a, i, _ in tally.acked}),
        "cycles_with_all_acked_kept": cycles - len({p.split(":")[0] for p in problems if p.startswith("cycle")}),
        "rounds_reached": len(snapshot["rounds"]), "killed_in_state": dict(Counter(k["state"] for k in kills)),
        "final_round": final_status["round"], "unexpected": tally.unexpected[:5],
        "unexpected_count": len(tally.unexpected), "problems": problems,
    }


def load_rounds(work_dir: Path, annotator_counts: tuple[int, ...] = (8, 32), items_per_annotator: int = 10,
                mode: str = "fork", deadline_s: float = 120.0, program: str = "app.py") -> list[dict]:
    """One server; round r's batch is answered by annotator_counts[r] concurrent annotators until it is
    done. Per round: no item leased to two annotators, stored == acknowledged, no 5xx, p50/p95."""
    db = work_dir / "load.db"
    users = add_annotators(db, max(annotator_counts))
    sizes = [count * items_per_annotator for count in annotator_counts]
    reports = []
    with Launcher(mode, program) as launcher:
        server = start_server(launcher, db, work_dir, initial=sizes[0], query_size=sizes[1] if len(sizes) > 1 else 10,
                              rounds=len(sizes), strategy="random")
        try:
            server.wait_ready()
            for round_index, count in enumerate(annotator_counts):
                deadline = time.monotonic() + deadline_s
                while (status := server.status())["round"] != round_index or status["round_state"] != "labeling":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"round {round_index} was not posted within {deadline_s} s: {status}")
                    time.sleep(0.1)
                tally, stop = Tally(), threading.Event()
                started = time.perf_counter()
                threads = run_annotators(server.base, users[:count], tally, stop, until_empty=True)
                for thread in threads:
                    thread.join(max(deadline - time.monotonic(), 1))
                stop.set()
                elapsed = time.perf_counter() - started
                snapshot = read_db(db)
                stored = [(a, i, label) for a, i, r, label in snapshot["answers"] if r == round_index]
                holders: dict[int, set] = {}
                for user_id, item_id in tally.leases:
                    holders.setdefault(item_id, set()).add(user_id)
                reports.append({
                    "annotators": count, "batch_size": status["batch_size"], "acknowledged": len(tally.acked),
                    "stored": len(stored), "stored_equals_acknowledged": sorted(stored) == sorted(tally.acked),
                    "items_leased_to_two": sum(len(h) > 1 for h in holders.values()),
                    "server_errors_5xx": sum(1 for _, s, _ in tally.unexpected if s >= 500),
                    "unexpected": tally.unexpected[:5], "answers_per_s": round(len(tally.acked) / elapsed, 1),
                    "latency_next_plus_answer": percentiles(tally.pair_ms),
                })
        finally:
            server.process.kill()
    return reports


def open_idle_connections(port: int, count: int, timeout: float = 5.0) -> list[socket.socket]:
    """`count` connections that each send half a request (no blank line ending the headers) and then
    nothing: what an unauthenticated client needs to tie up a server that waits for the rest."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        except OSError:
            sock.close()
            break
        sockets.append(sock)
    return sockets


def count_closed(sockets: list[socket.socket]) -> int:
    """How many of these connections the server has closed (end of stream, or reset)."""
    import select

    closed = 0
    for sock in sockets:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and not sock.recv(4096, socket.MSG_PEEK):
                closed += 1
        except OSError:
            closed += 1
    return closed


def probe_latency(server: "Server", seconds: float, timeout: float = 10.0, pause_s: float = 0.05) -> dict:
    """Legitimate GET /api/status calls, one after another for `seconds`, each on a new connection:
    their latency (failed and timed-out calls count as failures, not latencies)."""
    latencies, failures, errors = [], 0, Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            status, _ = call(server.base, "/api/status", server.token, timeout=timeout)
            if status == 200:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                failures += 1
                errors[f"status {status}"] += 1
        except (ConnectionError, OSError) as error:
            failures += 1
            errors[type(error).__name__ + (": timed out" if "timed out" in str(error) else "")] += 1
        time.sleep(pause_s)
    return {**percentiles(latencies), "failures": failures, "errors": dict(errors)}


def idle_connection_attack(work_dir: Path, idle: int = 1100, mode: str = "fork", program: str = "app.py",
                           fd_limit: int = 1024, probe_s: float = 10.0, hold_s: float = 0.0) -> dict:
    """The idle-socket attack: a server started under a soft limit of `fd_limit` open files (the usual
    default), `idle` half-sent requests held open, and legitimate calls measured before and during it.
    With `hold_s`, the connections are kept that long and the report says how many the server closed."""
    set_fd_limit(idle + 256)  # this client's own sockets
    with Launcher(mode, program) as launcher:
        server = start_server(launcher, work_dir / "idle.db", work_dir, fd_limit=fd_limit, initial=20, query_size=10,
                              rounds=2, strategy="random")
        server.wait_ready()
        baseline = probe_latency(server, probe_s)
        started = time.perf_counter()
        sockets = open_idle_connections(int(server.base.rsplit(":", 1)[1]), idle)
        opened_s = time.perf_counter() - started
        try:
            during = probe_latency(server, probe_s)
            report = {"idle_connections": len(sockets), "opened_in_s": round(opened_s, 2), "server_fd_limit": fd_limit,
                      "baseline": baseline, "during_attack": during, "server_alive": server.process.alive()}
            if hold_s:
                time.sleep(max(hold_s - probe_s, 0))
                report.update(held_s=hold_s, closed_by_server_after_hold=count_closed(sockets),
                              after_hold=probe_latency(server, min(probe_s, 5.0)))
        finally:
            for sock in sockets:
                sock.close()
            server.process.kill()
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--launcher"]:
    launcher_loop()
