# -*- test-case-name: tests.test_translate_common -*-
"""
What every translation shares: the incremental SSE reader, the translated request
(L{Translation}), the response wrappers that translate a body as it arrives, and backend
errors reshaped for the client's API family.

A response is translated in one of two ways:

  - streamed (the client asked for a stream and the backend answers C{text/event-stream}):
    L{TranslatedResponse} wraps the backend's L{IResponse}; the relay reads it like any
    other response, and its body protocol feeds each chunk through a L{StreamTranslator}
    as it arrives. The backend's transport is handed on untouched, so the relay still
    registers it as the client's producer (backpressure) and stops it on cancel.
  - whole (no stream, or an error status): the body is collected under a size limit and
    translated at once by a L{WholeTranslator}, which also picks the status.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol as TypingProtocol

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from ollamamq.errors import BadGateway, ProxyError, errorPayload

#: Largest single SSE event accepted from a backend. A chunk is one token or one tool
#: call; anything near this is a misbehaving server, not an answer.
MAX_EVENT = 8 * 1024 * 1024

#: Largest whole (non-streamed) backend answer translated. Embeddings of a large batch
#: are the biggest legitimate answers (1,000 inputs x 4,096 floats is about 80 MB).
MAX_WHOLE = 256 * 1024 * 1024

NDJSON = b"application/x-ndjson"
EVENT_STREAM = b"text/event-stream"
JSON_TYPE = b"application/json; charset=utf-8"


class UntranslatableResponse(Exception):
    """
    A backend answer that cannot be put faithfully into the client's dialect (not JSON,
    not the documented shape, tool arguments that are not a JSON object).
    """


class SSEReader:
    """
    Splits a Server-Sent Events byte stream into events as the bytes arrive (the
    WHATWG event-stream grammar: lines end in CR, LF or CRLF, an empty line ends an
    event, C{data:} lines are joined with LF, lines starting with C{:} are comments).

    Only the unfinished tail is kept between calls, never the stream.
    """

    def __init__(self, maxEvent: int = MAX_EVENT) -> None:
        self._buffer = b""
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0
        self._maxEvent = maxEvent
        self._skipLF = False

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """
        Take the next bytes; return the events they complete, as C{(event, data)} with
        C{event} C{"message"} when unnamed.

        @raise UntranslatableResponse: an event larger than the limit.
        """
        if self._skipLF and data.startswith(b"\n"):
            data = data[1:]
        self._skipLF = False
        self._buffer += data
        events = []
        start = 0
        buffer = self._buffer
        while True:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, after = lf, lf + 1
            else:
                end = cr
                if cr + 1 < len(buffer):
                    after = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
                else:
                    # A CR at the end of the chunk: its LF may come in the next one.
                    after = cr + 1
                    self._skipLF = True
            event = self._line(buffer[start:end])
            if event is not None:
                events.append(event)
            start = after
        self._buffer = buffer[start:]
        if len(self._buffer) + self._size > self._maxEvent:
            raise UntranslatableResponse(f"an event of the backend's stream is over {self._maxEvent} bytes")
        return events

    def _line(self, line: bytes) -> tuple[str, str] | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = (self._event.decode("utf-8", "replace") or "message",
                     b"\n".join(self._data).decode("utf-8", "replace"))
            self._event, self._data, self._size = b"", [], 0
            return event
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._size += len(value)
            if self._size > self._maxEvent:
                raise UntranslatableResponse(f"an event of the backend's stream is over {self._maxEvent} bytes")
        elif name == b"event":
            self._event = value
        return None

    def close(self) -> list[tuple[str, str]]:
        """
        The stream ended: the event still being read, if its data is complete.
        """
        events = []
        if self._buffer:
            event = self._line(self._buffer)
            self._buffer = b""
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events


def jsonLine(value: Any) -> bytes:
    """
    One NDJSON line.
    """
    return json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"


def sseEvent(value: Any, name: str | None = None) -> bytes:
    """
    One SSE event with a JSON payload, named when C{name} is given.
    """
    head = b"event: " + name.encode("ascii") + b"\n" if name else b""
    return head + b"data: " + json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n\n"


def decodeJSON(body: bytes, what: str) -> Any:
    """
    A backend's JSON answer, decoded.

    @raise UntranslatableResponse: when it is not JSON.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise UntranslatableResponse(f"the backend's {what} is not JSON") from None


class OpenAIStreamReader:
    """
    What every translation of an OpenAI chat or completion SSE stream does before its own
    mapping: read the events as the bytes arrive, end at C{[DONE]}, refuse what is not a
    JSON object, and end with the client's error shape at an error event. Subclasses set
    C{_reader} (an L{SSEReader}) and C{_ended}, and give C{_final}, C{_error} and
    C{_chunk}.
    """

    _reader: SSEReader
    _ended: bool

    def feed(self, data: bytes) -> bytes:
        """
        Translate the next bytes of the backend's stream.
        """
        if self._ended:
            return b""
        return b"".join(self._event(payload) for _, payload in self._reader.feed(data))

    def _event(self, payload: str) -> bytes:
        if self._ended:
            return b""
        if payload.strip() == "[DONE]":
            return self._final()
        chunk = decodeJSON(payload.encode("utf-8"), "stream event")
        if not isinstance(chunk, dict):
            raise UntranslatableResponse("a stream event is not a JSON object")
        if "error" in chunk:
            self._ended = True
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            return self._error(str(message or "backend error"))
        return self._chunk(chunk)

    def _final(self) -> bytes:
        raise NotImplementedError

    def _error(self, message: str) -> bytes:
        raise NotImplementedError

    def _chunk(self, chunk: dict) -> bytes:
        raise NotImplementedError


class StreamTranslator(TypingProtocol):
    """
    Translates a streamed answer: bytes in as they come from the backend, bytes out in
    the client's framing.
    """

    contentType: bytes

    def feed(self, data: bytes) -> bytes:
        """
        The translation of the next bytes (possibly empty: an event not finished yet).

        @raise UntranslatableResponse: what the backend sent cannot be translated.
        """

    def finish(self) -> bytes:
        """
        The end of the translated stream, once the backend's body is complete.
        """

    def failed(self, error: ProxyError) -> bytes:
        """
        The end of the translated stream when the answer cannot go on: an error in the
        client's framing.
        """


class WholeTranslator(TypingProtocol):
    """
    Translates a whole (collected) answer.
    """

    def translate(self, code: int, body: bytes) -> tuple[int, bytes, bytes]:
        """
        C{(status, content type, body)} for the client.

        @raise UntranslatableResponse: the answer cannot be translated.
        """


@attrs.frozen
class Translation:
    """
    A request put into a backend's dialect, and how to put the answer back.

    @ivar path: the backend's path (C{/v1/chat/completions}).
    @ivar body: the backend's request body.
    @ivar family: the API family of the client (for error shapes).
    @ivar stream: whether the client asked for a streamed answer.
    @ivar streamed: makes the translator of a streamed answer.
    @ivar whole: makes the translator of a whole answer.
    @ivar local: the answer itself, when the proxy answers without asking the backend
        (Ollama's "load the model" call: an OpenAI server has its models loaded).
    """

    path: bytes
    body: dict
    family: str
    stream: bool
    streamed: Callable[[], StreamTranslator] | None
    whole: Callable[[], WholeTranslator] | None
    local: dict | None = None

    def encodedBody(self) -> bytes:
        """
        The request body as sent.
        """
        return json.dumps(self.body).encode("utf-8")


def backendErrorMessage(body: bytes, code: int) -> str:
    """
    The message of a backend's error answer, in any of the shapes servers use: OpenAI
    (C{{"error": {"message"}}}), Ollama and llama-server (C{{"error": "..."}}), FastAPI
    (C{{"detail": ...}}), or plain text.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or f"backend answered {code}"
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail"))
        if isinstance(error, dict):
            message = error.get("message")
            if isinstance(message, str) and message:
                return message
        if isinstance(error, str) and error:
            return error
        if error is not None:
            return json.dumps(error)[:500]
    return f"backend answered {code}"


class _BackendError(ProxyError):
    """
    A backend's own error answer, reshaped: it keeps the backend's status.
    """

    openaiTypes = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "invalid_request_error",
                   413: "invalid_request_error", 429: "rate_limit_error"}
    anthropicTypes = {400: "invalid_request_error", 401: "authentication_error",
                      403: "permission_error", 404: "not_found_error",
                      413: "request_too_large", 429: "rate_limit_error",
                      503: "overloaded_error", 529: "overloaded_error"}

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message, code="backend_error")
        self.status = code
        self.openaiType = self.openaiTypes.get(code, "server_error" if code >= 500 else "invalid_request_error")
        self.anthropicType = self.anthropicTypes.get(code, "api_error")


def errorAnswer(code: int, body: bytes, family: str) -> tuple[int, bytes, bytes]:
    """
    A backend's error answer (status C{code}), reshaped for C{family}.
    """
    error = _BackendError(code, backendErrorMessage(body, code))
    return code, JSON_TYPE, json.dumps(errorPayload(error, family)).encode("utf-8")


def untranslatable(reason: str, family: str) -> tuple[int, bytes, bytes]:
    """
    The 502 a client gets for an answer that cannot be translated.
    """
    error = BadGateway(f"cannot translate the backend's answer: {reason}", code="untranslatable_response")
    return 502, JSON_TYPE, json.dumps(errorPayload(error, family)).encode("utf-8")


def translateWhole(code: int, body: bytes, family: str, translate: Callable[[Any], Any],
                   encode: Callable[[Any], tuple[bytes, bytes]]) -> tuple[int, bytes, bytes]:
    """
    The client's status, content type and body for a whole backend answer: the backend's
    own error passed on in C{family}'s shape, else C{translate} of the decoded answer,
    encoded as C{encode} says; a 502 when the answer cannot be translated. What every
    L{WholeTranslator} does around its own mapping.
    """
    if not 200 <= code < 300:
        return errorAnswer(code, body, family)
    try:
        result = translate(decodeJSON(body, "answer"))
    except UntranslatableResponse as e:
        return untranslatable(str(e), family)
    contentType, data = encode(result)
    return 200, contentType, data


def asJSON(value: Any) -> tuple[bytes, bytes]:
    """
    A translated answer as one JSON document.
    """
    return JSON_TYPE, json.dumps(value, ensure_ascii=False).encode("utf-8")


class _TranslatingBody:
    """
    The body protocol the relay gets: it is handed the backend's transport unchanged
    and sees translated bytes.
    """

    def __init__(self, inner: IProtocol, translator: StreamTranslator) -> None:
        self._inner = inner
        self._translator = translator
        self._broken = False
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            out = self._translator.feed(data)
        except UntranslatableResponse as e:
            self._break(str(e))
            return
        if out:
            self._inner.dataReceived(out)

    def _break(self, reason: str) -> None:
        # The stream cannot go on faithfully: end it with an error line in the client's
        # framing and drop the backend connection; the relay then sees a clean end.
        self._broken = True
        error = BadGateway(f"cannot translate the backend's answer: {reason}",
                           code="untranslatable_response")
        self._inner.dataReceived(self._translator.failed(error))
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        if self._broken:
            self._inner.connectionLost(Failure(ResponseDone()))
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            try:
                tail = self._translator.finish()
            except UntranslatableResponse as e:
                tail = self._translator.failed(BadGateway(
                    f"cannot translate the backend's answer: {e}", code="untranslatable_response"))
            if tail:
                self._inner.dataReceived(tail)
        self._inner.connectionLost(reason)


@implementer(IResponse)
class TranslatedResponse:
    """
    A backend's streamed response as the client's dialect sees it: same status, the
    client's content type, no length (the translated body has another one), and a body
    translated as it arrives.
    """

    def __init__(self, response: IResponse, translator: StreamTranslator) -> None:
        self._response = response
        self._translator = translator
        self.version = response.version
        self.code = response.code
        self.phrase = response.phrase
        self.length = UNKNOWN_LENGTH
        self.request = response.request
        self.previousResponse = None
        headers = Headers()
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in (b"content-type", b"content-length", b"content-encoding"):
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"content-type", [translator.contentType])
        self.headers = headers

    def deliverBody(self, protocol: IProtocol) -> None:
        """
        Deliver the translated body to C{protocol}.
        """
        self._response.deliverBody(_TranslatingBody(protocol, self._translator))

    def setPreviousResponse(self, response: IResponse) -> None:
        """
        Part of L{IResponse}; a translated response has no redirect history.
        """
        self.previousResponse = response

