# -*- test-case-name: tests.test_api -*-
"""
The HTTP front: the route table. Each request is classified (local, aggregated, queued,
routed by model, model management), its caller identified, and handed on: queued requests
to the scheduler and then the relay, aggregated ones to the aggregator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from ollamamq.aggregate import Aggregator
from ollamamq.backends import OLLAMA as OLLAMA_BACKEND
from ollamamq.backends import OPENAI as OPENAI_BACKEND
from ollamamq.backends import Backend, BackendPool, UnknownBackend
from ollamamq.config import Config
from ollamamq.errors import (
    ANTHROPIC,
    OLLAMA,
    OPENAI,
    BadGateway,
    BadRequest,
    BodyTooLarge,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Unavailable,
    errorBody,
    retryAfterHeader,
)
from ollamamq.identity import IdentityResolver
from ollamamq.models import ModelCatalog, Resolution
from ollamamq.relay import (
    BackendUnreachable,
    BodyTooLong,
    Relay,
    requestHeadersForBackend,
)
from ollamamq.scheduler import Job, Lease, Scheduler
from ollamamq.translate.plan import Translator

OLLAMA_ONLY = frozenset({OLLAMA_BACKEND})
ANY_KIND = frozenset({OLLAMA_BACKEND, OPENAI_BACKEND})

# Statuses that mean "this backend cannot serve now" rather than "this is the answer":
# the request fails over to another backend and this one is marked offline until a probe
# finds it working. A 500 is the backend's real answer (a bad prompt, too little memory)
# and is relayed as is.
FAILOVER_STATUSES = frozenset({502, 503, 504})

log = Logger()

# What one backend may answer to a model-management request that goes to several (the
# answers are merged in memory): pull progress is a few hundred kilobytes.
FAN_OUT_LIMIT = 16 * 1024 * 1024

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

JSON = b"application/json; charset=utf-8"


def familyFor(path: bytes) -> str:
    """
    The API family whose error shape a path's caller understands.
    """
    if path.startswith(b"/v1/messages"):
        return ANTHROPIC
    if path.startswith(b"/v1/"):
        return OPENAI
    return OLLAMA


def kindsFor(path: bytes) -> frozenset[str]:
    """
    Backend kinds that serve a path: native C{/api/*} routes need Ollama, the rest any.
    """
    return OLLAMA_ONLY if path.startswith(b"/api/") else ANY_KIND


def _jsonResponse(request: IRequest, payload: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON)
    return json.dumps(payload).encode("utf-8")


def _peerHost(request: IRequest) -> str:
    return getattr(request.getClientAddress(), "host", None) or "local"


def bodyLimitedRequest(maxBodyBytes: int) -> type[Request]:
    """
    A request class for the proxy's L{Site} that refuses a body over C{maxBodyBytes} while
    it arrives, from its declared length or as chunks pile up, instead of after
    twisted.web has spooled all of it to disk. Blob uploads (C{/api/blobs/}, admin only)
    are exempt: model files are gigabytes.
    """

    class BodyLimitedRequest(Request):
        _received = 0
        _refused = False

        def _exempt(self) -> bool:
            return (getattr(self.channel, "_path", b"") or b"").startswith(b"/api/blobs/")

        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            if length is not None and length > maxBodyBytes and not self._exempt():
                self._refuse()

        def handleContentChunk(self, data: bytes) -> None:
            if self._refused:
                return
            self._received += len(data)
            if self._received > maxBodyBytes and not self._exempt():
                self._refuse()
                return
            super().handleContentChunk(data)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            if not self._refused:
                super().requestReceived(command, path, version)

        def _refuse(self) -> None:
            # The request line is parsed but the request object is not set up yet, so,
            # like twisted.web's own _respondToBadRequestAndDisconnect, answer on the
            # transport and hang up rather than read the rest.
            self._refused = True
            path = getattr(self.channel, "_path", b"/") or b"/"
            error = BodyTooLarge(f"request body over {maxBodyBytes} bytes", code="body_too_large")
            body = errorBody(error, familyFor(path))
            self.channel.transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: " + JSON
                + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            self.channel.loseConnection()

    return BodyLimitedRequest


class _CanonicalPaths(Resource):
    """
    Refuses, shaped, paths the router mishandles: those with empty segments
    (C{//api/generate}: the router would merge the slashes and match, while the request
    would be classified and forwarded by its raw path, so it could reach the wrong kind of
    backend) and those that are not UTF-8.
    """

    isLeaf = True

    def __init__(self, router: Any) -> None:
        super().__init__()
        self._router = router

    def render(self, request: IRequest) -> Any:
        error: ProxyError | None = None
        if b"//" in request.path:
            error = NotFound(f"no route for {request.path.decode('latin-1')!r}",
                             code="unknown_route")
        else:
            try:
                unquote_to_bytes(request.path).decode("utf-8")
            except UnicodeDecodeError:
                # The router would answer this with a plain-text 400 and a logged traceback.
                error = BadRequest("the path is not UTF-8", code="invalid_path")
        if error is None:
            return self._router.render(request)
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", JSON)
        return errorBody(error, familyFor(b"/" + request.path.lstrip(b"/")))


@attrs.define
class ProxyAPI:
    """
    The Klein application of the proxy; all collaborators are injected.

    @ivar recheck: called with a backend that just failed a request (it is offline now),
        so that it can be probed again soon.
    """

    config: Config
    pool: BackendPool
    scheduler: Scheduler
    relay: Relay
    identity: IdentityResolver
    catalog: ModelCatalog
    aggregator: Aggregator
    recheck: Callable[[Backend], None] = lambda backend: None
    translator: Translator = attrs.field(
        default=attrs.Factory(lambda self: Translator(self.relay.clock, self.relay), takes_self=True))

    app = Klein()

    def resource(self) -> Any:
        """
        The twisted.web resource serving this API.
        """
        return _CanonicalPaths(self.app.resource())

    # --- errors ---

    @app.handle_errors(ProxyError)
    def _proxyError(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        retry = retryAfterHeader(error)
        if retry is not None:
            request.setHeader(b"retry-after", retry)
        if isinstance(error, MethodNotAllowed):
            request.setHeader(b"allow", ", ".join(error.allowed).encode("ascii"))
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", JSON)
        return errorBody(error, familyFor(request.path))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        # A bug must cost one request a 500, never the daemon or a traceback to the client.
        log.failure("Unexpected error handling {method} {path}", failure,
                    method=request.method, path=request.path)
        return self._proxyError(request, Failure(ProxyError("internal proxy error",
                                                            code="internal_error")))

    # --- local routes ---

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        """
        What Ollama answers, so clients that check for a running server are satisfied.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        """
        Liveness for load balancers: 200 while at least one backend is online, else 503.
        """
        backends = self.pool.backends
        online = sum(b.online for b in backends)
        if online:
            status = "ok" if online == len(backends) else "degraded"
        else:
            status = "starting" if not self.pool.settled else "down"
        payload = {
            "status": status,
            "backends": {"online": online, "total": len(backends)},
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
        }
        return _jsonResponse(request, payload, 200 if online else 503)

    @app.route("/proxy/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        """
        Backends, users and queues, as documented in DESIGN.md section 4.
        """
        payload = {
            "backends": [b.describe() for b in self.pool.backends],
            "users": self.scheduler.snapshot(),
            "blocked_ips": [],
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
        }
        return _jsonResponse(request, payload)

    # --- aggregated over backends, never queued ---

    @app.route("/api/tags", methods=["GET", "HEAD"])
    async def tags(self, request: IRequest) -> bytes:
        """
        The union of every online Ollama backend's models, plus configured aliases.
        """
        return _jsonResponse(request, await self.aggregator.tags())

    @app.route("/api/ps", methods=["GET"])
    async def ps(self, request: IRequest) -> bytes:
        """
        The union of the models loaded on the online Ollama backends.
        """
        return _jsonResponse(request, await self.aggregator.ps())

    @app.route("/api/version", methods=["GET", "HEAD"])
    async def version(self, request: IRequest) -> bytes:
        """
        The lowest backend version: what every request can rely on.
        """
        return _jsonResponse(request, await self.aggregator.version())

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: IRequest) -> bytes:
        """
        The union of the online backends' models, OpenAI-shaped.
        """
        return _jsonResponse(request, await self.aggregator.models())

    @app.route("/v1/models/<path:model>", methods=["GET"])
    async def model(self, request: IRequest, model: str) -> bytes:
        """
        One model, OpenAI-shaped; 404 when no online backend has it.
        """
        return _jsonResponse(request, await self.aggregator.model(model))

    # --- queued: fair-share scheduled, routed by model ---

    @app.route("/api/generate", methods=["POST"])
    @app.route("/api/chat", methods=["POST"])
    @app.route("/api/embed", methods=["POST"])
    @app.route("/api/embeddings", methods=["POST"])
    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/v1/completions", methods=["POST"])
    @app.route("/v1/embeddings", methods=["POST"])
    @app.route("/v1/messages", methods=["POST"])
    @app.route("/v1/messages/count_tokens", methods=["POST"])
    async def queued(self, request: IRequest) -> None:
        """
        A generation or embedding: wait for a fair turn and a slot, then stream.
        """
        raw, body = self._readJSON(request)
        await self._runQueued(request, body, self._resolveModel(body), raw)

    @app.route("/<path:rest>", methods=ALL_METHODS)
    async def other(self, request: IRequest, rest: str) -> None:
        """
        Any other path: proxied (queued, any backend of a fitting kind) with
        C{--allow-all-routes}, else 404.
        """
        if not self.config.allowAllRoutes:
            allowed = self._allowedMethods(request.path)
            if allowed:
                raise MethodNotAllowed(
                    f"{request.method.decode('latin-1')} is not allowed on /{rest}; use "
                    + " or ".join(allowed), allowed)
            raise NotFound(f"no route for {request.method.decode('latin-1')} /{rest}",
                           code="unknown_route")
        raw = self._readBody(request)
        body: dict | None = None
        resolution = None
        if raw:
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                body = parsed
                resolution = self._resolveModel(body)
        await self._runQueued(request, body, resolution, raw=raw)

    def _allowedMethods(self, path: bytes) -> list[str]:
        """
        The methods the route table takes for C{path} (other than the catch-all).
        """
        adapter = self.app.url_map.bind("proxy")
        allowed = []
        for method in ALL_METHODS:
            try:
                endpoint, _ = adapter.match(path.decode("latin-1"), method=method)
            except HTTPException:
                continue
            if endpoint != "other":
                allowed.append(method)
        return allowed

    # --- routed by model, not queued ---

    @app.route("/api/show", methods=["POST"])
    async def show(self, request: IRequest) -> bytes | None:
        """
        Model details, from a backend that has the model, without waiting in a queue:
        an Ollama backend's own answer, else what an OpenAI-only backend says of it.
        """
        raw, body = self._readJSON(request)
        resolution = self._resolveModel(body)
        holders = self.pool.holders(OLLAMA_ONLY, resolution.key)
        if not holders:
            others = self.pool.holders(frozenset({OPENAI_BACKEND}), resolution.key)
            if not others:
                raise self._unavailable(resolution.requested)
            return _jsonResponse(request, await self.aggregator.show(others[0], resolution.requested))
        payload = dict(body, model=holders[0].modelName(resolution.key))
        payload.pop("name", None)
        await self._tryInTurn(request, holders, json.dumps(payload).encode("utf-8"))

    # --- request handling ---

    def _readBody(self, request: IRequest) -> bytes:
        """
        The request body, refused with 413 beyond C{max_body_bytes} (blob uploads exempt,
        see L{bodyLimitedRequest}).
        """
        if request.path.startswith(b"/api/blobs/"):
            return request.content.read()
        limit = self.config.maxBodyBytes
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes", code="body_too_large")
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes", code="body_too_large")
        return raw

    def _readJSON(self, request: IRequest) -> tuple[bytes, dict]:
        """
        The request body, raw and parsed as a JSON object.
        """
        raw = self._readBody(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            # RecursionError: nesting deeper than the parser's stack (a hostile body).
            raise BadRequest(f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        return raw, body

    def _resolveModel(self, body: dict) -> Resolution:
        """
        The model a request names, resolved; 404 when no backend has ever listed it.
        """
        # Ollama's older clients send "name" instead of "model" on some routes.
        requested = body.get("model", body.get("name"))
        if not isinstance(requested, str) or not requested.strip():
            raise BadRequest("missing model: set \"model\" in the request body", code="missing_model")
        resolution = self.catalog.resolve(requested)
        if not self.pool.knows(resolution.key):
            if self.pool.settled:
                raise NotFound(f"model {requested!r} not found on any backend", code="model_not_found")
            raise Unavailable(
                f"model {requested!r} not known yet: backends are starting",
                code="backends_starting",
                retryAfter=self.config.healthInterval,
            )
        return resolution

    def _unavailable(self, requested: str) -> Unavailable:
        return Unavailable(
            f"no backend online for model {requested!r}",
            code="no_backend",
            retryAfter=self.config.healthInterval,
        )

    def _backendHeaders(self, request: IRequest) -> Headers:
        """
        The client's headers for a backend, less the proxy's own credentials and controls.
        """
        drop = {b"x-admin-key", b"x-backend"}
        for name in (b"authorization", b"x-api-key"):
            # Every value counts: a repeated header must not smuggle a key through.
            values = request.requestHeaders.getRawHeaders(name, [])
            if any(self.identity.isProxyCredential(v.decode("latin-1")) for v in values):
                drop.add(name)
        return requestHeadersForBackend(request.requestHeaders, frozenset(drop))

    def _bodyFor(self, backend: Backend, body: dict | None, resolution: Resolution | None,
                 path: bytes, raw: bytes | None) -> bytes | None:
        """
        The body to send C{backend}: model rules applied and the model spelled as that
        backend spells it; the client's own bytes when nothing changed.
        """
        if body is None or resolution is None:
            return raw
        family = OLLAMA if path.startswith(b"/api/") else OPENAI
        rewritten = self._rewritten(backend, body, resolution, path)
        if rewritten == body and raw is not None:
            return raw
        return json.dumps(rewritten).encode("utf-8")

    def _rewritten(self, backend: Backend | None, body: dict, resolution: Resolution,
                   path: bytes) -> dict:
        """
        C{body} with the model rules applied and the model spelled as C{backend} spells
        it (as the client spelled it without a backend).
        """
        family = OLLAMA if path.startswith(b"/api/") else OPENAI
        rewritten = self.catalog.rewrite(body, resolution, family)
        if backend is not None:
            spelled = backend.modelName(resolution.key)
            if rewritten.get("model") != spelled:
                rewritten = dict(rewritten, model=spelled)
        return rewritten

    async def _runQueued(
        self,
        request: IRequest,
        body: dict | None,
        resolution: Resolution | None,
        raw: bytes | None = None,
    ) -> None:
        """
        Queue the request for its user, then relay it to the backend it is granted,
        failing over to another while a backend fails before answering.
        """
        path = request.path
        model = resolution.key if resolution is not None else None
        who = self.identity.identify(request.requestHeaders, _peerHost(request))
        kinds = self.translator.kindsFor(path, model, self.pool)
        if kinds != kindsFor(path) and body is not None and resolution is not None:
            # It may be translated: refuse what cannot be before it waits in a queue, and
            # answer what needs no backend (loading a model) at once.
            translation = self.translator.translate(
                path, self._rewritten(None, body, resolution, path), resolution.requested)
            if translation.local is not None:
                request.write(self.translator.answerLocally(request, translation))
                return
        job = Job(user=who.user, kinds=kinds, model=model)
        headers = self._backendHeaders(request)
        lease: Lease = await self.scheduler.enqueue(job)
        try:
            while True:
                if body is not None and resolution is not None and \
                        self.translator.needed(path, lease.backend):
                    translation = self.translator.translate(
                        path, self._rewritten(lease.backend, body, resolution, path),
                        resolution.requested)
                    if translation.local is not None:
                        request.write(self.translator.answerLocally(request, translation))
                        return
                    response = await self._open(request, lease.backend, headers,
                                                translation.encodedBody(), translation.path)
                    if response is not None:
                        await self.translator.respond(request, response, translation)
                        return
                else:
                    data = self._bodyFor(lease.backend, body, resolution, path, raw)
                    response = await self._open(request, lease.backend, headers, data)
                    if response is not None:
                        if body is not None and self.translator.lacksMessages(
                                path, lease.backend, response):
                            # No Messages route there: send it again, as chat completions.
                            self.relay.discard(response)
                            continue
                        await self.relay.stream(request, response, familyFor(path))
                        return
                failed = lease.backend
                try:
                    lease = await lease.retry()
                except BadGateway as e:
                    raise BadGateway(f"{e.message} ({failed.error})", code=e.code) from None
        finally:
            lease.release()

    async def _open(
        self, request: IRequest, backend: Backend, headers: Headers, data: bytes | None,
        uri: bytes | None = None,
    ) -> IResponse | None:
        """
        Send the request to C{backend} (at C{uri}, by default the client's). L{None} when
        the backend failed before answering (refused, dropped, or 502/503/504): it is then
        marked offline until a probe finds it working, and the caller fails over.
        """
        try:
            response = await self.relay.open(backend, request.method, uri or request.uri,
                                             headers, data)
        except BackendUnreachable as e:
            reason = str(e)
        else:
            if response.code not in FAILOVER_STATUSES:
                return response
            self.relay.discard(response)
            reason = f"backend {backend.name} answered {response.code}"
        log.warn("{reason}; marking it offline and failing over", reason=reason)
        self.pool.markOffline(backend, reason)
        # Probe it again soon rather than a whole interval later: a restart is brief.
        self.recheck(backend)
        return None

    async def _tryInTurn(self, request: IRequest, backends: list[Backend], data: bytes) -> None:
        """
        Send an unqueued request to the first of C{backends} that answers, failing over.
        """
        headers = self._backendHeaders(request)
        for backend in backends:
            response = await self._open(request, backend, headers, data)
            if response is not None:
                await self.relay.stream(request, response, familyFor(request.path))
                return
        reasons = "; ".join(b.error or b.name for b in backends)
        raise BadGateway(f"no backend could answer: {reasons}", code="backend_failed")

    # --- model management: one named backend, or every online Ollama backend ---

    @app.route("/api/pull", methods=["POST"])
    @app.route("/api/push", methods=["POST"])
    @app.route("/api/create", methods=["POST"])
    @app.route("/api/copy", methods=["POST"])
    @app.route("/api/delete", methods=["DELETE"])
    @app.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
    async def manage(self, request: IRequest, digest: str | None = None) -> bytes | None:
        """
        Model management goes to the backend named in C{X-Backend}, or to every online
        Ollama backend at once (so a pulled model is everywhere). A single target streams
        as usual. Several targets run concurrently and are answered when all are done: each
        backend's NDJSON lines tagged with C{"backend"}, or for C{"stream": false}
        C{{"status", "backends": {name: last answer}}}; the HTTP status is the worst.
        """
        self._checkAdmin(request)
        data = self._readBody(request)
        named = request.getHeader(b"x-backend")
        if named is not None:
            try:
                target = self.pool.get(named.decode("utf-8", "replace"))
            except UnknownBackend:
                raise NotFound(f"no backend named {named.decode('utf-8', 'replace')!r}",
                               code="unknown_backend") from None
            await self._tryInTurn(request, [target], data)
            return None
        targets = [b for b in self.pool.backends if b.available and b.kind == OLLAMA_BACKEND]
        if not targets:
            raise Unavailable("no Ollama backend online", code="no_backend",
                              retryAfter=self.config.healthInterval)
        if len(targets) == 1:
            await self._tryInTurn(request, targets, data)
            return None
        return await self._fanOut(request, targets, data)

    def _checkAdmin(self, request: IRequest) -> None:
        key = self.config.adminKey
        if key is None:
            return
        given = [v.decode("latin-1").strip()
                 for v in request.requestHeaders.getRawHeaders(b"x-admin-key", [])]
        for auth in request.requestHeaders.getRawHeaders(b"authorization", []):
            scheme, _, credential = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                given.append(credential.strip())
        if key not in given:
            raise Forbidden("this route needs the admin key", code="admin_only")

    async def _fanOut(self, request: IRequest, targets: list[Backend], data: bytes) -> bytes:
        headers = self._backendHeaders(request)

        async def one(backend: Backend) -> tuple[int, bytes]:
            try:
                response = await self.relay.open(backend, request.method, request.uri, headers, data)
                return response.code, await self.relay.collect(response, FAN_OUT_LIMIT)
            except (BackendUnreachable, BodyTooLong, ResponseFailed) as e:
                return 502, json.dumps({"error": f"backend {backend.name}: {e}"}).encode()

        results = await DeferredList(
            [ensureDeferred(one(b)) for b in targets], consumeErrors=True
        )
        if request.finished or getattr(request, "_disconnected", False):
            # The client left: cancelling the list cancelled every backend call.
            raise CancelledError()
        answers = {}
        worst = 200
        lines = []
        for backend, (ok, result) in zip(targets, results):
            code, content = result if ok else (502, b"")
            worst = max(worst, code)
            decoded = []
            for line in content.splitlines():
                try:
                    decoded.append(json.loads(line))
                except (ValueError, RecursionError):
                    pass
            answers[backend.name] = decoded[-1] if decoded else {"status": code}
            lines.extend(dict(item, backend=backend.name) for item in decoded if isinstance(item, dict))
        request.setResponseCode(worst)
        if request.method == b"HEAD":
            return b""
        streamed = True
        try:
            streamed = json.loads(data or b"{}").get("stream", True) is not False
        except (ValueError, RecursionError, AttributeError):
            pass
        if streamed and lines:
            request.setHeader(b"content-type", b"application/x-ndjson")
            return b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        status = "success" if worst < 300 else "error"
        return _jsonResponse(request, {"status": status, "backends": answers}, worst)

