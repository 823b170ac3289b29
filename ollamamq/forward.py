# -*- test-case-name: tests.test_forward -*-
"""
One request's life after the route table: wait for a fair turn and a slot, open the request
on the backend it is granted, read what the answer means, fail over or back off, relay the
answer, release the slot.

What a backend's answer means before its first byte (L{Forwarder._open}):

  - an answer (any 2xx-4xx but 429, and 500, which is the backend's real answer to a bad
    prompt or too little memory): relayed as it is;
  - busy (429, or 503 whose body says it is loading or busy, as llama-server and Ollama
    answer): the backend is paused for its C{Retry-After} (or a short, growing backoff)
    and the request goes back to its place in the queue, uncharged; nobody is failed and
    the backend counts no failure;
  - failed (refused, dropped, or 502/503/504): the backend is marked failed (suspect, then
    offline, see L{ollamamq.backends}), probed again at once, and the request goes to
    another backend, or waits for this one to come back within C{down_grace};
  - a request lost on a pooled keep-alive connection is first sent once more on a fresh
    connection to the same backend: a backend that closed an idle connection has not
    failed;
  - no first byte within C{first_byte_timeout}: a 504 for the client (the work may have
    been done; sending it again could do it twice); twice in a row and the backend is
    marked failed.

A request granted a backend that does not speak its dialect is translated
(L{ollamamq.translate.plan}): the translated request is opened the same way, and its
answer translated on the way back.

The scheduler decides who goes where; this module never picks a backend itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import BinaryIO
import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, IResponse

from ollamamq.backends import Backend, BackendPool
from ollamamq.errors import (
    OLLAMA,
    OPENAI,
    BadGateway,
    GatewayTimeout,
    ProxyError,
    Unavailable,
)
from ollamamq.front import familyFor
from ollamamq.models import ModelCatalog, Resolution
from ollamamq.relay import BackendUnreachable, BodyTooLong, Relay
from ollamamq.scheduler import Job, Lease, Scheduler
from ollamamq.translate.common import Translation
from ollamamq.translate.plan import Translator
from ollamamq.tracking import Observer, Tracker

log = Logger()

#: Statuses that mean "this backend cannot serve now" rather than "this is the answer".
FAILOVER_STATUSES = frozenset({502, 503, 504})

#: Words in a 503 body that mean busy rather than broken (llama-server: "Loading model";
#: Ollama: "server busy, please try again").
BUSY_WORDS = (b"loading", b"busy")

#: How much of a 429/503 body is read to tell busy from broken.
BUSY_BODY_LIMIT = 64 * 1024

#: Backoff for a busy backend that gave no Retry-After: doubling from the first, capped.
BUSY_BACKOFF = (1.0, 30.0)

#: Failed attempts (other than busy answers) one request makes before its client gets 502.
MAX_FAILED_ATTEMPTS = 3

#: Busy answers one request takes before its client gets 503.
MAX_BUSY_ATTEMPTS = 20

#: First-byte timeouts in a row that make a backend count as failed.
FIRST_BYTE_STRIKES = 2


def _outcome(request: IRequest, error: BaseException) -> tuple[int, bool]:
    """
    The status a request that ended with C{error} is recorded with, and whether its
    client went away.
    """
    if isinstance(error, CancelledError):
        return request.code, True
    if isinstance(error, ProxyError):
        return error.status, False
    return 500, False


@attrs.frozen
class Outgoing:
    """
    What a request will send to a backend, held while it waits: one copy of the client's
    body, and what the route table learnt from it.

    @ivar target: the request target (origin form, checked by L{ollamamq.front}).
    @ivar headers: the client's headers fit for a backend (no proxy credentials).
    @ivar body: the client's body bytes, a file to stream (blob uploads), or L{None}.
    @ivar resolution: the model the body names, resolved, or L{None} when it names none.
    @ivar requested: the model name as the client wrote it.
    """

    method: bytes
    target: bytes
    headers: Headers
    body: bytes | BinaryIO | None = None
    resolution: Resolution | None = None
    requested: str | None = None

    @property
    def path(self) -> bytes:
        """
        The target's path.
        """
        return self.target.split(b"?", 1)[0]


@attrs.define
class _Failed:
    """
    The backend failed before answering; C{reason} is for the client and the log.
    """

    reason: str


@attrs.define
class _Busy:
    """
    The backend said it is busy.
    """


@attrs.define(eq=False)
class Forwarder:
    """
    Runs requests on the backends the scheduler grants them.

    @ivar recheck: called with a backend that just failed, so it is probed again at once.
    @ivar downAfter: failures in a row that make a backend offline (see
        L{BackendPool.markFailed}).
    """

    pool: BackendPool
    scheduler: Scheduler
    relay: Relay
    catalog: ModelCatalog
    clock: IReactorTime
    recheck: Callable[[Backend], None] = lambda backend: None
    downAfter: int = 3
    translator: Translator = attrs.field(
        default=attrs.Factory(lambda self: Translator(self.clock, self.relay), takes_self=True))
    # Reports on every queued request (headers, metrics, request log, access line).
    observer: Observer | None = None
    _busyTimers: dict[Backend, IDelayedCall] = attrs.field(factory=dict)
    _busyStreak: dict[Backend, int] = attrs.field(factory=dict)

    async def forward(self, request: IRequest, job: Job, outgoing: Outgoing) -> None:
        """
        Queue C{job}, then run C{outgoing} on the backend it is granted, failing over or
        backing off until one answers, and relay that answer to C{request}.

        @raise ProxyError: what the client is answered when it never got a backend's
            answer (429/503 from admission, 502 when every attempt failed, 504).
        """
        family = familyFor(outgoing.path)
        observer = self.observer if self.observer is not None else Observer(self.clock)
        tracker = observer.begin(request, job.user, job.peer, outgoing.path.decode("latin-1"),
                                 job.model, job.requestId)
        if job.requestId is None:
            job = attrs.evolve(job, requestId=tracker.requestId)
        try:
            lease: Lease = await self.scheduler.enqueue(job)
        except BaseException as e:
            tracker.finish(*_outcome(request, e))
            raise
        failed = busy = 0
        try:
            while True:
                tracker.granted(lease)
                translation = self.translationFor(lease.backend, outgoing)
                if translation is not None and translation.local is not None:
                    request.write(self.translator.answerLocally(request, translation))
                    tracker.finish(request.code)
                    return
                outcome = await self._open(lease.backend, outgoing, tracker=tracker,
                                           translation=translation)
                if not isinstance(outcome, (_Failed, _Busy)):
                    if translation is None and self.translator.lacksMessages(
                            outgoing.path, lease.backend, outcome):
                        # No Messages route there after all: send it again, translated.
                        self.relay.discard(outcome)
                        continue
                    if translation is not None:
                        await self.translator.respond(request, outcome, translation,
                                                      tracker.streamAccount,
                                                      tracker.proxyHeaders())
                    else:
                        await self.relay.stream(request, outcome, family,
                                                tracker.streamAccount, tracker.proxyHeaders())
                    tracker.finish(request.code)
                    return
                if isinstance(outcome, _Busy):
                    busy += 1
                    if busy >= MAX_BUSY_ATTEMPTS:
                        raise Unavailable(
                            f"backend {lease.backend.name} stayed busy", code="backend_busy",
                            retryAfter=self._busyDelay(lease.backend),
                        )
                    tracker.busy(lease.backend)
                    lease = await lease.retry(exclude=False)
                    continue
                failed += 1
                tracker.failedOver(lease.backend)
                if failed >= MAX_FAILED_ATTEMPTS:
                    raise BadGateway(f"no backend could answer: {outcome.reason}",
                                     code="backend_failed")
                try:
                    lease = await lease.retry()
                except BadGateway as e:
                    raise BadGateway(f"{e.message} ({outcome.reason})", code=e.code) from None
        except BaseException as e:
            tracker.finish(*_outcome(request, e))
            raise
        finally:
            lease.release()

    async def tryInTurn(self, request: IRequest, backends: list[Backend],
                        outgoing: Outgoing) -> None:
        """
        Send an unqueued request to the first of C{backends} that answers, failing over.
        A 429 is relayed as it is: nothing would queue the request to try again.
        """
        reasons = []
        for backend in backends:
            outcome = await self._open(backend, outgoing, queued=False)
            if isinstance(outcome, _Failed):
                reasons.append(outcome.reason)
                continue
            assert not isinstance(outcome, _Busy)
            await self.relay.stream(request, outcome, familyFor(outgoing.path))
            return
        raise BadGateway(f"no backend could answer: {'; '.join(reasons)}",
                         code="backend_failed")

    def translationFor(self, backend: Backend, outgoing: Outgoing) -> Translation | None:
        """
        The translation of C{outgoing} for C{backend}, or L{None} when it speaks the
        request's dialect.

        @raise ollamamq.errors.BadRequest: it cannot be translated faithfully.
        """
        if outgoing.resolution is None or not self.translator.needed(outgoing.path, backend):
            return None
        data = self.bodyFor(backend, outgoing)
        assert isinstance(data, bytes)
        return self.translator.translate(outgoing.path, json.loads(data),
                                         outgoing.requested or outgoing.resolution.requested)

    def bodyFor(self, backend: Backend, outgoing: Outgoing) -> bytes | BinaryIO | None:
        """
        The body to send C{backend}: model rules applied and the model spelled as that
        backend spells it; the client's own bytes when nothing changes. The body is parsed
        again here rather than kept parsed while it waits: one copy per queued request.
        """
        resolution = outgoing.resolution
        raw = outgoing.body
        if resolution is None or not isinstance(raw, bytes):
            return raw
        spelled = backend.modelName(resolution.key)
        if resolution.rule is None and not resolution.aliased and spelled == outgoing.requested:
            return raw
        body = json.loads(raw)
        family = OLLAMA if outgoing.path.startswith(b"/api/") else OPENAI
        rewritten = self.catalog.rewrite(body, resolution, family)
        if rewritten.get("model") != spelled:
            rewritten = dict(rewritten, model=spelled)
        if rewritten == body:
            return raw
        return json.dumps(rewritten).encode("utf-8")

    async def _open(self, backend: Backend, outgoing: Outgoing, queued: bool = True,
                    tracker: Tracker | None = None,
                    translation: Translation | None = None) -> IResponse | _Failed | _Busy:
        """
        Send C{outgoing} (or its C{translation}) to C{backend} and say what its answer
        means (module docstring).

        @param queued: whether the request can wait for a busy backend; if not, a 429 is
            an answer and a 503 a failure.
        @param tracker: the request's observations, which may ask the backend for usage.
        """
        if translation is not None:
            data: bytes | BinaryIO | None = translation.encodedBody()
            target = translation.path
        else:
            data = self.bodyFor(backend, outgoing)
            target = outgoing.target
        if tracker is not None:
            # By the client's path: a translated request already asks for usage, and the
            # account reads the translated answer, in the client's dialect.
            data = tracker.prepare(outgoing.path, data)
        try:
            try:
                response = await self.relay.open(
                    backend, outgoing.method, target, outgoing.headers, data)
            except BackendUnreachable as e:
                if not e.stale:
                    raise
                log.info("{reason}; trying once more on a fresh connection", reason=str(e))
                response = await self.relay.open(
                    backend, outgoing.method, target, outgoing.headers, data, fresh=True)
        except BackendUnreachable as e:
            return self._failed(backend, str(e))
        except GatewayTimeout:
            backend.firstByteTimeouts += 1
            if backend.firstByteTimeouts >= FIRST_BYTE_STRIKES:
                self._failed(backend, f"backend {backend.name} reached the first-byte "
                                      f"timeout {backend.firstByteTimeouts} times in a row")
            raise
        backend.firstByteTimeouts = 0
        code = response.code
        if code not in FAILOVER_STATUSES and (code != 429 or not queued):
            self._busyStreak.pop(backend, None)
            return response
        if queued and code in (429, 503):
            try:
                content = await self.relay.collect(response, BUSY_BODY_LIMIT)
            except BodyTooLong:
                content = b""
            except CancelledError:
                raise
            except Exception:
                return self._failed(backend, f"backend {backend.name} answered {code}")
            if code == 429 or any(word in content.lower() for word in BUSY_WORDS):
                self._markBusy(backend, response)
                return _Busy()
        else:
            self.relay.discard(response)
        return self._failed(backend, f"backend {backend.name} answered {code}")

    def _failed(self, backend: Backend, reason: str) -> _Failed:
        """
        Count a failure of C{backend} and have it probed again at once.
        """
        log.warn("{reason}; failing over", reason=reason)
        self.pool.markFailed(backend, reason, self.clock.seconds(), self.downAfter)
        self.recheck(backend)
        return _Failed(reason)

    def _busyDelay(self, backend: Backend, retryAfter: bytes | None = None) -> float:
        """
        How long to leave a busy backend alone: its own C{Retry-After} when it gave a
        number of seconds, else a backoff doubling with each busy answer in a row.
        """
        if retryAfter is not None and retryAfter.strip().isdigit():
            return min(float(retryAfter.strip()), BUSY_BACKOFF[1])
        streak = self._busyStreak.get(backend, 0)
        return min(BUSY_BACKOFF[0] * 2 ** streak, BUSY_BACKOFF[1])

    def _markBusy(self, backend: Backend, response: IResponse) -> None:
        """
        Pause C{backend} for its busy delay, then let it take requests again.
        """
        retryAfter = (response.headers.getRawHeaders(b"retry-after") or [None])[0]
        delay = self._busyDelay(backend, retryAfter)
        self._busyStreak[backend] = self._busyStreak.get(backend, 0) + 1
        log.info("Backend {name} is busy; pausing it for {delay:g}s", name=backend.name,
                 delay=delay)
        self.pool.markBusy(backend, self.clock.seconds() + delay)
        timer = self._busyTimers.get(backend)
        if timer is not None and timer.active():
            timer.cancel()

        def ready() -> None:
            del self._busyTimers[backend]
            self.pool.markReady(backend)

        self._busyTimers[backend] = self.clock.callLater(delay, ready)
