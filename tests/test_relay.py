"""
Tests for L{ollamamq.relay}: streaming, header forwarding, backpressure, cancellation and
the idle timeout.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http import HTTPChannel, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from ollamamq.backends import Backend
from ollamamq.errors import OLLAMA, OPENAI, GatewayTimeout
from ollamamq.relay import (
    BackendUnreachable,
    Relay,
    forwardedHeaders,
    requestHeadersForBackend,
)


class HoldingBackend(Resource):
    """
    A backend that keeps every request open for the test to answer piece by piece.
    """

    isLeaf = True

    def __init__(self, contentType: bytes = b"application/x-ndjson") -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.lost: list[Failure] = []
        self.contentType = contentType

    def render(self, request: Any) -> object:
        request.setHeader(b"content-type", self.contentType)
        request.setHeader(b"x-backend-header", b"from-backend")
        request.setHeader(b"keep-alive", b"timeout=5")
        self.requests.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        return NOT_DONE_YET


class Front(Resource):
    """
    A minimal front end: relays every request to one backend with L{Relay}.
    """

    isLeaf = True

    def __init__(self, relay: Relay, backend: Backend) -> None:
        super().__init__()
        self.relay = relay
        self.backend = backend
        self.outcomes: list[Any] = []

    def render(self, request: Any) -> object:
        async def run() -> None:
            response = await self.relay.open(
                self.backend,
                request.method,
                request.uri,
                requestHeadersForBackend(request.requestHeaders),
                request.content.read(),
            )
            await self.relay.stream(request, response, OLLAMA)

        d = ensureDeferred(run())
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(result: object) -> None:
            self.outcomes.append(result)
            if not request._disconnected:
                request.finish()

        d.addBoth(done)
        return NOT_DONE_YET


class RelayTests(SynchronousTestCase):
    """
    End to end through StubTreq: client -> front (Relay) -> backend resource.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backendResource = HoldingBackend()
        self.backendHTTP = RequestTraversalAgent(self.backendResource)
        self.relay = Relay(self.backendHTTP, self.clock, idleTimeout=30)
        self.front = Front(self.relay, Backend(name="b", url="http://backend"))
        self.client = StubTreq(self.front)

    def flush(self) -> None:
        """
        Move bytes both ways through both stubs.
        """
        for _ in range(3):
            self.backendHTTP.flush()
            self.client.flush()

    def startStream(self) -> tuple[Any, list[bytes]]:
        """
        Send a request, answer its headers on the backend, start collecting the body.
        """
        d = self.client.post(
            "http://proxy/api/generate",
            data=b'{"model": "m"}',
            headers={"X-User-ID": "alice", "Keep-Alive": "timeout=5",
                     "Proxy-Authorization": "Basic eDp5"},
            unbuffered=True,
        )
        self.flush()
        self.assertEqual(len(self.backendResource.requests), 1)
        backendRequest = self.backendResource.requests[0]
        backendRequest.write(b"")  # send the headers
        self.flush()
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        self.hangUp = False

        def collect(data: bytes) -> None:
            if self.hangUp:
                # treq drops the connection when the collector raises: a client hanging up.
                raise ConnectionAbortedError("client hung up")
            chunks.append(data)

        self.collected = treq.collect(response, collect)
        return response, chunks

    def test_chunksArriveOneByOne(self) -> None:
        """
        Each backend write reaches the client before the backend finishes.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        for i in range(3):
            backendRequest.write(b'{"response": "t%d", "done": false}\n' % i)
            self.flush()
            self.assertEqual(b"".join(chunks).count(b"\n"), i + 1)
        self.assertNoResult(self.collected)
        backendRequest.write(b'{"done": true}\n')
        backendRequest.finish()
        self.flush()
        self.successResultOf(self.collected)
        self.assertEqual(b"".join(chunks).count(b"\n"), 4)

    def test_headersForwardedBothWays(self) -> None:
        """
        Client headers reach the backend and backend headers reach the client; hop-by-hop
        headers do not.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        self.assertEqual(backendRequest.getHeader(b"x-user-id"), b"alice")
        self.assertIsNone(backendRequest.getHeader(b"keep-alive"))
        self.assertIsNone(backendRequest.getHeader(b"proxy-authorization"))
        self.assertEqual(response.headers.getRawHeaders(b"x-backend-header"), [b"from-backend"])
        self.assertIsNone(response.headers.getRawHeaders(b"keep-alive"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])

    def test_transparentHeaders(self) -> None:
        """
        The relay adds nothing the client did not send (no Accept-Encoding, no cookies)
        and the client gets the backend's Content-Length, without an invented
        Content-Encoding.
        """
        # A bare agent as the client: treq would add Accept-Encoding itself.
        client = RequestTraversalAgent(self.front)

        def flush() -> None:
            for _ in range(3):
                self.backendHTTP.flush()
                client.flush()

        d = client.request(b"POST", b"http://proxy/api/show", Headers(), None)
        flush()
        backendRequest = self.backendResource.requests[0]
        self.assertIsNone(backendRequest.getHeader(b"accept-encoding"))
        self.assertIsNone(backendRequest.getHeader(b"cookie"))
        backendRequest.setHeader(b"content-length", b"11")
        backendRequest.setHeader(b"set-cookie", b"a=1")
        backendRequest.write(b'{"ok": true}'[:11])
        backendRequest.finish()
        flush()
        response = self.successResultOf(d)
        self.assertEqual(response.length, 11)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1"])
        client.request(b"POST", b"http://proxy/api/show", Headers(), None)
        flush()
        self.assertIsNone(self.backendResource.requests[1].getHeader(b"cookie"))

    def test_clientDisconnectClosesBackend(self) -> None:
        """
        A client that goes away mid-stream makes the relay drop the backend connection.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        backendRequest.write(b'{"response": "a"}\n')
        self.flush()
        self.hangUp = True
        backendRequest.write(b'{"response": "b"}\n')
        self.flush()
        self.failureResultOf(self.collected, ConnectionAbortedError)
        self.assertEqual(len(self.backendResource.lost), 1)
        self.assertEqual(len(self.front.outcomes), 1)
        self.assertIsInstance(self.front.outcomes[0], Failure)
        self.front.outcomes[0].trap(CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_idleTimeoutMidStream(self) -> None:
        """
        Silence longer than the idle timeout ends an NDJSON stream with an error line and
        drops the backend connection; steady output is never cut, however long.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        for _ in range(10):
            self.clock.advance(29)
            backendRequest.write(b'{"response": "x"}\n')
            self.flush()
        self.assertEqual(self.backendResource.lost, [])
        self.clock.advance(30)
        self.flush()
        self.successResultOf(self.collected)
        last = b"".join(chunks).splitlines()[-1]
        self.assertIn("sent nothing for 30s", json.loads(last)["error"])
        self.assertEqual(len(self.backendResource.lost), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_backendFailsMidStream(self) -> None:
        """
        A backend connection lost mid-stream ends the stream with an error line.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        backendRequest.write(b'{"response": "x"}\n')
        self.flush()
        backendRequest.channel.transport.loseConnection()
        self.flush()
        self.successResultOf(self.collected)
        last = json.loads(b"".join(chunks).splitlines()[-1])
        self.assertIn("failed mid-stream", last["error"])

    def test_failureMessageIsReadable(self) -> None:
        """
        The error line names the cause in words, not as a list of Failure reprs.
        """
        response, chunks = self.startStream()
        backendRequest = self.backendResource.requests[0]
        backendRequest.channel.transport.loseConnection()
        self.flush()
        last = json.loads(b"".join(chunks).splitlines()[-1])["error"]
        self.assertNotIn("Failure", last)
        self.assertNotIn("[<", last)

    def test_timeoutBeforeHeaders(self) -> None:
        """
        No response headers within the idle timeout is a L{GatewayTimeout}.
        """
        d = ensureDeferred(
            self.relay.open(self.front.backend, b"POST", b"/api/chat", Headers(), b"{}")
        )
        self.backendHTTP.flush()
        self.clock.advance(30)
        self.backendHTTP.flush()
        self.failureResultOf(d, GatewayTimeout)

    def test_cancelBeforeHeaders(self) -> None:
        """
        Cancelling before the headers gives a plain L{CancelledError}, not Twisted's
        ResponseNeverReceived, and closes the backend request.
        """
        d = ensureDeferred(
            self.relay.open(self.front.backend, b"POST", b"/api/chat", Headers(), b"{}")
        )
        self.backendHTTP.flush()
        d.cancel()
        self.backendHTTP.flush()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.backendResource.lost), 1)


class FileBodyTests(SynchronousTestCase):
    """
    A file body (a spooled blob upload) is streamed to the backend in turns on the
    relay's own clock, not read into memory at once.
    """

    def test_fileStreamed(self) -> None:
        """
        The backend receives the whole file, which the relay reads in chunks.
        """
        import io

        from twisted.web.resource import Resource

        received: list[bytes] = []

        class Sink(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                received.append(request.content.read())
                return b"{}"

        clock = Clock()
        agent = RequestTraversalAgent(Sink())
        relay = Relay(agent, clock, 30)
        data = bytes(range(256)) * 4096  # 1 MiB
        reads: list[int] = []

        class Counted(io.BytesIO):
            def read(self, size: int = -1) -> bytes:
                chunk = super().read(size)
                reads.append(len(chunk))
                return chunk

        d = ensureDeferred(relay.open(Backend(name="b", url="http://b"), b"POST",
                                      b"/api/blobs/sha256:0", Headers(), Counted(data)))
        for _ in range(100):
            clock.advance(0)
            agent.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(received, [data])
        self.assertGreater(len([n for n in reads if n]), 1)
        self.assertLess(max(reads), len(data))


class ConnectingTests(SynchronousTestCase):
    """
    A client that leaves while the proxy is still connecting to the backend.
    """

    def test_cancelWhileConnecting(self) -> None:
        """
        Cancelling during the TCP connect is a plain L{CancelledError}, not a backend
        failure (which would mark a healthy backend offline).
        """
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import Agent

        reactor = MemoryReactorClock()
        relay = Relay(Agent(reactor), reactor, 300)
        backend = Backend(name="b", url="http://127.0.0.1:11434")
        d = ensureDeferred(relay.open(backend, b"POST", b"/api/chat", Headers(), b"{}"))
        self.assertEqual(len(reactor.tcpClients), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)


class UnreachableTests(SynchronousTestCase):
    """
    Connection failures before the response become L{BackendUnreachable}.
    """

    def test_connectionRefused(self) -> None:
        """
        A refused connection is reported as unreachable, naming the backend.
        """
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.defer import fail

        class Refusing:
            def request(self, *args: object, **kwargs: object) -> object:
                return fail(ConnectionRefusedError())

        relay = Relay(Refusing(), Clock(), 30)
        d = ensureDeferred(
            relay.open(Backend(name="gpu9", url="http://x"), b"GET", b"/", Headers(), None)
        )
        failure = self.failureResultOf(d, BackendUnreachable)
        self.assertIn("gpu9", str(failure.value))


def connectedRequest(path: bytes = b"/api/generate") -> tuple[HTTPChannel, Request]:
    """
    A client request on a connected channel (a real L{HTTPChannel} on a
    L{StringTransport}), as twisted.web hands it to a route.
    """
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    request = Request(channel)
    request.method = b"POST"
    request.uri = request.path = path
    request.clientproto = b"HTTP/1.1"
    return channel, request


@implementer(IPushProducer)
class FakeBackendTransport:
    """
    The producer side of a backend connection: records pause/resume/stop.
    """

    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class FakeResponse:
    """
    Just enough of L{IResponse} to hand a body protocol a producer transport.
    """

    code = 200
    phrase = b"OK"
    length = UNKNOWN_LENGTH

    def __init__(self, contentType: bytes) -> None:
        self.headers = Headers({b"content-type": [contentType]})
        self.transport = FakeBackendTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class BackpressureTests(SynchronousTestCase):
    """
    A real HTTPChannel on a StringTransport: when the client side pauses, the backend
    transport pauses.
    """

    def makeRequest(self) -> tuple[HTTPChannel, Request]:
        """
        A request on a connected channel.
        """
        return connectedRequest()

    def test_pauseAndResume(self) -> None:
        """
        Pausing the client channel pauses the backend; resuming resumes it.
        """
        channel, request = self.makeRequest()
        response = FakeResponse(b"application/x-ndjson")
        relay = Relay(None, Clock(), 30)
        done = relay.stream(request, response, OLLAMA)
        response.protocol.dataReceived(b'{"response": "a"}\n')
        channel.pauseProducing()
        self.assertEqual(response.transport.state, "paused")
        channel.resumeProducing()
        self.assertEqual(response.transport.state, "producing")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(done), len(b'{"response": "a"}\n'))

    def test_cancelStopsBackend(self) -> None:
        """
        Cancelling the relay (the client went away) stops the backend transport.
        """
        channel, request = self.makeRequest()
        response = FakeResponse(b"text/event-stream")
        done = Relay(None, Clock(), 30).stream(request, response, OPENAI)
        done.cancel()
        self.assertEqual(response.transport.state, "stopped")
        self.failureResultOf(done, CancelledError)

    def test_plainBodyCutShortAborts(self) -> None:
        """
        A plain (not NDJSON or SSE) body that the backend cuts short aborts the client
        connection: closing it gently would still let the final chunk marker (written
        when the request is finished) through, and the client would take the truncated
        body for complete.
        """
        channel, request = self.makeRequest()
        aborted = []
        channel.transport.abortConnection = lambda: aborted.append(True)
        response = FakeResponse(b"application/json")
        done = Relay(None, Clock(), 30).stream(request, response, OLLAMA)
        response.protocol.dataReceived(b'{"partial": "abc')
        from twisted.internet.error import ConnectionLost

        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(done)
        self.assertEqual(aborted, [True])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_sseErrorLine(self) -> None:
        """
        An SSE stream that fails mid-way ends with a C{data:} error event.
        """
        channel, request = self.makeRequest()
        response = FakeResponse(b"text/event-stream")
        done = Relay(None, Clock(), 30).stream(request, response, OPENAI)
        response.protocol.dataReceived(b"data: {}\n\n")
        from twisted.internet.error import ConnectionLost

        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(done)
        written = channel.transport.value()
        self.assertIn(b'data: {"error": {"message": "backend failed mid-stream', written)
        self.assertEqual(self.flushLoggedErrors(), [])


class TimeoutTests(SynchronousTestCase):
    """
    The two timeouts of a body being relayed: first byte, then idle; neither runs while
    the client is what paused the transfer.
    """

    def start(self, firstByte: float = 60, idle: float = 5) -> tuple[Any, Any, Any, Clock]:
        """
        A body being relayed with these timeouts: the client channel, the backend
        response, the relay's Deferred and the clock.
        """
        channel, request = connectedRequest()
        clock = Clock()
        response = FakeResponse(b"application/x-ndjson")
        done = Relay(None, clock, idle, firstByte).stream(request, response, OLLAMA)
        return channel, response, done, clock

    def test_firstByteThenIdle(self) -> None:
        """
        Before the first body byte the first-byte timeout applies (a model loading after
        the headers were sent), after it the idle timeout.
        """
        channel, response, done, clock = self.start()
        clock.advance(59)
        self.assertEqual(response.transport.state, "producing")
        response.protocol.dataReceived(b'{"response": "a"}\n')
        clock.advance(4.9)
        self.assertEqual(response.transport.state, "producing")
        clock.advance(0.2)
        self.assertEqual(response.transport.state, "stopped")
        from twisted.internet.error import ConnectionLost

        # What stopping the backend transport ends with.
        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(done)
        self.assertIn(b"sent nothing for 5s mid-stream", channel.transport.value())
        self.flushLoggedErrors()

    def test_noTimeoutWhileClientPaused(self) -> None:
        """
        While the client's side has paused the backend (backpressure), the backend's
        silence is ours, and no timeout runs; once resumed, the idle timeout starts over.
        """
        channel, response, done, clock = self.start()
        response.protocol.dataReceived(b'{"response": "a"}\n')
        channel.pauseProducing()
        clock.advance(3600)
        self.assertEqual(response.transport.state, "paused")
        channel.resumeProducing()
        clock.advance(4.9)
        self.assertEqual(response.transport.state, "producing")
        clock.advance(0.2)
        self.assertEqual(response.transport.state, "stopped")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.successResultOf(done)


class HeaderTests(SynchronousTestCase):
    """
    L{forwardedHeaders} and L{requestHeadersForBackend}.
    """

    def test_dropsHopByHopAndListed(self) -> None:
        """
        Hop-by-hop headers and those listed in Connection are dropped, others kept.
        """
        headers = Headers(
            {
                b"Connection": [b"keep-alive, X-Private"],
                b"X-Private": [b"1"],
                b"Transfer-Encoding": [b"chunked"],
                b"X-User-ID": [b"alice"],
                b"Host": [b"proxy"],
                b"Content-Length": [b"5"],
                b"Authorization": [b"Bearer sk-proxy"],
            }
        )
        forwarded = requestHeadersForBackend(headers, frozenset({b"authorization"}))
        self.assertEqual(
            sorted(name for name, _ in forwarded.getAllRawHeaders()), [b"X-User-Id"]
        )
        kept = forwardedHeaders(headers)
        self.assertEqual(kept.getRawHeaders(b"host"), [b"proxy"])
        self.assertIsNone(kept.getRawHeaders(b"x-private"))


class ReconfigureTests(SynchronousTestCase):
    """
    L{Relay.reconfigure}: a reloaded config's timeouts.
    """

    def test_timeouts(self) -> None:
        """
        Both timeouts come from the new config.
        """
        from twisted.internet.task import Clock

        from ollamamq.config import Config

        relay = Relay(None, Clock(), 30)
        relay.reconfigure(Config(timeout=12.0, firstByteTimeout=45.0))
        self.assertEqual((relay.idleTimeout, relay.firstByteTimeout), (12.0, 45.0))
