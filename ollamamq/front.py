# -*- test-case-name: tests.test_front -*-
"""
The HTTP front's own rules, checked before anything else sees a request: the request
target, the method, and the size of the body.

They are checked twice over, by one function (L{FrontRules.check}):

  - when the request's headers have arrived, before any body byte is accepted, by the
    request class of the proxy's L{Site} (L{FrontRules.requestFactory}): a refused request
    is answered on the spot and the connection closed, so nobody can make the daemon
    spool a body it will refuse, or hold a connection open sending one;
  - again when the request is rendered (L{FrontResource}), so the route table only ever
    sees valid requests whatever L{Site} serves it (tests use treq's own).

Request targets. Only the origin form (C{/path?query}, RFC 9112 section 3.2.1) is taken:
the absolute form (C{http://host/path}), the authority form and C{*} are for proxies and
servers we are not, and a target without its leading slash would be glued onto a backend's
base URL (C{http://10.0.0.5} + C{0/api/...} is C{http://10.0.0.50/api/...}). The path may
hold only the characters RFC 3986 allows there, no empty segment (C{//}, which the router
would merge while the request went out by its raw path) and, decoded, must be UTF-8.

Methods. A method outside L{KNOWN_METHODS} gets 405 with C{Allow} on a path the route table
knows, and 501 elsewhere; neither reaches the router, whose own 405 is an exception.

Bodies. A body over C{max_body_bytes} is refused with 413 from its declared length, or as
it arrives when chunked. Blob uploads (C{/api/blobs/...}) have their own larger limit,
C{max_blob_bytes}, and need the admin key, checked here, before the gigabytes arrive.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from ollamamq.backends import ANTHROPIC_API, OLLAMA_API, OPENAI_API
from ollamamq.errors import (
    ANTHROPIC,
    OLLAMA,
    OPENAI,
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    NotImplementedMethod,
    ProxyError,
    errorResponse,
)

#: The methods the route table takes anywhere. Anything else is refused here.
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

#: Where blob uploads go (admin only, their own size limit).
BLOB_PREFIX = b"/api/blobs/"

# RFC 3986: a path is "/"-separated pchars (unreserved, pct-encoded, sub-delims, ":", "@");
# a query is pchars, "/" and "?".
_PCHAR = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_ORIGIN_FORM = re.compile(rb"(/" + _PCHAR + rb"*)+(\?(?:" + _PCHAR + rb"|[/?])*)?")


def familyFor(path: bytes) -> str:
    """
    The API family whose error shape a path's caller understands: the one place that maps
    paths to families.
    """
    if path.startswith(b"/v1/messages"):
        return ANTHROPIC
    if path.startswith(b"/v1/"):
        return OPENAI
    return OLLAMA


def dialectsFor(path: bytes) -> frozenset[str]:
    """
    The wire dialects a backend must speak to serve a path as it is: native C{/api/*}
    routes need Ollama's, C{/v1/messages} Anthropic's, the rest of C{/v1/*} OpenAI's; any
    other path (C{--allow-all-routes}) goes to a backend of any dialect.
    """
    if path.startswith(b"/api/"):
        return frozenset({OLLAMA_API})
    if path.startswith(b"/v1/messages"):
        return frozenset({ANTHROPIC_API})
    if path.startswith(b"/v1/"):
        return frozenset({OPENAI_API})
    return frozenset({OLLAMA_API, OPENAI_API})


def wrongMethod(method: bytes, path: bytes, allowed: list[str]) -> MethodNotAllowed:
    """
    The 405 for a path asked with a method it does not take: the one wording of it.
    """
    return MethodNotAllowed(
        f"{method.decode('latin-1')} is not allowed on {path.decode('latin-1')}; use "
        + " or ".join(allowed), allowed)


def checkTarget(target: bytes) -> ProxyError | None:
    """
    Whether a request target is one the proxy serves (see the module docstring).

    @return: the error to answer, or L{None} when the target is fine.
    """
    if not _ORIGIN_FORM.fullmatch(target):
        if target.startswith(b"/") and b"//" not in target.split(b"?", 1)[0]:
            return BadRequest("the request target has characters a URL may not have",
                              code="invalid_target")
        if not target.startswith(b"/"):
            return BadRequest("the request target must be a path starting with /",
                              code="invalid_target")
    path = target.split(b"?", 1)[0]
    if b"//" in path:
        return NotFound(f"no route for {path.decode('latin-1')!r}", code="unknown_route")
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return BadRequest("the path is not UTF-8", code="invalid_path")
    return None


@attrs.frozen
class FrontRules:
    """
    The front's limits and the few facts about routes it needs.

    @ivar maxBodyBytes: the largest body of any request but a blob upload.
    @ivar maxBlobBytes: the largest blob upload.
    @ivar allowedMethods: the methods the route table takes for a path (empty when it does
        not know the path).
    @ivar adminError: the error for a request that lacks the admin key (L{None} when it
        has it, or when no admin key is configured); asked for blob uploads.
    """

    maxBodyBytes: int
    maxBlobBytes: int
    allowedMethods: Callable[[bytes], list[str]] = lambda path: []
    adminError: Callable[[Headers], ProxyError | None] = lambda headers: None

    def limitFor(self, path: bytes) -> int:
        """
        The body limit of a path.
        """
        return self.maxBlobBytes if path.startswith(BLOB_PREFIX) else self.maxBodyBytes

    def check(self, method: bytes, target: bytes, headers: Headers,
              length: int | None) -> ProxyError | None:
        """
        Every rule of the front for one request, in the order a client would want to hear
        about them.

        @param length: the declared body length, or L{None} when unknown (chunked).
        @return: the error to answer, or L{None} to go on.
        """
        error = checkTarget(target)
        if error is not None:
            return error
        path = target.split(b"?", 1)[0]
        name = method.decode("latin-1")
        if name not in KNOWN_METHODS:
            allowed = self.allowedMethods(path)
            if allowed:
                return wrongMethod(method, path, allowed)
            return NotImplementedMethod(f"method {name} is not supported",
                                        code="method_not_implemented")
        if path.startswith(BLOB_PREFIX):
            error = self.adminError(headers)
            if error is not None:
                return error
        limit = self.limitFor(path)
        if length is not None and length > limit:
            return self.tooLarge(path)
        return None

    def tooLarge(self, path: bytes) -> BodyTooLarge:
        """
        The 413 for a body over C{path}'s limit.
        """
        return BodyTooLarge(f"request body over {self.limitFor(path)} bytes",
                            code="body_too_large")

    def requestFactory(self) -> type[Request]:
        """
        A request class for the proxy's L{Site} that applies these rules when the headers
        have arrived and while the body arrives (see the module docstring).
        """
        rules = self

        class FrontRequest(Request):
            _received = 0
            _refused = False

            def gotLength(self, length: int | None) -> None:
                super().gotLength(length)
                channel = self.channel
                method = getattr(channel, "_command", b"GET")
                target = getattr(channel, "_path", b"/")
                error = rules.check(method, target, self.requestHeaders, length)
                if error is not None:
                    self._refuse(error, target)
                elif target.startswith(BLOB_PREFIX):
                    # Spool blobs to a file with a name, so each backend a blob goes to
                    # can read it with a file of its own (ollamamq.api), never in memory.
                    self.content = tempfile.NamedTemporaryFile(prefix="ollamamq-blob-")

            def handleContentChunk(self, data: bytes) -> None:
                if self._refused:
                    return
                self._received += len(data)
                target = getattr(self.channel, "_path", b"/") or b"/"
                path = target.split(b"?", 1)[0]
                if self._received > rules.limitFor(path):
                    self._refuse(rules.tooLarge(path), target)
                    return
                super().handleContentChunk(data)

            def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
                if not self._refused:
                    super().requestReceived(command, path, version)

            def _refuse(self, error: ProxyError, target: bytes) -> None:
                # The request is not set up for rendering yet, so, like twisted.web's own
                # _respondToBadRequestAndDisconnect, answer on the transport and hang up
                # rather than read (or spool) the rest.
                self._refused = True
                path = target.split(b"?", 1)[0]
                self.channel.transport.write(errorResponse(error, familyFor(path)))
                self.channel.loseConnection()

        return FrontRequest


class FrontResource(Resource):
    """
    The proxy's root resource: L{FrontRules.check} again, then the route table.
    """

    isLeaf = True

    def __init__(self, router: Any, rules: FrontRules, answer: Callable[..., bytes]) -> None:
        """
        @param router: the route table's resource.
        @param answer: writes a L{ProxyError} as the response to a request and returns the
            body (the route table's own error writer, so both answer alike).
        """
        super().__init__()
        self._router = router
        self._rules = rules
        self._answer = answer

    def render(self, request: IRequest) -> Any:
        declared = request.getHeader(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        error = self._rules.check(request.method, request.uri, request.requestHeaders, length)
        if error is None:
            return self._router.render(request)
        return self._answer(request, error)
