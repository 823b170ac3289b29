"""
Tests for L{ollamamq.store}: schema versions and migrations, refusing unusable files,
round trips of every override, and queries off the reactor thread.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ollamamq import store
from ollamamq.store import (
    SCHEMA_VERSION,
    BackendOverride,
    State,
    Store,
    StoreError,
    StoreService,
    UserOverride,
    loadState,
)


class LoadTests(SynchronousTestCase):
    """
    L{loadState}: the startup read, with its checks and migrations.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()

    def test_newFile(self) -> None:
        """
        A missing file is created mode 0600 at the current version, in WAL mode, and is
        empty.
        """
        self.assertEqual(loadState(self.path), State())
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_migrateFromVersion1(self) -> None:
        """
        A version 1 file (user policy and blocks, no backend table) is migrated step by
        step; its rows are kept and the new table is usable.
        """
        connection = sqlite3.connect(self.path, isolation_level=None)
        for statement in store.MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("PRAGMA user_version=1")
        connection.execute(
            "INSERT INTO user_policy VALUES ('alice', 'vip', NULL, 5, 1, 0)"
        )
        connection.execute("INSERT INTO address_blocks VALUES ('10.0.0.0/8', 0)")
        connection.close()
        state = loadState(self.path)
        self.assertEqual(
            state.users,
            {"alice": UserOverride("alice", priority="vip", maxQueued=5, blocked=True)},
        )
        self.assertEqual(state.blocks, ("10.0.0.0/8",))
        self.assertEqual(state.backends, {})
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0],
                         store.SCHEMA_VERSION)
        connection.execute("SELECT name, url, draining FROM backend_overrides").fetchall()

    def test_failedMigrationLeavesFileAlone(self) -> None:
        """
        A migration step that fails rolls back every step: the file keeps its version and
        tables, and startup is told why.
        """
        connection = sqlite3.connect(self.path, isolation_level=None)
        for statement in store.MIGRATIONS[0]:
            connection.execute(statement)
        # A table in the way of step 2.
        connection.execute("CREATE TABLE backend_overrides (x)")
        connection.execute("PRAGMA user_version=1")
        connection.close()
        error = self.assertRaises(StoreError, loadState, self.path)
        self.assertIn(self.path, str(error))
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], 1)

    def test_newerVersionRefused(self) -> None:
        """
        A file from a newer ollamamq is refused, naming the versions, and left unchanged.
        """
        connection = sqlite3.connect(self.path)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        connection.close()
        error = self.assertRaises(StoreError, loadState, self.path)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1} is newer", str(error))
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(
            connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION + 1
        )

    def test_corruptFileRefused(self) -> None:
        """
        A file that is not SQLite is refused with a clear error and not overwritten.
        """
        garbage = b"this is not a database, just some text\n" * 200
        with open(self.path, "wb") as f:
            f.write(garbage)
        error = self.assertRaises(StoreError, loadState, self.path)
        self.assertIn("is not a usable SQLite database", str(error))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_unopenable(self) -> None:
        """
        A path in a missing directory is a clear error.
        """
        error = self.assertRaises(StoreError, loadState, self.mktemp() + "/missing/x.db")
        self.assertIn("cannot open state file", str(error))


class StoreTests(TestCase):
    """
    L{Store} on a real thread: writes round-trip, and run off the reactor thread.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        loadState(self.path)
        self.store = Store(self.path, Clock(), reactor)
        self.service = StoreService(self.store)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    async def test_offReactorThread(self) -> None:
        """
        Interactions run on a thread that is not the reactor's.
        """
        reactorThread = threading.get_ident()
        seen = await self.store.runInteraction(lambda cursor: threading.get_ident())
        self.assertNotEqual(seen, reactorThread)

    async def test_roundTrip(self) -> None:
        """
        Every kind of override written is read back; deletes remove them; an empty user
        override deletes the row.
        """
        await self.store.putUser(UserOverride("alice", priority="vip", weight=2.5))
        await self.store.putUser(UserOverride("bob", blocked=False, maxQueued=3))
        await self.store.putUser(UserOverride("carol", blocked=True))
        await self.store.putUser(UserOverride("carol"))
        await self.store.putBlock("10.0.0.0/8")
        await self.store.putBlock("192.0.2.7/32")
        await self.store.deleteBlock("10.0.0.0/8")
        added = BackendOverride("gpu9", url="http://gpu9:11434", slots=2, added=True)
        await self.store.putBackend(added)
        await self.store.putBackend(BackendOverride("gpu1", draining=True))
        await self.store.putBackend(BackendOverride("gpu2", removed=True))
        await self.store.deleteBackend("gpu2")
        state = await self.store.readState()
        self.assertEqual(
            state.users,
            {
                "alice": UserOverride("alice", priority="vip", weight=2.5),
                "bob": UserOverride("bob", blocked=False, maxQueued=3),
            },
        )
        self.assertEqual(state.blocks, ("192.0.2.7/32",))
        self.assertEqual(
            state.backends,
            {"gpu9": added, "gpu1": BackendOverride("gpu1", draining=True)},
        )
        self.assertEqual(loadState(self.path), state)

    async def test_failedInteractionRollsBack(self) -> None:
        """
        An interaction that raises leaves nothing behind, and the store keeps working.
        """

        def half(cursor: object) -> None:
            cursor.execute("INSERT INTO address_blocks VALUES ('10.0.0.1/32', 0)")
            raise ValueError("boom")

        with self.assertRaises(ValueError):
            await self.store.runInteraction(half)
        await self.store.putBlock("10.0.0.2/32")
        state = await self.store.readState()
        self.assertEqual(state.blocks, ("10.0.0.2/32",))

    def test_notStarted(self) -> None:
        """
        Using a store that was never started is a programming error, said plainly.
        """
        self.assertRaises(RuntimeError, Store(self.path, Clock()).runInteraction, id)
