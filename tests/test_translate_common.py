"""
Tests for L{ollamamq.translate.common}: the incremental SSE reader, the translating
response wrapper, and backend errors reshaped.
"""

from __future__ import annotations

import json

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ollamamq.errors import ANTHROPIC, OLLAMA, OPENAI, ProxyError
from ollamamq.translate.common import (
    SSEReader,
    TranslatedResponse,
    UntranslatableResponse,
    backendErrorMessage,
    errorAnswer,
    untranslatable,
)


class SSEReaderTests(SynchronousTestCase):
    """
    Tests for L{SSEReader}.
    """

    def test_events(self) -> None:
        """
        Events end at an empty line; unnamed ones are C{message}; C{event:} names them.
        """
        reader = SSEReader()
        self.assertEqual(reader.feed(b'data: {"a": 1}\n\nevent: ping\ndata: x\n\n'),
                         [("message", '{"a": 1}'), ("ping", "x")])

    def test_split(self) -> None:
        """
        An event split anywhere, even inside C{data:}, comes out once it is complete,
        and only the unfinished tail is kept.
        """
        reader = SSEReader()
        stream = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
        events = []
        for i in range(len(stream)):
            events.extend(reader.feed(stream[i : i + 1]))
        self.assertEqual(events, [("message", '{"choices": []}'), ("message", "[DONE]")])

    def test_lineEndings(self) -> None:
        """
        CRLF and CR end lines too, also when a CRLF is split between two chunks.
        """
        reader = SSEReader()
        self.assertEqual(reader.feed(b"data: a\r\n\r"), [("message", "a")])
        self.assertEqual(reader.feed(b"\ndata: b\r\rdata: c\n\n"), [("message", "b"), ("message", "c")])

    def test_multiline(self) -> None:
        """
        Several C{data:} lines are joined with LF; comments and unknown fields are
        ignored; a value without the space after the colon is kept whole.
        """
        reader = SSEReader()
        self.assertEqual(reader.feed(b": keep-alive\nid: 3\ndata:one\ndata: two\n\n"),
                         [("message", "one\ntwo")])
        self.assertEqual(reader.feed(b": comment only\n\n"), [])

    def test_close(self) -> None:
        """
        At the end of the stream, an event missing only its empty line is delivered.
        """
        reader = SSEReader()
        self.assertEqual(reader.feed(b"data: [DONE]"), [])
        self.assertEqual(reader.close(), [("message", "[DONE]")])

    def test_limit(self) -> None:
        """
        An event over the size limit is refused, whether in one line or in many.
        """
        self.assertRaises(UntranslatableResponse, SSEReader(10).feed, b"data: " + b"x" * 20)
        reader = SSEReader(10)
        self.assertRaises(UntranslatableResponse, reader.feed, b"data: 123456\ndata: 123456\n")


class _Collect(Protocol):
    """
    The relay's side in the tests: what a body protocol received.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


class _Upper:
    """
    A stream translator for the tests: upper-cases, refuses C{"bad"}.
    """

    contentType = b"application/x-ndjson"

    def feed(self, data: bytes) -> bytes:
        if data == b"bad":
            raise UntranslatableResponse("bad bytes")
        return data.upper()

    def finish(self) -> bytes:
        return b"END\n"

    def failed(self, error: ProxyError) -> bytes:
        return json.dumps({"error": error.message}).encode() + b"\n"


class _Response:
    """
    Just enough of an L{IResponse}.
    """

    version = (b"HTTP", 1, 1)
    code = 200
    phrase = b"OK"
    length = 42
    request = None

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"text/event-stream"], b"x-request-id": [b"7"]})
        self.protocol = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol


class TranslatedResponseTests(SynchronousTestCase):
    """
    Tests for L{TranslatedResponse}.
    """

    def setUp(self) -> None:
        self.backend = _Response()
        self.response = TranslatedResponse(self.backend, _Upper())
        self.inner = _Collect()
        self.response.deliverBody(self.inner)
        self.transport = StringTransport()
        self.backend.protocol.makeConnection(self.transport)

    def test_headers(self) -> None:
        """
        Status and other headers pass; the content type is the client's; the length is
        unknown (the translation has another one).
        """
        self.assertEqual(self.response.code, 200)
        self.assertEqual(self.response.length, UNKNOWN_LENGTH)
        self.assertEqual(self.response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        self.assertEqual(self.response.headers.getRawHeaders(b"x-request-id"), [b"7"])

    def test_transportHandedOn(self) -> None:
        """
        The relay's protocol gets the backend's own transport, so it can register it as
        the client's producer (backpressure) and stop it (cancel).
        """
        self.assertIs(self.inner.transport, self.transport)

    def test_translated(self) -> None:
        """
        Each chunk is translated as it arrives; the end of the body adds the
        translator's tail before the relay sees the end.
        """
        self.backend.protocol.dataReceived(b"ab")
        self.assertEqual(self.inner.data, [b"AB"])
        self.backend.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.inner.data, [b"AB", b"END\n"])
        self.assertTrue(self.inner.reason.check(ResponseDone))

    def test_untranslatable(self) -> None:
        """
        A chunk that cannot be translated ends the stream with an error line and drops
        the backend connection; the relay sees a clean end and nothing more.
        """
        self.backend.protocol.dataReceived(b"bad")
        self.backend.protocol.dataReceived(b"more")
        self.assertEqual(json.loads(self.inner.data[0])["error"],
                         "cannot translate the backend's answer: bad bytes")
        self.assertEqual(len(self.inner.data), 1)
        self.assertEqual(self.transport.producerState, "stopped")
        self.backend.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception())])))
        self.assertTrue(self.inner.reason.check(ResponseDone))

    def test_failure(self) -> None:
        """
        A backend failure mid-body reaches the relay as it is (it writes the error line).
        """
        self.backend.protocol.connectionLost(Failure(ResponseFailed([])))
        self.assertEqual(self.inner.data, [])
        self.assertTrue(self.inner.reason.check(ResponseFailed))


class BackendErrorTests(SynchronousTestCase):
    """
    Tests for L{backendErrorMessage}, L{errorAnswer} and L{untranslatable}.
    """

    def test_shapes(self) -> None:
        """
        The message is found in OpenAI's, Ollama's and FastAPI's shapes and in text.
        """
        self.assertEqual(backendErrorMessage(b'{"error": {"message": "m1", "code": 400}}', 400), "m1")
        self.assertEqual(backendErrorMessage(b'{"error": "m2"}', 400), "m2")
        self.assertEqual(backendErrorMessage(b'{"detail": "Not Found"}', 404), "Not Found")
        self.assertEqual(backendErrorMessage(b"plain text\n", 500), "plain text")
        self.assertEqual(backendErrorMessage(b"", 500), "backend answered 500")
        self.assertEqual(backendErrorMessage(b"[]", 500), "backend answered 500")

    def test_reshaped(self) -> None:
        """
        A backend's error keeps its status and gets the client's shape.
        """
        body = b'{"error": {"message": "context too long", "type": "invalid_request_error"}}'
        code, kind, data = errorAnswer(400, body, OLLAMA)
        self.assertEqual((code, json.loads(data)), (400, {"error": "context too long"}))
        code, kind, data = errorAnswer(400, body, ANTHROPIC)
        self.assertEqual(json.loads(data), {"type": "error", "error": {
            "type": "invalid_request_error", "message": "context too long"}})
        code, kind, data = errorAnswer(500, body, OPENAI)
        self.assertEqual(json.loads(data)["error"]["type"], "server_error")
        self.assertEqual(kind, b"application/json; charset=utf-8")

    def test_untranslatable(self) -> None:
        """
        An answer that cannot be translated is a 502 saying why.
        """
        code, _, data = untranslatable("no choices", OLLAMA)
        self.assertEqual((code, json.loads(data)),
                         (502, {"error": "cannot translate the backend's answer: no choices"}))
