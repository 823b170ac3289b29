# -*- test-case-name: tests.test_requestlog -*-
"""
The request log: one row per finished proxied request in the SQLite store, and the one
access line per request in the daemon's log.

Rows are collected on the reactor thread and written in batches (every C{batchSize} rows
or C{interval} seconds, whichever comes first) in one C{executemany} on the store's
database thread, so a burst of requests costs the reactor one list append each. No prompt
or response text is ever stored: only who, what route and model, where, how long, how many
tokens and how it ended. Rows older than C{log_retention_days} are deleted by the same
loop, hourly.

The table (C{request_log}) is created by a migration step of L{ollamamq.store}, in the
daemon's one state file; queries for C{GET /proxy/usage} and C{ollamamq-usage} are
L{usageTotals}.
"""

from __future__ import annotations

import sqlite3
import time as _time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

# The access line's logger: a namespace of its own, so it can be filtered or routed.
accessLog = Logger(namespace="ollamamq.access")

COLUMNS = (
    "time", "request_id", "user", "peer", "route", "model", "backend", "queue_wait",
    "first_byte", "duration", "prompt_tokens", "completion_tokens", "bytes", "status",
    "cancelled", "failovers",
)

GROUPS = {
    "user": "user",
    "model": "model",
    "backend": "backend",
    # Days in UTC, as ISO dates.
    "day": "date(time, 'unixepoch')",
}

RETENTION_PERIOD = 3600.0
"""
Seconds between two deletions of rows past the retention.
"""


@attrs.frozen
class RequestRecord:
    """
    What is known of one finished proxied request.

    @ivar time: arrival, seconds since the epoch.
    @ivar queueWait: seconds queued (every wait, if it failed over); L{None} when it never
        got a slot.
    @ivar firstByte: seconds from the slot to the backend's first body byte; L{None} when
        no body byte came.
    @ivar duration: seconds from arrival to the end.
    @ivar promptTokens: L{None} when the backend reported no counts.
    @ivar bytes: body bytes received from the backend.
    @ivar status: the HTTP status the client got.
    @ivar cancelled: the client went away before the end.
    @ivar failovers: backends that failed before answering it.
    """

    time: float
    requestId: str
    user: str
    peer: str | None
    route: str
    model: str | None
    backend: str | None
    queueWait: float | None
    firstByte: float | None
    duration: float
    promptTokens: int | None
    completionTokens: int | None
    bytes: int
    status: int
    cancelled: bool = False
    failovers: int = 0

    def row(self) -> tuple:
        """
        The record as a row of the table, in L{COLUMNS} order.
        """
        return (
            self.time, self.requestId, self.user, self.peer, self.route, self.model,
            self.backend, self.queueWait, self.firstByte, self.duration, self.promptTokens,
            self.completionTokens, self.bytes, self.status, int(self.cancelled),
            self.failovers,
        )

    def fields(self) -> dict[str, Any]:
        """
        The record as the access line's fields (and the JSON log's keys).
        """
        return dict(zip(COLUMNS, self.row()), cancelled=self.cancelled)


def logAccess(record: RequestRecord) -> None:
    """
    Emit the access line for a finished request.

    The line is formatted here, once, with an f-string: twisted.logger's own formatting
    of a dozen fields (C{string.Formatter}, in Python) cost more than the rest of a
    request's bookkeeping together (see C{bench/requestlog.py}). The fields travel in the
    event as well, for the JSON log.
    """
    tokens = (
        f"{record.promptTokens}+{record.completionTokens}"
        if record.promptTokens is not None else "unknown"
    )
    line = (
        f"{record.route} {record.status} user={record.user} model={record.model} "
        f"backend={record.backend} wait={_ms(record.queueWait)}ms "
        f"ttfb={_ms(record.firstByte)}ms dur={_ms(record.duration)}ms "
        f"tokens={tokens} bytes={record.bytes} id={record.requestId}"
    )
    if record.cancelled:
        line += " cancelled"
    if record.failovers:
        line += f" failovers={record.failovers}"
    accessLog.info("{access_line}", access_line=line, access=True, **record.fields())


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def insertRows(txn: Any, rows: list[tuple]) -> None:
    """
    Write a batch of rows (in L{COLUMNS} order).
    """
    txn.executemany(
        f"INSERT INTO request_log ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(COLUMNS))})",
        rows,
    )


def deleteBefore(txn: Any, cutoff: float) -> int:
    """
    Delete rows of requests that arrived before C{cutoff}; return how many.
    """
    txn.execute("DELETE FROM request_log WHERE time < ?", (cutoff,))
    return txn.rowcount


def usageTotals(
    txn: Any,
    since: float | None = None,
    until: float | None = None,
    user: str | None = None,
    model: str | None = None,
    group: str = "user",
) -> list[dict[str, Any]]:
    """
    Totals per C{group} (a key of L{GROUPS}) over the rows that match, largest first:
    C{{group, "requests", "prompt_tokens", "completion_tokens", "unknown", "cancelled",
    "errors", "bytes", "duration", "queue_wait"}} (C{unknown}: requests without counts;
    C{errors}: status 400 and above; C{duration}, C{queue_wait}: summed seconds).

    @raise ValueError: for an unknown C{group}.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    where, args = [], []
    for clause, value in (("time >= ?", since), ("time < ?", until), ("user = ?", user),
                          ("model = ?", model)):
        if value is not None:
            where.append(clause)
            args.append(value)
    txn.execute(
        f"""
        SELECT {GROUPS[group]} AS key, COUNT(*),
               COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
               SUM(prompt_tokens IS NULL), SUM(cancelled), SUM(status >= 400),
               SUM(bytes), SUM(duration), COALESCE(SUM(queue_wait), 0)
        FROM request_log {'WHERE ' + ' AND '.join(where) if where else ''}
        GROUP BY key ORDER BY COUNT(*) DESC, key
        """,
        args,
    )
    names = ("requests", "prompt_tokens", "completion_tokens", "unknown", "cancelled",
             "errors", "bytes", "duration", "queue_wait")
    return [{group: row[0], **dict(zip(names, row[1:]))} for row in txn.fetchall()]


class RequestLog(Service):
    """
    Collects records and writes them in batches through the store.

    @ivar runInteraction: the store's C{runInteraction}: runs C{fn(txn, *args)} on its
        database thread and fires with the result.
    @ivar retentionDays: rows older than this many days are deleted (L{None}: kept);
        a config reload sets it.
    @ivar dropped: records thrown away because the database fell too far behind.
    """

    def __init__(
        self,
        runInteraction: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        retentionDays: float | None = 30.0,
        batchSize: int = 500,
        interval: float = 1.0,
        maxPending: int = 100_000,
        wallClock: Callable[[], float] = _time.time,
    ) -> None:
        self.runInteraction = runInteraction
        self._clock = clock
        self.retentionDays = retentionDays
        self._batchSize = batchSize
        self._interval = interval
        self._maxPending = maxPending
        self._wallClock = wallClock
        self._pending: list[tuple] = []
        self._writing: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._lastPrune = -RETENTION_PERIOD
        self.dropped = 0
        self.written = 0

    def add(self, record: RequestRecord) -> None:
        """
        Queue a record for the next batch (on the reactor thread; cheap).
        """
        if len(self._pending) >= self._maxPending:
            self.dropped += 1
            return
        self._pending.append(record.row())
        if len(self._pending) >= self._batchSize and self._writing is None:
            self.flush()

    def flush(self) -> Deferred[None]:
        """
        Write what is pending (after a write in progress, if any); fires when written.
        """
        if self._writing is not None:
            # One write at a time; the rows that came meanwhile go in the next batch.
            d: Deferred[None] = Deferred()

            def again(result: Any) -> Any:
                self.flush().chainDeferred(d)
                return result

            self._writing.addBoth(again)
            return d
        if not self._pending:
            return succeed(None)
        rows, self._pending = self._pending, []
        writing = self._writing = self.runInteraction(insertRows, rows)

        def written(result: Any) -> None:
            self.written += len(rows)

        def failed(failure: Any) -> None:
            log.failure("Could not write {count} request log rows", failure, count=len(rows))

        def done(result: Any) -> Any:
            self._writing = None
            return result

        writing.addCallbacks(written, failed)
        writing.addBoth(done)
        return writing

    def prune(self) -> Deferred[int]:
        """
        Delete rows past the retention now; fires with how many went.
        """
        if self.retentionDays is None:
            return succeed(0)
        cutoff = self._wallClock() - self.retentionDays * 86400
        return self.runInteraction(deleteBefore, cutoff)

    def _tick(self) -> None:
        self.flush()
        now = self._clock.seconds()
        if now - self._lastPrune >= RETENTION_PERIOD:
            self._lastPrune = now
            self.prune().addErrback(
                lambda f: log.failure("Could not delete old request log rows", f))

    def startService(self) -> None:
        """
        Start the batch loop (and the hourly retention).
        """
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        # The first tick one interval from now: the store is not touched while the daemon
        # is still starting.
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: log.failure("Request log loop stopped", f))

    def stopService(self) -> Deferred[None]:
        """
        Stop the loop and write what is left; fires once written.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()


def connectReadOnly(path: str) -> sqlite3.Connection:
    """
    Open a store's database for reading only (the usage CLI, beside a running daemon).
    """
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)

