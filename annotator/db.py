"""The annotator's SQLite database: the only module that speaks SQL (through sqlite-utils).

WAL mode; every answer, undo and round change commits with synchronous=FULL (fsync) before its
request returns, so killing the server (or the machine) at any moment loses no acknowledged answer.
Leases commit without the fsync: losing one only hands the item out again. Writes that must see a consistent picture
(an answer against an open round, closing a round, leasing items) run in `BEGIN IMMEDIATE`
transactions, so concurrent requests and the engine worker serialise instead of racing.

Tables (schema version 6; MIGRATIONS below bring older files up to date):
  meta         key/value: schema version, the run's settings, the cookie-signing secret, `finished`, `overlap`,
               `server` (the host and port the last server listened on, for the links `users add` prints)
  users        annotators and admins; only a SHA-256 of each token is stored; `removed` once revoked
  sessions     signed-in browsers: a SHA-256 of each session's random id (the cookie holds the id), so
               neither the file nor the signing secret alone can make a session; sign-out deletes the row
  rounds       one row per batch: state labeling -> closed -> trained, and the metrics of the
               model trained once the batch was answered (the learning curve)
  items        every pool item that ever entered a batch (pool index, file name)
  batch_items  which items a round's batch holds, in pick order, with the strategy, score and
               model version that chose each; audit items (`--audit-fraction`, drawn uniformly at
               random) have strategy "audit", audit = 1 and `predicted`, the class the model that
               posted the batch predicted before anyone answered (the accuracy estimate's input)
  answers      one row per (item, annotator, round); label -1 records a skip; `seq` orders them
               (a counter, not the clock: a clock stepped back never makes an older answer the latest);
               `source` says how it came: "batch" (the open batch), "check" (a blind second opinion
               on a closed round's item while the engine trained) or "review" (a correction after the
               round closed, which decides the item's training label)
  answer_history  every answer as it was before a replacement, correction or undo
  leases       which annotator holds which item (kind "label" or "check"), until when (unix seconds)
  files        the data folder's manifest (image folders): one stable item id per file name, so a
               folder that grows (or loses files) keeps every answer on its picture
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import sqlite_utils

from al_engine.errors import UserError

SCHEMA_VERSION = 6
SKIP = -1  # the label an answer carries when the annotator skipped the item
LEASE_SECONDS = 100  # an item stays with one annotator this long unless answered or renewed by a heartbeat
# (the page renews every 30 s while its tab is open, so a closed tab's items come free within 2 minutes)
MAX_HELD = 24  # the most items one annotator may hold at once (grid mode shows 24), and at most half a batch
LABEL_MODELS = ("majority", "dawid-skene")
ROLES = ("annotator", "admin")
OWNER = "owner"  # the built-in admin whose token is printed at start-up
IMPORT_USER = "import"  # the annotator that labels imported with `app.py import` are recorded under
RUN_IDENTITY = ("dataset", "subset", "seed")  # settings that must match for a database to go on
BUSY_TIMEOUT_S = 10.0  # seconds a connection waits for another process's lock before giving up
SESSION_SECONDS = 14 * 24 * 3600  # a browser's sign-in lasts two weeks at most (then: the link again)
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is cut back to once a checkpoint has emptied it
FILE_MODE = 0o600  # the database (and its WAL, which SQLite creates with the same mode): the owner only


class AnnotatorDBError(UserError):
    """The database cannot be opened or used (locked, damaged, from a newer version)."""


class NotFound(LookupError):
    """The item (or answer) does not exist, or is in no batch."""


class Conflict(RuntimeError):
    """The request contradicts the round's state (e.g. answering a batch that has closed)."""


@dataclass
class FileChanges:
    """What `reconcile_files` found on start: each file's item id, and how the folder changed."""

    item_ids: list[int]  # per pool position, the file's stable item id
    added: list[str]  # new files, given the next ids
    vanished: list[str]  # files the database knows that the folder no longer has
    returned: list[str]  # files that had vanished and are back


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


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the database file, or None when it is gone: a file deleted or replaced under
    a running server has another identity (or none), while open connections still see the old one."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def database_gone_message(path: str) -> str:
    return (f"the database {path!r} was deleted or replaced while the server ran; nothing more can be stored. "
            "Stop the server, put the database back, and start it again")


def make_private(path: str) -> bool:
    """Take the group's and others' read and write bits off the database and its WAL and shared-memory
    files (a database made by an earlier version was 0644); True if any file changed."""
    changed = False
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):
            mode = os.stat(name).st_mode
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
                changed = True
    return changed


class ServerLock:
    """One server per database: an exclusive lock on `DB.lock`, held while the server runs and released by
    the kernel when the process ends in any way (a SIGKILL included), so a stale lock never blocks a restart.
    The file also records that a server ran on this database, so that a database deleted since is noticed
    at the next start instead of being silently replaced by a new, empty run."""

    def __init__(self, db_path: str):
        self.path = db_path + ".lock"
        self.db_path = db_path
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as error:
            raise AnnotatorDBError(f"cannot create the lock file {self.path!r}: {error.strerror}") from None
        try:
            _lock_exclusive(self.fd)
        except OSError:
            record = self._read()
            os.close(self.fd)
            holder = f" (pid {record['pid']})" if isinstance(record.get("pid"), int) else ""
            raise AnnotatorDBError(f"database {db_path!r} is in use by another server{holder}; stop it first, "
                                   "or give this one another --db") from None
        self.previous = self._read()

    def _read(self) -> dict:
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            return json.loads(os.read(self.fd, 4096) or b"{}")
        except (OSError, ValueError):
            return {}

    def check_not_deleted(self) -> None:
        """Refuse to start a new run where a server ran before and the database is now missing."""
        if self.previous.get("served") and not os.path.exists(self.db_path):
            raise AnnotatorDBError(
                f"database {self.db_path!r} is missing, but a server ran on it before (see {self.path!r}): it was "
                f"deleted or moved. Restore it, or delete {self.path!r} to start a new run under that name")

    def mark_served(self, **details) -> None:
        record = json.dumps({"pid": os.getpid(), "served": True, "started": _iso(_now()), **details}).encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, record)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _lock_exclusive(fd: int) -> None:
    """A non-blocking exclusive lock on the whole file; OSError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


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
    """A version number taken by work on another branch; nothing to do on this one."""


def _migrate_to_4(db: sqlite_utils.Database) -> None:
    """Workflow: corrections keep their history, leases per (item, annotator) for overlap, checks."""
    columns = {column.name for column in db["answers"].columns}
    if "source" not in columns:
        db.execute("alter table answers add column source text not null default 'batch'")
    if "answer_history" not in db.table_names():
        db["answer_history"].create({
            "id": int, "answer_id": int, "item_id": int, "annotator_id": int, "round": int, "label": int,
            "source": str, "created": float, "updated": float, "replaced": float, "change": str,
        }, pk="id")
        db["answer_history"].create_index(["item_id"])
    if "users" in db.table_names() and "instructions_seen" not in {c.name for c in db["users"].columns}:
        db.execute("alter table users add column instructions_seen text")
    lease_columns = {column.name for column in db["leases"].columns}
    if "kind" not in lease_columns:  # leases are ephemeral: rebuilt with a key per (item, annotator)
        db.execute("drop table leases")
        db["leases"].create({"item_id": int, "annotator_id": int, "expires": float, "kind": str},
                            pk=("item_id", "annotator_id"),
                            foreign_keys=[("item_id", "items", "id"), ("annotator_id", "users", "id")])
        db["leases"].create_index(["annotator_id"])


def _migrate_to_6(db: sqlite_utils.Database) -> None:
    # The manifest of an image folder: item ids follow file names, not positions in a sorted listing.
    if "files" not in db.table_names():
        db["files"].create({"id": int, "name": str, "added": float, "vanished": float}, pk="id",
                           not_null={"name"})
        db["files"].create_index(["name"], unique=True)


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    # Reliability: server-side sessions (revocable; only a hash of the cookie's id is stored), revoked
    # users, and a counter that orders answers instead of the wall clock. Idempotent.
    if "sessions" not in db.table_names():
        db["sessions"].create({"id_hash": str, "user_id": int, "created": float, "expires": float}, pk="id_hash",
                              not_null={"user_id", "expires"}, foreign_keys=[("user_id", "users", "id")])
        db["sessions"].create_index(["user_id"])
    if "removed" not in db["users"].columns_dict:
        db.execute("alter table users add column removed float")
    if "seq" not in db["answers"].columns_dict:
        db.execute("alter table answers add column seq integer")
        db.execute("update answers set seq = (select count(*) from answers b where b.updated < answers.updated "
                   "or (b.updated = answers.updated and b.id <= answers.id))")
    db["answers"].create_index(["seq"], if_not_exists=True)




def _migrate_to_5(db: sqlite_utils.Database) -> None:
    # Cold start: audit items and their predictions; the stopping signal per trained round. Idempotent.
    batch_columns = db["batch_items"].columns_dict
    if "audit" not in batch_columns:
        db.execute("alter table batch_items add column audit integer not null default 0")
    if "predicted" not in batch_columns:
        db.execute("alter table batch_items add column predicted integer")
    round_columns = db["rounds"].columns_dict
    for name, kind in (("kappa", "real"), ("kappa_mean", "real"), ("stop", "integer")):
        if name not in round_columns:
            db.execute(f"alter table rounds add column {name} {kind}")


MIGRATIONS = {1: _migrate_to_1, 2: _migrate_to_2, 3: _migrate_to_3,
              4: _migrate_to_4,
              5: _migrate_to_5,
              6: _migrate_to_6}


def _create_private(path: str) -> None:
    """Create an empty database file readable by its owner only (SQLite would make it 0644 under the
    usual umask, and its WAL inherits the mode); an existing file is left as it is."""
    if path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


def _read_write_uri(path: str) -> str:
    """A URI that opens an existing database and never creates one (a deleted file stays deleted)."""
    from urllib.parse import quote

    return "file:" + quote(os.path.abspath(path)) + "?mode=rw"


class AnnotationDB:
    """One connection to the annotator database; open one per thread (per request, per worker)."""

    def __init__(self, path: str | Path, timeout: float | None = None, setup: bool = True):
        """`setup=False` skips WAL set-up and migrations: for per-request connections of an app
        that already did both at start-up; such a connection never creates the file (a database
        deleted under a running server is an error, not a new empty database)."""
        self.path = str(path)
        try:
            if setup:
                _create_private(self.path)
            connection = sqlite3.connect(self.path if setup else _read_write_uri(self.path),
                                         timeout=BUSY_TIMEOUT_S if timeout is None else timeout,
                                         isolation_level=None, check_same_thread=False, uri=not setup)
            self.db = sqlite_utils.Database(connection)
            if setup:
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable=True transactions raise it to FULL
            self.db.execute("PRAGMA foreign_keys=ON")
            # A long export holds a read snapshot that keeps checkpoints from emptying the WAL, which then
            # grows; once a checkpoint does empty it, the next commit cuts the file back to this size.
            self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
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
        """The cookie-signing secret, made once and kept, so sign-ins survive a restart. It alone makes
        no session: a cookie must also carry a session id whose hash is in `sessions`."""
        with self.transaction():
            secret = self.get_meta("secret_key")
            if secret is None:
                secret = secrets.token_hex(32)
                self._set_meta("secret_key", secret)
        return secret

    def bind_run(self, settings: dict) -> dict:
        """Store the run's settings on first use; refuse a database that belongs to another run.

        An image folder is identified by its resolved path (`data_root`), and its files by name in the
        `files` manifest (`reconcile_files`), so the folder may grow or lose files; other datasets by
        their pool size. Classes may be added at the end; removing or reordering them is refused.
        Returns the stored settings, updated with what may change (classes, pool size)."""
        with self.transaction():
            stored = self.get_meta("run")
            if stored is None:
                self._set_meta("run", json.dumps(settings, sort_keys=True))
                return settings
            previous = json.loads(stored)
            differing = [k for k in RUN_IDENTITY if previous.get(k) != settings.get(k)]
            if settings.get("data_root") is not None and previous.get("data_root") is not None:
                if previous["data_root"] != settings["data_root"]:
                    differing.append(f"data folder ({previous['data_root']})")
            elif previous.get("data_dir") != settings.get("data_dir"):  # written before data_root was kept
                differing.append("data_dir")
            if settings.get("data_root") is None and previous.get("pool_size") != settings.get("pool_size"):
                differing.append("pool_size")
            if differing:
                raise AnnotatorDBError(f"database {self.path!r} belongs to another run (its {', '.join(differing)} "
                                       f"differ); choose another --db")
            old_classes, new_classes = list(previous.get("classes") or []), list(settings.get("classes") or [])
            if new_classes[:len(old_classes)] != old_classes:
                raise AnnotatorDBError(
                    f"database {self.path!r} has the classes {','.join(old_classes)}: classes may be added at the "
                    f"end (--classes {','.join(old_classes)},NEW), never removed or reordered")
            merged = {**previous, **{k: settings[k] for k in ("classes", "class_option", "pool_size", "data_root")
                                     if k in settings}}
            if merged != previous:
                self._set_meta("run", json.dumps(merged, sort_keys=True))
            return merged

    def unbind_run(self) -> None:
        """Forget the run's settings and manifest while no batch was ever posted (a failed first start),
        so that the corrected command is not refused as "another run"."""
        with self.transaction():
            if self.db.execute("select count(*) from rounds").fetchone()[0] == 0:
                self.db.execute("delete from meta where key = 'run'")
                self.db.execute("delete from files")

    def record_server(self, host: str, port: int) -> None:
        """Where the server listens, for the sign-in links that `app.py users add` prints."""
        self.set_meta("server", json.dumps({"host": host, "port": port}))

    def server_address(self) -> tuple[str, int] | None:
        stored = self.get_meta("server")
        if stored is None:
            return None
        address = json.loads(stored)
        return address["host"], int(address["port"])

    def set_run_setting(self, key: str, value) -> None:
        """Change one stored setting of the run (a strategy change the user asked for)."""
        with self.transaction():
            stored = json.loads(self.get_meta("run") or "{}")
            stored[key] = value
            self._set_meta("run", json.dumps(stored, sort_keys=True))

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
            elif self.db.execute("select token_hash from users where id = ?", [row[0]]).fetchone()[0] \
                    != hash_token(token):  # a new start-up token: the old one's sessions end with it
                self.db.execute("update users set token_hash = ? where id = ?", [hash_token(token), row[0]])
                self.db.execute("delete from sessions where user_id = ?", [row[0]])
        return self.user_for_token(token)

    def add_user(self, name: str, role: str = "annotator") -> str:
        """Add a named annotator; returns their new token (shown once, stored only as a hash)."""
        name = name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise UserError("a user name must be 1 to 64 printable characters")
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; choose from: {', '.join(ROLES)}")
        if name in (OWNER, IMPORT_USER):
            raise UserError(f"the name {name!r} is reserved (start-up token, imported labels)")
        token = secrets.token_urlsafe(24)
        with self.transaction():
            row = self.db.execute("select id, removed from users where name = ?", [name]).fetchone()
            if row is not None and row[1] is None:
                raise UserError(f"a user named {name!r} already exists")
            if row is not None:  # a removed user comes back with a new token (their answers stay theirs)
                self.db.execute("update users set role = ?, token_hash = ?, removed = null where id = ?",
                                [role, hash_token(token), row[0]])
            else:
                self.db.execute("insert into users(name, role, token_hash, created) values (?, ?, ?, ?)",
                                [name, role, hash_token(token), _now()])
        return token

    def remove_user(self, name: str) -> int:
        """Revoke a user: their token stops working and every session of theirs ends at once; their
        answers are kept. Returns the number of sessions ended."""
        if name == OWNER:
            raise UserError(f"{OWNER!r} is the start-up token's user; restart the server with a new --token instead")
        with self.transaction():
            row = self.db.execute("select id from users where name = ? and removed is null", [name]).fetchone()
            if row is None:
                raise UserError(f"no user named {name!r}")
            ended = self.db.execute("delete from sessions where user_id = ?", [row[0]]).rowcount
            self.db.execute("update users set token_hash = null, removed = ? where id = ?", [_now(), row[0]])
        return ended

    def list_users(self) -> list[dict]:
        """Every user that was ever added (a removed one has `removed` set), with their answer count."""
        return list(self.db.query(
            "select u.id, u.name, u.role, u.created, u.removed, count(a.id) as answers from users u "
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

    def instructions_seen(self, user_id: int) -> str | None:
        """The version of the guidelines this user last saw (None: never)."""
        row = self.db.execute("select instructions_seen from users where id = ?", [user_id]).fetchone()
        return row[0] if row else None

    def mark_instructions_seen(self, user_id: int, version: str) -> None:
        with self.transaction(durable=False):
            self.db.execute("update users set instructions_seen = ? where id = ?", [version, user_id])

    def user_by_id(self, user_id: int) -> User | None:
        row = self.db.execute("select id, name, role, token_hash from users where id = ? and removed is null",
                              [user_id]).fetchone()
        return User(*row) if row else None

    # ---------------------------------------------------------------------------------------- sessions

    def create_session(self, user_id: int, now: float | None = None) -> str:
        """A new browser session of this user; returns its random id (for the cookie). Only its SHA-256
        is stored, so the database file does not hold a usable session."""
        now = _now() if now is None else now
        session_id = secrets.token_urlsafe(32)
        with self.transaction():
            self.db.execute("delete from sessions where expires <= ?", [now])
            self.db.execute("insert into sessions(id_hash, user_id, created, expires) values (?, ?, ?, ?)",
                            [hash_token(session_id), user_id, now, now + SESSION_SECONDS])
        return session_id

    def user_for_session(self, session_id: str, now: float | None = None) -> User | None:
        """The user of a live session id, or None (unknown, ended, expired, or the user was removed)."""
        if not session_id:
            return None
        row = self.db.execute(
            "select u.id, u.name, u.role, u.token_hash from sessions s join users u on u.id = s.user_id "
            "where s.id_hash = ? and s.expires > ? and u.removed is null",
            [hash_token(session_id), _now() if now is None else now]).fetchone()
        return User(*row) if row else None

    def end_session(self, session_id: str) -> None:
        """Sign-out: the session is gone for every copy of its cookie."""
        with self.transaction():
            self.db.execute("delete from sessions where id_hash = ?", [hash_token(session_id)])

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

    def overlap(self) -> int:
        """How many different annotators answer each item before it counts as done (--overlap)."""
        return int(self.get_meta("overlap", "1"))

    def label_model(self) -> str:
        """How an item's answers become its training label: "majority" or "dawid-skene"."""
        return self.get_meta("label_model", "majority")

    def close_round_if_complete(self, round_index: int, grace_s: float = 0.0, now: float | None = None) -> bool:
        """Close a labeling round once every item of its batch has `overlap` answers (or skips) and the
        last answer is `grace_s` seconds old (so that the batch's last answer can still be undone)."""
        now = _now() if now is None else now
        with self.transaction():
            row = self.db.execute("select state from rounds where round = ?", [round_index]).fetchone()
            if row is None or row[0] != "labeling":
                return row is not None and row[0] != "labeling"
            if self._remaining(round_index) > 0:
                return False
            last = self.db.execute("select max(updated) from answers where round = ?", [round_index]).fetchone()[0]
            if grace_s > 0 and last is not None and now - last < grace_s:
                return False
            self.db.execute("update rounds set state = 'closed', closed = ? where round = ?", [now, round_index])
            self.db.execute("delete from leases where kind = 'label'")
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

    def _votes(self, where: str = "", params: list | None = None) -> dict[int, list[tuple]]:
        """Non-skip answers per item: (annotator id, label, created, updated, source, round, id, seq), oldest first."""
        rows = self.db.execute(
            "select item_id, annotator_id, label, created, updated, source, round, id, seq from answers "
            f"where label >= 0 {where} order by id", params or []).fetchall()
        votes: dict[int, list[tuple]] = {}
        for item_id, *rest in rows:
            votes.setdefault(item_id, []).append(tuple(rest))
        return votes

    def decide_labels(self, votes: dict[int, list[tuple]], num_classes: int | None = None) -> dict[int, int]:
        """Each item's training label from its answers (as `_votes` gives them): the latest correction
        ("review" answer) if there is one, else the majority of the annotators' answers (ties: the earliest
        answer's label), or with the "dawid-skene" label model the Dawid-Skene estimate."""
        from .agreement import dawid_skene, majority_label

        decided, undecided = {}, {}
        for item, answers in votes.items():
            reviews = [a for a in answers if a[4] == "review"]
            if reviews:
                decided[item] = max(reviews, key=lambda a: (a[7] or 0, a[6]))[1]  # the latest by seq, not clock
                continue
            latest = {}  # one vote per annotator: their latest answer (an item may be in several rounds)
            for answer in answers:
                latest[answer[0]] = answer
            undecided[item] = latest
        if self.label_model() == "dawid-skene" and undecided:
            classes = num_classes or 1 + max(a[1] for item in undecided.values() for a in item.values())
            posteriors = dawid_skene({item: {annotator: a[1] for annotator, a in latest.items()}
                                      for item, latest in undecided.items()}, classes)
            decided.update({item: int(np.argmax(posterior)) for item, posterior in posteriors.items()})
        else:
            # ties: the earliest answer, by insertion order (ids), which a stepped clock cannot reorder
            decided.update({item: majority_label([(a[6], a[1]) for a in latest.values()])
                            for item, latest in undecided.items()})
        return decided

    def training_answers(self, up_to_round: int) -> tuple[list[int], list[int], list[int]]:
        """(items, labels, rounds) for training: per item of rounds <= up_to_round, the label
        `decide_labels` gives (corrections made after a round closed included), and the item's round."""
        votes = self._votes("and round <= ?", [up_to_round])
        labels = self.decide_labels(votes, len((self.run_settings() or {}).get("classes") or []) or None)
        items = sorted(labels)
        return items, [labels[i] for i in items], [min(a[5] for a in votes[i]) for i in items]

    def batch_answers(self, round_index: int) -> list[int]:
        """The training label (as `training_answers` gives it) of each item of the round's batch, in
        pick order; SKIP for an item without one."""
        batch = self.db.execute("select item_id from batch_items where round = ? order by position",
                                [round_index]).fetchall()
        items, labels, _ = self.training_answers(round_index)
        latest = dict(zip(items, labels))
        return [latest.get(row[0], SKIP) for row in batch]

    def _remaining(self, round_index: int) -> int:
        """Items of the round's batch with fewer than `overlap` answers (skips count as answers)."""
        return self.db.execute(
            "select count(*) from batch_items b where b.round = ? and (select count(*) from answers a "
            "where a.item_id = b.item_id and a.round = b.round) < ?", [round_index, self.overlap()]).fetchone()[0]

    def audit_estimates(self) -> list[dict]:
        """Per model (the round whose trained model posted a batch with audit items): its accuracy on
        the answered audit items, predicted before anyone answered them, with the 95% Wilson interval:
        {round, labeled, n, correct, accuracy, low, high}. The answer counted is an item's latest
        non-skip answer in its batch's round."""
        from al_engine.estimate import audit_estimate

        rows = self.db.execute(
            "select b.round, b.predicted, ("
            "  select a.label from answers a where a.item_id = b.item_id and a.round = b.round and a.label >= 0"
            "  order by a.seq desc limit 1) "
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
        """Per class, how many items carry it as their training label."""
        return dict(Counter(self.decide_labels(self._votes()).values()))

    # ---------------------------------------------------------------------------------------- leases

    def lease_cap(self, query_size: int) -> int:
        """The most items one annotator may hold at once: MAX_HELD, and never more than half the batch
        (at least 4, what the page preloads), so that one person cannot take a whole batch away."""
        return max(4, min(MAX_HELD, query_size // 2))

    def lease_tasks(self, user_id: int, count: int = 1, now: float | None = None, checks: bool = False) -> list[int]:
        """Up to `count` items of the open batch for this annotator, leased for LEASE_SECONDS: the ones
        they already hold first, then free ones in the strategy's pick order; never one they answered,
        never one that already has (or is leased towards) `overlap` answers; at most `lease_cap` held.

        With `checks`, when the open batch has nothing for them (the engine trains, or the rest is with
        others), items of closed rounds that they did not answer, for a blind second opinion."""
        now = _now() if now is None else now
        with self.transaction(durable=False):  # a lease lost to a power cut is simply handed out again
            current = self.current_round()
            if current is None or self.is_finished():
                return []
            items: list[int] = []
            if current["state"] == "labeling":
                rows = self.db.execute(
                    "select item_id from (select b.item_id, b.position, "
                    " (select count(*) from answers a where a.item_id = b.item_id and a.round = b.round) as answered, "
                    " (select count(*) from leases l where l.item_id = b.item_id and l.kind = 'label' "
                    "   and l.expires > :now and l.annotator_id != :user) as others, "
                    " exists(select 1 from leases l where l.item_id = b.item_id and l.kind = 'label' "
                    "   and l.expires > :now and l.annotator_id = :user) as mine "
                    " from batch_items b where b.round = :round and not exists (select 1 from answers a "
                    "   where a.item_id = b.item_id and a.round = b.round and a.annotator_id = :user)) "
                    "where answered < :overlap and (mine or answered + others < :overlap) "
                    "order by mine desc, position limit :count",
                    {"round": current["round"], "now": now, "user": user_id, "overlap": self.overlap(),
                     "count": min(count, self.lease_cap(current["query_size"]))}).fetchall()
                items = [row[0] for row in rows]
                kind = "label"
            if not items and checks:
                rows = self.db.execute(
                    "select b.item_id from batch_items b join rounds r on r.round = b.round "
                    "where r.state != 'labeling' and exists (select 1 from answers a where a.item_id = b.item_id "
                    "  and a.round = b.round and a.label >= 0) "
                    "and not exists (select 1 from answers a where a.item_id = b.item_id and a.annotator_id = :user) "
                    "order by exists(select 1 from leases l where l.item_id = b.item_id and l.annotator_id = :user "
                    "  and l.expires > :now) desc, "
                    "(select count(*) from answers a where a.item_id = b.item_id) asc, b.round desc, b.position "
                    "limit :count", {"user": user_id, "now": now, "count": min(count, MAX_HELD)}).fetchall()
                items = [row[0] for row in rows]
                kind = "check"
            for item_id in items:
                self.db.execute("insert into leases(item_id, annotator_id, expires, kind) values (?, ?, ?, ?) "
                                "on conflict(item_id, annotator_id) do update set expires = excluded.expires, "
                                "kind = excluded.kind", [item_id, user_id, now + LEASE_SECONDS, kind])
        return items

    def task_kinds(self, user_id: int, item_ids: list[int]) -> dict[int, str]:
        """"label" or "check" per item this annotator holds."""
        if not item_ids:
            return {}
        marks = ",".join("?" * len(item_ids))
        return dict(self.db.execute(f"select item_id, kind from leases where annotator_id = ? and item_id in ({marks})",
                                    [user_id, *item_ids]).fetchall())

    def renew_leases(self, user_id: int, now: float | None = None) -> int:
        """The heartbeat of an open page: every unexpired lease of this annotator runs LEASE_SECONDS again."""
        now = _now() if now is None else now
        with self.transaction(durable=False):
            return self.db.execute("update leases set expires = ? where annotator_id = ? and expires > ?",
                                   [now + LEASE_SECONDS, user_id, now]).rowcount

    def active_leases(self, now: float | None = None) -> list[dict]:
        """Who holds what (admin page): one row per annotator, their items and when the leases lapse."""
        now = _now() if now is None else now
        rows = self.db.execute(
            "select u.id, u.name, l.kind, group_concat(l.item_id), max(l.expires) from leases l "
            "join users u on u.id = l.annotator_id where l.expires > ? group by u.id, l.kind order by u.name",
            [now]).fetchall()
        return [{"annotator_id": uid, "annotator": name, "kind": kind,
                 "item_ids": sorted(int(i) for i in items.split(",")), "expires_in_s": round(expires - now)}
                for uid, name, kind, items, expires in rows]

    def release_leases(self, user_id: int | None = None, item_id: int | None = None) -> int:
        """Admin: hand one annotator's items (or one item) back to everyone; returns how many."""
        with self.transaction(durable=False):
            if user_id is not None:
                return self.db.execute("delete from leases where annotator_id = ?", [user_id]).rowcount
            if item_id is not None:
                return self.db.execute("delete from leases where item_id = ?", [item_id]).rowcount
            return 0

    def item_in_batches(self, item_id: int) -> bool:
        return self.db.execute("select 1 from batch_items where item_id = ? limit 1", [item_id]).fetchone() is not None

    # ---------------------------------------------------------------------------------------- answers

    def record_answer(self, user_id: int, item_id: int, label: int, time_taken_ms: int | None = None,
                      is_admin: bool = False) -> str:
        """Store an answer before returning: 'created', 'unchanged' (same answer again), 'replaced' (a
        different answer from the same annotator), 'checked' (a second opinion on a closed round's item
        they were handed) or 'corrected' (an answer to a closed round's item: it decides the item's label
        from the next training on). Raises NotFound / Conflict."""
        with self.transaction():
            return self._record_answer(user_id, item_id, label, time_taken_ms, _now(), is_admin)

    def record_answers(self, user_id: int, item_ids: list[int], label: int, is_admin: bool = False) -> list[str]:
        """Grid mode: one label for many items in one transaction, all or nothing (an unknown item, or
        one leased to someone else, raises NotFound / Conflict and records none of them)."""
        now = _now()
        with self.transaction():
            return [self._record_answer(user_id, item_id, label, None, now, is_admin) for item_id in item_ids]

    # Answers are ordered by this counter (inside the write transaction, so it is strictly increasing),
    # never by the clock, which NTP or a person may step back.
    _NEXT_SEQ = "(select coalesce(max(seq), 0) + 1 from answers)"

    def _keep_history(self, answer_id: int, now: float, change: str) -> None:
        self.db.execute("insert into answer_history(answer_id, item_id, annotator_id, round, label, source, created, "
                        "updated, replaced, change) select id, item_id, annotator_id, round, label, source, created, "
                        "updated, ?, ? from answers where id = ?", [now, change, answer_id])

    def _record_answer(self, user_id: int, item_id: int, label: int, time_taken_ms: int | None, now: float,
                       is_admin: bool = False) -> str:
        """One answer, inside the caller's transaction."""
        batch = self.db.execute(
            "select b.round, b.strategy, b.score, b.model_version, r.state from batch_items b "
            "join rounds r on r.round = b.round where b.item_id = ? order by b.round desc limit 1",
            [item_id]).fetchone()
        if batch is None:
            raise NotFound(f"item {item_id} is in no batch")
        round_index, strategy, score, model_version, state = batch
        existing = self.db.execute("select id, label, source from answers where item_id = ? and annotator_id = ? "
                                   "and round = ?", [item_id, user_id, round_index]).fetchone()
        lease = self.db.execute("select kind from leases where item_id = ? and annotator_id = ? and expires > ?",
                                [item_id, user_id, now]).fetchone()
        if state == "labeling":
            source = "batch"
            if existing is None and lease is None and not is_admin:
                answered = self.db.execute("select count(*) from answers where item_id = ? and round = ?",
                                           [item_id, round_index]).fetchone()[0]
                others = self.db.execute("select count(*) from leases where item_id = ? and kind = 'label' "
                                         "and expires > ? and annotator_id != ?", [item_id, now, user_id]).fetchone()[0]
                if others and answered + others >= self.overlap():
                    raise Conflict(f"item {item_id} is leased to another annotator")
        elif label == SKIP:
            raise Conflict(f"item {item_id} belongs to round {round_index}, which is closed: "
                           "a correction must name a class")
        elif existing is None and lease is not None and lease[0] == "check":
            source = "check"  # a blind second opinion while the engine trained: one more vote
        else:
            source = "review"  # a correction: it decides the item's label
        if existing is not None and existing[1] == label and (source != "review" or existing[2] == "review"):
            outcome = "unchanged"
        elif existing is not None:
            self._keep_history(existing[0], now, "corrected" if source == "review" else "replaced")
            self.db.execute("update answers set label = ?, time_taken_ms = coalesce(?, time_taken_ms), updated = ?, "
                            f"source = ?, seq = {self._NEXT_SEQ} where id = ?", [label, time_taken_ms, now, source, existing[0]])
            outcome = "corrected" if source == "review" else "replaced"
        else:
            self.db.execute(
                "insert into answers(item_id, annotator_id, round, label, time_taken_ms, created, updated, "
                f"strategy, score, model_version, source, seq) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {self._NEXT_SEQ})",
                [item_id, user_id, round_index, label, time_taken_ms, now, now, strategy, score, model_version,
                 source])
            outcome = {"batch": "created", "check": "checked", "review": "corrected"}[source]
        self.db.execute("delete from leases where item_id = ? and annotator_id = ?", [item_id, user_id])
        if state == "labeling":
            answered = self.db.execute("select count(*) from answers where item_id = ? and round = ?",
                                       [item_id, round_index]).fetchone()[0]
            if answered >= self.overlap():
                self.db.execute("delete from leases where item_id = ? and kind = 'label'", [item_id])
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
                raise Conflict(f"the round of item {item_id} is closed: answer it again to correct it "
                               "(the correction is used from the next training on)")
            now = _now()
            self._keep_history(row[0], now, "undone")
            self.db.execute("delete from answers where id = ?", [row[0]])
            self.db.execute("insert into leases(item_id, annotator_id, expires, kind) values (?, ?, ?, 'label') "
                            "on conflict(item_id, annotator_id) do update set expires = excluded.expires, "
                            "kind = 'label'", [item_id, user_id, now + LEASE_SECONDS])

    def answer_history(self, item_id: int) -> list[dict]:
        """Every earlier version of the item's answers (replaced, corrected, undone), oldest first."""
        return list(self.db.query("select h.*, u.name as annotator from answer_history h join users u "
                                  "on u.id = h.annotator_id where h.item_id = ? order by h.id", [item_id]))

    def agreement(self, classes: list[str]) -> dict:
        """Agreement between annotators (GET /api/agreement, the dashboard): see agreement_report."""
        from .agreement import agreement_report

        names = dict(self.db.execute("select id, name from users").fetchall())
        answers = {item: {names[a[0]]: a[1] for a in votes} for item, votes in self._votes().items()}
        return agreement_report(answers, classes)

    def recent_answers(self, user_id: int, limit: int = 10) -> list[dict]:
        """This annotator's latest answers (skips included), newest first: the labeling page's history."""
        return list(self.db.query(
            "select a.item_id, a.label, a.round, a.updated, a.source, r.state from answers a "
            "join rounds r on r.round = a.round where a.annotator_id = ? order by a.updated desc, a.id desc limit ?",
            [user_id, limit]))

    def review_items(self, label: int | None = None, annotator_id: int | None = None, round_index: int | None = None,
                     disagreements: bool = False, conflicts: bool = False, limit: int = 48,
                     offset: int = 0) -> tuple[list[dict], int]:
        """Items for the review page, newest answer first, with every answer and the training label.

        Filters: an answer with this class / by this annotator / in this round; `disagreements`: the
        item's answers name more than one class; `conflicts`: disagreements no correction has settled."""
        where, params = ["a.label >= 0"], []
        if label is not None:
            where.append("a.label = ?")
            params.append(label)
        if annotator_id is not None:
            where.append("a.annotator_id = ?")
            params.append(annotator_id)
        if round_index is not None:
            where.append("a.round = ?")
            params.append(round_index)
        having = ""
        if disagreements or conflicts:
            where.append("a.item_id in (select item_id from answers where label >= 0 group by item_id "
                         "having count(distinct label) > 1)")
        if conflicts:
            where.append("a.item_id not in (select item_id from answers where source = 'review')")
        sql = f"select a.item_id, max(a.updated) as last from answers a where {' and '.join(where)} group by a.item_id{having}"
        total = self.db.execute(f"select count(*) from ({sql})", params).fetchone()[0]
        rows = self.db.execute(sql + " order by last desc, a.item_id limit ? offset ?", [*params, limit, offset]).fetchall()
        item_ids = [r[0] for r in rows]
        if not item_ids:
            return [], total
        marks = ",".join("?" * len(item_ids))
        decided = self.decide_labels(self._votes(f"and item_id in ({marks})", item_ids))
        names = dict(self.db.execute("select id, name from users").fetchall())
        files = dict(self.db.execute(f"select id, file_name from items where id in ({marks})", item_ids).fetchall())
        answers: dict[int, list[dict]] = {i: [] for i in item_ids}
        for row in self.db.execute(f"select item_id, annotator_id, label, round, source, updated from answers "
                                   f"where item_id in ({marks}) order by id", item_ids).fetchall():
            answers[row[0]].append({"annotator": names.get(row[1], "?"), "annotator_id": row[1], "label": row[2],
                                    "round": row[3], "source": row[4], "time": _iso(row[5])})
        return [{"item_id": i, "file_name": files.get(i), "label": decided.get(i), "answers": answers[i],
                 "disagreement": len({a["label"] for a in answers[i] if a["label"] >= 0}) > 1} for i in item_ids], total

    def answers_of(self, item_id: int) -> list[dict]:
        return list(self.db.query("select a.*, u.name as annotator from answers a join users u "
                                  "on u.id = a.annotator_id where a.item_id = ? order by a.id", [item_id]))

    # ---------------------------------------------------------------------------------------- files

    def known_files(self) -> list[str]:
        """The manifest's file names in item-id order (vanished ones included): the order a restart
        loads the folder in, so earlier items keep their pool positions."""
        return [row[0] for row in self.db.execute("select name from files order by id")]

    def reconcile_files(self, names: list[str]) -> "FileChanges":
        """Give each of the folder's files (`names`, in pool order) its stable item id: known names keep
        theirs, new names get the next ids. Files the manifest knows but the folder lacks are marked
        vanished; their answers stay, and unanswered ones leave the open batch.

        A database written before the manifest existed used the pool position as the id: its items'
        stored file names must still sit at those positions, else the folder changed and it is refused."""
        now = _now()
        with self.transaction():
            known = {name: item_id for item_id, name in self.db.execute("select id, name from files")}
            if not known:
                legacy = self.db.execute("select id, file_name from items where file_name is not null").fetchall()
                moved = [(i, n) for i, n in legacy if i >= len(names) or names[i] != n]
                if moved:
                    item_id, name = moved[0]
                    raise AnnotatorDBError(
                        f"database {self.path!r} was written by an older version whose item {item_id} is {name!r}, "
                        f"but the folder has changed since ({len(moved)} item(s) moved); start once with the folder "
                        f"as it was, or choose another --db")
                self.db.conn.executemany("insert into files(id, name, added) values (?, ?, ?)",
                                    [(i, name, now) for i, name in enumerate(names)])
                return FileChanges(item_ids=list(range(len(names))), added=[], vanished=[], returned=[])
            present = set(names)
            answered = self.db.execute("select count(*) from answers").fetchone()[0]
            if answered and not present & known.keys():
                raise AnnotatorDBError(f"none of the {len(known)} files of database {self.path!r} is in the data "
                                       f"folder; is it the right folder? (or choose another --db)")
            next_id = max(known.values()) + 1
            item_ids, added = [], []
            for name in names:
                if name not in known:
                    known[name] = next_id
                    added.append((next_id, name, now))
                    next_id += 1
                item_ids.append(known[name])
            self.db.conn.executemany("insert into files(id, name, added) values (?, ?, ?)", added)
            was_vanished = {row[0] for row in self.db.execute("select name from files where vanished is not null")}
            vanished = sorted(name for name in known if name not in present)
            returned = sorted(was_vanished & present)
            self.db.conn.executemany("update files set vanished = null where name = ?", [(n,) for n in returned])
            self.db.conn.executemany("update files set vanished = coalesce(vanished, ?) where name = ?",
                                [(now, n) for n in vanished])
            self._drop_vanished_from_open_batch([known[n] for n in vanished])
        return FileChanges(item_ids=item_ids, added=[name for _, name, _ in added], vanished=vanished,
                           returned=returned)

    def _drop_vanished_from_open_batch(self, item_ids: list[int]) -> None:
        """An open batch cannot wait for pictures that are gone: their unanswered items leave it."""
        current = self.current_round()
        if current is None or current["state"] != "labeling" or not item_ids:
            return
        for item_id in item_ids:
            self.db.execute("delete from batch_items where round = ? and item_id = ? and not exists "
                            "(select 1 from answers a where a.item_id = ? and a.round = ?)",
                            [current["round"], item_id, item_id, current["round"]])
            self.db.execute("delete from leases where item_id = ?", [item_id])
        size = self.db.execute("select count(*) from batch_items where round = ?", [current["round"]]).fetchone()[0]
        self.db.execute("update rounds set query_size = ? where round = ?", [size, current["round"]])

    def vanished_files(self) -> list[str]:
        return [row[0] for row in self.db.execute("select name from files where vanished is not null order by name")]

    def file_ids(self) -> dict[str, int]:
        return {name: item_id for item_id, name in self.db.execute("select id, name from files")}

    def import_labels(self, labels: list[tuple[int, int]]) -> int:
        """Record (item id, class index) pairs as answers of the `import` annotator, in the current round:
        they count as labeled from the next training on, appear in exports and are never queried.
        Importing an item again replaces its imported label. Returns how many were recorded."""
        now = _now()
        with self.transaction():
            current = self.current_round()
            if current is None:
                raise AnnotatorDBError(f"database {self.path!r} has no round yet: start the annotator on it once "
                                       f"before importing")
            row = self.db.execute("select id from users where name = ?", [IMPORT_USER]).fetchone()
            if row is None:
                user_id = self.db.execute("insert into users(name, role, token_hash, created) values (?, 'annotator', "
                                          "null, ?)", [IMPORT_USER, now]).lastrowid
            else:
                user_id = row[0]
            names = dict(self.db.execute("select id, name from files"))
            round_index = current["round"]
            for item_id, label in labels:
                self.db.execute("insert into items(id, file_name) values (?, ?) on conflict(id) do nothing",
                                [item_id, names.get(item_id)])
                self.db.execute(
                    "insert into answers(item_id, annotator_id, round, label, time_taken_ms, created, updated, "
                    f"strategy, seq) values (?, ?, ?, ?, null, ?, ?, 'import', {self._NEXT_SEQ}) "
                    "on conflict(item_id, annotator_id, round) "
                    f"do update set label = excluded.label, updated = excluded.updated, seq = {self._NEXT_SEQ}",
                    [item_id, user_id, round_index, label, now, now])
        return len(labels)

    # ---------------------------------------------------------------------------------------- export

    EXPORT_FIELDS = ("item", "pool_index", "file_name", "label", "label_index", "annotator", "time",
                     "time_taken_ms", "round", "strategy", "score", "model_version")

    def iter_export(self, classes: list[str], latest_only: bool = False, chunk: int = 1000) -> Iterator[dict]:
        """Every non-skip answer (or, with latest_only, the latest per item), streamed in chunks
        from one read snapshot so that 100k answers never sit in memory at once."""
        where = "a.label >= 0"
        sql = ("select a.id, a.item_id, i.file_name, a.label, u.name, a.updated, a.time_taken_ms, a.round, "
               "a.strategy, a.score, a.model_version, a.seq from answers a join items i on i.id = a.item_id "
               f"join users u on u.id = a.annotator_id where {where}")
        if latest_only:
            sql = (f"select * from (select *, row_number() over (partition by item_id order by seq desc)"
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
            # The snapshot held the WAL back from checkpoints while it lasted: checkpoint now, without waiting
            # for anyone, so that the next commit can restart the WAL and cut it back to WAL_SIZE_LIMIT.
            with contextlib.suppress(sqlite3.Error):
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.close()
