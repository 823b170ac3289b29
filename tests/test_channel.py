# -*- test-case-name: tests.test_channel -*-
"""
Tests for L{ollamamq.channel}: slow clients time out (408) and oversized headers get 431,
before a request reaches a resource.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollamamq.channel import MIN_BODY_RATE, guardedChannel


class _Recorder(Resource):
    """
    A leaf resource answering C{ok} and recording the requests it saw.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request):  # type: ignore[no-untyped-def]
        self.seen.append(request.path)
        self.headers = list(request.requestHeaders.getAllRawHeaders())
        return b"ok"


class ChannelTests(SynchronousTestCase):
    """
    A L{guardedChannel} on a L{StringTransport} and a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = _Recorder()
        self.site = Site(self.resource, reactor=self.clock)
        self.site.protocol = guardedChannel(self.clock, 10.0, 1024)

    def connect(self) -> tuple[object, StringTransport]:
        """
        A channel connected to a fresh transport.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def test_normalRequest(self) -> None:
        """
        A request sent in time is served, and the timer is off while it is handled.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.resource.seen, [b"/x"])
        self.assertIn(b"200 OK", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_slowHeaders(self) -> None:
        """
        Headers trickling in a byte at a time get a shaped 408 after C{client_timeout}, and
        the request never reaches the resource.
        """
        channel, transport = self.connect()
        request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nX-Slow: "
        for byte in request:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.15)
        self.assertFalse(transport.disconnecting)
        for _ in range(10):
            channel.dataReceived(b"x")
            self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), response)
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"]["code"], "request_timeout")
        self.assertEqual(self.resource.seen, [])

    def test_slowBody(self) -> None:
        """
        A body arriving slower than L{MIN_BODY_RATE} beyond the grace is timed out; one
        arriving faster passes, however long it takes in total.
        """
        channel, transport = self.connect()
        size = MIN_BODY_RATE * 40
        channel.dataReceived(
            b"POST /api/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
        )
        # Fast enough: 40 chunks of 1.25 x the minimum rate per second, over 32 seconds.
        chunk = b"x" * MIN_BODY_RATE
        for _ in range(40):
            self.clock.advance(0.8)
            channel.dataReceived(chunk)
        self.assertEqual(self.resource.seen, [b"/api/chat"])
        self.assertFalse(transport.disconnecting)

        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /api/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
        )
        for _ in range(40):
            self.clock.advance(1.0)
            channel.dataReceived(b"x" * 1000)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"408", transport.value().split(b"\r\n")[0])
        self.assertEqual(self.resource.seen, [b"/api/chat"])

    def test_idleConnection(self) -> None:
        """
        A connection that sends nothing, or nothing after its response, is closed quietly
        after C{client_timeout}.
        """
        channel, transport = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

        channel, transport = self.connect()
        self.clock.advance(9)
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(9)
        channel.dataReceived(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.resource.seen, [b"/a", b"/b"])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)

    def test_pipelined(self) -> None:
        """
        Two requests in one packet are both served.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.resource.seen, [b"/a", b"/b"])

    def test_headersTooLarge(self) -> None:
        """
        Headers over C{max_header_bytes} in total, or in one line, get a 431 shaped for the
        route (here OpenAI); the resource never sees the request.
        """
        for headers in [b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(12)),
                        b"X-Big: " + b"v" * 2000 + b"\r\n"]:
            channel, transport = self.connect()
            channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n" + headers + b"\r\n")
            self.assertTrue(transport.disconnecting)
            status, _, rest = transport.value().partition(b"\r\n")
            self.assertEqual(status, b"HTTP/1.1 431 Request Header Fields Too Large")
            body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
            self.assertEqual(body["error"]["type"], "invalid_request_error")
            self.assertEqual(body["error"]["code"], "headers_too_large")
        self.assertEqual(self.resource.seen, [])

    def test_targetTooLong(self) -> None:
        """
        A request line over the limit gets 414, shaped for Ollama on C{/api/} paths.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /api/tags?" + b"q" * 2000 + b" HTTP/1.1\r\n")
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), response[:80])
        self.assertIn("over 1024 bytes", json.loads(response.split(b"\r\n\r\n", 1)[1])["error"])

    def test_justUnderLimit(self) -> None:
        """
        Headers just under the limit pass.
        """
        channel, transport = self.connect()
        line = b"GET /x HTTP/1.1"
        filler = b"X-F: " + b"v" * (1024 - len(line) - 5 - 10)
        channel.dataReceived(line + b"\r\n" + filler + b"\r\n\r\n")
        self.assertEqual(self.resource.seen, [b"/x"])

    def test_crlfInHeaderValue(self) -> None:
        """
        A bare CR, LF or NUL inside a header value is refused (400) before any resource
        sees it, so it can never be forwarded to a backend as a second header.
        """
        for value in [b"a\rX-Injected: 1", b"a\nX-Injected: 1", b"a\x00b"]:
            channel, transport = self.connect()
            channel.dataReceived(b"GET /x HTTP/1.1\r\nX-Note: " + value + b"\r\n\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400"), value)
        self.assertEqual(self.resource.seen, [])

    def test_foldedHeader(self) -> None:
        """
        An obsolete folded header line is joined with a space: the value that goes on
        has no CR or LF in it.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nX-Note: a\r\n X-Injected: 1\r\n\r\n")
        self.assertEqual(self.resource.seen, [b"/x"])
        values = [v for _, vs in self.resource.headers for v in vs]
        self.assertIn(b"a X-Injected: 1", values)
        for value in values:
            self.assertNotIn(b"\r", value)
            self.assertNotIn(b"\n", value)

    def test_closedBeforeTimeout(self) -> None:
        """
        A connection already being closed (the front refused its request) is not timed
        out again when its transport is slow to go: no second answer, no error.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /api/chat HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        channel.loseConnection()
        channel.loseConnection()
        self.clock.advance(60)
        self.assertEqual(transport.value(), b"")
