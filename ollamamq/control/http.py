# -*- test-case-name: tests.test_control_http -*-
"""
The admin HTTP API: the operator actions of L{ollamamq.control.actions} under
C{/proxy/...}, as a Klein app of its own that L{ollamamq.api} mounts at C{/proxy/}
(routes here are relative to that mount).

Access
======

Writes, the queue listing and the event stream need the admin key when one is configured
(C{[server] admin_key}): C{Authorization: Bearer KEY} or C{X-Admin-Key: KEY}, compared in
constant time; without it (or with a wrong one) the answer is a 401 with
C{WWW-Authenticate: Bearer}. With no admin key configured they are taken from loopback
peers only (the TCP peer, never C{X-Forwarded-For}): anyone else gets a 403. C{GET
/proxy/queue/me} (the caller's own requests) needs nothing.

Answers are JSON; errors are C{{"error": message, "code": code}}, with C{"field"} naming
the offending field of a 400.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from ollamamq.control.actions import ControlActions
from ollamamq.control.amp import (
    ControlError,
    DuplicateBackend,
    InvalidValue,
    ReloadFailed,
    UnknownAddress,
    UnknownBackend,
    UnknownRequest,
    UnknownUser,
)
from ollamamq.control.events import EventHub
from ollamamq.identity import IdentityResolver
from ollamamq.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Unauthorized,
    errorHeaders,
)

log = Logger()

JSON = b"application/json; charset=utf-8"

MAX_ADMIN_BODY = 64 * 1024
"""
The largest admin request body read (a policy is a few dozen bytes).
"""

SSE_BUFFER_LIMIT = 256
"""
Events an SSE client may be behind (its connection paused by backpressure) before the
rest are only counted and announced with one C{events.dropped}.
"""

USER_BODY = {"priority", "weight", "max_queued", "blocked"}
BACKEND_BODY = {"url", "name", "slots"}


class Conflict(ProxyError):
    """
    The name is taken.
    """

    status = 409
    openaiType = anthropicType = "invalid_request_error"


_STATUS_FOR = {
    InvalidValue: (BadRequest, "invalid_value"),
    ReloadFailed: (BadRequest, "reload_failed"),
    UnknownUser: (NotFound, "unknown_user"),
    UnknownBackend: (NotFound, "unknown_backend"),
    UnknownRequest: (NotFound, "unknown_request"),
    UnknownAddress: (NotFound, "unknown_address"),
    DuplicateBackend: (Conflict, "duplicate_backend"),
}


def _isLoopback(host: str | None) -> bool:
    """
    Whether a TCP peer address is a loopback address (IPv4-mapped included).
    """
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _SSEClient:
    """
    One C{GET /proxy/events} client: a hub subscriber that writes events to the response
    and a push producer the connection pauses when the client reads slowly.
    """

    def __init__(self, request: IRequest, hub: EventHub) -> None:
        self._request = request
        self._hub = hub
        self._paused = False
        self._dropped = 0
        self._closed = False
        self.done: Deferred[None] = Deferred(self._cancel)

    def start(self) -> None:
        request = self._request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        # Push producer: the channel pauses us when the socket's buffer is full.
        request.registerProducer(self, True)
        request.write(b": connected\n\n")
        self._hub.subscribe(self)

    def event(self, name: str, payload: dict) -> None:
        if self._closed:
            return
        if self._paused:
            # The client does not read: count, keep nothing.
            self._dropped += 1
            return
        self._write(name, payload)

    def _write(self, name: str, payload: dict) -> None:
        data = json.dumps(payload, separators=(",", ":"))
        self._request.write(f"event: {name}\ndata: {data}\n\n".encode("utf-8"))

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._dropped and not self._closed:
            count, self._dropped = self._dropped, 0
            self._write("events.dropped", {"count": count})

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.unsubscribe(self)

    def _cancel(self, d: Deferred[None]) -> None:
        # The client went away (Klein cancels the route's Deferred).
        self._close()
        if self._request.channel is not None:
            self._request.unregisterProducer()


@attrs.define
class AdminAPI:
    """
    The admin routes on the operator actions.

    @ivar config: supplies the admin key; read at each request, so a reload applies.
    @ivar identify: C{(headers, peerHost) -> user}, for C{/proxy/queue/me}.
    @ivar isAdmin: C{headers -> bool}, whether a request carries the admin key: the
        daemon's one admin-key check (L{ollamamq.identity.IdentityResolver.isAdmin}, kept
        current across reloads); by default one made from the actions' config.
    """

    actions: ControlActions
    hub: EventHub
    identify: Any = None
    isAdmin: Any = None

    app = Klein()

    def resource(self) -> Any:
        """
        The twisted.web resource serving these routes.
        """
        return self.app.resource()

    # --- errors ---

    @app.handle_errors(ProxyError)
    def _proxyError(self, request: IRequest, failure: Failure) -> bytes:
        return self._answerError(request, failure.value)

    @app.handle_errors(ControlError)
    def _controlError(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        cls, code = _STATUS_FOR.get(type(error), (ProxyError, "internal_error"))
        field = None
        if isinstance(error, InvalidValue):
            field = str(error).split(":", 1)[0]
        return self._answerError(request, cls(str(error), code=code), field)

    @app.handle_errors(WerkzeugNotFound)
    def _notFound(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("latin-1")
        return self._answerError(request, NotFound(f"no route for {path}", code="unknown_route"))

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def _wrongMethod(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or [])
        method = request.method.decode("latin-1")
        return self._answerError(
            request,
            MethodNotAllowed(f"{method} is not allowed on {request.path.decode('latin-1')}",
                             allowed),
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""
        log.failure("Unexpected error handling {method} {path}", failure,
                    method=request.method, path=request.path)
        return self._answerError(request, ProxyError("internal proxy error", code="internal_error"))

    def _answerError(self, request: IRequest, error: ProxyError, field: str | None = None) -> bytes:
        request.setResponseCode(error.status)
        for name, value in errorHeaders(error):
            request.setHeader(name, value)
        if isinstance(error, Unauthorized):
            request.setHeader(b"www-authenticate", b'Bearer realm="ollamamq admin"')
        payload: dict[str, Any] = {"error": error.message, "code": error.code}
        if field is not None:
            payload["field"] = field
        return json.dumps(payload).encode("utf-8")

    # --- helpers ---

    def _authorize(self, request: IRequest) -> None:
        """
        Let an admin request through, or raise: 401 without the right key when one is
        configured, 403 from a non-loopback peer when none is.
        """
        key = self.actions.config.adminKey
        if key is None:
            host = getattr(request.getClientAddress(), "host", None)
            if not _isLoopback(host):
                raise Forbidden(
                    "no admin_key is configured: admin requests are taken from loopback only",
                    code="admin_loopback_only",
                )
            return
        headers = request.requestHeaders
        presented = headers.hasHeader(b"x-admin-key") or headers.hasHeader(b"authorization")
        isAdmin = self.isAdmin
        if isAdmin is None:
            isAdmin = IdentityResolver(self.actions.config).isAdmin
        if not isAdmin(headers):
            raise Unauthorized(
                "this route needs the admin key (Authorization: Bearer or X-Admin-Key)"
                if not presented else "wrong admin key",
                code="admin_key_required" if not presented else "admin_key_invalid",
            )

    def _body(self, request: IRequest, allowed: set[str]) -> dict:
        """
        The request's JSON object body (empty allowed), with only C{allowed} fields.

        @raise BadRequest: for a body that is not a JSON object, or unknown fields.
        """
        raw = request.content.read(MAX_ADMIN_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_ADMIN_BODY:
            raise BadRequest(f"body: larger than {MAX_ADMIN_BODY} bytes", code="invalid_body")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("body: not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("body: expected a JSON object", code="invalid_body")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidValue(
                f"{unknown[0]}: unknown field (known: {', '.join(sorted(allowed))})"
            )
        return body

    def _json(self, request: IRequest, payload: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", JSON)
        return json.dumps(payload).encode("utf-8")

    # --- routes ---

    @app.route("/queue", methods=["GET"])
    def queue(self, request: IRequest) -> bytes:
        """
        Every queued request in predicted dispatch order; C{?user=ID} keeps one user's.
        """
        self._authorize(request)
        users = request.args.get(b"user")
        user = users[0].decode("utf-8", "replace") if users else None
        requests = self.actions.queue(user)
        return self._json(request, {"requests": requests, "total": len(requests)})

    @app.route("/queue/me", methods=["GET"])
    def queueMine(self, request: IRequest) -> bytes:
        """
        The caller's own queued requests (identified as for a proxied request).
        """
        host = getattr(request.getClientAddress(), "host", None) or "local"
        user = self.identify(request.requestHeaders, host) if self.identify else host
        requests = self.actions.queue(user)
        return self._json(request, {"user": user, "requests": requests, "total": len(requests)})

    @app.route("/users/<user>", methods=["PUT"])
    async def putUser(self, request: IRequest, user: str) -> bytes:
        """
        Set any of C{priority}, C{weight}, C{max_queued} (0 or null: back to the config's),
        C{blocked}.
        """
        self._authorize(request)
        body = self._body(request, USER_BODY)
        fields: dict[str, Any] = {}
        for name, key in (("priority", "priority"), ("weight", "weight"),
                          ("max_queued", "maxQueued"), ("blocked", "blocked")):
            if name in body:
                value = body[name]
                if value is None and name != "max_queued":
                    raise InvalidValue(f"{name}: must not be null")
                fields[key] = value
        entry = await self.actions.setUser(user, **fields)
        return self._json(request, entry)

    @app.route("/users/<user>", methods=["DELETE"])
    async def deleteUser(self, request: IRequest, user: str) -> bytes:
        """
        Drop the user's runtime policy: the config's values apply again.
        """
        self._authorize(request)
        return self._json(request, await self.actions.clearUser(user))

    @app.route("/ips/<path:address>", methods=["PUT"])
    async def putAddress(self, request: IRequest, address: str) -> bytes:
        """
        Block an address or CIDR range (C{/proxy/ips/10.1.0.0/16}).
        """
        self._authorize(request)
        self._body(request, set())
        return self._json(request, await self.actions.blockAddress(address))

    @app.route("/ips/<path:address>", methods=["DELETE"])
    async def deleteAddress(self, request: IRequest, address: str) -> bytes:
        """
        Lift a block.
        """
        self._authorize(request)
        return self._json(request, {"address": await self.actions.unblockAddress(address)})

    @app.route("/backends", methods=["POST"])
    async def postBackend(self, request: IRequest) -> bytes:
        """
        Add a backend: C{{"url", "name"?, "slots"?}}.
        """
        self._authorize(request)
        body = self._body(request, BACKEND_BODY)
        if "url" not in body:
            raise InvalidValue("url: required")
        entry = await self.actions.addBackend(body["url"], body.get("name"), body.get("slots"))
        return self._json(request, entry, 201)

    @app.route("/backends/<name>", methods=["DELETE"])
    async def deleteBackend(self, request: IRequest, name: str) -> bytes:
        """
        Remove a backend; its running requests finish.
        """
        self._authorize(request)
        return self._json(request, {"name": await self.actions.removeBackend(name)})

    @app.route("/backends/<name>", methods=["PATCH"])
    async def patchBackend(self, request: IRequest, name: str) -> bytes:
        """
        Set a backend's C{slots}.
        """
        self._authorize(request)
        body = self._body(request, {"slots"})
        if "slots" not in body:
            raise InvalidValue("slots: required")
        return self._json(request, await self.actions.setSlots(name, body["slots"]))

    @app.route("/backends/<name>/drain", methods=["POST"])
    async def drain(self, request: IRequest, name: str) -> bytes:
        """
        Drain a backend: nothing new, running requests finish.
        """
        self._authorize(request)
        return self._json(request, await self.actions.drainBackend(name, True))

    @app.route("/backends/<name>/undrain", methods=["POST"])
    async def undrain(self, request: IRequest, name: str) -> bytes:
        """
        Undo a drain.
        """
        self._authorize(request)
        return self._json(request, await self.actions.drainBackend(name, False))

    @app.route("/requests/<requestId>", methods=["DELETE"])
    def deleteRequest(self, request: IRequest, requestId: str) -> bytes:
        """
        Cancel a queued request; its client gets a 503.
        """
        self._authorize(request)
        return self._json(request, {"id": self.actions.cancelRequest(requestId)})

    @app.route("/reload", methods=["POST"])
    def reload(self, request: IRequest) -> bytes:
        """
        Re-read the config file; 400 with the reason when it is invalid (nothing changed).
        """
        self._authorize(request)
        return self._json(request, {"changes": self.actions.reload()})

    @app.route("/events", methods=["GET"])
    async def events(self, request: IRequest) -> None:
        """
        The event stream as Server-Sent Events: C{event: NAME} and C{data: JSON} per event
        (names and payloads as on the control socket).
        """
        self._authorize(request)
        client = _SSEClient(request, self.hub)
        client.start()
        await client.done
