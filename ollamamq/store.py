# -*- test-case-name: tests.test_store -*-
"""
The daemon's persistent state: one SQLite file (C{--state}, default C{ollamamq.db}).

What it keeps
=============

Every runtime override an operator made through the control plane, so that a restart
(SIGTERM, a crash, a reboot) does not undo it:

  - C{user_policy}: per user, the runtime priority, weight, C{max_queued} and block. A
    C{NULL} column means "no runtime value": the config's value (or the default) applies.
  - C{address_blocks}: blocked addresses and CIDR ranges (normalised network text).
  - C{backend_overrides}: backends added at runtime (C{url}, C{slots}), configured
    backends removed, drained or given other slots at runtime.

Config values are the defaults; a runtime value wins until it is cleared (C{DELETE
/proxy/users/{id}}, L{ollamamq.control.amp.ClearUser}, unblocking, undraining).

Threads
=======

At startup, before the reactor runs, L{loadState} opens the file on the calling thread,
checks and migrates it, and reads the overrides, so the daemon serves no request before
its blocks apply, and a bad file stops startup with a clear L{StoreError}. While the
daemon runs, every query goes through L{Store}: a L{twisted.enterprise.adbapi}
connection pool with one connection on one thread of its own (SQLite wants one writer;
one thread also keeps the writes in the order the reactor made them), so the reactor
never waits for the disk. The file is in WAL mode with C{synchronous=NORMAL}: a write
is one append to the log, readers never block it.

Schema versions and migrations
==============================

The schema version is C{PRAGMA user_version}. L{MIGRATIONS} lists, for each version,
the statements that bring the previous version to it; opening an older file applies the
missing steps in order inside one transaction, so a file is never left half-migrated. A
file with a newer version than L{SCHEMA_VERSION} (written by a newer ollamamq) or that
is not an SQLite database at all is refused with a L{StoreError} naming the file: it is
never silently reset.

Adding a table (the request log, minted API keys, ...): append one entry to
L{MIGRATIONS} with its C{CREATE TABLE} (and indexes), which raises L{SCHEMA_VERSION} by
one; then write the queries as functions of a cursor and run them with
L{Store.runInteraction}, from the module that owns the concept (C{usage.py},
C{identity.py}). The same file, the same thread, one more table: never a second database.
Branches that add tables at the same time each append a step; when they merge, the steps
are renumbered in merge order (a step already released is never edited).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

T = TypeVar("T")

MIGRATIONS: list[tuple[str, ...]] = [
    # Version 1: user policy and address blocks.
    (
        """
        CREATE TABLE user_policy (
            user TEXT PRIMARY KEY,
            priority TEXT,
            weight REAL,
            max_queued INTEGER,
            blocked INTEGER,
            changed REAL NOT NULL
        )
        """,
        """
        CREATE TABLE address_blocks (
            network TEXT PRIMARY KEY,
            changed REAL NOT NULL
        )
        """,
    ),
    # Version 2: backends added, removed, drained or resized at runtime.
    (
        """
        CREATE TABLE backend_overrides (
            name TEXT PRIMARY KEY,
            url TEXT,
            slots INTEGER,
            draining INTEGER,
            added INTEGER NOT NULL DEFAULT 0,
            removed INTEGER NOT NULL DEFAULT 0,
            changed REAL NOT NULL
        )
        """,
    ),
    # Version 3: the request log (ollamamq.requestlog): one row per finished request, no
    # prompt or response text.
    (
        """
        CREATE TABLE request_log (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,
            request_id TEXT NOT NULL,
            user TEXT NOT NULL,
            peer TEXT,
            route TEXT NOT NULL,
            model TEXT,
            backend TEXT,
            queue_wait REAL,
            first_byte REAL,
            duration REAL NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            bytes INTEGER NOT NULL,
            status INTEGER NOT NULL,
            cancelled INTEGER NOT NULL,
            failovers INTEGER NOT NULL
        )
        """,
        "CREATE INDEX request_log_time ON request_log (time)",
    ),
    # Version 4: API keys minted at runtime, as SHA-256 digests only (ollamamq.keys).
    (
        """
        CREATE TABLE api_keys (
            prefix TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            created REAL NOT NULL
        )
        """,
        "CREATE INDEX api_keys_user ON api_keys (user)",
    ),
]
"""
Step C{i} (0-based) brings a file from version C{i} to version C{i + 1}.
"""

SCHEMA_VERSION = len(MIGRATIONS)
"""
The version this code writes and understands.
"""


class StoreError(Exception):
    """
    The state file cannot be used (not a database, from a newer ollamamq, unreadable); the
    message names the file and what to do.
    """


@attrs.frozen
class UserOverride:
    """
    A user's runtime policy; L{None} fields have no runtime value.
    """

    user: str
    priority: str | None = None
    weight: float | None = None
    maxQueued: int | None = None
    blocked: bool | None = None

    def isEmpty(self) -> bool:
        """
        Whether no field has a runtime value.
        """
        return (self.priority, self.weight, self.maxQueued, self.blocked) == (None,) * 4


@attrs.frozen
class BackendOverride:
    """
    A backend's runtime changes.

    @ivar added: added at runtime (then C{url} and C{slots} say what it is).
    @ivar removed: a configured backend removed at runtime.
    @ivar slots: slots set at runtime, or L{None}.
    @ivar draining: drained (or undrained) at runtime, or L{None}.
    """

    name: str
    url: str | None = None
    slots: int | None = None
    draining: bool | None = None
    added: bool = False
    removed: bool = False


@attrs.frozen
class State:
    """
    Everything L{loadState} read from the file.
    """

    users: dict[str, UserOverride] = attrs.field(factory=dict)
    blocks: tuple[str, ...] = ()
    backends: dict[str, BackendOverride] = attrs.field(factory=dict)


def _configure(connection: sqlite3.Connection) -> None:
    """
    Per-connection settings: WAL, normal syncing (durable at checkpoints, never corrupt),
    foreign keys.
    """
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")


def migrate(connection: sqlite3.Connection, path: str) -> int:
    """
    Bring the database on C{connection} to L{SCHEMA_VERSION}, step by step in one
    transaction.

    @return: the version the file had.
    @raise StoreError: when the file is not a database or is newer than this code.
    """
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state file {path}: schema version {version} is newer than this ollamamq "
                f"understands ({SCHEMA_VERSION}); upgrade ollamamq or point --state elsewhere"
            )
        if version < SCHEMA_VERSION:
            # Explicit transaction: DDL and the version bump commit together or not at all.
            connection.execute("BEGIN IMMEDIATE")
            try:
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return version
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"state file {path} is not a usable SQLite database ({e}); "
            "move it away to start with no saved state"
        ) from None


def _connect(path: str) -> sqlite3.Connection:
    """
    Open C{path} (created when missing) with the store's settings, migrated.

    @raise StoreError: as L{migrate}, or when the file cannot be opened.
    """
    try:
        # Created private: it will hold keys (see the module docstring); SQLite gives its
        # -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as e:
        raise StoreError(f"cannot open state file {path}: {e.strerror}") from None
    try:
        # Autocommit mode: migrate() manages its transaction explicitly; adbapi's
        # interactions commit through connection.commit(), a no-op here, and each of
        # their statements is atomic on its own or wrapped by the caller.
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open state file {path}: {e}") from None
    try:
        _configure(connection)
        migrate(connection, path)
    except sqlite3.DatabaseError as e:
        connection.close()
        raise StoreError(
            f"state file {path} is not a usable SQLite database ({e}); "
            "move it away to start with no saved state"
        ) from None
    except BaseException:
        connection.close()
        raise
    return connection


def _readState(cursor: Any) -> State:
    """
    Read every override with C{cursor}.
    """
    users = {}
    for user, priority, weight, maxQueued, blocked in cursor.execute(
        "SELECT user, priority, weight, max_queued, blocked FROM user_policy"
    ).fetchall():
        users[user] = UserOverride(
            user=user,
            priority=priority,
            weight=weight,
            maxQueued=maxQueued,
            blocked=None if blocked is None else bool(blocked),
        )
    blocks = tuple(
        row[0]
        for row in cursor.execute("SELECT network FROM address_blocks ORDER BY changed, network")
    )
    backends = {}
    for name, url, slots, draining, added, removed in cursor.execute(
        "SELECT name, url, slots, draining, added, removed FROM backend_overrides"
        " ORDER BY changed, name"
    ).fetchall():
        backends[name] = BackendOverride(
            name=name,
            url=url,
            slots=slots,
            draining=None if draining is None else bool(draining),
            added=bool(added),
            removed=bool(removed),
        )
    return State(users=users, blocks=blocks, backends=backends)


def loadState(path: str) -> State:
    """
    Open, check and migrate the state file on the calling thread and read every override.
    For startup only, before the reactor runs.

    @raise StoreError: when the file cannot be used.
    """
    connection = _connect(path)
    try:
        return _readState(connection.cursor())
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"state file {path} is not a usable SQLite database ({e}); "
            "move it away to start with no saved state"
        ) from None
    finally:
        connection.close()


class Store:
    """
    The state file while the daemon runs: every query on the store's own thread.

    Writes are fire-and-wait: each method returns a L{Deferred} that fires once the row
    is on disk (in the WAL), in the order the calls were made.
    """

    def __init__(self, path: str, clock: Any, reactor: Any = None) -> None:
        """
        @param path: the SQLite file.
        @param clock: supplies C{seconds()} for the C{changed} columns.
        @param reactor: the reactor the pool's results are delivered on (the global one
            by default).
        """
        self.path = path
        self._clock = clock
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None

    def start(self) -> None:
        """
        Start the store's thread; the connection opens (and migrates) there on first use.
        """
        if self._pool is not None:
            return
        kwargs: dict[str, Any] = {}
        if self._reactor is not None:
            kwargs["cp_reactor"] = self._reactor
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_noisy=False,
            cp_openfun=self._open,
            **kwargs,
        )
        self._pool.start()

    def _open(self, connection: sqlite3.Connection) -> None:
        """
        Set up a new connection (on the store's thread).
        """
        _configure(connection)
        migrate(connection, self.path)

    def close(self) -> None:
        """
        Finish the queued queries, close the connection, stop the thread.
        """
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def runInteraction(self, fn: Callable[..., T], *args: Any, **kw: Any) -> Deferred[T]:
        """
        Run C{fn(cursor, *args, **kw)} on the store's thread inside a transaction
        (committed when it returns, rolled back when it raises); for the modules that own
        a table of their own (see the module docstring).
        """
        if self._pool is None:
            raise RuntimeError("the store is not started")
        return self._pool.runInteraction(self._transaction, fn, *args, **kw)

    @staticmethod
    def _transaction(txn: Any, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """
        One explicit transaction around C{fn} (the connection is in autocommit mode).
        """
        txn.execute("BEGIN")
        try:
            result = fn(txn, *args, **kw)
        except BaseException:
            txn.execute("ROLLBACK")
            raise
        txn.execute("COMMIT")
        return result

    def readState(self) -> Deferred[State]:
        """
        Every override, read on the store's thread.
        """
        return self.runInteraction(_readState)

    def putUser(self, override: UserOverride) -> Deferred[None]:
        """
        Save a user's runtime policy (an empty one deletes the row).
        """
        if override.isEmpty():
            return self.deleteUser(override.user)
        blocked = None if override.blocked is None else int(override.blocked)
        return self.runInteraction(
            _execute,
            "INSERT OR REPLACE INTO user_policy"
            " (user, priority, weight, max_queued, blocked, changed) VALUES (?, ?, ?, ?, ?, ?)",
            (override.user, override.priority, override.weight, override.maxQueued, blocked,
             self._clock.seconds()),
        )

    def deleteUser(self, user: str) -> Deferred[None]:
        """
        Forget a user's runtime policy.
        """
        return self.runInteraction(_execute, "DELETE FROM user_policy WHERE user = ?", (user,))

    def putBlock(self, network: str) -> Deferred[None]:
        """
        Save an address block.
        """
        return self.runInteraction(
            _execute,
            "INSERT OR REPLACE INTO address_blocks (network, changed) VALUES (?, ?)",
            (network, self._clock.seconds()),
        )

    def deleteBlock(self, network: str) -> Deferred[None]:
        """
        Forget an address block.
        """
        return self.runInteraction(
            _execute, "DELETE FROM address_blocks WHERE network = ?", (network,)
        )

    def putBackend(self, override: BackendOverride) -> Deferred[None]:
        """
        Save a backend's runtime changes.
        """
        draining = None if override.draining is None else int(override.draining)
        return self.runInteraction(
            _execute,
            "INSERT OR REPLACE INTO backend_overrides"
            " (name, url, slots, draining, added, removed, changed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (override.name, override.url, override.slots, draining, int(override.added),
             int(override.removed), self._clock.seconds()),
        )

    def deleteBackend(self, name: str) -> Deferred[None]:
        """
        Forget a backend's runtime changes.
        """
        return self.runInteraction(
            _execute, "DELETE FROM backend_overrides WHERE name = ?", (name,)
        )


def _execute(cursor: Any, statement: str, parameters: tuple) -> None:
    """
    Run one statement (on the store's thread).
    """
    cursor.execute(statement, parameters)


class StoreService(service.Service):
    """
    Starts the store's thread with the daemon and closes the file when it stops (after
    the services started later, which may still write while stopping, have stopped).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> None:
        super().stopService()
        self.store.close()
