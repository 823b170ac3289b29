"""
Tests for L{ollamamq.requestlog}: batched writes, retention, usage totals and the access
line.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ollamamq.store import Store, migrate
from ollamamq.requestlog import (
    RequestLog,
    RequestRecord,
    insertRows,
    logAccess,
    usageTotals,
)


def record(**changes: Any) -> RequestRecord:
    """
    A finished request's record, with C{changes}.
    """
    fields: dict[str, Any] = dict(
        time=1_000_000.0, requestId="r1", user="alice", peer="127.0.0.1",
        route="/api/chat", model="llama3:latest", backend="gpu1", queueWait=0.5,
        firstByte=0.25, duration=2.0, promptTokens=10, completionTokens=20, bytes=300,
        status=200,
    )
    fields.update(changes)
    return RequestRecord(**fields)


class InlineStore:
    """
    A store double whose interactions run at once on an in-memory database, on the
    calling thread (the real store runs them on its database thread), and that can be
    held to show batching.
    """

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        migrate(self.db, ":memory:")
        self.calls = 0
        self.held: list[tuple[Deferred[Any], Any, tuple]] = []
        self.hold = False
        self.broken = False

    def runInteraction(self, fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.broken:
            return fail(sqlite3.OperationalError("disk I/O error"))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, fn, args))
            return d
        result = fn(self.db.cursor(), *args, **kwargs)
        self.db.commit()
        return succeed(result)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, fn, args in held:
            result = fn(self.db.cursor(), *args)
            self.db.commit()
            d.callback(result)

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM request_log").fetchone()[0]


class RequestLogTests(SynchronousTestCase):
    """
    L{RequestLog} batches rows and deletes old ones.
    """

    def setUp(self) -> None:
        self.store = InlineStore()
        self.clock = Clock()
        self.now = 1_000_000.0
        self.log = RequestLog(self.store.runInteraction, self.clock, retentionDays=1,
                              batchSize=3, interval=1.0, wallClock=lambda: self.now)

    def test_batchBySize(self) -> None:
        """
        Rows are written together once C{batchSize} are pending, not one by one.
        """
        self.log.add(record(requestId="a"))
        self.log.add(record(requestId="b"))
        self.assertEqual((self.store.calls, self.store.count()), (0, 0))
        self.log.add(record(requestId="c"))
        self.assertEqual((self.store.calls, self.store.count()), (1, 3))

    def test_batchByTime(self) -> None:
        """
        Pending rows are written within C{interval} seconds.
        """
        self.log.startService()
        self.log.add(record())
        self.assertEqual(self.store.count(), 0)
        self.clock.advance(1.0)
        self.assertEqual(self.store.count(), 1)
        self.successResultOf(self.log.stopService())

    def test_oneWriteAtATime(self) -> None:
        """
        Rows that arrive while a batch is being written wait for the next batch.
        """
        self.store.hold = True
        for i in range(3):
            self.log.add(record(requestId=str(i)))
        for i in range(3, 6):
            self.log.add(record(requestId=str(i)))
        self.assertEqual(len(self.store.held), 1)
        done = self.log.flush()
        self.store.release()
        self.store.release()
        self.successResultOf(done)
        self.assertEqual(self.store.count(), 6)

    def test_stopWritesTheRest(self) -> None:
        """
        Stopping the service writes what is pending.
        """
        self.log.startService()
        self.log.add(record())
        self.successResultOf(self.log.stopService())
        self.assertEqual(self.store.count(), 1)

    def test_fields(self) -> None:
        """
        Every field of the record is stored; cancelled and failed-over requests say so.
        """
        self.log.add(record(cancelled=True, failovers=2, status=499, promptTokens=None,
                            completionTokens=None, firstByte=None))
        self.successResultOf(self.log.flush())
        row = self.store.db.execute(
            "SELECT request_id, user, peer, route, model, backend, queue_wait, first_byte, "
            "duration, prompt_tokens, completion_tokens, bytes, status, cancelled, failovers "
            "FROM request_log").fetchone()
        self.assertEqual(row, ("r1", "alice", "127.0.0.1", "/api/chat", "llama3:latest",
                               "gpu1", 0.5, None, 2.0, None, None, 300, 499, 1, 2))

    def test_retention(self) -> None:
        """
        Rows older than the retention are deleted by the loop, newer ones kept.
        """
        self.log.add(record(time=self.now - 86400 - 1, requestId="old"))
        self.log.add(record(time=self.now - 10, requestId="new"))
        self.successResultOf(self.log.flush())
        self.log.startService()
        self.clock.advance(1.0)
        self.assertEqual(
            [r[0] for r in self.store.db.execute("SELECT request_id FROM request_log")],
            ["new"],
        )
        self.successResultOf(self.log.stopService())

    def test_retentionChanged(self) -> None:
        """
        A new retention (a config reload) applies to the next deletion.
        """
        self.log.add(record(time=self.now - 3 * 86400))
        self.successResultOf(self.log.flush())
        self.log.retentionDays = 7
        self.assertEqual(self.successResultOf(self.log.prune()), 0)
        self.log.retentionDays = 2
        self.assertEqual(self.successResultOf(self.log.prune()), 1)

    def test_noRetention(self) -> None:
        """
        Without a retention nothing is deleted.
        """
        log = RequestLog(self.store.runInteraction, self.clock, retentionDays=None,
                         wallClock=lambda: self.now)
        log.add(record(time=0.0))
        self.successResultOf(log.flush())
        self.assertEqual(self.successResultOf(log.prune()), 0)
        self.assertEqual(self.store.count(), 1)

    def test_bounded(self) -> None:
        """
        When the database falls far behind, new records are dropped and counted rather
        than piling up in memory.
        """
        log = RequestLog(self.store.runInteraction, self.clock, batchSize=1000,
                         maxPending=2)
        for _ in range(5):
            log.add(record())
        self.assertEqual(log.dropped, 3)

    def test_writeFailureLogged(self) -> None:
        """
        A failed write is logged, and the log keeps working.
        """
        self.store.broken = True
        self.log.add(record())
        self.successResultOf(self.log.flush())
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.store.broken = False
        self.log.add(record())
        self.successResultOf(self.log.flush())
        self.assertEqual(self.store.count(), 1)


class UsageTotalsTests(SynchronousTestCase):
    """
    L{usageTotals} sums the log by user, model, backend or day.
    """

    def setUp(self) -> None:
        self.db = sqlite3.connect(":memory:")
        migrate(self.db, ":memory:")
        insertRows(self.db.cursor(), [
            record(user="alice", model="a", time=86400 * 10 + 5).row(),
            record(user="alice", model="b", time=86400 * 11 + 5, promptTokens=1,
                   completionTokens=2).row(),
            record(user="bob", model="a", time=86400 * 11 + 6, promptTokens=None,
                   completionTokens=None, status=502, backend="gpu2").row(),
            record(user="bob", model="a", time=86400 * 11 + 7, cancelled=True).row(),
        ])

    def totals(self, **kw: Any) -> list[dict]:
        return usageTotals(self.db.cursor(), **kw)

    def test_byUser(self) -> None:
        """
        Per user: requests, tokens, requests without counts, cancelled, errors.
        """
        alice, bob = sorted(self.totals(group="user"), key=lambda r: r["user"])
        self.assertEqual(
            (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"],
             alice["unknown"]), (2, 11, 22, 0))
        self.assertEqual(
            (bob["requests"], bob["prompt_tokens"], bob["unknown"], bob["cancelled"],
             bob["errors"]), (2, 10, 1, 1, 1))

    def test_filters(self) -> None:
        """
        C{since}, C{until}, C{user} and C{model} narrow the rows.
        """
        self.assertEqual(self.totals(group="model", user="bob"),
                         [dict(self.totals(group="model", user="bob")[0], model="a")])
        rows = self.totals(group="day", since=86400 * 11)
        self.assertEqual([(r["day"], r["requests"]) for r in rows], [("1970-01-12", 3)])
        rows = self.totals(group="user", until=86400 * 11)
        self.assertEqual([(r["user"], r["requests"]) for r in rows], [("alice", 1)])
        self.assertEqual(self.totals(model="nothing"), [])

    def test_byBackend(self) -> None:
        """
        Grouped by backend.
        """
        rows = {r["backend"]: r["requests"] for r in self.totals(group="backend")}
        self.assertEqual(rows, {"gpu1": 3, "gpu2": 1})

    def test_badGroup(self) -> None:
        """
        An unknown group is refused, never put into the SQL.
        """
        self.assertRaises(ValueError, self.totals, group="user; DROP TABLE request_log")


class AccessLineTests(SynchronousTestCase):
    """
    L{logAccess} emits one event per request with the fields of the record.
    """

    def test_oneLine(self) -> None:
        """
        The event is in the C{ollamamq.access} namespace, carries every field and reads
        as one line.
        """
        from twisted.logger import formatEvent

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        logAccess(record(failovers=1))
        [event] = [e for e in events if e.get("access")]
        self.assertEqual(event["log_namespace"], "ollamamq.access")
        self.assertEqual((event["user"], event["status"], event["prompt_tokens"],
                          event["failovers"]), ("alice", 200, 10, 1))
        text = formatEvent(event)
        self.assertEqual(
            text,
            "/api/chat 200 user=alice model=llama3:latest backend=gpu1 wait=500ms "
            "ttfb=250ms dur=2000ms tokens=10+20 bytes=300 id=r1 failovers=1",
        )

    def test_unknownTokens(self) -> None:
        """
        A request without counts says so.
        """
        from twisted.logger import formatEvent

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        logAccess(record(promptTokens=None, completionTokens=None, cancelled=True))
        [event] = [e for e in events if e.get("access")]
        self.assertIn("tokens=unknown", formatEvent(event))
        self.assertTrue(formatEvent(event).endswith(" cancelled"))


class RealDatabaseTests(TestCase):
    """
    With the real store: writes happen off the reactor thread, in the store's one state
    file, and the log survives a restart.
    """

    def test_offThreadAndSurvivesRestart(self) -> Deferred[None]:
        """
        Rows are written on the store's thread; a new store on the same file reads them.
        """
        from twisted.internet import reactor
        from twisted.internet.defer import ensureDeferred

        path = self.mktemp()
        threads: list[int] = []

        def insertNoting(txn: Any, rows: list[tuple]) -> None:
            threads.append(threading.get_ident())
            insertRows(txn, rows)

        def rowsIn(txn: Any) -> list[tuple]:
            txn.execute("SELECT request_id, cancelled, failovers FROM request_log")
            return txn.fetchall()

        async def run() -> None:
            store = Store(path, reactor)
            store.start()
            log = RequestLog(lambda fn, *a: store.runInteraction(
                insertNoting if fn is insertRows else fn, *a), reactor)
            log.add(record(requestId="kept", cancelled=True, failovers=1))
            await log.flush()
            store.close()
            again = Store(path, reactor)
            again.start()
            try:
                rows = await again.runInteraction(rowsIn)
            finally:
                again.close()
            self.assertEqual(rows, [("kept", 1, 1)])
            self.assertNotIn(threading.get_ident(), threads)
            self.assertEqual(len(threads), 1)

        return ensureDeferred(run())
