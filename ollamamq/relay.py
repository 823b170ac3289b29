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

The idle timeout (C{--timeout}) is the longest silence allowed between two backend bytes
(or before the response headers), never a total deadline.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
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
    """


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
    A short message for a failed backend call, for people (logs, error bodies): the first
    underlying reason, not Twisted's list of Failure reprs.
    """
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = failure.value.reasons
        return describeFailure(reasons[0]) if reasons else "no response"
    return failure.getErrorMessage().rstrip(".") or failure.type.__name__


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
    @ivar clock: for the idle timeout.
    @ivar idleTimeout: seconds of backend silence that end a request.
    """

    def __init__(self, agent: IAgent, clock: IReactorTime, idleTimeout: float) -> None:
        self.agent = agent
        self.clock = clock
        self.idleTimeout = idleTimeout

    async def open(
        self,
        backend: Backend,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: bytes | None,
    ) -> IResponse:
        """
        Send a request to C{backend} and wait for its response headers.

        @param path: the path and query, starting with C{/}.
        @param headers: the client's headers, less the proxy's own credentials. A backend
            with its own C{apiKey} gets that as C{Authorization: Bearer} instead of any
            credential the client sent.
        @raise BackendUnreachable: the connection failed before a response started.
        @raise GatewayTimeout: no response headers within the idle timeout.
        @raise CancelledError: the caller cancelled (the client went away).
        """
        url = backend.url.encode("utf-8") + path
        auth = backend.authHeaders()
        if auth:
            headers = headers.copy()
            headers.removeHeader(b"x-api-key")
            for name, values in auth.items():
                headers.setRawHeaders(name, values)
        d = self.agent.request(
            method, url, headers, _BodyBytes(body) if body is not None else None
        )
        timedOut = []

        def onTimeout(result: Any, timeout: float) -> Any:
            timedOut.append(True)
            return result

        d.addTimeout(self.idleTimeout, self.clock, onTimeoutCancel=onTimeout)
        try:
            return await d
        except Exception:
            failure = Failure()
            if timedOut:
                raise GatewayTimeout(
                    f"backend {backend.name} sent nothing for {self.idleTimeout:g}s",
                    code="backend_timeout",
                ) from None
            if wasCancelled(failure):
                raise CancelledError() from None
            raise BackendUnreachable(
                f"backend {backend.name}: {describeFailure(failure)}"
            ) from None

    def stream(
        self,
        request: IRequest,
        response: IResponse,
        family: str,
    ) -> Deferred[int]:
        """
        Copy C{response} (status, headers, body) to C{request} as it arrives.

        A backend failure or idle timeout after the headers ends an NDJSON or SSE stream with
        an error line in its own framing (and any other body by dropping the connection, so
        it is never taken for complete).

        @param family: the route's API family, for the shape of a final error line.
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
        contentType = b";".join(response.headers.getRawHeaders(b"content-type", [])).lower()
        relay = _BodyRelay(
            request,
            self.clock,
            self.idleTimeout,
            family,
            sse=b"text/event-stream" in contentType,
            ndjson=b"ndjson" in contentType,
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


class _BodyRelay(Protocol):
    """
    Receives a backend response body and writes it to the client request.
    """

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        idleTimeout: float,
        family: str,
        sse: bool,
        ndjson: bool,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._family = family
        self._sse = sse
        self._ndjson = ndjson
        self._cancelled = False
        self._timedOut = False
        self._idle: IDelayedCall | None = None
        self.relayed = 0
        self.done: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, done: Deferred[int]) -> None:
        # The client went away: drop the backend connection so the backend stops work.
        self._cancelled = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if getattr(self._request, "channel", None) is None:
            # The client left before the body started: nothing to relay to.
            self.transport.stopProducing()
            return
        self._request.registerProducer(self.transport, True)
        self._idle = self._clock.callLater(self._idleTimeout, self._timeout)

    def _timeout(self) -> None:
        self._timedOut = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idleTimeout)
        self.relayed += len(data)
        self._request.write(data)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        connected = getattr(self._request, "channel", None) is not None
        if connected:
            # Without a channel (client gone) unregisterProducer raises AttributeError.
            self._request.unregisterProducer()
        if self._cancelled:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.relayed)
            return
        error: ProxyError
        if self._timedOut:
            error = GatewayTimeout(
                f"backend sent nothing for {self._idleTimeout:g}s; stream ended",
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

