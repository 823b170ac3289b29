# -*- test-case-name: tests.test_tracking -*-
"""
One proxied request observed from arrival to end, for everything that reports on it: the
response headers that tell the client about its queueing, the metrics, the request log and
the access line.

The request path calls, in order: L{Observer.begin} when the request arrives (the request
id header is set at once, so even a refusal carries it), L{Tracker.granted} with each
lease, L{Tracker.failedOver} when a backend fails before answering, L{Tracker.prepare}
for the body sent to the backend (and the L{ollamamq.usage.StreamAccount} the answer goes
through), and L{Tracker.finish} once, whatever the outcome.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from ollamamq.requestlog import RequestRecord, logAccess
from ollamamq.usage import OPENAI_STREAMING_ROUTES, StreamAccount, askForUsage

REQUEST_ID = b"x-ollamamq-request-id"
BACKEND = b"x-ollamamq-backend"
QUEUE_WAIT = b"x-ollamamq-queue-wait-ms"

# What the log says for a request whose client went away before its answer began.
CLIENT_CLOSED = 499


def newRequestId() -> str:
    """
    A fresh request id: 16 random hex digits, short enough to read out and paste.
    """
    return uuid.uuid4().hex[:16]


class Tracker:
    """
    The observations of one request.

    @ivar requestId: the id in logs, headers and the control plane.
    @ivar user: the caller's user id.
    """

    def __init__(self, observer: Observer, request: IRequest, requestId: str, user: str,
                 peer: str | None, route: str, model: str | None) -> None:
        self._observer = observer
        self._request = request
        self.requestId = requestId
        self.user = user
        self.peer = peer
        self.route = route
        self.model = model
        self.arrived = observer.clock.seconds()
        self.wallArrived = observer.wallClock()
        self.backend: str | None = None
        self.waited: float | None = None
        self.grantedAt: float | None = None
        self.failovers = 0
        self._nextReason: str | None = None
        self.streamAccount: StreamAccount | None = None
        self.finished = False
        request.responseHeaders.setRawHeaders(REQUEST_ID, [requestId.encode("ascii")])

    def granted(self, lease: Any) -> None:
        """
        A slot on C{lease.backend}: name it and the queue wait in the response headers,
        and count the dispatch with its reason.
        """
        backend = lease.backend
        reason, self._nextReason = self._nextReason, None
        self.backend = backend.name
        self.waited = lease.waited
        self.grantedAt = self._observer.clock.seconds()
        headers = self._request.responseHeaders
        headers.setRawHeaders(BACKEND, [backend.name.encode("utf-8")])
        headers.setRawHeaders(QUEUE_WAIT, [b"%d" % round(lease.waited * 1000)])
        metrics = self._observer.metrics
        if metrics is not None:
            if reason is not None:
                pass
            elif self.model is None:
                reason = "any"
            elif self.model in backend.loaded:
                reason = "loaded"
            else:
                reason = "cold"
            metrics.dispatched(backend.name, reason)

    def busy(self, backend: Any) -> None:
        """
        C{backend} said it is busy; the request waits for another turn.
        """
        self._nextReason = "busy"

    def failedOver(self, backend: Any) -> None:
        """
        C{backend} failed before answering; the request moves on (or fails).
        """
        self.failovers += 1
        self._nextReason = "failover"
        if self._observer.metrics is not None:
            self._observer.metrics.failedOver(backend.name)

    def prepare(self, path: bytes, data: Any) -> Any:
        """
        The body to send the backend for this attempt (C{data}, or for an OpenAI stream
        whose client did not ask for usage, C{data} asking for it), and a new
        L{StreamAccount} for the answer in L{streamAccount} (which then removes that
        usage event again).
        """
        replacement = None
        if path in OPENAI_STREAMING_ROUTES and isinstance(data, bytes) and b'"stream"' in data:
            try:
                body = json.loads(data)
            except (ValueError, RecursionError):
                body = None
            if isinstance(body, dict):
                replacement = askForUsage(path, body)
        self.streamAccount = StreamAccount(self._observer.clock,
                                           removeUsageEvent=replacement is not None)
        if replacement is None:
            return data
        return json.dumps(replacement).encode("utf-8")

    def proxyHeaders(self) -> dict[bytes, bytes]:
        """
        The proxy's own response headers, set over whatever the backend sent.
        """
        headers = {REQUEST_ID: self.requestId.encode("ascii")}
        if self.backend is not None:
            headers[BACKEND] = self.backend.encode("utf-8")
            headers[QUEUE_WAIT] = b"%d" % round((self.waited or 0) * 1000)
        return headers

    def finish(self, status: int, cancelled: bool = False) -> RequestRecord | None:
        """
        The request is over with C{status} (what the client got, or would have): report
        it everywhere, once. Later calls do nothing.
        """
        if self.finished:
            return None
        self.finished = True
        now = self._observer.clock.seconds()
        account = self.streamAccount
        usage = account.usage() if account is not None else None
        firstByte = None
        if account is not None and account.firstByteAt is not None and self.grantedAt is not None:
            firstByte = account.firstByteAt - self.grantedAt
        if cancelled and self.grantedAt is None:
            status = CLIENT_CLOSED
        record = RequestRecord(
            time=self.wallArrived,
            requestId=self.requestId,
            user=self.user,
            peer=self.peer,
            route=self.route,
            model=self.model,
            backend=self.backend,
            queueWait=self.waited,
            firstByte=firstByte,
            duration=now - self.arrived,
            promptTokens=usage.promptTokens if usage is not None else None,
            completionTokens=usage.completionTokens if usage is not None else None,
            bytes=usage.bytes if usage is not None else 0,
            status=status,
            cancelled=cancelled,
            failovers=self.failovers,
        )
        self._observer.report(record)
        # twisted.web's own access line is left out for this request (ollamamq.tap._Site).
        self._request.ollamamqLogged = True
        return record


class Observer:
    """
    Where finished requests are reported: metrics, the request log, the access line.

    @ivar clock: for durations (the reactor).
    @ivar wallClock: for the log's timestamps.
    """

    def __init__(self, clock: IReactorTime, metrics: Any = None, requestLog: Any = None,
                 wallClock: Callable[[], float] = time.time,
                 newId: Callable[[], str] = newRequestId) -> None:
        self.clock = clock
        self.metrics = metrics
        self.requestLog = requestLog
        self.wallClock = wallClock
        self._newId = newId
        # The control plane's event stream (tap.py sets it): token counts go to consoles.
        self.publish: Callable[[str, dict], None] | None = None
        # The per-user tokens per day (tap.py sets it): finished requests are charged.
        self.budget: Any = None

    def begin(self, request: IRequest, user: str, peer: str | None, route: str,
              model: str | None, requestId: str | None = None) -> Tracker:
        """
        A proxied request arrived.
        """
        return Tracker(self, request, requestId or self._newId(), user, peer, route, model)

    def report(self, record: RequestRecord) -> None:
        """
        Hand a finished request's record to everything that reports on it.
        """
        if self.metrics is not None:
            self.metrics.finished(record)
        if self.requestLog is not None:
            self.requestLog.add(record)
        logAccess(record)
        if self.budget is not None:
            self.budget.charge(record.user, (record.promptTokens or 0)
                               + (record.completionTokens or 0))
        if self.publish is not None and record.completionTokens is not None:
            self.publish("request.accounted", {
                "id": record.requestId, "user": record.user, "model": record.model,
                "tokens": {"prompt": record.promptTokens,
                           "completion": record.completionTokens},
            })
