# -*- test-case-name: tests.test_relay -*-
"""
The streaming relay: one request sent to one backend, its answer copied to the client as
the bytes arrive.

Three properties matter and each has its mechanism here:
 - streaming: body bytes are written to the client as they are received, never re-framed;
 - backpressure: the backend connection is registered as the client request's producer,
   so a client that reads slowly pauses reading from the backend;
 - cancellation: a client that goes away cancels the relay, which drops the backend
   connection (Ollama stops generating when its client disconnects).

Two timeouts, never a total deadline:
 - C{first_byte_timeout}: from sending the request to the first body byte (or the headers
   of an empty answer). It covers a cold model load and a whole C{"stream": false}
   generation, during which a backend sends nothing at all.
 - the idle C{timeout} (C{--timeout}): the longest silence between two backend bytes once
   the answer has started.
Neither runs while the client is what paused the transfer: when a slow client's socket
fills up, twisted.web pauses the backend connection (backpressure), the backend goes
silent because we stopped reading, and that is nobody's timeout.

Backend URLs are built from the backend's own base URL and the parsed path and query of a
request target that L{ollamamq.front} already checked (L{targetURL}), so no target can
change the host a request goes to.
"""

from __future__ import annotations

from typing import Any, BinaryIO
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IRequest, IResponse
from zope.interface import implementer

from ollamamq.backends import Backend
from ollamamq.errors import BadGateway, GatewayTimeout, ProxyError, streamErrorLine

log = Logger()

# RFC 9110 section 7.6.1, plus Proxy-Connection which old clients still send. Host and
# Content-Length are recomputed for the new hop.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_RECOMPUTED = frozenset({b"host", b"content-length"})


class BackendUnreachable(Exception):
    """
    The backend could not be reached or dropped the connection before answering: the
    request may be retried on another backend.

    @ivar stale: whether the failure looks like a pooled keep-alive connection the backend
        had closed (the request was lost on an open connection, not refused): worth one
        more try on a fresh connection to the same backend before it counts as a failure.
    """

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


def targetURL(base: str, target: bytes) -> bytes:
    """
    The URL of request target C{target} (origin form, C{/path?query}) on the backend whose
    base URL is C{base}: the base's scheme, authority and path prefix, then the target's
    path and query. Nothing in the target can change the host.

    @raise ValueError: when C{target} is not in origin form.
    """
    path, mark, query = target.partition(b"?")
    if not path.startswith(b"/"):
        raise ValueError(f"not an origin-form request target: {target!r}")
    parts = urlsplit(base)
    prefix = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}".encode("ascii")
    return prefix + path + (b"?" + query if mark else b"")


def _connectionListed(headers: Headers) -> set[bytes]:
    """
    Header names a C{Connection} header declares hop-by-hop.
    """
    names = set()
    for value in headers.getRawHeaders(b"connection", []):
        names.update(n.strip().lower() for n in value.split(b",") if n.strip())
    return names


def forwardedHeaders(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """
    A copy of C{headers} fit for the next hop: hop-by-hop headers, those named in
    C{Connection}, and the lower-case names in C{drop} left out.
    """
    skip = HOP_BY_HOP | _connectionListed(headers) | drop
    result = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            result.setRawHeaders(name, values)
    return result


def requestHeadersForBackend(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """
    The client's request headers as sent on to a backend: without hop-by-hop headers,
    without C{Host} and C{Content-Length} (the agent sets them for the new hop) and without
    the names in C{drop} (the proxy's own credentials).
    """
    return forwardedHeaders(headers, drop | _RECOMPUTED)


def wasCancelled(failure: Failure) -> bool:
    """
    Whether C{failure} is a cancelled backend call, in any of the wrappings Agent uses for
    it: L{ConnectingCancelledError} while connecting, L{ResponseNeverReceived} or
    L{ResponseFailed} around L{CancelledError} later. A cancel is the client going away,
    never a backend failure.
    """
    if failure.check(CancelledError, ConnectingCancelledError):
        return True
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return any(r.check(CancelledError) for r in failure.value.reasons)
    return False


def describeFailure(failure: Failure) -> str:
    """
    A short reason for a failed backend call, fit for clients, logs and status pages: a
    fixed phrase per kind of failure, never the underlying message (which can hold the
    backend's address or URL) nor Twisted's list of Failure reprs.
    """
    if failure.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed):
        reasons = failure.value.reasons
        return describeFailure(reasons[0]) if reasons else "connection lost"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(DNSLookupError):
        return "DNS lookup failed"
    if failure.check(ConnectTimeoutError):
        return "connect timed out"
    if failure.check(ConnectError):
        return "cannot connect"
    if failure.check(ConnectionDone, ConnectionLost, RequestNotSent):
        return "connection lost"
    return f"unexpected error ({failure.type.__name__})"


def _staleConnection(failure: Failure) -> bool:
    """
    Whether a failure before the response is what a keep-alive connection that the backend
    had closed meanwhile looks like: the request was written (or being written) and the
    connection went away, as opposed to a connection that could not be made.
    """
    return bool(failure.check(ResponseNeverReceived, RequestTransmissionFailed,
                              RequestNotSent))


@implementer(IBodyProducer)
class _BodyBytes:
    """
    A request body already in memory, written in one go. (Twisted's C{FileBodyProducer}
    would do, but it paces itself on the global reactor's cooperator, which tests on a
    memory agent never run.)
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Relay:
    """
    Sends requests to backends and streams their answers back.

    The relay talks to a plain L{IAgent}, not treq: treq adds C{Accept-Encoding: gzip} and
    decodes bodies, keeps one cookie jar for every request, and follows redirects, none of
    which a transparent proxy may do.

    @ivar agent: an L{IAgent} with a persistent connection pool.
    @ivar freshAgent: an L{IAgent} that opens a new connection for every request, for the
        one retry after a stale keep-alive connection (the same as C{agent} by default).
    @ivar clock: for the timeouts.
    @ivar idleTimeout: seconds of backend silence that end a request once it started.
    @ivar firstByteTimeout: seconds a backend may take to send its first byte.
    """

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        idleTimeout: float,
        firstByteTimeout: float | None = None,
        freshAgent: IAgent | None = None,
    ) -> None:
        self.agent = agent
        self.freshAgent = freshAgent if freshAgent is not None else agent
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.firstByteTimeout = firstByteTimeout if firstByteTimeout is not None else idleTimeout
        # File bodies are read in turns on our own clock, not the global reactor's.
        self._cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))

    def reconfigure(self, config: Any) -> None:
        """
        Take a reloaded config's idle and first-byte timeouts (requests already running
        keep theirs).
        """
        self.idleTimeout = config.timeout
        self.firstByteTimeout = config.firstByteTimeout

    async def open(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes | BinaryIO | None,
        fresh: bool = False,
    ) -> IResponse:
        """
        Send a request to C{backend} and wait for its response headers.

        @param target: the path and query, origin form (checked by L{ollamamq.front}).
        @param headers: the client's headers, less the proxy's own credentials. A backend
            with its own C{apiKey} gets that as C{Authorization: Bearer} instead of any
            credential the client sent.
        @param fresh: open a new connection instead of reusing a pooled one.
        @raise BackendUnreachable: the connection failed before a response started.
        @raise GatewayTimeout: no response headers within the first-byte timeout.
        @raise CancelledError: the caller cancelled (the client went away).
        """
        url = targetURL(backend.url, target)
        auth = backend.authHeaders()
        if auth:
            headers = headers.copy()
            headers.removeHeader(b"x-api-key")
            for name, values in auth.items():
                headers.setRawHeaders(name, values)
        agent = self.freshAgent if fresh else self.agent
        d = agent.request(method, url, headers, self._producer(body))
        timedOut = []

        def onTimeout(result: Any, timeout: float) -> Any:
            timedOut.append(True)
            return result

        d.addTimeout(self.firstByteTimeout, self.clock, onTimeoutCancel=onTimeout)
        try:
            return await d
        except Exception:
            failure = Failure()
            if timedOut:
                raise GatewayTimeout(
                    f"backend {backend.name} sent nothing for {self.firstByteTimeout:g}s",
                    code="backend_timeout",
                ) from None
            if wasCancelled(failure):
                raise CancelledError() from None
            log.info("Request to backend {name} ({url}) failed: {failure}", name=backend.name,
                     url=url.decode("latin-1"), failure=failure.getErrorMessage())
            raise BackendUnreachable(
                f"backend {backend.name}: {describeFailure(failure)}",
                stale=_staleConnection(failure),
            ) from None

    def _producer(self, body: bytes | BinaryIO | None) -> IBodyProducer | None:
        """
        The body producer for C{body}: bytes in one write, a file streamed in chunks as
        the connection takes them (blob uploads).
        """
        if body is None:
            return None
        if isinstance(body, bytes):
            return _BodyBytes(body)
        return FileBodyProducer(body, cooperator=self._cooperator)

    def stream(
        self,
        request: IRequest,
        response: IResponse,
        family: str,
        account: Any = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> Deferred[int]:
        """
        Copy C{response} (status, headers, body) to C{request} as it arrives.

        A backend failure or idle timeout after the headers ends an NDJSON or SSE stream with
        an error line in its own framing (and any other body by dropping the connection, so
        it is never taken for complete).

        @param family: the route's API family, for the shape of a final error line.
        @param account: a L{ollamamq.usage.StreamAccount} every body chunk goes through
            (token counts, first byte; it may hold back or remove bytes).
        @param headers: the proxy's own response headers, set over the backend's.
        @return: fires with the number of body bytes relayed once the body is complete;
            cancel it to drop the backend connection.
        """
        request.setResponseCode(response.code, response.phrase)
        for name, values in forwardedHeaders(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH:
            # Twisted's client keeps Content-Length out of the headers; the body is relayed
            # byte for byte, so the client may rely on it (and gets no chunked framing).
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        for name, value in (headers or {}).items():
            request.responseHeaders.setRawHeaders(name, [value])
        contentType = b";".join(response.headers.getRawHeaders(b"content-type", [])).lower()
        if account is not None:
            account.started(b"text/event-stream" in contentType,
                            response.length is not UNKNOWN_LENGTH)
        relay = _BodyRelay(
            request,
            self.clock,
            self.idleTimeout,
            self.firstByteTimeout,
            family,
            sse=b"text/event-stream" in contentType,
            ndjson=b"ndjson" in contentType,
            account=account,
        )
        # Send the headers now: a client learns the request started even while the model
        # loads, and the status is final from here on.
        request.write(b"")
        response.deliverBody(relay)
        return relay.done

    def collect(self, response: IResponse, limit: int) -> Deferred[bytes]:
        """
        Read a whole response body (at most C{limit} bytes), under the idle timeout;
        cancelling drops the backend connection.
        """
        collector = BodyCollector(limit, self.clock, self.idleTimeout)
        response.deliverBody(collector)
        return collector.done

    def discard(self, response: IResponse) -> None:
        """
        Throw away a response we will not relay (a 5xx before failing over), closing its
        connection rather than reading a body nobody wants.
        """
        response.deliverBody(_Discard())


class BodyTooLong(Exception):
    """
    A collected response body went past its limit.
    """


class BodyCollector(Protocol):
    """
    Collects a response body, at most C{limit} bytes, for answers read whole (probes,
    model-management fan-out).

    treq's C{collect}/C{content} cannot be cancelled: cancelling leaves the connection open
    and reading. Cancelling C{done} here drops the connection, so the backend stops too.
    With a C{clock}, silence longer than C{idleTimeout} between bytes cancels as well.
    """

    def __init__(
        self, limit: int, clock: IReactorTime | None = None, idleTimeout: float = 0
    ) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._idle: IDelayedCall | None = None
        if clock is not None:
            self._idle = clock.callLater(idleTimeout, self.done.cancel)
            self._idleTimeout = idleTimeout

    def _cancel(self, done: Deferred[bytes]) -> None:
        self._stopTimer()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stopTimer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idleTimeout)
        self._size += len(data)
        if self._size > self._limit:
            self._stopTimer()
            self.done.errback(Failure(BodyTooLong(self._limit)))
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        self._stopTimer()
        if self.done.called:
            # Already answered (too long, or cancelled): this is our own hang-up.
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _Discard(Protocol):
    """
    Drops a response body by dropping its connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        pass


@implementer(IPushProducer)
class _ClientPacedProducer:
    """
    The backend connection as the client request's producer, telling the relay when the
    client side pauses and resumes it, so no timeout runs while we are the ones not
    reading.
    """

    def __init__(self, transport: Any, relay: _BodyRelay) -> None:
        self._transport = transport
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay.clientPaused()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._relay.clientResumed()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


class _BodyRelay(Protocol):
    """
    Receives a backend response body and writes it to the client request.

    Until the first body byte the first-byte timeout runs (the headers may come long
    before the first token, while a model loads); after it, the idle timeout between
    bytes. The timer stops while the client has paused the transfer.
    """

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        idleTimeout: float,
        firstByteTimeout: float,
        family: str,
        sse: bool,
        ndjson: bool,
        account: Any = None,
    ) -> None:
        self._request = request
        self._account = account
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._firstByteTimeout = firstByteTimeout
        self._family = family
        self._sse = sse
        self._ndjson = ndjson
        self._cancelled = False
        self._timedOut = False
        self._paused = False
        self._idle: IDelayedCall | None = None
        self.relayed = 0
        self.done: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, done: Deferred[int]) -> None:
        # The client went away: drop the backend connection so the backend stops work.
        self._cancelled = True
        if self.transport is not None:
            self.transport.stopProducing()

    def _currentTimeout(self) -> float:
        return self._idleTimeout if self.relayed else self._firstByteTimeout

    def _stopTimer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _startTimer(self) -> None:
        self._stopTimer()
        if not self._paused:
            self._idle = self._clock.callLater(self._currentTimeout(), self._timeout)

    def clientPaused(self) -> None:
        """
        The client's side is full: stop the clock until it drains.
        """
        self._paused = True
        self._stopTimer()

    def clientResumed(self) -> None:
        """
        The client's side drained: the backend's silence counts again, from now.
        """
        if self._paused:
            self._paused = False
            self._startTimer()

    def connectionMade(self) -> None:
        if getattr(self._request, "channel", None) is None:
            # The client left before the body started: nothing to relay to.
            self.transport.stopProducing()
            return
        self._request.registerProducer(_ClientPacedProducer(self.transport, self), True)
        self._startTimer()

    def _timeout(self) -> None:
        self._idle = None
        self._timedOut = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        first = not self.relayed
        self.relayed += len(data)
        if first:
            # From the first byte on, the (usually shorter) idle timeout applies.
            self._startTimer()
        elif self._idle is not None:
            self._idle.reset(self._idleTimeout)
        if self._account is not None:
            data = self._account.feed(data)
            if not data:
                return
        self._request.write(data)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        self._stopTimer()
        connected = getattr(self._request, "channel", None) is not None
        if connected:
            # Without a channel (client gone) unregisterProducer raises AttributeError.
            self._request.unregisterProducer()
        if self._cancelled:
            return
        if self._account is not None and connected:
            held = self._account.finish()
            if held:
                self._request.write(held)
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.relayed)
            return
        error: ProxyError
        if self._timedOut:
            which = "before its first byte" if not self.relayed else "mid-stream"
            error = GatewayTimeout(
                f"backend sent nothing for {self._currentTimeout():g}s {which}; stream ended",
                code="backend_timeout",
            )
        else:
            error = BadGateway(
                f"backend failed mid-stream: {describeFailure(reason)}", code="backend_failed"
            )
        log.warn("Relay ended early: {message}", message=error.message)
        if connected:
            if self._sse or self._ndjson:
                self._request.write(streamErrorLine(error, self._family, self._sse))
            else:
                # A plain body cut short must not look complete: abort the connection, so
                # not even the last chunk marker (written when the request is finished)
                # reaches the client.
                self._request.channel.transport.abortConnection()
        self.done.callback(self.relayed)
