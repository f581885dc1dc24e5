"""The annotator's SQLite database: the only module that speaks SQL (through sqlite-utils).

WAL mode; every answer, undo and round change commits with synchronous=FULL (fsync) before its
request returns, so killing the server (or the machine) at any moment loses no acknowledged answer.
Leases commit without the fsync: losing one only hands the item out again. Writes that must see a consistent picture
(an answer against an open round, closing a round, leasing items) run in `BEGIN IMMEDIATE`
transactions, so concurrent requests and the engine worker serialise instead of racing.

Tables (schema version 5; MIGRATIONS below bring older files up to date):
  meta         key/value: schema version, the run's settings, the session secret, `finished`
  users        annotators and admins; only a SHA-256 of each token is stored
  rounds       one row per batch: state labeling -> closed -> trained, and the metrics of the
               model trained once the batch was answered (the learning curve)
  items        every pool item that ever entered a batch (pool index, file name)
  batch_items  which items a round's batch holds, in pick order, with the strategy, score and
               model version that chose each; audit items (`--audit-fraction`, drawn uniformly at
               random) have strategy "audit", audit = 1 and `predicted`, the class the model that
               posted the batch predicted before anyone answered (the accuracy estimate's input)
  answers      one row per (item, annotator, round); label -1 records a skip
  leases       which annotator holds which item, until when (unix seconds)
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlite_utils

from al_engine.errors import UserError

SCHEMA_VERSION = 5
SKIP = -1  # the label an answer carries when the annotator skipped the item
LEASE_SECONDS = 600  # an item stays with one annotator this long (10 minutes) unless answered
ROLES = ("annotator", "admin")
OWNER = "owner"  # the built-in admin whose token is printed at start-up
BUSY_TIMEOUT_S = 10.0  # seconds a connection waits for another process's lock before giving up


class AnnotatorDBError(UserError):
    """The database cannot be opened or used (locked, damaged, from a newer version)."""


class NotFound(LookupError):
    """The item (or answer) does not exist, or is in no batch."""


class Conflict(RuntimeError):
    """The request contradicts the round's state (e.g. answering a batch that has closed)."""


@dataclass
class User:
    id: int
    name: str
    role: str
    token_hash: str | None = None  # sessions remember a prefix of it: a new token signs old sessions out

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> float:
    return time.time()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    """One lock per database file for the writers of this process. SQLite's own busy handler sleeps
    in growing steps (up to 100 ms) while another connection writes; queueing on a lock instead
    wakes the next writer the moment the previous one commits. Other processes (the CLI) still
    meet SQLite's lock and its timeout."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


# --------------------------------------------------------------------------------------------
# Schema and migrations: MIGRATIONS[v] brings a database from version v-1 to v.


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["users"].create({"id": int, "name": str, "role": str, "token_hash": str, "created": float},
                       pk="id", not_null={"name", "role"})
    db["users"].create_index(["name"], unique=True)
    db["users"].create_index(["token_hash"], unique=True)
    db["rounds"].create({
        "round": int, "state": str, "strategy": str, "model_version": int, "batch_size": int,
        "created": float, "closed": float, "labeled": int, "accuracy": float, "train_s": float,
        "query_s": float, "epochs": int, "trained": float,
    }, pk="round", not_null={"state"})
    db["items"].create({"id": int, "file_name": str}, pk="id")
    db["batch_items"].create({
        "round": int, "item_id": int, "position": int, "strategy": str, "score": float, "model_version": int,
    }, pk=("round", "item_id"), foreign_keys=[("round", "rounds", "round"), ("item_id", "items", "id")])
    db["batch_items"].create_index(["item_id"])
    db["answers"].create({
        "id": int, "item_id": int, "annotator_id": int, "round": int, "label": int, "time_taken_ms": int,
        "created": float, "updated": float, "strategy": str, "score": float, "model_version": int,
    }, pk="id", not_null={"item_id", "annotator_id", "round", "label"},
        foreign_keys=[("item_id", "items", "id"), ("annotator_id", "users", "id"), ("round", "rounds", "round")])
    db["answers"].create_index(["item_id", "annotator_id", "round"], unique=True)
    db["answers"].create_index(["round", "item_id"])
    db["leases"].create({"item_id": int, "annotator_id": int, "expires": float}, pk="item_id",
                        foreign_keys=[("item_id", "items", "id"), ("annotator_id", "users", "id")])


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    # One name per meaning: the items of a round's batch are its query size; batch_size is the SGD
    # mini-batch of training.
    db.execute("alter table rounds rename column batch_size to query_size")


def _reserved(db: sqlite_utils.Database) -> None:
    pass


def _migrate_to_5(db: sqlite_utils.Database) -> None:
    # cold start: audit items and their predictions; the stopping signal per trained round.
    batch_columns = {column.name for column in db["batch_items"].columns}
    if "audit" not in batch_columns:
        db.execute("alter table batch_items add column audit integer not null default 0")
    if "predicted" not in batch_columns:
        db.execute("alter table batch_items add column predicted integer")
    round_columns = {column.name for column in db["rounds"].columns}
    for name, kind in (("kappa", "real"), ("kappa_mean", "real"), ("stop", "integer")):
        if name not in round_columns:
            db.execute(f"alter table rounds add column {name} {kind}")


MIGRATIONS = {1: _migrate_to_1, 2: _migrate_to_2,
              3: _reserved,  # reserved: reliability's migration
              4: _reserved,  # reserved: workflow's migration
              5: _migrate_to_5}


class AnnotationDB:
    """One connection to the annotator database; open one per thread (per request, per worker)."""

    def __init__(self, path: str | Path, timeout: float | None = None, setup: bool = True):
        """`setup=False` skips WAL set-up and migrations: for per-request connections of an app
        that already did both at start-up."""
        self.path = str(path)
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S if timeout is None else timeout,
                                         isolation_level=None,
                                         check_same_thread=False)
            self.db = sqlite_utils.Database(connection)
            if setup:
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable=True transactions raise it to FULL
            self.db.execute("PRAGMA foreign_keys=ON")
            if setup:
                self.migrate()
        except sqlite3.DatabaseError as error:
            raise AnnotatorDBError(f"cannot use database {self.path!r}: {error}") from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite_utils.Database]:
        """A write transaction taken up front (BEGIN IMMEDIATE): no lost updates between readers.

        durable=True commits with synchronous=FULL (the WAL is fsynced: the change survives even a
        power cut); durable=False (leases only) commits with NORMAL, which survives a killed process
        but may lose the last commits on a power cut, and saves an fsync (about 9 ms here) per request."""
        with _write_lock(self.path):
            if durable:
                self.db.execute("PRAGMA synchronous=FULL")
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise AnnotatorDBError(f"database {self.path!r} is busy: {error}") from None
            try:
                yield self.db
                self.db.commit()
            except sqlite3.Error as error:  # disk full, I/O error, locked by another process...
                with contextlib.suppress(sqlite3.Error):
                    self.db.rollback()
                raise AnnotatorDBError(f"database {self.path!r}: {error}") from None
            except BaseException:
                self.db.rollback()
                raise
            finally:
                if durable:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("PRAGMA synchronous=NORMAL")

    def schema_version(self) -> int:
        if "meta" not in self.db.table_names():
            return 0
        row = self.db.execute("select value from meta where key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        with self.transaction():
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise AnnotatorDBError(f"database {self.path!r} has schema version {version}, newer than this "
                                       f"program's {SCHEMA_VERSION}; upgrade the program")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](self.db)
                self._set_meta("schema_version", str(target))

    # ---------------------------------------------------------------------------------------- meta

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("insert into meta(key, value) values (?, ?) "
                        "on conflict(key) do update set value = excluded.value", [key, value])

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("select value from meta where key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._set_meta(key, value)

    def secret_key(self) -> str:
        """The session-signing secret, made once and kept, so sign-ins survive a restart."""
        with self.transaction():
            secret = self.get_meta("secret_key")
            if secret is None:
                secret = secrets.token_hex(32)
                self._set_meta("secret_key", secret)
        return secret

    def bind_run(self, settings: dict) -> dict:
        """Store the run's settings on first use; refuse a database that belongs to another run."""
        with self.transaction():
            stored = self.get_meta("run")
            if stored is None:
                self._set_meta("run", json.dumps(settings, sort_keys=True))
                return settings
        previous = json.loads(stored)
        keys = ("dataset", "data_dir", "subset", "classes", "image_size", "seed", "pool_size")
        differing = [k for k in keys if previous.get(k) != settings.get(k)]
        if differing:
            raise AnnotatorDBError(f"database {self.path!r} belongs to another run (its {', '.join(differing)} "
                                   f"differ); choose another --db")
        return previous

    def run_settings(self) -> dict | None:
        stored = self.get_meta("run")
        return None if stored is None else json.loads(stored)

    # ---------------------------------------------------------------------------------------- users

    def ensure_owner(self, token: str) -> User:
        """The built-in admin, whose token (printed at start-up) replaces the previous start's."""
        with self.transaction():
            row = self.db.execute("select id from users where name = ?", [OWNER]).fetchone()
            if row is None:
                self.db.execute("insert into users(name, role, token_hash, created) values (?, 'admin', ?, ?)",
                                [OWNER, hash_token(token), _now()])
            else:
                self.db.execute("update users set token_hash = ? where id = ?", [hash_token(token), row[0]])
        return self.user_for_token(token)

    def add_user(self, name: str, role: str = "annotator") -> str:
        """Add a named annotator; returns their new token (shown once, stored only as a hash)."""
        name = name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise UserError("a user name must be 1 to 64 printable characters")
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; choose from: {', '.join(ROLES)}")
        if name == OWNER:
            raise UserError(f"the name {OWNER!r} is reserved for the start-up token")
        token = secrets.token_urlsafe(24)
        with self.transaction():
            if self.db.execute("select 1 from users where name = ?", [name]).fetchone():
                raise UserError(f"a user named {name!r} already exists")
            self.db.execute("insert into users(name, role, token_hash, created) values (?, ?, ?, ?)",
                            [name, role, hash_token(token), _now()])
        return token

    def list_users(self) -> list[dict]:
        return list(self.db.query(
            "select u.id, u.name, u.role, u.created, count(a.id) as answers from users u "
            "left join answers a on a.annotator_id = u.id and a.label >= 0 group by u.id order by u.id"))

    def user_for_token(self, token: str) -> User | None:
        """The user holding this token. Found through the index on the token's SHA-256 (a lookup's
        timing can only reveal bits of a hash, which do not lead back to the token), then confirmed
        with a constant-time comparison."""
        if not token:
            return None
        presented = hash_token(token)
        row = self.db.execute("select id, name, role, token_hash from users where token_hash = ?",
                              [presented]).fetchone()
        if row is None or not hmac.compare_digest(row[3], presented):
            return None
        return User(*row)

    def user_by_id(self, user_id: int) -> User | None:
        row = self.db.execute("select id, name, role, token_hash from users where id = ?", [user_id]).fetchone()
        return User(*row) if row else None

    # ---------------------------------------------------------------------------------------- rounds

    def current_round(self) -> dict | None:
        rows = list(self.db.query("select * from rounds order by round desc limit 1"))
        return rows[0] if rows else None

    def rounds(self) -> list[dict]:
        return list(self.db.query("select * from rounds order by round"))

    def is_finished(self) -> bool:
        return self.get_meta("finished") == "1"

    def create_round(self, round_index: int, item_ids: list[int], scores: list[float], strategy: str,
                     model_version: int, file_names: list[str | None] | None = None,
                     audit: list[int | None] | None = None) -> None:
        """Post a new batch (state `labeling`); refuses when a batch is still open. `audit`, per item, is
        None for the strategy's picks and the model's predicted class for an audit item."""
        with self.transaction():
            self._insert_round(round_index, item_ids, scores, strategy, model_version, file_names, audit)

    def _insert_round(self, round_index: int, item_ids: list[int], scores: list[float], strategy: str,
                      model_version: int, file_names: list[str | None] | None = None,
                      audit: list[int | None] | None = None) -> None:
        file_names = file_names or [None] * len(item_ids)
        audit = audit or [None] * len(item_ids)
        current = self.current_round()
        if current is not None and (current["state"] == "labeling" or current["round"] >= round_index):
            raise Conflict(f"round {current['round']} is {current['state']}; cannot post round {round_index}")
        self.db.execute("insert into rounds(round, state, strategy, model_version, query_size, created) "
                        "values (?, 'labeling', ?, ?, ?, ?)",
                        [round_index, strategy, model_version, len(item_ids), _now()])
        for position, (item_id, score, file_name, predicted) in enumerate(zip(item_ids, scores, file_names, audit)):
            self.db.execute("insert into items(id, file_name) values (?, ?) on conflict(id) do nothing",
                            [int(item_id), file_name])
            self.db.execute("insert into batch_items(round, item_id, position, strategy, score, model_version, "
                            "audit, predicted) values (?, ?, ?, ?, ?, ?, ?, ?)",
                            [round_index, int(item_id), position, "audit" if predicted is not None else strategy,
                             float(score), model_version, int(predicted is not None),
                             None if predicted is None else int(predicted)])

    def close_round_if_complete(self, round_index: int) -> bool:
        """Close a labeling round once every item of its batch has an answer (or a skip)."""
        with self.transaction():
            row = self.db.execute("select state from rounds where round = ?", [round_index]).fetchone()
            if row is None or row[0] != "labeling":
                return row is not None and row[0] != "labeling"
            if self._remaining(round_index) > 0:
                return False
            self.db.execute("update rounds set state = 'closed', closed = ? where round = ?", [_now(), round_index])
            self.db.execute("delete from leases")
            return True

    def record_training(self, round_index: int, labeled: int, accuracy: float | None, train_s: float,
                        query_s: float, epochs: int, next_batch: dict | None, engine_state: str | None = None,
                        stability: dict | None = None) -> None:
        """Store the metrics of the model trained on rounds <= round_index, and post the next batch
        in the same transaction (or mark the run finished when there is none), with the engine's
        cross-round state (JSON text: strategy state, warm-start weights) that a restart restores.
        `stability` is the stopping signal ({kappa, kappa_mean, stop}, al_engine/estimate.py)."""
        stability = stability or {}
        with self.transaction():
            if engine_state is not None:
                self._set_meta("engine_state", engine_state)
            self.db.execute("update rounds set state = 'trained', labeled = ?, accuracy = ?, train_s = ?, "
                            "query_s = ?, epochs = ?, trained = ?, kappa = ?, kappa_mean = ?, stop = ? where round = ?",
                            [labeled, accuracy, train_s, query_s, epochs, _now(), stability.get("kappa"),
                             stability.get("kappa_mean"), int(bool(stability.get("stop"))), round_index])
            if next_batch is None:
                self._set_meta("finished", "1")
            else:
                self._insert_round(round_index + 1, **next_batch)

    def training_answers(self, up_to_round: int) -> tuple[list[int], list[int], list[int]]:
        """(items, labels, rounds) for training: per item, the latest non-skip answer of any
        annotator in rounds <= up_to_round."""
        rows = self.db.execute(
            "select item_id, label, round from ("
            "  select item_id, label, round, row_number() over ("
            "    partition by item_id order by updated desc, id desc) as latest"
            "  from answers where label >= 0 and round <= ?"
            ") where latest = 1 order by item_id", [up_to_round]).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def batch_answers(self, round_index: int) -> list[int]:
        """The training label (as `training_answers` gives it) of each item of the round's batch, in
        pick order; SKIP for an item without one."""
        batch = self.db.execute("select item_id from batch_items where round = ? order by position",
                                [round_index]).fetchall()
        items, labels, _ = self.training_answers(round_index)
        latest = dict(zip(items, labels))
        return [latest.get(row[0], SKIP) for row in batch]

    def _remaining(self, round_index: int) -> int:
        return self.db.execute(
            "select count(*) from batch_items b where b.round = ? and not exists "
            "(select 1 from answers a where a.item_id = b.item_id and a.round = b.round)", [round_index]).fetchone()[0]

    def audit_estimates(self) -> list[dict]:
        """Per model (the round whose trained model posted a batch with audit items): its accuracy on
        the answered audit items, predicted before anyone answered them, with the 95% Wilson interval:
        {round, labeled, n, correct, accuracy, low, high}. The answer counted is an item's latest
        non-skip answer in its batch's round."""
        from al_engine.estimate import audit_estimate

        rows = self.db.execute(
            "select b.round, b.predicted, ("
            "  select a.label from answers a where a.item_id = b.item_id and a.round = b.round and a.label >= 0"
            "  order by a.updated desc, a.id desc limit 1) "
            "from batch_items b where b.audit = 1 order by b.round, b.position").fetchall()
        labeled = {r["round"]: r["labeled"] for r in self.rounds()}
        estimates = []
        for batch_round in sorted({row[0] for row in rows}):
            chosen = [row for row in rows if row[0] == batch_round]
            answers = [row[2] if row[2] is not None else SKIP for row in chosen]
            estimate = audit_estimate([row[1] for row in chosen], answers)
            if estimate is not None:
                estimates.append({"round": batch_round - 1, "labeled": labeled.get(batch_round - 1), **estimate})
        return estimates

    def batch_progress(self) -> dict:
        current = self.current_round()
        if current is None:
            return {"round": None, "state": None, "query_size": 0, "remaining": 0}
        remaining = self._remaining(current["round"]) if current["state"] == "labeling" else 0
        return {"round": current["round"], "state": current["state"], "query_size": current["query_size"],
                "remaining": remaining}

    def labeled_count(self) -> int:
        return self.db.execute("select count(distinct item_id) from answers where label >= 0").fetchone()[0]

    def class_counts(self) -> dict[int, int]:
        """Per class, how many items carry it as their latest non-skip answer."""
        rows = self.db.execute(
            "select label, count(*) from (select item_id, label, row_number() over ("
            "  partition by item_id order by updated desc, id desc) as latest from answers where label >= 0"
            ") where latest = 1 group by label").fetchall()
        return {label: count for label, count in rows}

    # ---------------------------------------------------------------------------------------- leases

    def lease_tasks(self, user_id: int, count: int = 1, now: float | None = None) -> list[int]:
        """Up to `count` unanswered items of the open batch, leased to this annotator for 10 minutes:
        the ones they already hold first, then free ones in the strategy's pick order."""
        now = _now() if now is None else now
        with self.transaction(durable=False):  # a lease lost to a power cut is simply handed out again
            current = self.current_round()
            if current is None or current["state"] != "labeling":
                return []
            unanswered = ("select b.item_id, b.position from batch_items b where b.round = :round and not exists "
                          "(select 1 from answers a where a.item_id = b.item_id and a.round = b.round)")
            rows = self.db.execute(
                f"select u.item_id, l.annotator_id from ({unanswered}) u "
                "left join leases l on l.item_id = u.item_id and l.expires > :now "
                "where l.annotator_id is null or l.annotator_id = :user "
                "order by (l.annotator_id is null), u.position limit :count",
                {"round": current["round"], "now": now, "user": user_id, "count": count}).fetchall()
            items = [row[0] for row in rows]
            for item_id in items:
                self.db.execute("insert into leases(item_id, annotator_id, expires) values (?, ?, ?) "
                                "on conflict(item_id) do update set annotator_id = excluded.annotator_id, "
                                "expires = excluded.expires", [item_id, user_id, now + LEASE_SECONDS])
        return items

    def item_in_batches(self, item_id: int) -> bool:
        return self.db.execute("select 1 from batch_items where item_id = ? limit 1", [item_id]).fetchone() is not None

    # ---------------------------------------------------------------------------------------- answers

    def record_answer(self, user_id: int, item_id: int, label: int, time_taken_ms: int | None = None) -> str:
        """Store an answer before returning: 'created', 'unchanged' (same answer again) or 'replaced'
        (a different answer from the same annotator). Raises NotFound / Conflict."""
        with self.transaction():
            return self._record_answer(user_id, item_id, label, time_taken_ms, _now())

    def record_answers(self, user_id: int, item_ids: list[int], label: int) -> list[str]:
        """Grid mode: one label for many items in one transaction, all or nothing (an unknown or
        closed item raises NotFound / Conflict and records none of them)."""
        now = _now()
        with self.transaction():
            return [self._record_answer(user_id, item_id, label, None, now) for item_id in item_ids]

    def _record_answer(self, user_id: int, item_id: int, label: int, time_taken_ms: int | None, now: float) -> str:
        """One answer, inside the caller's transaction."""
        batch = self.db.execute(
            "select b.round, b.strategy, b.score, b.model_version, r.state from batch_items b "
            "join rounds r on r.round = b.round where b.item_id = ? order by b.round desc limit 1",
            [item_id]).fetchone()
        if batch is None:
            raise NotFound(f"item {item_id} is in no batch")
        round_index, strategy, score, model_version, state = batch
        if state != "labeling":
            raise Conflict(f"item {item_id} belongs to round {round_index}, which is closed")
        existing = self.db.execute("select id, label from answers where item_id = ? and annotator_id = ? "
                                   "and round = ?", [item_id, user_id, round_index]).fetchone()
        if existing is not None and existing[1] == label:
            outcome = "unchanged"
        elif existing is not None:
            self.db.execute("update answers set label = ?, time_taken_ms = ?, updated = ? where id = ?",
                            [label, time_taken_ms, now, existing[0]])
            outcome = "replaced"
        else:
            self.db.execute(
                "insert into answers(item_id, annotator_id, round, label, time_taken_ms, created, updated, "
                "strategy, score, model_version) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [item_id, user_id, round_index, label, time_taken_ms, now, now, strategy, score, model_version])
            outcome = "created"
        self.db.execute("delete from leases where item_id = ?", [item_id])
        return outcome

    def undo_answer(self, user_id: int, item_id: int) -> None:
        """Withdraw this annotator's answer to an item of the open batch and lease the item back."""
        with self.transaction():
            row = self.db.execute(
                "select a.id, r.state from answers a join rounds r on r.round = a.round "
                "where a.item_id = ? and a.annotator_id = ? order by a.round desc limit 1",
                [item_id, user_id]).fetchone()
            if row is None:
                raise NotFound(f"you have no answer to item {item_id}")
            if row[1] != "labeling":
                raise Conflict(f"the round of item {item_id} is closed; its answer can no longer be undone")
            self.db.execute("delete from answers where id = ?", [row[0]])
            self.db.execute("insert into leases(item_id, annotator_id, expires) values (?, ?, ?) "
                            "on conflict(item_id) do update set annotator_id = excluded.annotator_id, "
                            "expires = excluded.expires", [item_id, user_id, _now() + LEASE_SECONDS])

    def answers_of(self, item_id: int) -> list[dict]:
        return list(self.db.query("select a.*, u.name as annotator from answers a join users u "
                                  "on u.id = a.annotator_id where a.item_id = ? order by a.id", [item_id]))

    # ---------------------------------------------------------------------------------------- export

    EXPORT_FIELDS = ("item", "pool_index", "file_name", "label", "label_index", "annotator", "time",
                     "time_taken_ms", "round", "strategy", "score", "model_version")

    def iter_export(self, classes: list[str], latest_only: bool = False, chunk: int = 1000) -> Iterator[dict]:
        """Every non-skip answer (or, with latest_only, the latest per item), streamed in chunks
        from one read snapshot so that 100k answers never sit in memory at once."""
        where = "a.label >= 0"
        sql = ("select a.id, a.item_id, i.file_name, a.label, u.name, a.updated, a.time_taken_ms, a.round, "
               "a.strategy, a.score, a.model_version from answers a join items i on i.id = a.item_id "
               f"join users u on u.id = a.annotator_id where {where}")
        if latest_only:
            sql = (f"select * from (select *, row_number() over (partition by item_id order by updated desc, id desc)"
                   f" as latest from ({sql})) where latest = 1")
        cursor = self.db.conn.cursor()
        cursor.execute("BEGIN")  # one read snapshot for the whole stream
        try:
            cursor.execute(sql + " order by 2, 1")
            while True:
                rows = cursor.fetchmany(chunk)
                if not rows:
                    break
                for row in rows:
                    _, item_id, file_name, label, annotator, updated, taken, round_index, strategy, score, version = row[:11]
                    yield {
                        "item": item_id, "pool_index": item_id, "file_name": file_name,
                        "label": classes[label] if 0 <= label < len(classes) else str(label), "label_index": label,
                        "annotator": annotator, "time": _iso(updated), "time_taken_ms": taken,
                        "round": round_index, "strategy": strategy, "score": score, "model_version": version,
                    }
        finally:
            cursor.execute("COMMIT")
            cursor.close()
