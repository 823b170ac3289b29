# -*- test-case-name: tests.test_errors -*-
"""
Errors the proxy answers itself, shaped for the API family of the route they happen on.

Every component raises a L{ProxyError} subclass; only the HTTP layer turns it into bytes,
with L{errorBody} before the response started, or L{streamErrorLine} once a stream is
under way (a stream never ends silently truncated).
"""

from __future__ import annotations

import json
import math
from typing import Any

OLLAMA = "ollama"
OPENAI = "openai"
ANTHROPIC = "anthropic"


class ProxyError(Exception):
    """
    An error answered to the client.

    @cvar status: the HTTP status code.
    @cvar openaiType: the C{error.type} of the OpenAI shape.
    @cvar anthropicType: the C{error.type} of the Anthropic shape.
    @ivar message: what went wrong, for a person.
    @ivar code: a machine-readable reason (OpenAI C{error.code}), or L{None}.
    @ivar retryAfter: seconds for a C{Retry-After} header, or L{None}.
    @ivar headers: further response headers the answer carries (lower-case names).
    """

    status = 500
    openaiType = "server_error"
    anthropicType = "api_error"

    def __init__(
        self, message: str, code: str | None = None, retryAfter: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryAfter = retryAfter
        self.headers: dict[bytes, bytes] = {}


class BadRequest(ProxyError):
    """
    Malformed JSON, a missing model, or another unusable request.
    """

    status = 400
    openaiType = anthropicType = "invalid_request_error"


class Unauthorized(ProxyError):
    """
    A missing or unknown key where one is needed (the user's key with C{auth =
    "required"}, the admin key on admin routes).
    """

    status = 401
    openaiType = anthropicType = "authentication_error"


class Forbidden(ProxyError):
    """
    A blocked user or address.
    """

    status = 403
    openaiType = anthropicType = "permission_error"


class NotFound(ProxyError):
    """
    An unknown model or route.
    """

    status = 404
    openaiType = "invalid_request_error"
    anthropicType = "not_found_error"


class MethodNotAllowed(ProxyError):
    """
    A known route asked with a method it does not take.

    @ivar allowed: the methods it does take, for the C{Allow} header.
    """

    status = 405
    openaiType = anthropicType = "invalid_request_error"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message, code="method_not_allowed")
        self.allowed = allowed


class NotImplementedMethod(ProxyError):
    """
    A request method the proxy does not implement anywhere.
    """

    status = 501
    openaiType = anthropicType = "invalid_request_error"


class BodyTooLarge(ProxyError):
    """
    A request body over C{max_body_bytes}.
    """

    status = 413
    openaiType = "invalid_request_error"
    anthropicType = "request_too_large"


class RequestTimeout(ProxyError):
    """
    The client sent its request too slowly (C{client_timeout}).
    """

    status = 408
    openaiType = anthropicType = "invalid_request_error"


class TargetTooLong(ProxyError):
    """
    The request line alone is over C{max_header_bytes}.
    """

    status = 414
    openaiType = anthropicType = "invalid_request_error"


class HeadersTooLarge(ProxyError):
    """
    The request's headers are over C{max_header_bytes}.
    """

    status = 431
    openaiType = anthropicType = "invalid_request_error"


class TooManyRequests(ProxyError):
    """
    The user's queue is full, or the user's request rate is over its limit.
    """

    status = 429
    openaiType = anthropicType = "rate_limit_error"


class BadGateway(ProxyError):
    """
    The backend failed before the first byte and no other backend could take the request.
    """

    status = 502
    openaiType = "server_error"
    anthropicType = "api_error"


class Unavailable(ProxyError):
    """
    No backend online for the model, the global queue is full, a queue-wait limit passed,
    or the proxy is shutting down.
    """

    status = 503
    openaiType = "server_error"
    anthropicType = "overloaded_error"


class GatewayTimeout(ProxyError):
    """
    The backend sent nothing for the idle timeout before the first byte.
    """

    status = 504
    openaiType = "server_error"
    anthropicType = "api_error"


def errorPayload(error: ProxyError, family: str) -> dict:
    """
    The JSON object describing C{error} in the shape of C{family}.
    """
    if family == OPENAI:
        return {
            "error": {
                "message": error.message,
                "type": error.openaiType,
                "code": error.code,
            }
        }
    if family == ANTHROPIC:
        return {
            "type": "error",
            "error": {"type": error.anthropicType, "message": error.message},
        }
    return {"error": error.message}


def errorBody(error: ProxyError, family: str) -> bytes:
    """
    A whole error response body.
    """
    return json.dumps(errorPayload(error, family)).encode("utf-8")


def retryAfterHeader(error: ProxyError) -> bytes | None:
    """
    The C{Retry-After} value (whole seconds, at least 1), or L{None} when it has none.
    """
    if error.retryAfter is None:
        return None
    return str(max(1, math.ceil(error.retryAfter))).encode("ascii")


_REASONS = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 413: b"Payload Too Large", 429: b"Too Many Requests",
    408: b"Request Timeout", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

JSON_TYPE = b"application/json; charset=utf-8"


def errorHeaders(error: ProxyError) -> list[tuple[bytes, bytes]]:
    """
    The response headers that go with C{error}: its content type, C{Retry-After} and
    C{Allow} where it has them, C{WWW-Authenticate} on a 401 (the OpenAI and Anthropic
    SDKs read it), and the error's own C{headers}.
    """
    headers = [(b"content-type", JSON_TYPE)]
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="ollamamq"'))
    headers.extend(error.headers.items())
    retry = retryAfterHeader(error)
    if retry is not None:
        headers.append((b"retry-after", retry))
    allowed = getattr(error, "allowed", None)
    if allowed:
        headers.append((b"allow", ", ".join(allowed).encode("ascii")))
    return headers


def writeError(request: Any, error: ProxyError, family: str) -> bytes:
    """
    Set C{request}'s status and headers for C{error} and return the body to write: the one
    way every route answers an error before its response started.
    """
    request.setResponseCode(error.status)
    for name, value in errorHeaders(error):
        request.setHeader(name, value)
    return errorBody(error, family)


def errorResponse(error: ProxyError, family: str) -> bytes:
    """
    A whole HTTP/1.1 response for C{error} that closes the connection, for answering on a
    transport before twisted.web has set a request up (see L{ollamamq.front}).
    """
    body = errorBody(error, family)
    lines = [b"HTTP/1.1 %d %s" % (error.status, _REASONS.get(error.status, b"Error"))]
    lines += [name + b": " + value for name, value in errorHeaders(error)]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def streamErrorLine(error: ProxyError, family: str, sse: bool) -> bytes:
    """
    The last piece of a stream that failed midway, in the stream's own framing: an NDJSON
    line, or an SSE event (Anthropic streams name it C{event: error}).
    """
    payload = json.dumps(errorPayload(error, family)).encode("utf-8")
    if not sse:
        return payload + b"\n"
    if family == ANTHROPIC:
        return b"event: error\ndata: " + payload + b"\n\n"
    return b"data: " + payload + b"\n\n"
